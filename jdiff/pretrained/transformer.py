"""diffusers ``DiTTransformer2DModel`` (also saved as ``Transformer2DModel`` with ``norm_type ada_norm_zero``, as in
facebook/DiT-XL-2-256) <-> jdiff `DiT`: config.json fields and weight names.

Timestep convention: the DiT reference code (facebookresearch/DiT), with which the published DiT weights were
trained, embeds t with frequencies ``10000 ** (-i / 128)`` and LayerNorm epsilon 1e-6 before the MLP; diffusers'
DiTTransformer2DModel hard-codes ``downscale_freq_shift=1`` (frequencies over 127) and uses the config's
``norm_eps`` (default 1e-5) there. ``convention="reference"`` (the default) loads the weights with the
reference computation, ``"diffusers"`` with diffusers' (``DiT.freq_shift=1, mlp_norm_eps=norm_eps``).
Exported configs record the convention in ``_jdiff_timestep_convention`` (diffusers ignores ``_`` keys).

diffusers keeps one timestep and label embedder per block (copies of the reference's single one); jdiff has
one, so the copies must be equal.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jdiff.models.dit import DiT
from jdiff.models.embeddings import sincos_2d
from jdiff.pretrained.files import PretrainedError, PretrainedUsageError, check_config_keys
from jdiff.pretrained.mapping import (
    abstract_params,
    build_links,
    check_repeats,
    leaf_suffix,
    params_from_tensors,
    tensors_from_params,
)

CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
CONVENTIONS = ("reference", "diffusers")
CONVENTION_KEY = "_jdiff_timestep_convention"
FIXED = {  # keys whose value must be this (diffusers' DiT default); Transformer2DModel keys must be off
    "activation_fn": "gelu-approximate",
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "attention_bias": True,
    "cross_attention_dim": None,
    "use_linear_projection": False,
    "only_cross_attention": False,
    "double_self_attention": False,
    "num_vector_embeds": None,
    "attention_type": "default",
    "caption_channels": None,
    "interpolation_scale": None,
    "use_additional_conditions": None,
}
USED = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "num_layers",
    "sample_size",
    "patch_size",
    "num_embeds_ada_norm",
    "norm_eps",
    "dropout",  # inference: no effect
    "upcast_attention",  # fp16 only; jdiff's softmax is float32
    "norm_num_groups",  # unused by the patch (DiT) path
)
# Transformer2DModel's own defaults where they differ (a config saved by it may leave them out)
T2D_DEFAULTS = {
    "attention_head_dim": 88,
    "in_channels": None,
    "num_layers": 1,
    "attention_bias": False,
    "sample_size": None,
    "patch_size": None,
    "activation_fn": "geglu",
    "num_embeds_ada_norm": None,
    "norm_type": "layer_norm",
    "norm_elementwise_affine": True,
}
DEFAULTS = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
    "norm_eps": 1e-5,
}


def _err(key: str, value: Any, allowed: str) -> PretrainedError:
    return PretrainedError(f"DiT config {key}={value!r} is not supported; supported: {allowed}")


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def dit_from_config(config: dict, convention: str | None = None) -> tuple[DiT, tuple[int, int, int]]:
    """The jdiff `DiT` a DiTTransformer2DModel config.json describes, and its sample shape (H, W, C).
    ``convention``: "reference" / "diffusers" (see the module docstring); None = the config's recorded
    ``_jdiff_timestep_convention``, else "reference"."""
    cls = config.get("_class_name", CLASSES[0])
    if cls not in CLASSES:
        raise PretrainedError(f"model config _class_name {cls!r} is not a DiT; supported: {', '.join(CLASSES)}")
    if cls == "Transformer2DModel":
        config = {**T2D_DEFAULTS, **config}
    error = PretrainedUsageError if convention else PretrainedError  # the argument, or the config's record
    convention = convention or config.get(CONVENTION_KEY, "reference")
    if convention not in CONVENTIONS:
        raise error(f"timestep_convention {convention!r} is not supported; supported: {CONVENTIONS}")
    check_config_keys(config, USED, FIXED, "DiT")
    for key, want in FIXED.items():
        if config.get(key, want) != want and not (want is None and config.get(key) in (None, False)):
            raise _err(key, config[key], repr(want))
    c = {**DEFAULTS, **{k: v for k, v in config.items() if k in USED}}
    for key in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size", "patch_size"):
        if not _pos_int(c[key]):
            raise _err(key, c[key], "an int >= 1")
    if not _pos_int(c["num_embeds_ada_norm"]):
        raise _err("num_embeds_ada_norm", c["num_embeds_ada_norm"], "the number of classes, an int >= 1")
    c_in = c["in_channels"]
    c_out = c_in if c["out_channels"] is None else c["out_channels"]
    if not _pos_int(c_out):
        raise _err("out_channels", c_out, "null or an int >= 1")
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    if hidden % 4:
        raise _err("attention_head_dim", c["attention_head_dim"], "heads * head_dim divisible by 4 (sin-cos positions)")
    if c["sample_size"] % c["patch_size"]:
        raise _err("sample_size", c["sample_size"], f"a multiple of patch_size {c['patch_size']}")
    eps = c["norm_eps"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise _err("norm_eps", eps, "a positive finite number")
    learn_sigma = c_out == 2 * c_in
    model = DiT(
        patch_size=c["patch_size"],
        hidden_size=hidden,
        depth=c["num_layers"],
        num_heads=c["num_attention_heads"],
        mlp_ratio=4.0,
        num_classes=c["num_embeds_ada_norm"],
        learn_sigma=learn_sigma,
        out_channels=None if learn_sigma or c_out == c_in else c_out,
        freq_shift=1.0 if convention == "diffusers" else 0.0,
        mlp_norm_eps=float(eps) if convention == "diffusers" else 1e-6,
    )
    return model, (c["sample_size"], c["sample_size"], c_in)


def config_from_dit(model: DiT, sample_shape: tuple[int, int, int]) -> dict:
    """The DiTTransformer2DModel config.json of a jdiff `DiT` sampling ``sample_shape`` (H, W, C)."""
    if not isinstance(model, DiT):
        raise PretrainedError(f"expected a jdiff DiT, got {type(model).__name__}")

    def refuse(field: str, why: str):
        raise PretrainedError(f"DiT {field}={getattr(model, field)!r} cannot be expressed in diffusers: {why}")

    hgt, wid, c_in = (int(v) for v in sample_shape)
    if hgt != wid:
        raise PretrainedError(f"DiT sample shape {sample_shape} cannot be expressed in diffusers: square only")
    if model.num_classes is None:
        refuse("num_classes", "DiTTransformer2DModel is class-conditional (num_embeds_ada_norm)")
    if model.mlp_ratio != 4.0:
        refuse("mlp_ratio", "diffusers' DiT MLP is 4x wide")
    if model.hidden_size % model.num_heads:
        refuse("num_heads", f"must divide hidden_size {model.hidden_size}")
    if model.freq_shift == 1:
        convention = "diffusers"
    elif model.freq_shift == 0 and model.mlp_norm_eps == 1e-6:
        convention = "reference"
    else:
        refuse("freq_shift", "supported: 0 with mlp_norm_eps 1e-6 (reference convention) or 1 (diffusers')")
    c_out = (model.out_channels or c_in) * (2 if model.learn_sigma else 1)
    return {
        "_class_name": CLASSES[0],
        CONVENTION_KEY: convention,
        "num_attention_heads": model.num_heads,
        "attention_head_dim": model.hidden_size // model.num_heads,
        "in_channels": c_in,
        "out_channels": c_out,
        "num_layers": model.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": hgt,
        "patch_size": model.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": model.num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": model.mlp_norm_eps,
    }


def _translate(depth: int):
    blocks = lambda fmt: tuple((f"transformer_blocks.{k}.{fmt}",) for k in range(depth))

    def translate(path: tuple[str, ...]):
        *mods, leaf = path
        sfx = leaf_suffix(leaf)
        kind = "dense" if leaf == "kernel" else "same"
        top = mods[0]
        if top == "x_embedder":
            return ((f"pos_embed.proj.{sfx}",),), "conv" if leaf == "kernel" else "same"
        if top == "t_embedder":
            linear = {"dense_0": "linear_1", "dense_1": "linear_2"}[mods[1]]
            return blocks(f"norm1.emb.timestep_embedder.{linear}.{sfx}"), kind
        if top == "y_embedder":
            return blocks("norm1.emb.class_embedder.embedding_table.weight"), "same"
        if top == "final_layer":
            name = {"adaLN_modulation": "proj_out_1", "linear": "proj_out_2"}[mods[1]]
            return ((f"{name}.{sfx}",),), kind
        if top.startswith("blocks_"):
            base = f"transformer_blocks.{top.removeprefix('blocks_')}"
            if mods[1:] == ["attn", "qkv"]:
                return (tuple(f"{base}.attn1.{q}.{sfx}" for q in ("to_q", "to_k", "to_v")),), "qkv"
            sub = {"adaLN_modulation": "norm1.linear", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2"}
            name = "attn1.to_out.0" if mods[1:] == ["attn", "proj"] else sub[mods[1]]
            return ((f"{base}.{name}.{sfx}",),), kind
        raise PretrainedError(f"jdiff DiT parameter {'/'.join(path)} has no diffusers counterpart")

    return translate


def dit_params(model: DiT, sample_shape, tensors: dict[str, np.ndarray]) -> dict:
    """jdiff DiT params (numpy) from a DiTTransformer2DModel state dict. A stored ``pos_embed.pos_embed`` (the
    fixed sin-cos table of older exports) must equal jdiff's."""
    check_repeats(tensors, r"transformer_blocks\.(\d+)\.", model.depth, f"DiT config num_layers={model.depth}")
    tensors = dict(tensors)
    pos = tensors.pop("pos_embed.pos_embed", None)
    if pos is not None:
        p = model.patch_size
        tokens = (sample_shape[0] // p) * (sample_shape[1] // p)
        if pos.size != tokens * model.hidden_size:  # before building the table: a bogus sample_size is large
            raise PretrainedError(
                f"DiT weight 'pos_embed.pos_embed' has shape {tuple(pos.shape)}, the config needs "
                f"{tokens} x {model.hidden_size} (sample_size / patch_size squared x hidden)"
            )
        want = sincos_2d(model.hidden_size, sample_shape[0] // p, sample_shape[1] // p)
        if pos.reshape(-1).shape != want.reshape(-1).shape or not np.allclose(pos.reshape(want.shape), want, atol=1e-5):
            raise PretrainedError("DiT weight 'pos_embed.pos_embed' is not the fixed 2-D sin-cos table jdiff uses")
    abstract = abstract_params(model, sample_shape, "DiT")
    return params_from_tensors(build_links(abstract, _translate(model.depth)), abstract, tensors, "DiT")


def dit_tensors(model: DiT, sample_shape, params: Any) -> dict[str, np.ndarray]:
    """The DiTTransformer2DModel state dict of jdiff DiT params."""
    abstract = abstract_params(model, sample_shape, "DiT")
    return tensors_from_params(build_links(abstract, _translate(model.depth)), jax.device_get(params))
