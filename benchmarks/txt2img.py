"""Stable Diffusion txt2img on the CPU: jdiff's `text_to_image` vs diffusers' StableDiffusionPipeline, same run.

Configs: ``tiny`` (the sd_tiny test fixture: 16x16 images, 8x8x4 latents, loaded by both from the same
directory) and ``sd15`` (SD 1.5's UNet, CLIP ViT-L/14 text encoder and SD VAE with zero weights, the tiny
fixture's tokenizer with SD's 77-token context; 512x512 images, 64x64x4 latents). Batch 1, one prompt and the
empty negative prompt (classifier-free guidance 7.5: the UNet on a batch of 2), DDIM. Timed, wall seconds:

  first    jdiff's first call: trace, XLA compile (no persistent cache) and one run
  run      median of later calls (jdiff: the compiled program; diffusers: eager PyTorch, after a warm-up)

and the ratio diffusers run / jdiff run (> 1: jdiff faster). The figures are CPU-bound and shared-machine
sensitive: compare ratios within one run, never absolute seconds across machines. On a machine busy with other
work, run with OMP_NUM_THREADS=1: PyTorch's spinning worker threads otherwise lose most of their time to it.

    /work/venv-bench/bin/python benchmarks/txt2img.py                         # tiny, 10 steps
    /work/venv-bench/bin/python benchmarks/txt2img.py --config sd15 --steps 2 --reps 1
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
from conv_cpu import median_s  # benchmarks/ is sys.path[0] when a benchmark runs as a script

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "pretrained" / "sd_tiny"
PROMPT, GUIDANCE = "a photo of a cat", 7.5


def jdiff_pipeline(config: str):
    """A `Pretrained` for the config (sd15: zero weights, built from the abstract parameter shapes)."""
    import jax
    import jax.numpy as jnp

    from jdiff.models.clip import CLIP_VIT_L, CLIPText
    from jdiff.models.unet_cond import SD15, UNetCond
    from jdiff.models.vae import get_vae
    from jdiff.pretrained import load
    from jdiff.pretrained.autoencoder import Autoencoder
    from jdiff.pretrained.text import TextEncoder, load_tokenizer

    tiny = load(TINY)
    if config == "tiny":
        return tiny
    zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
    unet, text, vae = UNetCond(**SD15), CLIPText(**CLIP_VIT_L), get_vae("sd")
    key = jax.random.key(0)
    unet_p = jax.eval_shape(lambda: unet.init(key, jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 768))))
    text_p = jax.eval_shape(lambda: text.init(key, jnp.zeros((1, 77), jnp.int32)))
    vae_p = jax.eval_shape(lambda: vae.init(key, jnp.zeros((1, 64, 64, 3))))
    tokenizer = dataclasses.replace(load_tokenizer(TINY / "tokenizer", 77), max_length=77)
    return dataclasses.replace(
        tiny,
        model=unet,
        params=zeros(unet_p["params"]),
        sample_shape=(64, 64, 4),
        text_encoder=TextEncoder(text, zeros(text_p["params"])),
        tokenizer=tokenizer,
        vae=Autoencoder(vae, zeros(vae_p["params"])),
    )


def diffusers_pipeline(config: str):
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tiny = StableDiffusionPipeline.from_pretrained(TINY, safety_checker=None, torch_dtype=torch.float32)
    if config == "tiny":
        return tiny
    down, up = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, down_block_types=down, up_block_types=up, attention_head_dim=8
    )
    text = CLIPTextModel(  # CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14's text_config)
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    for m in (unet, text, vae):
        with torch.no_grad():
            for p in m.parameters():
                p.zero_()
    tokenizer = CLIPTokenizer.from_pretrained(TINY / "tokenizer", model_max_length=77)
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=tiny.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("tiny", "sd15"), default="tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="jdiff only")
    args = ap.parse_args()

    import jax

    from jdiff.pretrained import text_to_image

    p = jdiff_pipeline(args.config)
    run = lambda: np.asarray(
        text_to_image(p, [PROMPT], num_steps=args.steps, guidance_scale=GUIDANCE, rng=jax.random.key(0))
    )
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    ours = median_s(run, args.reps, warmup=0)
    print(f"{args.config}: batch 1, DDIM {args.steps} steps, guidance {GUIDANCE}, image {run().shape[1:3]}", flush=True)
    print(f"  jdiff     first call {first:8.2f} s (trace + compile + run)   run {ours:8.3f} s", flush=True)
    if args.no_torch:
        return
    import torch

    torch.manual_seed(0)
    pipe = diffusers_pipeline(args.config)
    theirs = median_s(
        lambda: pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=GUIDANCE, output_type="np"), args.reps
    )
    print(f"  diffusers run {theirs:8.3f} s ({torch.get_num_threads()} torch threads)")
    print(f"  ratio diffusers / jdiff (run): {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
