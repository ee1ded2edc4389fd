"""diffusers ``UNet2DModel`` (DDPM-style blocks) <-> jdiff `UNet`: config.json fields and weight names.

Supported: DownBlock2D / AttnDownBlock2D / UpBlock2D / AttnUpBlock2D (attention at the same levels down and
up), UNetMidBlock2D with attention, any layers_per_block, attention_head_dim, norm_num_groups (every width
with >= 4 channels per group, jdiff's rule), norm_eps, freq_shift, flip_sin_to_cos, resnet_time_scale_shift
"default" / "scale_shift", downsample_padding 0 / 1, num_class_embeds (the last row is jdiff's null label).
Everything else is refused with one `PretrainedError` line naming the key and the supported values.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np

from jdiff.models.layers import num_groups
from jdiff.models.unet import UNet
from jdiff.pretrained.files import PretrainedError, check_config_keys
from jdiff.pretrained.mapping import (
    abstract_params,
    build_links,
    check_repeats,
    leaf_suffix,
    params_from_tensors,
    tensors_from_params,
)

CLASS = "UNet2DModel"
DOWN, ATTN_DOWN, UP, ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"
# config keys whose value must be exactly this (diffusers' default) for the computation jdiff has
FIXED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "add_attention": True,
    "class_embed_type": None,
}
USED = (
    "sample_size",
    "in_channels",
    "out_channels",
    "freq_shift",
    "flip_sin_to_cos",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "dropout",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "resnet_time_scale_shift",
    "num_class_embeds",
    "num_train_timesteps",  # only read by time_embedding_type "learned"
)
DEFAULTS = {  # UNet2DModel's defaults for keys a config may leave out
    "in_channels": 3,
    "out_channels": 3,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": (DOWN, ATTN_DOWN, ATTN_DOWN, ATTN_DOWN),
    "up_block_types": (ATTN_UP, ATTN_UP, ATTN_UP, UP),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "dropout": 0.0,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "num_class_embeds": None,
}
OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # pre-0.14 names


def _err(key: str, value: Any, allowed: str) -> PretrainedError:
    return PretrainedError(f"UNet2DModel config {key}={value!r} is not supported; supported: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def sample_hw(config: dict) -> tuple[int, int]:
    """(H, W) of config['sample_size'] (an int or [H, W])."""
    s = config.get("sample_size")
    if _is_int(s) and s > 0:
        return s, s
    if isinstance(s, (list, tuple)) and len(s) == 2 and all(_is_int(v) and v > 0 for v in s):
        return int(s[0]), int(s[1])
    raise _err("sample_size", s, "a positive int or [height, width] (jdiff places attention by resolution)")


def unet_from_config(config: dict) -> tuple[UNet, tuple[int, int, int]]:
    """The jdiff `UNet` a UNet2DModel config.json describes, and its sample shape (H, W, C)."""
    cls = config.get("_class_name", CLASS)
    if cls != CLASS:
        raise PretrainedError(f"model config _class_name {cls!r} is not a {CLASS}")
    check_config_keys(config, USED, FIXED, "UNet2DModel")
    for key, want in FIXED.items():
        if key in config and config[key] != want:
            raise _err(key, config[key], repr(want))
    c = {**DEFAULTS, **{k: v for k, v in config.items() if k in USED}}
    hgt, wid = sample_hw(c)
    boc = c["block_out_channels"]
    if not isinstance(boc, (list, tuple)) or not boc or not all(_is_int(v) and v > 0 for v in boc):
        raise _err("block_out_channels", boc, "a non-empty list of positive ints")
    ch = boc[0]
    if any(v % ch for v in boc):
        raise _err("block_out_channels", boc, f"multiples of the first width {ch} (jdiff's ch * ch_mult)")
    n = len(boc)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for key, types, allowed in (("down_block_types", down, (DOWN, ATTN_DOWN)), ("up_block_types", up, (UP, ATTN_UP))):
        bad = [t for t in types if t not in allowed]
        if bad:
            raise _err(key, bad[0], ", ".join(allowed))
        if len(types) != n:
            raise _err(key, types, f"one block per block_out_channels entry ({n})")
    attn_levels = [lvl for lvl, t in enumerate(down) if t == ATTN_DOWN]
    if attn_levels != [lvl for lvl in range(n) if up[n - 1 - lvl] == ATTN_UP]:
        raise _err("up_block_types", up, "attention at the same levels as down_block_types (mirrored)")
    side = min(hgt, wid)
    if side % 2 ** (n - 1):
        raise _err("sample_size", c["sample_size"], f"multiples of 2**{n - 1}")
    lpb = c["layers_per_block"]
    if not _is_int(lpb) or lpb < 1:
        raise _err("layers_per_block", lpb, "an int >= 1")
    groups = c["norm_num_groups"]
    if not _is_int(groups) or groups < 1 or any(v % groups or num_groups(v, groups) != groups for v in boc):
        raise _err("norm_num_groups", groups, f"a divisor of every width {list(boc)} leaving >= 4 channels per group")
    shift = c["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise _err("resnet_time_scale_shift", shift, "'default', 'scale_shift'")
    attn_groups = c["attn_norm_num_groups"]
    if attn_groups != groups and not (attn_groups is None and shift == "default"):
        raise _err(
            "attn_norm_num_groups", attn_groups, f"{groups} (norm_num_groups), or null with 'default' time scale shift"
        )
    head_dim = c["attention_head_dim"]
    widths = [boc[-1]] + [boc[lvl] for lvl in attn_levels]
    if head_dim is not None and (not _is_int(head_dim) or head_dim < 1 or any(w % head_dim for w in widths)):
        raise _err("attention_head_dim", head_dim, f"null or a divisor of every attention width {sorted(set(widths))}")
    num_class = c["num_class_embeds"]
    if num_class is not None and (not _is_int(num_class) or num_class < 2):
        raise _err("num_class_embeds", num_class, "null or an int >= 2 (the last class is jdiff's null label)")
    for key in ("in_channels", "out_channels"):
        if not _is_int(c[key]) or c[key] < 1:
            raise _err(key, c[key], "an int >= 1")
    for key in ("freq_shift", "norm_eps", "dropout"):
        if not _is_num(c[key]) or not math.isfinite(c[key]):
            raise _err(key, c[key], "a finite number")
    if c["norm_eps"] <= 0:
        raise _err("norm_eps", c["norm_eps"], "a positive number")
    if not isinstance(c["flip_sin_to_cos"], bool):
        raise _err("flip_sin_to_cos", c["flip_sin_to_cos"], "true, false")
    if c["downsample_padding"] not in (0, 1):
        raise _err("downsample_padding", c["downsample_padding"], "0, 1")
    if not 0 <= c["freq_shift"] < ch // 2:
        raise _err("freq_shift", c["freq_shift"], f"0 <= freq_shift < {ch // 2}")
    c_in, c_out = c["in_channels"], c["out_channels"]
    learn_sigma = c_out == 2 * c_in
    model = UNet(
        ch=ch,
        ch_mult=tuple(v // ch for v in boc),
        num_res_blocks=lpb,
        attention_resolutions=tuple(side // 2**lvl for lvl in attn_levels),
        dropout=float(c["dropout"]),
        num_classes=None if num_class is None else num_class - 1,
        learn_sigma=learn_sigma,
        out_channels=None if learn_sigma or c_out == c_in else c_out,
        num_heads=1,
        num_head_channels=head_dim,
        use_scale_shift_norm=shift == "scale_shift",
        norm_groups=groups,
        norm_eps=float(c["norm_eps"]),
        cos_first=c["flip_sin_to_cos"],
        freq_shift=c["freq_shift"],
        downsample_padding=c["downsample_padding"],
    )
    return model, (hgt, wid, c_in)


def config_from_unet(model: UNet, sample_shape: tuple[int, int, int]) -> dict:
    """The UNet2DModel config.json of a jdiff `UNet` that samples ``sample_shape`` (H, W, C); PretrainedError
    for a UNet diffusers cannot express."""
    if not isinstance(model, UNet):
        raise PretrainedError(f"expected a jdiff UNet, got {type(model).__name__}")
    hgt, wid, c_in = (int(v) for v in sample_shape)
    boc = [model.ch * m for m in model.ch_mult]
    n = len(boc)

    def refuse(field: str, why: str):
        raise PretrainedError(f"UNet {field}={getattr(model, field)!r} cannot be expressed in diffusers: {why}")

    if model.resblock_updown:
        refuse("resblock_updown", "UNet2DModel resamples with convolutions (jdiff's resblock_updown=False)")
    groups = model.norm_groups
    widths = sorted(set(boc))
    eff = {w: num_groups(w, groups) for w in widths}
    if any(g != groups for g in eff.values()):
        refuse(
            "norm_groups",
            f"jdiff uses {eff} groups for these widths, diffusers one norm_num_groups for all "
            f"(needs every width a multiple of norm_groups with >= 4 channels per group)",
        )
    side = min(hgt, wid)
    resolutions = [side // 2**lvl for lvl in range(n)]
    attn_levels = [lvl for lvl, r in enumerate(resolutions) if r in tuple(model.attention_resolutions)]
    attn_widths = sorted({boc[-1], *(boc[lvl] for lvl in attn_levels)})
    if model.num_head_channels:
        head_dim = model.num_head_channels
    elif model.num_heads == 1:
        head_dim = None  # diffusers: one head of the full width
    else:
        dims = {w // model.num_heads for w in attn_widths}
        if len(dims) != 1 or any(w % model.num_heads for w in attn_widths):
            refuse("num_heads", f"diffusers needs one head width for attention widths {attn_widths}")
        head_dim = dims.pop()
    c_out = (model.out_channels or c_in) * (2 if model.learn_sigma else 1)
    shift = "scale_shift" if model.use_scale_shift_norm else "default"
    freq_shift = model.freq_shift
    return {
        "_class_name": CLASS,
        "sample_size": hgt if hgt == wid else [hgt, wid],
        "in_channels": c_in,
        "out_channels": c_out,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": int(freq_shift) if float(freq_shift).is_integer() else freq_shift,
        "flip_sin_to_cos": bool(model.cos_first),
        "down_block_types": [ATTN_DOWN if lvl in attn_levels else DOWN for lvl in range(n)],
        "up_block_types": [ATTN_UP if n - 1 - i in attn_levels else UP for i in range(n)],
        "block_out_channels": boc,
        "layers_per_block": model.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": model.downsample_padding,
        "dropout": model.dropout,
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": groups,
        "attn_norm_num_groups": groups if shift == "scale_shift" else None,
        "norm_eps": model.norm_eps,
        "resnet_time_scale_shift": shift,
        "add_attention": True,
        "num_class_embeds": None if model.num_classes is None else model.num_classes + 1,
    }


RES = {"norm_0": "norm1", "conv_0": "conv1", "emb_proj": "time_emb_proj", "norm_1": "norm2", "conv_1": "conv2"}


def block_prefix(top: str, n: int) -> str:
    """The diffusers module path of a jdiff U-Net top-level module (UNet2DModel and UNet2DConditionModel name
    their blocks alike) for a U-Net of ``n`` levels: jdiff's up level ``l`` is diffusers' ``up_blocks[n - 1 - l]``."""
    m = re.fullmatch(r"(down|up)_(\d+)_(res|attn)_(\d+)", top)
    if m:
        side, lvl, kind, i = m.groups()
        block = f"down_blocks.{lvl}" if side == "down" else f"up_blocks.{n - 1 - int(lvl)}"
        return f"{block}.{'resnets' if kind == 'res' else 'attentions'}.{i}"
    m = re.fullmatch(r"(down|up)_(\d+)_resample", top)
    if m:
        side, lvl = m.groups()
        if side == "down":
            return f"down_blocks.{lvl}.downsamplers.0"
        return f"up_blocks.{n - 1 - int(lvl)}.upsamplers.0"
    m = re.fullmatch(r"mid_res_(\d)", top)
    if m:
        return f"mid_block.resnets.{m.group(1)}"
    fixed = {
        "mid_attn": "mid_block.attentions.0",
        "time_embed": "time_embedding",
        "label_embed": "class_embedding",
        "norm_out": "conv_norm_out",
    }
    return fixed.get(top, top)  # conv_in, conv_out


def _translate(n: int):
    """jdiff UNet parameter path -> (diffusers names, layout kind) for a UNet of ``n`` levels (jdiff's up level
    ``l`` is diffusers' ``up_blocks[n - 1 - l]``)."""

    def translate(path: tuple[str, ...]):
        *mods, leaf = path
        base = block_prefix(mods[0], n)
        sub = {"dense_0": "linear_1", "dense_1": "linear_2", "norm": "group_norm", "shortcut": "conv_shortcut"}
        rest = [RES.get(m, sub.get(m, m)) for m in mods[1:] if m != "table"]
        kind = "same"
        if rest[-2:] == ["attn", "qkv"]:
            names = tuple(".".join([base, *rest[:-2], q, leaf_suffix(leaf)]) for q in ("to_q", "to_k", "to_v"))
            return (names,), "qkv"
        if rest[-2:] == ["attn", "proj"]:
            rest = [*rest[:-2], "to_out", "0"]
        if leaf == "kernel":
            kind = "conv" if mods[-1] in ("conv", "conv_in", "conv_out", "conv_0", "conv_1") else "dense"
            kind = "dense_1x1" if mods[-1] == "shortcut" else kind
        return (((".".join([base, *rest, leaf_suffix(leaf)]),),), kind)

    return translate


def normalize_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pre-0.14 diffusers attention names (query/key/value/proj_attn) as today's, 1x1-conv shaped as linear."""
    out = {}
    for name, a in tensors.items():
        parts = name.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in OLD_ATTENTION:
            name = ".".join([*parts[:-2], OLD_ATTENTION[parts[-2]], parts[-1]])
            if a.ndim == 4 and a.shape[2:] == (1, 1):
                a = a[:, :, 0, 0]
        out[name] = a
    return out


def unet_params(model: UNet, sample_shape, tensors: dict[str, np.ndarray]) -> dict:
    """jdiff UNet params (numpy) from a UNet2DModel state dict."""
    n, lpb = len(model.ch_mult), model.num_res_blocks
    check_repeats(tensors, r"down_blocks\.(\d+)\.", n, f"UNet2DModel config block_out_channels has {n} levels")
    check_repeats(tensors, r"down_blocks\.0\.resnets\.(\d+)\.", lpb, f"UNet2DModel config layers_per_block={lpb}")
    abstract = abstract_params(model, sample_shape, "UNet2DModel")
    links = build_links(abstract, _translate(len(model.ch_mult)))
    return params_from_tensors(links, abstract, normalize_names(tensors), "UNet2DModel")


def unet_tensors(model: UNet, sample_shape, params: Any) -> dict[str, np.ndarray]:
    """The UNet2DModel state dict of jdiff UNet params."""
    abstract = abstract_params(model, sample_shape, "UNet2DModel")
    return tensors_from_params(build_links(abstract, _translate(len(model.ch_mult))), jax.device_get(params))
