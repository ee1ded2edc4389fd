"""Few-step students of a diffusion model: the losses of consistency distillation / training
(`consistency`, Song et al. 2023; Song & Dhariwal 2023) and progressive distillation (`progressive`, Salimans
& Ho 2022). Pure functions of a denoiser (`jdiff.sampling.denoiser`), so every prediction type (eps, x0, v,
EDM, flow) is distilled the same way; the training step and the command line are `jdiff.training.distill`
and `jdiff.cli.distill`. The students are sampled by registered samplers: `consistency` (multistep
consistency sampling) and `ddim` (eta 0, spacing trailing)."""

from jdiff.distill import consistency, progressive

__all__ = ["consistency", "progressive"]
