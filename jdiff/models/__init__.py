"""Model zoo: DDPM/ADM U-Net, DiT, embeddings, a registry of named configs and model stats; the Stable Diffusion
cross-attention U-Net (`UNetCond`, called with text-encoder states instead of labels, so outside the registry's
protocol) and CLIP text encoder (`CLIPText`), and `TextUNet`, both in one registered text-conditioned model.

Every registered model follows the model protocol (`jdiff.models.registry`): a Flax Linen module with the
fields num_classes, learn_sigma, dtype, remat and remat_policy and a pure ``apply``:
``model.apply({'params': p}, x, t, y=None, train=False, rngs={'dropout': k})``
with NHWC float ``x``, (B,) float timesteps ``t`` and optional (B,) int32 labels
``y``; the output is float32 NHWC.
"""

from jdiff.models.clip import CLIPText
from jdiff.models.dit import DiT, DiTBlock
from jdiff.models.embeddings import (
    LabelEmbedder,
    TimestepEmbedder,
    check_labels,
    drop_labels,
    sincos_1d,
    sincos_2d,
    timestep_embedding,
)
from jdiff.models.registry import (
    PROTOCOL_FIELDS,
    check_model_class,
    get_model,
    list_models,
    make_registry,
    model_class,
    model_config,
    model_input_shape,
)
from jdiff.models.stats import abstract_params, count_params, forward_flops, tree_size
from jdiff.models.text_unet import TextUNet, dummy_condition, is_text_model
from jdiff.models.unet import UNet
from jdiff.models.unet_cond import UNetCond

__all__ = [
    "UNet",
    "UNetCond",
    "TextUNet",
    "is_text_model",
    "dummy_condition",
    "CLIPText",
    "DiT",
    "DiTBlock",
    "get_model",
    "check_model_class",
    "make_registry",
    "PROTOCOL_FIELDS",
    "list_models",
    "model_class",
    "model_config",
    "model_input_shape",
    "count_params",
    "tree_size",
    "forward_flops",
    "abstract_params",
    "timestep_embedding",
    "TimestepEmbedder",
    "LabelEmbedder",
    "check_labels",
    "drop_labels",
    "sincos_1d",
    "sincos_2d",
]
