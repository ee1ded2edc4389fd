"""Typed settings declared in one place: `Spec` holds a setting's type, default, help and allowed values,
and turns command-line text into a checked value.

Config fields (`jdiff.config`) and sampler options (`jdiff.sampling`) are both declared with it, so the CLIs
derive their flags, help and errors from the declarations. Errors are `ValueError`s that name the setting
and what it allows, in one line.
"""

import ast
import dataclasses
import json
import math
import types
import typing
from typing import Any, Callable, Optional, Sequence, Union

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_TYPES = (bool, int, float, str, tuple, dict)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One setting.

    kind: bool, int, float, str, tuple (of literals, such as (1, 2, 2)) or dict (JSON object on the command
      line).
    optional: None is allowed (spelt none/null on the command line).
    choices: allowed values (a tuple, or a function returning one, for registries filled at import).
    ge/gt/le/lt: numeric bounds. static: a sampler option that fixes the compiled program (a change
    recompiles); traced options never do.
    """

    kind: type
    default: Any
    help: str
    optional: bool = False
    choices: Union[Sequence[Any], Callable[[], Sequence[Any]], None] = None
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    static: bool = False

    def __post_init__(self):
        if self.kind not in _TYPES:
            raise TypeError(f"Spec kind must be one of {[t.__name__ for t in _TYPES]}, got {self.kind!r}")

    def allowed(self) -> Optional[tuple]:
        c = self.choices() if callable(self.choices) else self.choices
        return None if c is None else tuple(c)

    def describe(self) -> str:
        """What values are allowed, e.g. 'int >= 1', 'one of linear, cosine', 'float in [0, 1)'."""
        allowed = self.allowed()
        if allowed is not None:
            text = "one of " + ", ".join(map(str, allowed))
        else:
            text = "a JSON object" if self.kind is dict else self.kind.__name__
            lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
            hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
            if lo and hi:
                text += f" in {lo}, {hi}"
            elif lo:
                text += (" >= " if lo[0] == "[" else " > ") + lo[1:]
            elif hi:
                text += (" <= " if hi[-1] == "]" else " < ") + hi[:-1]
        return text + (" or none" if self.optional else "")

    def summary(self) -> str:
        """One line for --help: 'help; allowed values, default X'."""
        return f"{self.help}; {self.describe()}, default {self.default}"

    def parse(self, name: str, text: Any) -> Any:
        """`text` (command-line string, or an already typed value such as JSON gives) -> checked value."""
        if isinstance(text, str):
            value = self._from_text(name, text)
        else:
            value = _tupleize(text)
        if isinstance(value, dict):
            value = {k: _tupleize(v) for k, v in value.items()}
        return self.check(name, value)

    def _from_text(self, name: str, text: str) -> Any:
        t = text.strip()
        if self.optional and t.lower() in ("none", "null"):
            return None
        try:
            if self.kind is bool:
                if t.lower() in _TRUE:
                    return True
                if t.lower() in _FALSE:
                    return False
                raise ValueError
            if self.kind is int:
                f = float(t)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            if self.kind is float:
                return float(t)
            if self.kind is dict:
                return json.loads(t)
            if self.kind is tuple:
                v = ast.literal_eval(t)
                return _tupleize(list(v) if isinstance(v, (list, tuple)) else [v])
            return t
        except (ValueError, SyntaxError, TypeError, OverflowError):  # json.JSONDecodeError is a ValueError
            raise ValueError(f"bad value {text!r} for {name}: expected {self.describe()}") from None

    def check(self, name: str, value: Any) -> Any:
        """Returns `value` (ints widened to float for float settings) or raises ValueError."""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"{name} must not be none; allowed: {self.describe()}")
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, self.kind) and not (self.kind in (int, float) and isinstance(value, bool))
        if not ok:
            raise ValueError(f"bad value {value!r} for {name}: expected {self.describe()}")
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            raise ValueError(f"bad value {value!r} for {name}; allowed: {', '.join(map(str, allowed))}")
        if self.kind in (int, float):
            if self.kind is float and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            bad = (
                (self.ge is not None and not value >= self.ge)
                or (self.gt is not None and not value > self.gt)
                or (self.le is not None and not value <= self.le)
                or (self.lt is not None and not value < self.lt)
            )
            if bad:
                raise ValueError(f"{name} must be {self.describe().split(' ', 1)[1]}, got {value}")
        return value


def _num(x: float) -> str:
    """A bound as written: 4294967295, 0.5, 1e-08."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _tupleize(v: Any) -> Any:
    """Lists -> tuples, recursively (module fields and static arguments must be hashable)."""
    if isinstance(v, (list, tuple)):
        return tuple(_tupleize(x) for x in v)
    return v


def spec_of_annotation(annotation: Any) -> tuple[type, bool]:
    """(kind, optional) of a runtime annotation such as int, Optional[float] or tuple[int, ...]."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is tuple:
        annotation = tuple
    return annotation, optional


def literal(text: Any) -> Any:
    """A value whose type is not declared (e.g. a model field): a Python literal (64, 0.1, (1, 2), true,
    none) or, failing that, the bare string."""
    if not isinstance(text, str):
        return _tupleize(text)
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return _tupleize(ast.literal_eval(t))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return t
