"""Registry of named model configs: ``get_model('dit_s2', num_classes=10)``.

Each entry is (module class, field defaults, native NHWC input (H, W, C) used by
benchmarks and docs). Nothing here is mutable after import.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

import flax.linen as nn

from jdiff.models.dit import DiT
from jdiff.models.unet import UNet


class _Entry(NamedTuple):
    cls: type
    defaults: Mapping[str, Any]
    input_hwc: tuple[int, int, int]


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
    return MappingProxyType({k: _Entry(v.cls, MappingProxyType(v.defaults), v.input_hwc) for k, v in reg.items()})


_REGISTRY = _build()


def list_models() -> list[str]:
    """Names of all registered configs, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(list_models())}")
    return _REGISTRY[name]


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


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
