"""diffusers ``AutoencoderKL`` checkpoints (the Stable Diffusion VAE: stabilityai/sd-vae-ft-ema, -mse) as a
jdiff `AutoencoderKL` (`jdiff.models.vae`) with its latent scaling.

``load_autoencoder(config, tensors)`` maps every tensor of a diffusers state dict by name (``a.b.0.c.weight``
-> ``a/b_0/c/kernel``; convolutions OIHW -> HWIO, linear layers transposed; the attention's current
``to_q/to_k/to_v/to_out.0`` and pre-0.14 ``query/key/value/proj_attn`` names), checks every shape, and
refuses a missing, unexpected or duplicated tensor, or a config value it does not support, with one
`PretrainedError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jdiff.models.vae import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, AutoencoderKL, sample_posterior
from jdiff.pretrained.files import PretrainedError, read_model_dir

DEFAULT_SCALING = 0.18215  # diffusers' AutoencoderKL default (sd-vae-ft-ema / -mse)
# config.json keys -> module fields (the rest of the known keys do not change the computation)
FIELDS = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)
# tiling / fp16 upcast / latent scaling (read by Autoencoder) / pipeline-side latent normalisation (null only)
IGNORED = ("sample_size", "force_upcast", "scaling_factor", "shift_factor", "latents_mean", "latents_std")
OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


@dataclasses.dataclass(frozen=True, eq=False)
class Autoencoder:
    """A loaded VAE: Flax `module`, its `params`, and the latent scaling of its config. Diffusion models see
    ``(z - shift_factor) * scaling_factor`` for a posterior draw z (shift 0 when None), as in diffusers'
    pipelines. `encode`/`decode` are jitted pure functions of (params, input); params default to `params`."""

    module: AutoencoderKL
    params: Any
    scaling_factor: float = DEFAULT_SCALING
    shift_factor: Optional[float] = None
    fingerprint: str = ""  # `fingerprint` of the config and weights it was loaded from ("" when built otherwise)

    def encode(self, x: jax.Array, params: Any = None) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, C) in [-1, 1] -> posterior (mean, logvar), logvar clipped to [-30, 20]."""
        return _encode(self.module, self.params if params is None else params, x)

    def decode(self, z: jax.Array, params: Any = None) -> jax.Array:
        """VAE latents (B, h, w, c) (unscaled) -> images (B, H, W, C), about [-1, 1]."""
        return _decode(self.module, self.params if params is None else params, z)

    def encode_latents(self, params: Any, x: jax.Array, key: Optional[jax.Array]) -> jax.Array:
        """What a latent diffusion model trains on: ``(z - shift) * scaling_factor`` for a posterior draw z
        with `key` (the posterior mean when key is None). Pure; use inside jit."""
        mean, logvar = self.module.apply({"params": params}, x, method="encode")
        z = mean if key is None else sample_posterior(key, mean, logvar)
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def decode_latents(self, params: Any, z: jax.Array) -> jax.Array:
        """Images from a latent diffusion model's samples: ``decode(z / scaling_factor + shift)``. Pure; the
        `decode` hook of `jdiff.run.Generator` (with decode_params=self.params)."""
        z = z.astype(jnp.float32) / self.scaling_factor + (self.shift_factor or 0.0)
        return self.module.apply({"params": params}, z, method="decode")

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(h, w, latent_channels) of the latents of (H, W, C) images."""
        f = self.module.downsample_factor
        h, w, _ = image_shape
        return (h // f, w // f, self.module.latent_channels)


@functools.partial(jax.jit, static_argnums=0)
def _encode(module, params, x):
    return module.apply({"params": params}, x, method="encode")


@functools.partial(jax.jit, static_argnums=0)
def _decode(module, params, z):
    return module.apply({"params": params}, z, method="decode")


def module_from_config(config: dict) -> AutoencoderKL:
    """The AutoencoderKL a diffusers config.json describes; PretrainedError for a value jdiff does not run."""
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise PretrainedError(f"VAE config _class_name {cls!r} not supported; allowed: AutoencoderKL")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in (*FIELDS, *IGNORED))
    unknown += [k for k in ("latents_mean", "latents_std") if config.get(k) is not None]
    if unknown:
        raise PretrainedError(
            f"VAE config key(s) {unknown} not supported; allowed: {', '.join((*FIELDS, *IGNORED))} "
            "(latents_mean/latents_std only null)"
        )
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in FIELDS}
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        bad = sorted({b for b in fields.get(key, ()) if b not in allowed})
        if bad:
            raise PretrainedError(f"VAE config {key}: {bad} not supported; allowed: {', '.join(allowed)}")
    if fields.get("act_fn", "silu") != "silu":
        raise PretrainedError(f"VAE config act_fn {fields['act_fn']!r} not supported; allowed: silu")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    scaling, shift = config.get("scaling_factor", DEFAULT_SCALING), config.get("shift_factor")
    if not number(scaling) or scaling == 0:
        raise PretrainedError(f"VAE config scaling_factor must be a non-zero number, got {scaling!r}")
    if shift is not None and not number(shift):
        raise PretrainedError(f"VAE config shift_factor must be a number or null, got {shift!r}")
    return AutoencoderKL(**fields)


def flax_path(name: str) -> tuple[str, ...]:
    """diffusers tensor name -> Flax parameter path (leaf 'weight'/'bias'; kernel/scale decided by the caller).
    ``encoder.down_blocks.0.resnets.1.conv1.weight`` -> (encoder, down_blocks_0, resnets_1, conv1, weight)."""
    out: list[str] = []
    for part in name.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(OLD_ATTENTION.get(part, part))
    return tuple(out)


def diffusers_name(path: tuple[str, ...]) -> str:
    """Flax parameter path -> diffusers tensor name (kernel/scale -> weight): the inverse of `flax_path`."""
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return ".".join([re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]] + [leaf])


def _to_flax(value: np.ndarray, leaf: str, want: tuple[int, ...]) -> np.ndarray:
    """A torch-layout tensor in the Flax layout of `leaf` with shape `want` (conv OIHW -> HWIO, linear (out, in)
    -> (in, out), a 1x1-conv attention weight of old checkpoints as linear)."""
    if leaf == "kernel" and len(want) == 4 and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and len(want) == 2:
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        return value.T if value.ndim == 2 else value
    return value


def _torch_shape(leaf: str, want: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(want) == 4:
        return (want[3], want[2], want[0], want[1])
    if leaf == "kernel" and len(want) == 2:
        return (want[1], want[0])
    return tuple(want)


def map_tensors(module: AutoencoderKL, tensors: dict[str, np.ndarray], sample_hw: tuple[int, int] = (8, 8)) -> Any:
    """Flax params of `module` from a diffusers state dict: every tensor used once, none missing, shapes
    checked (PretrainedError naming the tensor otherwise)."""
    f = module.downsample_factor
    x = jax.ShapeDtypeStruct((1, sample_hw[0] * f, sample_hw[1] * f, module.in_channels), jnp.float32)
    try:
        shapes = flatten_dict(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    except ValueError as e:
        raise PretrainedError(f"VAE config: {' '.join(str(e).split())}") from None
    by_torch_name = {diffusers_name(p): p for p in shapes}
    out: dict[tuple[str, ...], np.ndarray] = {}
    source: dict[tuple[str, ...], str] = {}
    for name in sorted(tensors):
        mod_path = flax_path(name)
        key = diffusers_name(mod_path[:-1] + ("kernel" if mod_path[-1] == "weight" else mod_path[-1],))
        path = by_torch_name.get(key)
        if path is None:
            raise PretrainedError(f"VAE weight {name!r} is not part of an AutoencoderKL with this config (unexpected)")
        if path in source:
            raise PretrainedError(f"VAE weights {source[path]!r} and {name!r} both give {key!r}")
        want = tuple(shapes[path].shape)
        value = np.asarray(tensors[name])
        arr = _to_flax(value, path[-1], want)
        if tuple(arr.shape) != want:
            raise PretrainedError(
                f"VAE weight {name!r} has shape {tuple(value.shape)}, this config needs {_torch_shape(path[-1], want)}"
            )
        out[path], source[path] = arr.astype(np.float32), name
    missing = sorted(diffusers_name(p) for p in shapes if p not in out)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PretrainedError(f"VAE weight {missing[0]!r} missing from the checkpoint{more}")
    return unflatten_dict(out)


def to_diffusers(params: Any) -> dict[str, np.ndarray]:
    """The diffusers state dict (torch layouts, current attention names) of AutoencoderKL params."""
    out = {}
    for path, v in flatten_dict(jax.device_get(params)).items():
        v = np.asarray(v, np.float32)
        if path[-1] == "kernel":
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        out[diffusers_name(path)] = np.ascontiguousarray(v)
    return out


def fingerprint(config: dict, tensors: dict[str, np.ndarray]) -> str:
    """The identity of a VAE: "sha256:" + the SHA-256 of its config (``_``-prefixed keys left out, keys
    sorted) and of every tensor (sorted by name: name, dtype, shape, bytes). Equal for the same weights
    saved again or sharded differently; any changed value changes it."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True).encode())
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"\n{name} {a.dtype.str} {a.shape}\n".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def load_autoencoder(config: dict, tensors: dict[str, np.ndarray]) -> Autoencoder:
    """An `Autoencoder` from a diffusers AutoencoderKL config.json (dict) and its state dict (numpy)."""
    module = module_from_config(config)
    params = jax.tree.map(jnp.asarray, map_tensors(module, tensors))
    shift = config.get("shift_factor")
    return Autoencoder(
        module,
        params,
        float(config.get("scaling_factor", DEFAULT_SCALING)),
        None if shift is None else float(shift),
        fingerprint(config, tensors),
    )


def load_autoencoder_dir(path: str, expect_fingerprint: Optional[str] = None) -> Autoencoder:
    """`load_autoencoder` of a diffusers model directory (config.json + safetensors), e.g. ``sd-vae-ft-ema/`` or
    a pipeline's ``vae/``. ``expect_fingerprint`` (a run's recorded `fingerprint`): PretrainedError (one line)
    if the directory now holds another VAE."""
    vae = load_autoencoder(*read_model_dir(path))
    if expect_fingerprint and vae.fingerprint != expect_fingerprint:
        raise PretrainedError(
            f"{path} holds another VAE than the one the run was trained with (fingerprint {vae.fingerprint[:19]} "
            f"!= recorded {expect_fingerprint[:19]}); restore that VAE or start a new run"
        )
    return vae
