"""Registry of named model configs: ``get_model('dit_s2', num_classes=10)``.

Each entry is (module class, field defaults, native NHWC input (H, W, C) used by
benchmarks and docs). Nothing here is mutable after import.

The model protocol: every registered class is a ``flax.linen.Module`` with the fields

* ``num_classes: int | None`` -- labels 0..num_classes-1 condition the model and ``num_classes`` is the
  null label of classifier-free guidance; None: unconditional (labels are not passed);
* ``learn_sigma: bool`` -- the output has twice the input channels, [prediction | variance values v]
  (Nichol & Dhariwal 2021); else as many as the input;
* ``dtype`` -- the compute dtype (parameters stay float32);
* ``remat: bool``, ``remat_policy: str`` -- rematerialise its blocks in the backward pass
  (`jdiff.models.remat`);

and is called as ``model.apply({"params": p}, x, t, y=None, train=False, rngs={"dropout": k})``: ``x`` NHWC
float (B, H, W, C), ``t`` (B,) float timesteps, ``y`` (B,) int32 labels or None, ``train`` enabling
dropout; the output is float32 NHWC. A text-conditioned model (class attribute ``conditioning = "text"``,
`jdiff.models.text_unet.TextUNet`) takes ``y`` as (B, L) int32 token ids instead, has num_classes None and the
field ``max_length`` (L); the unconditional input of classifier-free guidance is the empty caption's ids.
`make_registry` checks the protocol (`check_model_class`) when a class is registered, so the rest of jdiff reads
these fields directly.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

import flax.linen as nn

from jdiff.models.clip import CLIP_VIT_L
from jdiff.models.dit import DiT
from jdiff.models.text_unet import TextUNet
from jdiff.models.unet import UNet
from jdiff.models.unet_cond import SD15

PROTOCOL_FIELDS = ("num_classes", "learn_sigma", "dtype", "remat", "remat_policy")
CONDITIONINGS = ("label", "text")  # the class attribute `conditioning` (default "label")
CALL_PARAMETERS = ("x", "t", "y", "train")  # __call__(self, x, t, y=None, train=False)


class _Entry(NamedTuple):
    cls: type
    defaults: Mapping[str, Any]
    input_hwc: tuple[int, int, int]


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def check_model_class(cls: type) -> None:
    """TypeError naming what is missing unless `cls` follows the model protocol (module docstring): a
    flax.linen.Module with the fields PROTOCOL_FIELDS and __call__(self, x, t, y=None, train=False)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"a registered model must be a flax.linen.Module class, got {cls!r}")
    missing = [f for f in PROTOCOL_FIELDS if f not in _fields(cls)]
    if missing:
        raise TypeError(f"model {cls.__name__} lacks the protocol field(s) {missing} (needs {list(PROTOCOL_FIELDS)})")
    kind = getattr(cls, "conditioning", "label")
    if kind not in CONDITIONINGS or (kind == "text" and "max_length" not in _fields(cls)):
        raise TypeError(
            f"model {cls.__name__}: conditioning={kind!r} must be one of {CONDITIONINGS}; a text model needs the "
            "field max_length"
        )
    params = list(inspect.signature(cls.__call__).parameters.values())[1:]
    names = tuple(p.name for p in params[: len(CALL_PARAMETERS)])
    defaults_ok = len(params) >= 4 and params[2].default is None and params[3].default is False
    extra_required = [p.name for p in params[4:] if p.default is inspect.Parameter.empty]
    if names != CALL_PARAMETERS or not defaults_ok or extra_required:
        raise TypeError(
            f"model {cls.__name__} must be called as __call__(self, x, t, y=None, train=False), "
            f"not __call__{inspect.signature(cls.__call__)}"
        )


def make_registry(entries: Mapping[str, tuple[type, Mapping[str, Any], tuple[int, int, int]]]) -> Mapping[str, _Entry]:
    """An immutable registry {name: (class, field defaults, native input (H, W, C))}; every class must follow
    the model protocol (`check_model_class`) and every default must name one of its fields (TypeError)."""
    reg = {}
    for name, (cls, defaults, input_hwc) in entries.items():
        check_model_class(cls)
        bad = sorted(set(defaults) - set(_fields(cls)))
        if bad:
            raise TypeError(f"registry entry {name!r}: {bad} are not fields of {cls.__name__}")
        reg[name] = _Entry(cls, MappingProxyType(dict(defaults)), tuple(input_hwc))
    return MappingProxyType(reg)


