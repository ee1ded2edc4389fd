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
    # EDM (Karras et al. 2022) on the default digits data and model: EDM preconditioning and loss (log-normal
    # sigma, lambda weighting), the "edm" schedule (sigma 0.002..80, rho 7) as the sampling grid, so the default
    # linspace spacing is EDM's time grid; preview grids with EDM's Heun sampler (Alg. 1).
    "digits_edm": {
        "diffusion.prediction": "edm",
        "diffusion.schedule": "edm",
        "run.workdir": "runs/digits_edm",
        "sampling.sampler": "heun",
        "sampling.steps": 18,
        "sampling.spacing": "karras",
    },
    # Text-to-image on the embedded digits: captions from templates naming the digit ("a handwritten seven",
    # jdiff.data.captions), a CLIP text encoder trained from scratch with a BPE tokenizer learned from the
    # captions, the cross-attention U-Net (unet_text_small); 10% caption dropout for classifier-free guidance.
    "digits_text": {
        "model.name": "unet_text_small",
        "data.captions": "digits",
        "run.workdir": "runs/digits_text",
        "sampling.guidance_scale": 2.0,
    },
    # Flow matching (rectified flow, SD3's recipe) on the default digits data and model: the linear interpolant
    # x_s = (1 - s) x0 + s eps, velocity prediction, logit-normal s (SD3 defaults 0, 1), the flow schedule with
    # shift 1; previews with Euler on diffusers' FlowMatchEuler grid.
    "digits_flow": {
        "diffusion.prediction": "flow",
        "diffusion.schedule": "flow",
        "diffusion.t_sampling": "logit_normal",
        "run.workdir": "runs/digits_flow",
        "sampling.sampler": "euler",
        "sampling.steps": 20,
        "sampling.spacing": "flow",
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
    # EDM CIFAR-10 (Karras et al. 2022, Table 7, config F, unconditional): EDM preconditioning and loss, Adam
    # lr 1e-3 (betas 0.9/0.999, eps 1e-8), batch 512, lr ramp-up over 10M images (19,531 steps) then constant,
    # EMA half-life 0.5M images (decay 0.5^(512/500000) = 0.99929 per step), dropout 0.13, no gradient clipping,
    # 200M images (390,625 steps); sampling with Heun on the rho-7 grid, 18 steps (35 NFE).
    # What differs: the DDPM++ architecture (56M) is not in jdiff, so the DDPM U-Net (unet_ddpm_cifar10, 35.7M);
    # EDM's non-leaking augmentation (p 0.12, with augmentation labels) is not in jdiff, so random x-flips only;
    # EDM ramps the EMA half-life up as 0.05 x images seen, jdiff warms the decay up as (1+s)/(10+s);
    # squared errors are averaged over pixels rather than summed (a constant factor for Adam).
    "cifar10_edm": {
        "data.dataset": "cifar10",
        "model.name": "unet_ddpm_cifar10",
        "model.dropout": 0.13,
        "data.class_conditional": False,
        "data.label_dropout": 0.0,
        "data.random_flip": True,
        "diffusion.prediction": "edm",
        "diffusion.schedule": "edm",
        "optim.batch_size": 512,
        "optim.steps": 390_625,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 19_531,
        "optim.lr_decay": "constant",
        "optim.adam_b2": 0.999,
        "optim.grad_clip": 0.0,
        "optim.ema_decay": 0.99929,
        "optim.ema_warmup": True,
        "run.workdir": "runs/cifar10_edm",
        "run.checkpoint_every": 10_000,
        "run.log_every": 100,
        "sampling.every": 50_000,
        "sampling.num_samples": 64,
        "sampling.columns": 8,
        "sampling.sampler": "heun",
        "sampling.steps": 18,
        "sampling.spacing": "karras",
        "sampling.upscale": 2,
    },
    # Rectified flow on CIFAR-10: the cifar10 preset's U-Net and optimiser (Ho et al. 2020's recipe) trained on the
    # velocity with SD3's logit-normal timesteps (Esser et al. 2024, rf/lognorm(0, 1)), shift 1 (32x32 pixels);
    # previews with flow_heun (FlowMatchHeun) on the FlowMatchEuler grid, 25 steps (49 NFE).
    "cifar10_flow": {
        "data.dataset": "cifar10",
        "model.name": "unet_ddpm_cifar10",
        "data.class_conditional": False,
        "data.label_dropout": 0.0,
        "data.random_flip": True,
        "diffusion.prediction": "flow",
        "diffusion.schedule": "flow",
        "diffusion.t_sampling": "logit_normal",
        "optim.batch_size": 128,
        "optim.steps": 800_000,
        "optim.lr": 2e-4,
        "optim.warmup_steps": 5000,
        "optim.lr_decay": "constant",
        "optim.adam_b2": 0.999,
        "optim.grad_clip": 1.0,
        "optim.ema_decay": 0.9999,
        "optim.ema_warmup": False,
        "run.workdir": "runs/cifar10_flow",
        "run.checkpoint_every": 10_000,
        "run.log_every": 100,
        "sampling.every": 50_000,
        "sampling.num_samples": 64,
        "sampling.columns": 8,
        "sampling.sampler": "flow_heun",
        "sampling.steps": 25,
        "sampling.spacing": "flow",
        "sampling.upscale": 2,
    },
    # DiT-S/2 (Peebles & Xie 2023) in pixel space on CIFAR-10, class-conditional with CFG dropout, AdamW 1e-4
    # without weight decay, EMA 0.9999, batch 256; learned variance with the hybrid loss (as the paper).
    "dit": {
        "data.dataset": "cifar10",
        "model.name": "dit_s2",
        "model.learn_sigma": True,
        "diffusion.loss": "hybrid",
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
    # DiT-XL/2 in the latent space of the Stable Diffusion VAE (Peebles & Xie 2023, Sec. 4 / 5): ImageNet
    # 256x256 (tfds imagenet2012, prepared beforehand; or --data.dataset IMAGE_FOLDER) encoded per batch by
    # stabilityai/sd-vae-ft-ema (download it to ./sd-vae-ft-ema, or --data.vae PATH) to 32x32x4 latents x 0.18215;
    # AdamW lr 1e-4 constant, no weight decay, no warm-up, no gradient clipping, batch 256, EMA 0.9999,
    # horizontal flips, CFG label dropout 0.1; previews with guidance 4.0 (DiTPipeline's default); learned sigma
    # with the hybrid loss L_simple + 0.001 L_vlb, as the paper.
    "dit_latent": {
        "data.dataset": "imagenet2012",
        "data.image_size": 256,
        "data.channels": 3,
        "data.vae": "sd-vae-ft-ema",
        "data.class_conditional": True,
        "data.label_dropout": 0.1,
        "data.random_flip": True,
        "model.name": "dit_xl2",
        "model.learn_sigma": True,
        "diffusion.loss": "hybrid",
        "optim.batch_size": 256,
        "optim.steps": 400_000,
        "optim.lr": 1e-4,
        "optim.warmup_steps": 0,
        "optim.lr_decay": "constant",
        "optim.adam_b2": 0.999,
        "optim.weight_decay": 0.0,
        "optim.grad_clip": 0.0,
        "optim.ema_decay": 0.9999,
        "optim.ema_warmup": False,
        "run.workdir": "runs/dit_latent",
        "run.checkpoint_every": 50_000,
        "run.log_every": 100,
        "sampling.every": 50_000,
        "sampling.num_samples": 16,
        "sampling.columns": 4,
        "sampling.steps": 50,
        "sampling.guidance_scale": 4.0,
        "sampling.upscale": 1,
    },
    # SiT-XL/2 (Ma et al. 2024, "SiT", Table 1 / Sec. 4): the DiT-XL/2 backbone on SD-VAE latents (as dit_latent)
    # trained as a stochastic interpolant with the linear path x_s = (1 - s) x0 + s eps and velocity prediction,
    # s ~ U(0, 1); AdamW lr 1e-4 constant, no weight decay, batch 256, EMA 0.9999, CFG label dropout 0.1, 400k
    # steps (7M for the FID 2.06 row). Differs: SiT's ODE sampler is adaptive dopri5 and its SDE sampler
    # Euler-Maruyama with diffusion coefficient w_t = sigma_t (250 steps); jdiff previews with flow_heun
    # (Heun, 50 steps) on the FlowMatchEuler grid; SiT's time runs from data (0) to noise (1) as here, but its
    # model time input is s itself, jdiff's 1000 s (a rescaled embedding input); no learned sigma (SiT has none).
    "sit": {
        "data.dataset": "imagenet2012",
        "data.image_size": 256,
        "data.channels": 3,
        "data.vae": "sd-vae-ft-ema",
        "data.class_conditional": True,
        "data.label_dropout": 0.1,
        "data.random_flip": True,
        "model.name": "dit_xl2",
        "diffusion.prediction": "flow",
        "diffusion.schedule": "flow",
        "diffusion.t_sampling": "uniform",
        "optim.batch_size": 256,
        "optim.steps": 400_000,
        "optim.lr": 1e-4,
        "optim.warmup_steps": 0,
        "optim.lr_decay": "constant",
        "optim.adam_b2": 0.999,
        "optim.weight_decay": 0.0,
        "optim.grad_clip": 0.0,
        "optim.ema_decay": 0.9999,
        "optim.ema_warmup": False,
        "run.workdir": "runs/sit",
        "run.checkpoint_every": 50_000,
        "run.log_every": 100,
        "sampling.every": 50_000,
        "sampling.num_samples": 16,
        "sampling.columns": 4,
        "sampling.sampler": "flow_heun",
        "sampling.steps": 50,
        "sampling.spacing": "flow",
        "sampling.guidance_scale": 4.0,
        "sampling.upscale": 1,
    },
}


def get_preset(name: str) -> TrainConfig:
    """The config of preset `name` (see PRESETS)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return apply_overrides(TrainConfig(), PRESETS[name].items())
