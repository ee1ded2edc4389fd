"""A trainable text-to-image model: a CLIP text encoder (`CLIPText`) and the cross-attention U-Net of Stable
Diffusion (`UNetCond`) in one module, so that it follows the model protocol (`jdiff.models.registry`) with
text in place of class labels: ``y`` is (B, L) int32 token ids, and ``model.apply({"params": p}, x, t, y)``
is ``unet(x, t, text_encoder(y))`` (Rombach et al. 2022, Sec. 3.3: tau_theta(y) feeds every cross-attention).

The parameters are ``{"text_encoder": CLIPText params, "unet": UNetCond params}``, each in the layout of its
own module, so the halves load from and export to diffusers' CLIPTextModel and UNet2DConditionModel with
`jdiff.pretrained` (`jdiff.pretrained.text`, `jdiff.pretrained.unet_cond`). Classifier-free guidance's
unconditional input is the empty caption's token ids (the run's tokenizer of ""), as in Stable Diffusion
training (caption dropout) and StableDiffusionPipeline (the empty negative prompt).

``freeze_text=True`` stops gradients at the text states (a text encoder loaded from a checkpoint and kept
fixed, as Stable Diffusion trains with CLIP ViT-L/14 frozen); the optimizer leaves its parameters unchanged
(`jdiff.training.optim.make_optimizer`'s ``frozen``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.clip import CLIPText
from jdiff.models.remat import maybe_remat
from jdiff.models.unet_cond import UNetCond

Dtype = Any
TEXT_PARAMS = "text_encoder"  # the parameter subtree of the text encoder


class TextUNet(nn.Module):
    """Text encoder + cross-attention U-Net. The U-Net fields are `UNetCond`'s (``context_dim`` is the encoder's
    ``text_hidden``); the ``text_*`` fields, ``vocab_size`` and ``max_length`` are `CLIPText`'s. ``num_classes``
    must stay None (the condition is text) and ``learn_sigma`` False (no learned variances); ``remat``
    rematerialises the U-Net's forward pass as one block."""

    conditioning: ClassVar[str] = "text"
    num_classes: None = None
    learn_sigma: bool = False
    # the U-Net
    block_out_channels: Sequence[int] = (32, 64)
    cross_attention: Sequence[bool] = (True, True)
    heads: int | Sequence[int] = 4
    layers_per_block: int = 1
    transformer_layers: int = 1
    norm_groups: int = 8
    dropout: float = 0.0
    # the text encoder
    vocab_size: int = 49408
    max_length: int = 77
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    text_act: str = "quick_gelu"
    freeze_text: bool = False
    dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"

    def setup(self):
        if self.num_classes is not None:
            raise ValueError(f"TextUNet is conditioned on text; num_classes must be None, got {self.num_classes}")
        if self.learn_sigma:
            raise ValueError("TextUNet does not learn variances; learn_sigma must be False (diffusion.loss simple)")
        self.text_encoder = CLIPText(**self.text_fields())
        unet_cls = maybe_remat(UNetCond, self.remat, self.remat_policy, static_argnums=(4,))
        self.unet = unet_cls(**self.unet_fields())

    def text_fields(self) -> dict[str, Any]:
        """The `CLIPText` fields of this model (export to CLIPTextModel reads them)."""
        return dict(
            vocab_size=self.vocab_size,
            hidden=self.text_hidden,
            layers=self.text_layers,
            heads=self.text_heads,
            intermediate=self.text_intermediate,
            max_length=self.max_length,
            act=self.text_act,
            dtype=self.dtype,
        )

    def unet_fields(self) -> dict[str, Any]:
        """The `UNetCond` fields of this model (export to UNet2DConditionModel reads them)."""
        return dict(
            block_out_channels=tuple(self.block_out_channels),
            cross_attention=tuple(self.cross_attention),
            heads=self.heads if isinstance(self.heads, int) else tuple(self.heads),
            layers_per_block=self.layers_per_block,
            transformer_layers=self.transformer_layers,
            context_dim=self.text_hidden,
            norm_groups=self.norm_groups,
            dropout=self.dropout,
            dtype=self.dtype,
        )

    def encode(self, ids: jax.Array) -> jax.Array:
        """Text states (B, L, text_hidden) float32 of token ids (B, L) int."""
        states = self.text_encoder(ids)
        return jax.lax.stop_gradient(states) if self.freeze_text else states

    def denoise(self, x: jax.Array, t: jax.Array, context: jax.Array, train: bool = False) -> jax.Array:
        """The U-Net's prediction for text states ``context`` (from `encode`), float32 NHWC."""
        return self.unet(x, t, context, train)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False) -> jax.Array:
        if y is None:
            raise ValueError("TextUNet needs token ids y (B, L) int32 (the empty caption's for no text)")
        if jnp.ndim(y) != 2 or jnp.shape(y)[0] != x.shape[0]:
            raise ValueError(f"y must be token ids (B, L) with B={x.shape[0]}, got shape {jnp.shape(y)}")
        return self.denoise(x, t, self.encode(y), train)


def is_text_model(model: Any) -> bool:
    """Whether `model` (a module or class) is conditioned on text (y = token ids) rather than class labels."""
    return getattr(model, "conditioning", "label") == "text"


def dummy_condition(model: Any, batch: int = 1) -> jax.Array | None:
    """A zero condition ``y`` for `model.init` / tracing: (batch, max_length) token ids for a text model, (batch,)
    labels for a class-conditional one, None for an unconditional one."""
    if is_text_model(model):
        return jnp.zeros((batch, model.max_length), jnp.int32)
    return jnp.zeros((batch,), jnp.int32) if model.num_classes is not None else None
