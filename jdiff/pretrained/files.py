"""Read a diffusers-format model directory: ``config.json`` + safetensors weights, as numpy.

Weights are read with the ``safetensors`` package's numpy API; nothing is ever unpickled, so a
``diffusion_pytorch_model.bin`` (a pickle) is refused with the command that converts it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


class PretrainedError(ValueError):
    """A checkpoint directory that jdiff cannot read or map; the message is one line naming the cause."""


def convert_command(bin_path: Path) -> str:
    """The one-line shell command converting a pickled torch ``.bin`` state dict to safetensors (needs torch)."""
    out = bin_path.with_name(bin_path.name.removesuffix(".bin") + ".safetensors")
    return (
        'python -c "import torch; from safetensors.torch import save_file; '
        f"sd = torch.load('{bin_path}', map_location='cpu', weights_only=True); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{out}')\""
    )


def read_json(path: Path, what: str) -> dict:
    """Parse the JSON object at ``path`` (``what`` names it in errors)."""
    if not path.is_file():
        raise PretrainedError(f"{what}: {path} not found")
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

    if not path.is_file():
        raise PretrainedError(f"weights file {path} not found")
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


def read_model_dir(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, tensors)`` of a diffusers model directory (e.g. ``unet/``, ``transformer/``, ``vae/``).

    The directory holds ``config.json`` and either ``diffusion_pytorch_model.safetensors`` or the sharded
    ``diffusion_pytorch_model.safetensors.index.json`` with its shards. Raises ``PretrainedError`` (one line)
    for a missing directory or file, invalid JSON, corrupted/truncated weights, a shard index naming a
    missing tensor, or a directory with only a pickled ``.bin``.
    """
    d = Path(path)
    if not d.is_dir():
        raise PretrainedError(f"model directory {d} not found")
    config = read_json(d / "config.json", "model config")
    if (d / WEIGHTS).is_file():
        return config, read_safetensors(d / WEIGHTS)
    if (d / INDEX).is_file():
        index = read_json(d / INDEX, "safetensors shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PretrainedError(f"safetensors shard index {d / INDEX} has no 'weight_map' object")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise PretrainedError(f"safetensors shard index {d / INDEX} names shard {shard!r} outside {d}")
            tensors.update(read_safetensors(d / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise PretrainedError(f"shards of {d / INDEX} lack tensor(s) named in its weight_map: {missing[:5]}")
        return config, tensors
    bins = sorted(d.glob("*.bin"))
    if bins:
        raise PretrainedError(
            f"{d} holds only a pickled torch checkpoint ({bins[0].name}); jdiff never unpickles. "
            f"Convert it to safetensors on a machine with torch: {convert_command(bins[0])}"
        )
    others = sorted(p.name for p in d.glob("*.safetensors"))
    hint = f" (found {others}; diffusers weight variants such as fp16 are not read, rename one)" if others else ""
    raise PretrainedError(f"{d} has neither {WEIGHTS} nor {INDEX}{hint}")
