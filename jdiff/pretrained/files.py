"""Read a diffusers-format model directory: ``config.json`` + safetensors weights, as numpy.

Weights are read with the ``safetensors`` package's numpy API; nothing is ever unpickled, so a
``diffusion_pytorch_model.bin`` (a pickle) is refused with the command that converts it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


class PretrainedError(ValueError):
    """A checkpoint directory that jdiff cannot read or map; the message is one line naming the cause."""


class PretrainedUsageError(PretrainedError):
    """A `load` argument that does not apply to this checkpoint (e.g. timestep_convention for a UNet)."""


def convert_command(bin_path: Path) -> str:
    """The one-line shell command converting a pickled torch ``.bin`` state dict to safetensors (needs torch)."""
    out = bin_path.with_name(bin_path.name.removesuffix(".bin") + ".safetensors")
    return (
        'python -c "import torch; from safetensors.torch import save_file; '
        f"sd = torch.load('{bin_path}', map_location='cpu', weights_only=True); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{out}')\""
    )


def check_regular_file(path: Path, what: str) -> None:
    """PretrainedError naming what ``path`` is when it is not a readable regular file: missing, a dangling
    symlink, a symlink loop, a directory, a FIFO/socket/device (never opened: a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise PretrainedError(f"{what} {path} is a dangling symlink") from None
        raise PretrainedError(f"{what} {path} not found") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PretrainedError(f"{what} {path} is a symlink loop") from None
        raise PretrainedError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise PretrainedError(f"{what} {path} is {kind}, not a file")


def read_json(path: Path, what: str) -> dict:
    """Parse the JSON object at ``path`` (``what`` names it in errors)."""
    check_regular_file(path, f"{what}:")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def check_config_keys(config: dict, used, fixed, what: str) -> None:
    """PretrainedError naming the config keys (not ``_``-prefixed, not null) that are neither used nor fixed."""
    unknown = sorted(
        k for k, v in config.items() if not k.startswith("_") and k not in used and k not in fixed and v is not None
    )
    if unknown:
        raise PretrainedError(
            f"{what} config key(s) {unknown} not supported; supported keys: {', '.join(sorted((*used, *fixed)))}"
        )


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy arrays (bfloat16 tensors become float32)."""
    from safetensors import SafetensorError, safe_open

    check_regular_file(path, "weights file")
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            bf16 = []
            for name in f.keys():
                if f.get_slice(name).get_dtype() == "BF16":
                    bf16.append(name)  # numpy has no bfloat16: read below
                else:
                    out[name] = f.get_tensor(name)
        if bf16:
            out.update(_read_bf16(path, bf16))
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
        msg = " ".join(str(e).split())
        raise PretrainedError(f"weights file {path} is corrupted or truncated ({msg})") from None
    for name in sorted(out):
        a = out[name]
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = int(a.size - np.isfinite(a).sum())
            raise PretrainedError(f"weights file {path}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf)")
    return out


def _read_bf16(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The bfloat16 tensors ``names`` of a safetensors file as float32 (format: u64 header size, JSON header
    with per-tensor ``data_offsets`` into the byte buffer that follows)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        data = fh.read()
    out = {}
    for name in names:
        start, end = header[name]["data_offsets"]
        raw = np.frombuffer(data[start:end], np.uint16).astype(np.uint32) << 16
        out[name] = raw.view(np.float32).reshape(header[name]["shape"])
    return out


def read_model_dir(path: str | Path, weights: str = WEIGHTS) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, tensors)`` of a diffusers model directory (e.g. ``unet/``, ``transformer/``, ``vae/``).

    The directory holds ``config.json`` and either ``diffusion_pytorch_model.safetensors`` or the sharded
    ``diffusion_pytorch_model.safetensors.index.json`` with its shards (``weights``: another file name, e.g.
    transformers' ``model.safetensors``). Raises ``PretrainedError`` (one line)
    for a missing directory or file, invalid JSON, corrupted/truncated weights, a shard index naming a
    missing tensor, or a directory with only a pickled ``.bin``.
    """
    d = Path(path)
    if not d.is_dir():
        raise PretrainedError(f"model directory {d} not found")
    config = read_json(d / "config.json", "model config")
    index_name = weights + ".index.json"
    if os.path.lexists(d / weights):  # a symlink, directory or FIFO in its place: one line saying so
        return config, read_safetensors(d / weights)
    if os.path.lexists(d / index_name):
        index = read_json(d / index_name, "safetensors shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PretrainedError(f"safetensors shard index {d / index_name} has no 'weight_map' object")
        bad = [v for v in weight_map.values() if not isinstance(v, str) or not v]
        if bad:
            raise PretrainedError(
                f"safetensors shard index {d / index_name}: weight_map values must be shard file names, got {bad[0]!r}"
            )
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise PretrainedError(f"safetensors shard index {d / index_name} names shard {shard!r} outside {d}")
            tensors.update(read_safetensors(d / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise PretrainedError(f"shards of {d / index_name} lack tensor(s) named in its weight_map: {missing[:5]}")
        return config, tensors
    bins = sorted(d.glob("*.bin"))
    if bins:
        raise PretrainedError(
            f"{d} holds only a pickled torch checkpoint ({bins[0].name}); jdiff never unpickles. "
            f"Convert it to safetensors on a machine with torch: {convert_command(bins[0])}"
        )
    others = sorted(p.name for p in d.glob("*.safetensors"))
    hint = f" (found {others}; diffusers weight variants such as fp16 are not read, rename one)" if others else ""
    raise PretrainedError(f"{d} has neither {weights} nor {index_name}{hint}")
