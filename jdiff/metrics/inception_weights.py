"""Weights of the FID Inception network from a .safetensors file with pytorch-fid's state-dict keys.

pytorch-fid publishes its weights as a pickled torch state dict, ``pt_inception-2015-12-05-6726825d.pth``
(``FID_WEIGHTS_URL`` in ``pytorch_fid/inception.py``, a release asset of github.com/mseitzer/pytorch-fid).
jdiff downloads nothing and never unpickles: convert that file once, on a machine with torch
(``pip install -e .[bench]``), with ``python -m jdiff.cli.convert_inception PTH OUT.safetensors``, and
pass the .safetensors file. Keys are the torchvision ``Inception3`` names (``Conv2d_1a_3x3.conv.weight``,
``Mixed_7c.branch_pool.bn.running_var``, ``fc.weight``, ...); ``*.num_batches_tracked`` counters are ignored.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

IGNORED_SUFFIX = ".num_batches_tracked"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".pkl", ".ckpt")


class InceptionWeightsError(ValueError):
    """A weights file that is missing, unreadable or not pytorch-fid's network; the message is one line."""


def _torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch layout of a Flax parameter: HWIO kernels -> OIHW, (in, out) matrices -> (out, in)."""
    if name.endswith("conv.weight"):
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if name == "fc.weight":
        return tuple(reversed(shape))
    return tuple(shape)


def _to_flax(name: str, array: np.ndarray) -> np.ndarray:
    if name.endswith("conv.weight"):
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if name == "fc.weight":
        return np.ascontiguousarray(array.T)
    return array


@lru_cache(maxsize=1)
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """{pytorch-fid state-dict key: torch shape} of every tensor the network reads (the .pth's keys, less the
    ``num_batches_tracked`` counters)."""
    import jax
    import jax.numpy as jnp

    from jdiff.metrics.inception import SIZE, FIDInceptionV3

    model = FIDInceptionV3()
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), method=FIDInceptionV3.init_all)
    )["params"]
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name = ".".join(k.key for k in path)
        out[name] = _torch_shape(name, tuple(leaf.shape))
    return out


def params_from_state_dict(tensors: dict[str, np.ndarray], what: str = "inception weights") -> dict:
    """The Flax parameter tree of a {pytorch-fid key: array} dict; InceptionWeightsError (one line) naming the
    first missing, unexpected, mis-shaped or non-finite tensor."""
    expected = expected_shapes()
    names = {k for k in tensors if not k.endswith(IGNORED_SUFFIX)}
    missing = sorted(set(expected) - names)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InceptionWeightsError(
            f"{what}: missing tensor {missing[0]!r} (shape {expected[missing[0]]}){more}; expected pytorch-fid's "
            "FID Inception state dict (pt_inception-2015-12-05) converted to safetensors"
        )
    unexpected = sorted(names - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise InceptionWeightsError(
            f"{what}: unexpected tensor {unexpected[0]!r}{more}; not pytorch-fid's FID Inception state dict"
        )
    tree: dict = {}
    for name, shape in expected.items():
        a = np.asarray(tensors[name])
        if tuple(a.shape) != shape:
            raise InceptionWeightsError(f"{what}: tensor {name!r} has shape {tuple(a.shape)}, expected {shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise InceptionWeightsError(f"{what}: tensor {name!r} has dtype {a.dtype}, expected a float type")
        a = a.astype(np.float32)
        if not np.all(np.isfinite(a)):
            raise InceptionWeightsError(f"{what}: tensor {name!r} contains NaN or inf")
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _to_flax(name, a)
    return {"params": tree}


def read_inception_params(path: str | Path) -> dict:
    """The Flax variables of the FID Inception network from a .safetensors file (see module doc)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    p = Path(path)
    if p.suffix in PICKLE_SUFFIXES:
        raise InceptionWeightsError(
            f"inception weights {p} is a pickled torch file; jdiff never unpickles. Convert it on a machine with "
            f"torch: python -m jdiff.cli.convert_inception {p} {p.with_suffix('.safetensors')}"
        )
    if not p.is_file():
        raise InceptionWeightsError(f"inception weights file {p} not found")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
        msg = " ".join(str(e).split())
        raise InceptionWeightsError(f"inception weights file {p} is corrupted or truncated ({msg})") from None
    return params_from_state_dict(tensors, what=f"inception weights {p}")
