"""A `dit_latent` training step fed from a latent cache vs encoding every batch with the VAE on the fly (CPU).

The script writes the SD VAE architecture (sd-vae-ft-ema's config, random weights) as a diffusers directory
and a folder of --images random JPEGs at --size (default 64x64, so 8x8x4 latents: small shapes for a CPU; the
encoder's and the DiT's costs both scale with the pixel count, so their ratio is roughly that at 256x256),
encodes the folder once with `python -m jdiff.cli.encode` (timed), then trains the `dit_latent` preset (its
model, default dit_s2: dit_xl2's training state alone needs ~11 GB per run, at --batch) for --steps steps
after 2 warm-up steps, twice:

  on the fly  --data.dataset FOLDER --data.vae VAE: every batch decoded and encoded (posterior draw) in the
              data thread
  cache       --data.dataset CACHE --data.vae VAE: every batch read from the cache, z = mean + std * eps

and prints the wall seconds per step of each (the loop train.py runs: `Setup.batches` + `step_fn`, waited
for), their ratio (the speed-up of the cache), and per image the FLOPs of encoding and of one train step
(forward, backward, optimizer; XLA cost analysis of the lowered programs, nothing allocated) of the preset
itself (--flops-model dit_xl2 at --flops-size 256): (encode + step) / step is the speed-up a device whose
time follows FLOPs would see. The two timed runs alternate in --rounds rounds; the figures are medians.

    python benchmarks/latent_cache.py                       # dit_s2, batch 4, 64x64: a few minutes on 2 cores
    python benchmarks/latent_cache.py --model dit_b2 --batch 8 --size 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image


def write_vae(root: str) -> str:
    """The sd-vae-ft-ema architecture with random weights, as a diffusers AutoencoderKL directory."""
    import jax
    from safetensors.numpy import save_file

    from jdiff.models.vae import VAE_CONFIGS, get_vae
    from jdiff.pretrained.autoencoder import to_diffusers

    sys.path.insert(0, os.path.dirname(__file__))
    from dit_latent import random_params

    module = get_vae("sd")
    img = jax.ShapeDtypeStruct((1, 16, 16, 3), np.float32)
    params = random_params(jax.eval_shape(module.init, jax.random.key(1), img)["params"], 1)
    path = os.path.join(root, "vae")
    os.makedirs(path)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CONFIGS["sd"].items()}
    config.update(_class_name="AutoencoderKL", scaling_factor=0.18215)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in to_diffusers(params).items()},
        os.path.join(path, "diffusion_pytorch_model.safetensors"),
    )
    return path


def write_images(root: str, n: int, size: int) -> str:
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = os.path.join(root, "images", f"c{i % 4}")
        os.makedirs(cls, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(cls, f"{i}.jpg"))
    return os.path.join(root, "images")


class Run:
    """A dit_latent Setup over `dataset`, its state, and `steps()` timing the train loop."""

    def __init__(self, dataset: str, vae: str, args, workdir: str):
        import jax

        from jdiff.config import apply_overrides, get_preset
        from jdiff.run import replicated
        from jdiff.training import setup
        from jdiff.training.step import init_accumulator

        over = {
            "data.dataset": dataset,
            "data.vae": vae,
            "data.image_size": args.size,
            "model.name": args.model,
            "optim.batch_size": args.batch,
            "run.workdir": workdir,
        }
        self.s = setup(apply_overrides(get_preset("dit_latent"), over))
        self.state = self.s.init_fn()
        self.acc = jax.device_put(init_accumulator(), replicated(self.s.mesh))
        self.step = 0
        self.time(2)  # compile and warm up

    def time(self, n: int) -> float:
        import jax

        s = self.s
        start = time.perf_counter()
        with s.batches(self.step, n) as batches:
            for batch in batches:
                self.state, self.acc = s.step_fn(self.state, batch, s.schedule, self.acc)
            jax.block_until_ready(self.state)
        self.step += n
        return (time.perf_counter() - start) / n


def flops(vae_dir: str, images: str, model: str, size: int) -> dict:
    """FLOPs per image (XLA cost analysis of the lowered programs, nothing compiled or allocated) of encoding
    (one posterior draw) and of one train step of `model` at `size` x `size` pixels."""
    import jax

    from jdiff.config import apply_overrides, get_preset
    from jdiff.pretrained.autoencoder import load_autoencoder_dir
    from jdiff.training import setup

    vae = load_autoencoder_dir(vae_dir)
    x = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
    enc = jax.jit(lambda p, x: vae.encode_latents(p, x, jax.random.key(0))).lower(vae.params, x)
    over = {"data.dataset": images, "data.vae": vae_dir, "data.image_size": size, "model.name": model}
    s = setup(apply_overrides(get_preset("dit_latent"), {**over, "optim.batch_size": 1}), jax.devices()[:1])
    step = s.step_fn.lower(*s.abstract_step_args())

    def total(lowered):
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0))

    e, t = total(enc), total(step)
    return {
        "flops_model": model,
        "flops_pixels": size,
        "encode_gflops_per_image": round(e / 1e9, 1),
        "train_step_gflops_per_image": round(t / 1e9, 1),
        "flops_ratio": round((e + t) / t, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit_s2", help="the timed model (dit_xl2's state needs ~11 GB per run)")
    p.add_argument("--flops-model", default="dit_xl2", help="model of the FLOPs ratio (the preset's)")
    p.add_argument("--flops-size", type=int, default=256, help="image side of the FLOPs ratio (the preset's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="image side (latents: size / 8)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    from jdiff.cli import encode

    with tempfile.TemporaryDirectory() as tmp:
        vae = write_vae(tmp)
        images = write_images(tmp, args.images, args.size)
        cache = os.path.join(tmp, "cache")
        t = time.perf_counter()
        assert encode.main(["--vae", vae, "--dataset", images, "--out", cache, "--image_size", str(args.size)]) == 0
        encode_s = time.perf_counter() - t
        runs = {
            "on_the_fly": Run(images, vae, args, os.path.join(tmp, "fly")),
            "cache": Run(cache, vae, args, os.path.join(tmp, "cache_run")),
        }
        times: dict = {k: [] for k in runs}
        for r in range(args.rounds):
            for k in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                times[k].append(runs[k].time(args.steps))
        row = dict(
            model=args.model,
            batch=args.batch,
            pixels=args.size,
            latents=list(runs["cache"].s.image_shape),
            encode_once_s_per_image=round(encode_s / args.images, 4),
            step_s_on_the_fly=round(statistics.median(times["on_the_fly"]), 4),
            step_s_cache=round(statistics.median(times["cache"]), 4),
            load1=round(os.getloadavg()[0], 2),
        )
        row["speedup"] = round(row["step_s_on_the_fly"] / row["step_s_cache"], 2)
        del runs
        row.update(flops(vae, images, args.flops_model, args.flops_size))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
