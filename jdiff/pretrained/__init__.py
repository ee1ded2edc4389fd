"""Published diffusers-format checkpoints in and out (PyTorch is never needed; nothing is unpickled).

``load(path) -> Pretrained`` reads a diffusers pipeline or model directory (UNet2DModel with DDPM blocks,
DiTTransformer2DModel, optional AutoencoderKL ``vae/``, scheduler config); ``save(path, model, params, ...)``
writes a jdiff UNet / DiT in that format; ``read_model_dir(path)`` gives a model directory's (config, numpy
tensors). Errors are `PretrainedError` (a ValueError) with one line naming the cause; an export diffusers runs
differently from jdiff is a `PretrainedWarning` naming the difference.
"""

from jdiff.pretrained.files import PretrainedError, PretrainedUsageError, read_model_dir
from jdiff.pretrained.pipeline import Pretrained, PretrainedWarning, load, save
from jdiff.pretrained.scheduler import named_schedule

__all__ = [
    "PretrainedError",
    "PretrainedUsageError",
    "PretrainedWarning",
    "Pretrained",
    "load",
    "named_schedule",
    "read_model_dir",
    "save",
]
