"""CLIP text encoder (Radford et al. 2021, Sec. 2.4; transformers' CLIPTextModel), the text tower of Stable
Diffusion: token + learned position embeddings, pre-LayerNorm transformer layers with a causal mask, a final
LayerNorm.

``CLIPText().apply({'params': p}, ids, skip=0)`` maps int token ids (B, L) to states (B, L, hidden) float32:
the final LayerNorm of the output of layer ``num_layers - skip`` (``skip=0``: transformers' last_hidden_state;
``skip=1``: the penultimate layer, diffusers' ``clip_skip=1``). With `CLIP_VIT_L` (SD 1.x) it has the
123,060,480 parameters of openai/clip-vit-large-patch14's text model, with `OPENCLIP_H` (SD 2.x, 23 of the 24
layers kept) the 340,387,840 of stabilityai/stable-diffusion-2-1's text_encoder.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.layers import dot_product_attention

Dtype = Any
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's own approximation (OpenAI)
    "gelu": lambda x: nn.gelu(x, approximate=False),  # OpenCLIP
}


class CLIPLayer(nn.Module):
    """``x += out_proj(CausalMHA(LN(x))); x += fc2(act(fc1(LN(x))))`` on (B, L, hidden)."""

    heads: int
    intermediate: int
    act: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, c = x.shape
        split = lambda a: a.reshape(b, n, self.heads, c // self.heads)
        h = nn.LayerNorm(epsilon=self.eps, name="layer_norm1", **kw)(x)
        q, k, v = (split(nn.Dense(c, name=f"{s}_proj", **kw)(h)) for s in "qkv")
        h = dot_product_attention(q, k, v, is_causal=True).reshape(b, n, c)
        x = x + nn.Dense(c, name="out_proj", **kw)(h)
        h = nn.LayerNorm(epsilon=self.eps, name="layer_norm2", **kw)(x)
        h = ACTIVATIONS[self.act](nn.Dense(self.intermediate, name="fc1", **kw)(h))
        return x + nn.Dense(c, name="fc2", **kw)(h)


class CLIPText(nn.Module):
    """CLIP text transformer. Fields as transformers' CLIPTextConfig: vocab_size, hidden (hidden_size),
    layers (num_hidden_layers), heads (num_attention_heads), intermediate (intermediate_size), max_length
    (max_position_embeddings), act (hidden_act: "quick_gelu" or "gelu"), eps (layer_norm_eps)."""

    vocab_size: int = 49408
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_length: int = 77
    act: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, skip: int = 0) -> jax.Array:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"CLIPText act={self.act!r} is not supported; allowed: {', '.join(ACTIVATIONS)}")
        if self.hidden % self.heads:
            raise ValueError(f"CLIPText hidden={self.hidden} is not divisible by heads={self.heads}")
        if jnp.ndim(ids) != 2 or not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
            raise ValueError(f"token ids must be an integer (B, L) array, got {jnp.result_type(ids)} {jnp.shape(ids)}")
        n = jnp.shape(ids)[1]
        if n > self.max_length:
            raise ValueError(f"token ids have length {n}, more than the encoder's {self.max_length} positions")
        if not 0 <= skip < self.layers:
            raise ValueError(f"skip must be in [0, {self.layers - 1}] (layers from the end left out), got {skip}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = nn.Embed(self.vocab_size, self.hidden, name="token_embedding", **kw)(ids)
        pos = self.param("position_embedding", nn.initializers.normal(0.01), (self.max_length, self.hidden))
        h = tok + pos[:n].astype(self.dtype)
        for i in range(self.layers):
            if i < self.layers - skip:  # the skipped layers still own parameters (the checkpoint has them)
                h = CLIPLayer(self.heads, self.intermediate, self.act, self.eps, name=f"layer_{i}", **kw)(h)
            else:
                CLIPLayer(self.heads, self.intermediate, self.act, self.eps, name=f"layer_{i}", **kw)(h)
        h = nn.LayerNorm(epsilon=self.eps, name="final_layer_norm", **kw)(h)
        return h.astype(jnp.float32)


# transformers' text_config of the published encoders (parameter counts in the module docstring).
CLIP_VIT_L = dict(vocab_size=49408, hidden=768, layers=12, heads=12, intermediate=3072, act="quick_gelu")
OPENCLIP_H = dict(vocab_size=49408, hidden=1024, layers=23, heads=16, intermediate=4096, act="gelu")
