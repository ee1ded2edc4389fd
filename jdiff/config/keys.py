"""Config keys and overrides: every field has one key, its dotted path (`optim.lr`, `sampling.steps`);
`model.FIELD` sets a field of the model and `sampling.OPTION` an option of the preview sampler.
`apply_overrides(config, [(key, value)])` parses values with each field's Spec and builds a new (checked)
config; `to_dict` / `from_dict` are the JSON form of config.json.
"""

import dataclasses
import difflib
import json
from typing import Any, Iterable, Mapping, NamedTuple, Optional

from jdiff.config.schema import SECTIONS, ConfigError, TrainConfig, field_spec
from jdiff.spec import Spec, literal

MODEL_FIELDS, SAMPLER_OPTIONS = "model.fields", "sampling.options"  # keys whose entries come from registries


class Key(NamedTuple):
    """A declared config field: its dotted path, Spec, and whether resume must keep it."""

    path: str
    spec: Spec
    fixed: bool


def _declared() -> dict[str, Key]:
    keys = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            path = f"{section}.{f.name}"
            keys[path] = Key(path, field_spec(f), f.metadata["fixed"])
    return keys


KEYS = _declared()


def resolve(key: str) -> str:
    """The dotted path of `key` (a declared path, model.FIELD or sampling.OPTION); ConfigError if unknown."""
    if key in KEYS:
        return key
    head, _, rest = key.partition(".")
    if head in ("model", "sampling") and rest.isidentifier():
        return f"{MODEL_FIELDS if head == 'model' else SAMPLER_OPTIONS}.{rest}"
    close = suggest(key)
    hint = f" (did you mean {close}?)" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}; see --help for the list")


def suggest(key: str) -> Optional[str]:
    """The declared key closest to an unknown `key`: a close spelling, or the dotted key of a bare field name
    (lr -> optim.lr); None if there is none."""
    close = difflib.get_close_matches(key, list(KEYS), n=1)
    if close:
        return close[0]
    return next((k for k in KEYS if k.split(".")[1] == key), None)


def _parse(path: str, value: Any) -> Any:
    """`value` parsed with the Spec of `path` (a declared field, or an option of some sampler); a model field,
    whose type the model's default gives when the config is built, as a literal."""
    from jdiff.sampling import all_options

    name = path.rsplit(".", 1)[1]
    if path in KEYS:
        spec, label = KEYS[path].spec, path
    elif path.startswith(SAMPLER_OPTIONS + ".") and name in all_options():
        spec, label = all_options()[name][0], f"sampling.{name}"
    else:
        return literal(value)
    try:
        parsed = spec.parse(label, value)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {k: literal(v) for k, v in parsed.items()} if spec.kind is dict else parsed


def to_dict(config: TrainConfig) -> dict[str, dict[str, Any]]:
    """{section: {field: value}}, JSON-able (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """Inverse of `to_dict`: {section: {field: value}}. Unknown sections or keys are a ConfigError."""
    unknown = [k for k in d if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"not a jdiff 0.1 config: unknown section(s) {unknown[:3]} (expected {', '.join(SECTIONS)})")
    items = []
    for section, fields in d.items():
        if not isinstance(fields, Mapping):
            raise ConfigError(f"config section {section!r} must be an object, got {fields!r}")
        items += [(f"{section}.{k}", v) for k, v in fields.items()]
    return apply_overrides(TrainConfig(), items)


def apply_overrides(config: TrainConfig, overrides: "Iterable[tuple[str, Any]] | Mapping[str, Any]") -> TrainConfig:
    """A new config with `overrides` ((key, value) pairs, values typed or command-line strings) applied in
    order (a mapping: in its order). Raises ConfigError naming the key."""
    d = dataclasses.asdict(config)
    if isinstance(overrides, Mapping):
        overrides = overrides.items()
    for key, value in overrides:
        path = resolve(key)
        parts = path.split(".")
        v = _parse(path, value)
        if len(parts) == 3:  # model.fields.X / sampling.options.X
            d[parts[0]][parts[1]][parts[2]] = v
        else:
            d[parts[0]][parts[1]] = v
    try:
        return TrainConfig(**{s: SECTIONS[s](**fields) for s, fields in d.items()})
    except TypeError as e:  # pragma: no cover - guarded by resolve()
        raise ConfigError(str(e)) from None


def fixed_conflicts(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """'key: saved -> new' for every field that fixes the model or data (Key.fixed) and differs."""
    a, b = to_dict(saved), to_dict(new)
    out = []
    for k in KEYS.values():
        if k.fixed:
            s, f = k.path.split(".")
            if a[s][f] != b[s][f]:
                out.append(f"{k.path}: {a[s][f]!r} -> {b[s][f]!r}")
    return out
