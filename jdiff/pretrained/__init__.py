"""Published diffusers-format checkpoints in and out (PyTorch is never needed; nothing is unpickled).

``load(path) -> Pretrained`` reads a diffusers pipeline or model directory (UNet2DModel with DDPM blocks,
DiTTransformer2DModel, optional AutoencoderKL ``vae/``, scheduler config; a Stable Diffusion 1.x / 2.x
StableDiffusionPipeline with its CLIP text encoder and tokenizer, sampled by ``text_to_image``);
``save(path, model, params, ...)`` writes a jdiff UNet / DiT in that format; ``read_model_dir(path)`` gives a
model directory's (config, numpy tensors). Errors are `PretrainedError` (a ValueError) with one line naming the
cause; an export diffusers runs differently from jdiff is a `PretrainedWarning` naming the difference.
"""

from jdiff.pretrained.files import PretrainedError, PretrainedUsageError, read_model_dir
from jdiff.pretrained.pipeline import Pretrained, PretrainedWarning, load, save
from jdiff.pretrained.scheduler import named_schedule
from jdiff.pretrained.text import PromptTruncatedWarning
from jdiff.pretrained.txt2img import text_to_image

__all__ = [
    "PretrainedError",
    "PretrainedUsageError",
    "PretrainedWarning",
    "PromptTruncatedWarning",
    "Pretrained",
    "load",
    "named_schedule",
    "read_model_dir",
    "save",
    "text_to_image",
]