def _build() -> Mapping[str, _Entry]:
    reg: dict[str, _Entry] = {}
    # DDPM CIFAR-10 (Ho et al. 2020, App. B): 35,746,307 params.
    reg["unet_ddpm_cifar10"] = _Entry(
        UNet,
        dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,), dropout=0.1),
        (32, 32, 3),
    )
    # CPU-sized U-Net for 8x8 grey digits (attention at the 4x4 bottom level).
    reg["unet_small"] = _Entry(
        UNet,
        dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, num_heads=2),
        (8, 8, 1),
    )
    # Fastest CPU U-Net (~0.18M params, ~4x cheaper than unet_small) for quick runs / CI.
    reg["unet_tiny"] = _Entry(
        UNet, dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0), (8, 8, 1)
    )
    # 28x28 grey images (MNIST / Fashion-MNIST): 28 -> 14 -> 7, attention at 14 and 7.
    reg["unet_mnist"] = _Entry(
        UNet,
        dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(14, 7), dropout=0.1, num_heads=4),
        (28, 28, 1),
    )
    # DiT family (Peebles & Xie 2023, Table 1), ImageNet 256 latents: 32x32x4, 1000 classes.
    sizes = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
    for size, (depth, hidden, heads) in sizes.items():
        for p in (2, 4, 8):
            reg[f"dit_{size}{p}"] = _Entry(
                DiT,
                dict(
                    patch_size=p, hidden_size=hidden, depth=depth, num_heads=heads, num_classes=1000, learn_sigma=True
                ),
                (32, 32, 4),
            )
    # CPU-sized DiT for 8x8 or 28x28 grey images (16 / 196 tokens).
    reg["dit_tiny"] = _Entry(
        DiT, dict(patch_size=2, hidden_size=128, depth=4, num_heads=4, num_classes=None, learn_sigma=False), (8, 8, 1)
    )
    # Text-to-image (`TextUNet`: CLIP text encoder + cross-attention U-Net). CPU-sized for 8x8 grey digits
    # with captions (preset digits_text); vocab_size is set from the run's tokenizer.
    reg["unet_text_small"] = _Entry(
        TextUNet,
        dict(
            block_out_channels=(32, 64),
            cross_attention=(True, True),
            heads=4,
            layers_per_block=1,
            norm_groups=8,
            text_hidden=64,
            text_layers=2,
            text_heads=4,
            max_length=16,
        ),
        (8, 8, 1),
    )
    # Stable Diffusion 1.5's UNet with CLIP ViT-L/14's text encoder: 859,520,964 + 123,060,480 parameters.
    clip_l = dict(CLIP_VIT_L)
    reg["unet_text_sd15"] = _Entry(
        TextUNet,
        dict(
            block_out_channels=SD15["block_out_channels"],
            cross_attention=SD15["cross_attention"],
            heads=SD15["heads"],
            layers_per_block=2,
            norm_groups=32,
            vocab_size=clip_l["vocab_size"],
            text_hidden=clip_l["hidden"],
            text_layers=clip_l["layers"],
            text_heads=clip_l["heads"],
            text_intermediate=clip_l["intermediate"],
            text_act=clip_l["act"],
            max_length=77,
        ),
        (64, 64, 4),
    )
    return make_registry(reg)


_REGISTRY = _build()


def list_models() -> list[str]:
    """Names of all registered configs, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_class(name: str) -> type:
    """The module class of config ``name``."""
    return _entry(name).cls


def model_config(name: str) -> dict[str, Any]:
    """All module field values of config ``name`` (class defaults + registry values), as a new dict."""
    e = _entry(name)
    cfg = {f: getattr(e.cls(), f) for f in _fields(e.cls)}
    cfg.update(e.defaults)
    return cfg


def model_input_shape(name: str) -> tuple[int, int, int]:
    """Native NHWC input (H, W, C) of config ``name`` (e.g. (32, 32, 4) for DiT latents)."""
    return _entry(name).input_hwc


def get_model(name: str, **overrides: Any) -> nn.Module:
    """Build config ``name`` with field ``overrides`` (e.g. ``dtype=jnp.bfloat16, num_classes=10``).

    List values are converted to tuples. Raises ``ValueError`` for an unknown name or
    an override that is not a field.
    """
    e = _entry(name)
    allowed = _fields(e.cls)
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise ValueError(
            f"unknown override(s) {bad} for {name!r} ({e.cls.__name__}); allowed fields: {', '.join(allowed)}"
        )
    # Lists (e.g. from JSON configs) become tuples so the module stays hashable.
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return e.cls(**{**e.defaults, **overrides})
