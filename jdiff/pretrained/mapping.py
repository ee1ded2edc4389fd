"""Tensor-by-tensor correspondence between a jdiff parameter tree and a diffusers (PyTorch) state dict.

A `Link` ties one jdiff leaf (its path in the Flax tree) to the diffusers tensor(s) holding it, with the layout
change between them: convolutions HWIO <-> OIHW, dense kernels (in, out) <-> (out, in), a dense kernel <-> a
1x1 convolution, jdiff's fused attention ``qkv`` <-> diffusers' separate ``to_q / to_k / to_v``. A leaf may
have several identical copies on the diffusers side (diffusers' DiT keeps one timestep/label embedder per
block; jdiff shares one). `params_from_tensors` uses every tensor, checks every shape and refuses a missing,
extra or inconsistent tensor with one `PretrainedError` line; `tensors_from_params` is its exact inverse.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jdiff.pretrained.files import PretrainedError

KINDS = ("conv", "dense", "dense_1x1", "same", "qkv")


@dataclasses.dataclass(frozen=True)
class Link:
    """jdiff leaf ``path`` <-> diffusers ``copies`` (each a tuple of names: one, or (q, k, v) for kind "qkv")."""

    path: tuple[str, ...]
    copies: tuple[tuple[str, ...], ...]
    kind: str


def to_torch(kind: str, a: np.ndarray) -> list[np.ndarray]:
    """The diffusers arrays of one jdiff leaf ``a`` (views; no copy)."""
    if kind == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw)
        return [a.transpose(3, 2, 0, 1)]
    if kind == "dense":  # (in, out) -> (out, in)
        return [a.T]
    if kind == "dense_1x1":  # (in, out) -> (out, in, 1, 1)
        return [a.T[:, :, None, None]]
    if kind == "same":
        return [a]
    if kind == "qkv":  # kernel (in, 3C) -> 3 x (C, in); bias (3C,) -> 3 x (C,)
        return [p.T if a.ndim == 2 else p for p in np.split(a, 3, axis=-1)]
    raise AssertionError(kind)


def to_jdiff(kind: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Inverse of `to_torch`."""
    (a, *_) = arrays
    if kind == "conv":
        return a.transpose(2, 3, 1, 0)
    if kind == "dense":
        return a.T
    if kind == "dense_1x1":
        return a[:, :, 0, 0].T
    if kind == "same":
        return a
    if kind == "qkv":
        return np.concatenate([p.T if p.ndim == 2 else p for p in arrays], axis=-1)
    raise AssertionError(kind)


def abstract_params(model: Any, sample_shape: tuple[int, ...], what: str) -> Any:
    """The abstract parameter tree of a jdiff model for one (1, *sample_shape) input; a model the config
    describes but jdiff cannot build is one PretrainedError line."""
    from jdiff.models import abstract_params as eval_params

    try:
        return eval_params(model, (1, *sample_shape), with_labels=model.num_classes is not None)
    except ValueError as e:
        raise PretrainedError(f"{what} config: {' '.join(str(e).split())}") from None


def check_repeats(tensors: dict[str, np.ndarray], pattern: str, want: int, what: str) -> None:
    """PretrainedError unless the tensor names matching ``pattern`` (a regular expression with one group, the
    index of a repeated block) number exactly the blocks 0..want-1 the config asks for; checked before the
    model is built, so that a config asking for 20,000 layers of 2-layer weights fails at once."""
    found = {int(m.group(1)) for name in tensors if (m := re.match(pattern, name))}
    if found != set(range(want)):
        raise PretrainedError(
            f"{what} but the weights hold {len(found)} such block(s)"
            + (f" (indices {min(found)}..{max(found)})" if found else "")
        )


def build_links(abstract: Any, translate: Callable[[tuple[str, ...]], tuple[tuple[tuple[str, ...], ...], str]]):
    """One `Link` per leaf of the (abstract) jdiff parameter tree; ``translate(path) -> (copies, kind)``."""
    return [Link(path, *translate(path)) for path in flatten_dict(abstract)]


def leaf_suffix(leaf: str) -> str:
    """diffusers' parameter name for a Flax leaf name."""
    return {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]


def params_from_tensors(links: list[Link], abstract: Any, tensors: dict[str, np.ndarray], what: str) -> dict:
    """The jdiff parameter tree (float32 numpy leaves) from diffusers ``tensors``; ``what`` names the model in
    errors. Every tensor must be used exactly by the links, with the expected shape."""
    shapes = {k: tuple(v.shape) for k, v in flatten_dict(abstract).items()}
    used: set[str] = set()
    flat = {}
    for link in links:
        want = shapes[link.path]
        torch_shapes = [a.shape for a in to_torch(link.kind, np.broadcast_to(np.float32(0), want))]
        first = None
        for names in link.copies:
            arrays = []
            for name, shape in zip(names, torch_shapes):
                if name not in tensors:
                    raise PretrainedError(f"{what}: missing weight {name!r} (expected shape {tuple(shape)})")
                got = tuple(tensors[name].shape)
                if got != tuple(shape):
                    raise PretrainedError(f"{what}: weight {name!r} has shape {got}, expected {tuple(shape)}")
                used.add(name)
                arrays.append(np.asarray(tensors[name]))
            value = to_jdiff(link.kind, arrays)
            if first is None:
                first = value
            elif not np.array_equal(first, value):
                raise PretrainedError(
                    f"{what}: weight {names[0]!r} differs from {link.copies[0][0]!r}; jdiff shares one copy of "
                    "it, so the copies must be equal"
                )
        flat[link.path] = np.ascontiguousarray(first, dtype=np.float32)
    extra = sorted(set(tensors) - used)
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise PretrainedError(f"{what}: unexpected weight(s) {extra[:5]}{more} that jdiff's model does not use")
    return unflatten_dict(flat)


def tensors_from_params(links: list[Link], params: Any) -> dict[str, np.ndarray]:
    """The diffusers state dict (contiguous float32 numpy arrays) of a jdiff parameter tree."""
    flat = flatten_dict(params)
    out: dict[str, np.ndarray] = {}
    for link in links:
        arrays = to_torch(link.kind, np.asarray(flat[link.path], np.float32))
        for names in link.copies:
            for name, a in zip(names, arrays):
                out[name] = np.ascontiguousarray(a)
    return out
