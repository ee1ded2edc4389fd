"""Named starting points for `train.py --preset NAME`: each is a list of overrides of `TrainConfig()`."""

from jdiff.config.keys import apply_overrides
from jdiff.config.schema import ConfigError, TrainConfig

PRESETS: dict[str, dict[str, object]] = {
    # Default: CPU-sized, 8x8 digits, class-conditional; 2000 steps x 128 images: ~8 minutes on 2 cores.
    "digits": {},
    "mnist": {
        "data.dataset": "mnist",
        "model.name": "unet_mnist",
        "optim.batch_size": 128,
        "optim.steps": 50_000,
        "optim.lr": 2e-4,
        "optim.warmup_steps": 1000,
        "optim.lr_decay": "constant",
        "optim.adam_b2": 0.999,
        "optim.ema_decay": 0.9995,
        "data.label_dropout": 0.1,
        "run.workdir": "runs/mnist",
        "run.checkpoint_every": 5000,
        "run.log_every": 100,
        "sampling.every": 5000,
        "sampling.steps": 100,
        "sampling.guidance_scale": 2.0,
        "sampling.upscale": 2,
    },
    # DDPM CIFAR-10 (Ho et al. 2020, App. B): 35.7M U-Net, linear betas, T=1000, eps, Adam 2e-4, batch 128,
    # warm-up 5000, clip 1.0, dropout 0.1, random flips, EMA 0.9999, 800k steps.
    "cifar10": {
        "data.dataset": "cifar10",
        "model.name": "unet_ddpm_cifar10",
        "data.class_conditional": False,
        "data.label_dropout": 0.0,
        "data.random_flip": True,
        "optim.batch_size": 128,
        "optim.steps": 800_000,
        "optim.lr": 2e-4,
        "optim.warmup_steps": 5000,
        "optim.lr_decay": "constant",
        "optim.adam_b2": 0.999,
        "optim.grad_clip": 1.0,
        "optim.ema_decay": 0.9999,
        "optim.ema_warmup": False,
        "run.workdir": "runs/cifar10",
        "run.checkpoint_every": 10_000,
        "run.log_every": 100,
        "sampling.every": 50_000,
        "sampling.num_samples": 64,
        "sampling.columns": 8,
        "sampling.steps": 100,
        "sampling.upscale": 2,
    },
    # DiT-S/2 (Peebles & Xie 2023) in pixel space on CIFAR-10, class-conditional with CFG dropout, AdamW 1e-4
    # without weight decay, EMA 0.9999, batch 256.
    "dit": {
        "data.dataset": "cifar10",
        "model.name": "dit_s2",
        "model.learn_sigma": False,
        "data.class_conditional": True,
        "data.label_dropout": 0.1,
        "data.random_flip": True,
        "optim.batch_size": 256,
        "optim.steps": 400_000,
        "optim.lr": 1e-4,
        "optim.warmup_steps": 0,
        "optim.lr_decay": "constant",
        "optim.adam_b2": 0.999,
        "optim.grad_clip": 1.0,
        "optim.ema_decay": 0.9999,
        "run.workdir": "runs/dit",
        "run.checkpoint_every": 10_000,
        "run.log_every": 100,
        "sampling.every": 50_000,
        "sampling.num_samples": 100,
        "sampling.steps": 100,
        "sampling.guidance_scale": 1.5,
        "sampling.upscale": 2,
    },
}


def get_preset(name: str) -> TrainConfig:
    """The config of preset `name` (see PRESETS)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return apply_overrides(TrainConfig(), PRESETS[name].items())
