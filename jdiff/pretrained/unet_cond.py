"""diffusers ``UNet2DConditionModel`` of Stable Diffusion 1.x / 2.x <-> jdiff `UNetCond`: config.json and weights.

Supported: CrossAttnDownBlock2D / DownBlock2D and CrossAttnUpBlock2D / UpBlock2D (cross-attention at the same
levels down and up), UNetMidBlock2DCrossAttn, any layers_per_block, transformer_layers_per_block (an int),
attention_head_dim (diffusers' head count: an int or one per level; or num_attention_heads), conv or linear
proj_in/proj_out (use_linear_projection), upcast_attention (jdiff's softmax is float32 always), norm_num_groups,
norm_eps, freq_shift, flip_sin_to_cos, downsample_padding. SDXL's added conditioning (addition_embed_type
"text_time", a second text encoder), class embeddings, and every other option that changes the computation are
refused with one `PretrainedError` line naming the key.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np

from jdiff.models.layers import num_groups
from jdiff.models.unet_cond import UNetCond
from jdiff.pretrained.files import PretrainedError, check_config_keys
from jdiff.pretrained.mapping import build_links, check_repeats, leaf_suffix, params_from_tensors, tensors_from_params
from jdiff.pretrained.unet2d import RES, block_prefix, sample_hw

CLASS = "UNet2DConditionModel"
DOWN, ATTN_DOWN, UP, ATTN_UP = "DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"
FIXED = {  # keys whose value must be this (diffusers' default): the computation jdiff has
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
USED = (
    "sample_size",
    "in_channels",
    "out_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "dropout",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",  # float32 softmax always
    "addition_embed_type_num_heads",  # only read by addition_embed_type "text_proj"/"text_image"
)
DEFAULTS = {
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (ATTN_DOWN, ATTN_DOWN, ATTN_DOWN, DOWN),
    "up_block_types": (UP, ATTN_UP, ATTN_UP, ATTN_UP),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
}


def _err(key: str, value: Any, allowed: str) -> PretrainedError:
    return PretrainedError(f"{CLASS} config {key}={value!r} is not supported; supported: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def unet_cond_from_config(config: dict) -> tuple[UNetCond, tuple[int, int, int], bool]:
    """The jdiff `UNetCond` a UNet2DConditionModel config.json describes, its sample shape (H, W, C) and whether
    its proj_in/proj_out are linear layers (else 1x1 convolutions)."""
    if config.get("addition_embed_type") == "text_time" or config.get("addition_time_embed_dim") is not None:
        raise PretrainedError(
            f"{CLASS} config addition_embed_type={config.get('addition_embed_type')!r}: an SDXL UNet (added text "
            "and time-id conditioning, a second text encoder) is not supported; jdiff runs SD 1.x / 2.x"
        )
    check_config_keys(config, USED, FIXED, CLASS)
    for key, want in FIXED.items():
        if key in config and config[key] != want:
            raise _err(key, config[key], repr(want))
    c = {**DEFAULTS, **{k: v for k, v in config.items() if k in USED and v is not None}}
    hgt, wid = sample_hw(config)
    boc = c["block_out_channels"]
    if not isinstance(boc, (list, tuple)) or not boc or not all(_is_int(v) and v > 0 for v in boc):
        raise _err("block_out_channels", boc, "a non-empty list of positive ints")
    n = len(boc)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for key, types, allowed in (("down_block_types", down, (DOWN, ATTN_DOWN)), ("up_block_types", up, (UP, ATTN_UP))):
        bad = [t for t in types if t not in allowed]
        if bad:
            raise _err(key, bad[0], ", ".join(allowed))
        if len(types) != n:
            raise _err(key, types, f"one block per block_out_channels entry ({n})")
    cross = tuple(t == ATTN_DOWN for t in down)
    if cross != tuple(up[n - 1 - lvl] == ATTN_UP for lvl in range(n)):
        raise _err("up_block_types", up, "cross-attention at the same levels as down_block_types (mirrored)")
    if min(hgt, wid) % 2 ** (n - 1):
        raise _err("sample_size", config.get("sample_size"), f"multiples of 2**{n - 1}")
    heads = c["num_attention_heads"] if config.get("num_attention_heads") is not None else c["attention_head_dim"]
    key = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n
    if len(heads) != n or not all(_is_int(h) and h > 0 and w % h == 0 for h, w in zip(heads, boc)):
        raise _err(key, c[key], f"a head count (int or one per level) dividing every width {list(boc)}")
    for k, lo in (("layers_per_block", 1), ("transformer_layers_per_block", 1), ("cross_attention_dim", 1)):
        if not _is_int(c[k]) or c[k] < lo:
            raise _err(k, c[k], f"an int >= {lo}")
    groups = c["norm_num_groups"]
    widths = set(boc)
    if not _is_int(groups) or groups < 1 or any(v % groups or num_groups(v, groups) != groups for v in widths):
        raise _err("norm_num_groups", groups, f"a divisor of every width {list(boc)} leaving >= 4 channels per group")
    for k in ("in_channels", "out_channels"):
        if not _is_int(c[k]) or c[k] < 1:
            raise _err(k, c[k], "an int >= 1")
    for k in ("freq_shift", "norm_eps", "dropout"):
        if isinstance(c[k], bool) or not isinstance(c[k], (int, float)) or not math.isfinite(c[k]):
            raise _err(k, c[k], "a finite number")
    if c["norm_eps"] <= 0:
        raise _err("norm_eps", c["norm_eps"], "a positive number")
    if c["downsample_padding"] not in (0, 1):
        raise _err("downsample_padding", c["downsample_padding"], "0, 1")
    for k in ("flip_sin_to_cos", "use_linear_projection"):
        if not isinstance(c[k], bool):
            raise _err(k, c[k], "true, false")
    if not 0 <= c["freq_shift"] < boc[0] // 2:
        raise _err("freq_shift", c["freq_shift"], f"0 <= freq_shift < {boc[0] // 2}")
    model = UNetCond(
        block_out_channels=tuple(boc),
        cross_attention=cross,
        heads=heads[0] if len(set(heads)) == 1 else heads,
        layers_per_block=c["layers_per_block"],
        transformer_layers=c["transformer_layers_per_block"],
        context_dim=c["cross_attention_dim"],
        out_channels=c["out_channels"],
        norm_groups=groups,
        norm_eps=float(c["norm_eps"]),
        cos_first=c["flip_sin_to_cos"],
        freq_shift=c["freq_shift"],
        downsample_padding=c["downsample_padding"],
        dropout=float(c["dropout"]),
    )
    return model, (hgt, wid, c["in_channels"]), c["use_linear_projection"]


def config_from_unet_cond(model: UNetCond, sample_shape: tuple[int, int, int], linear_projection: bool) -> dict:
    """The UNet2DConditionModel config.json of a jdiff `UNetCond` sampling ``sample_shape`` (H, W, C)."""
    hgt, wid, c_in = (int(v) for v in sample_shape)
    n = len(model.block_out_channels)
    heads = list(model.level_heads())
    eff = {w: num_groups(w, model.norm_groups) for w in sorted(set(model.block_out_channels))}
    if any(g != model.norm_groups for g in eff.values()):
        raise PretrainedError(
            f"UNetCond norm_groups={model.norm_groups} cannot be expressed in diffusers: jdiff uses {eff} groups for "
            "these widths, diffusers one norm_num_groups for all (needs every width a multiple of norm_groups with "
            ">= 4 channels per group)"
        )
    return {
        "_class_name": CLASS,
        "sample_size": hgt if hgt == wid else [hgt, wid],
        "in_channels": c_in,
        "out_channels": model.out_channels or c_in,
        "flip_sin_to_cos": bool(model.cos_first),
        "freq_shift": int(model.freq_shift) if float(model.freq_shift).is_integer() else model.freq_shift,
        "down_block_types": [ATTN_DOWN if a else DOWN for a in model.cross_attention],
        "up_block_types": [ATTN_UP if model.cross_attention[n - 1 - i] else UP for i in range(n)],
        "block_out_channels": list(model.block_out_channels),
        "layers_per_block": model.layers_per_block,
        "downsample_padding": model.downsample_padding,
        "dropout": model.dropout,
        "norm_num_groups": model.norm_groups,
        "norm_eps": model.norm_eps,
        "cross_attention_dim": model.context_dim,
        "transformer_layers_per_block": model.transformer_layers,
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "use_linear_projection": bool(linear_projection),
    }


BLOCK = {"norm1": "norm1", "norm2": "norm2", "norm3": "norm3", "attn1": "attn1", "attn2": "attn2"}


def _translate(n: int, linear_projection: bool):
    """jdiff UNetCond parameter path -> (diffusers names, layout kind) (jdiff's up level ``l`` is diffusers'
    ``up_blocks[n - 1 - l]``)."""

    def translate(path: tuple[str, ...]):
        *mods, leaf = path
        rest = []
        for m in mods[1:]:
            blk = re.fullmatch(r"block_(\d+)", m)
            if blk:
                rest += ["transformer_blocks", blk.group(1)]
            elif m == "to_out":
                rest += ["to_out", "0"]
            elif m in ("proj_in", "proj_out") and rest[-1:] == ["ff"]:
                rest += ["net", "0", "proj"] if m == "proj_in" else ["net", "2"]
            else:
                rest.append(
                    RES.get(m, {"dense_0": "linear_1", "dense_1": "linear_2", "shortcut": "conv_shortcut"}.get(m, m))
                )
        kind = "same"
        if leaf == "kernel":
            last = mods[-1]
            if last in ("conv", "conv_in", "conv_out", "conv_0", "conv_1"):
                kind = "conv"
            elif last == "shortcut" or (last in ("proj_in", "proj_out") and len(mods) == 2 and not linear_projection):
                kind = "dense_1x1"
            else:
                kind = "dense"
        return ((".".join([block_prefix(mods[0], n), *rest, leaf_suffix(leaf)]),),), kind

    return translate


def _abstract(model: UNetCond, sample_shape) -> Any:
    import jax.numpy as jnp

    h, w, c = sample_shape
    x, t = jnp.zeros((1, h, w, c)), jnp.zeros((1,))
    ctx = jnp.zeros((1, 1, model.context_dim))
    try:
        return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx))["params"]
    except ValueError as e:
        raise PretrainedError(f"{CLASS} config: {' '.join(str(e).split())}") from None


def unet_cond_params(model: UNetCond, sample_shape, tensors: dict[str, np.ndarray], linear_projection: bool) -> dict:
    """jdiff UNetCond params (numpy float32) from a UNet2DConditionModel state dict."""
    n, lpb = len(model.block_out_channels), model.layers_per_block
    check_repeats(tensors, r"down_blocks\.(\d+)\.", n, f"{CLASS} config block_out_channels has {n} levels")
    check_repeats(tensors, r"down_blocks\.0\.resnets\.(\d+)\.", lpb, f"{CLASS} config layers_per_block={lpb}")
    abstract = _abstract(model, sample_shape)
    links = build_links(abstract, _translate(n, linear_projection))
    return params_from_tensors(links, abstract, tensors, CLASS)


def unet_cond_tensors(model: UNetCond, sample_shape, params: Any, linear_projection: bool) -> dict[str, np.ndarray]:
    """The UNet2DConditionModel state dict of jdiff UNetCond params."""
    abstract = _abstract(model, sample_shape)
    links = build_links(abstract, _translate(len(model.block_out_channels), linear_projection))
    return tensors_from_params(links, jax.device_get(params))
