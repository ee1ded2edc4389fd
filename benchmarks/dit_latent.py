"""DiT + Stable Diffusion VAE on the CPU: jdiff vs diffusers (PyTorch) in the same run.

For DiT-S/2 and DiT-XL/2 (random weights, 1000 classes, learned sigma, 32x32x4 latents) and the SD VAE
decoder (sd-vae-ft-ema architecture: block_out_channels (128, 256, 512, 512), 2 layers per block, 4 latent
channels, random weights; 256x256x3 images), at batch 1 and 8, it times (median wall seconds after a warm-up
call that also compiles):

  dit_forward    one DiT forward (with labels)
  vae_decode     the VAE decoder of (B, 32, 32, 4) latents
  latent_sample  the whole latent sampler: `--nfe` DDIM steps with classifier-free guidance 4.0 (the batch
                 doubled, as DiTPipeline), then latents / 0.18215 through the decoder. jdiff: one jitted
                 program (`jdiff.run.Generator` with the VAE decode hook); diffusers: DiTPipeline with
                 DDIMScheduler.

and the compile time of jdiff's latent sampler (trace+lower, XLA compile) with JAX's persistent compilation
cache cold (an empty cache directory) and warm (a second process on the same directory), each in a fresh
process. Ratios are diffusers seconds / jdiff seconds (> 1: jdiff faster). Without torch the jdiff columns are
printed alone.

    /work/venv-bench/bin/python benchmarks/dit_latent.py                        # S/2 and XL/2, batch 1 and 8
    python benchmarks/dit_latent.py --models s2 --batches 1 --no-torch          # jdiff only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from conv_cpu import median_s  # benchmarks/ is sys.path[0] when a benchmark runs as a script

DIT = {"s2": dict(depth=12, hidden=384, heads=6), "xl2": dict(depth=28, hidden=1152, heads=16)}
GUIDANCE, NULL = 4.0, 1000
LATENT = (32, 32, 4)


# ----------------------------------------------------------------------------------------------- jdiff


def jdiff_parts(model_key: str):
    import jax
    import jax.numpy as jnp

    from jdiff.models import get_model
    from jdiff.models.vae import get_vae
    from jdiff.pretrained.autoencoder import Autoencoder

    model = get_model(f"dit_{model_key}", num_classes=1000)
    x = jax.ShapeDtypeStruct((1, *LATENT), jnp.float32)
    t, y = jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
    params = random_params(jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"], 0)
    vae_mod = get_vae("sd")
    img = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    vparams = random_params(jax.eval_shape(vae_mod.init, jax.random.key(1), img)["params"], 1)
    return model, params, Autoencoder(vae_mod, vparams)


def random_params(shapes, seed: int):
    """Random weights of the given shapes drawn with numpy (jitting Flax init of the 84M-parameter VAE takes
    minutes to compile on this CPU): kernels N(0, 1/fan_in), norm scales 1, biases and other vectors small."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
        return jnp.asarray(rng.standard_normal(s.shape, np.float32) * (fan_in**-0.5 if len(s.shape) > 1 else 0.02))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def make_generator(model, vae, batch: int, nfe: int):
    import jax

    import jdiff
    from jdiff.run import Generator, Settings

    return Generator(
        model,
        jdiff.get_schedule("linear", 1000),
        Settings(sampler="ddim", steps=nfe, spacing="leading", guidance=GUIDANCE),
        image_shape=LATENT,
        num_classes=1000,
        prediction="eps",
        batch=batch,
        devices=jax.devices()[:1],
        decode=vae.decode_latents,
        decode_params=vae.params,
    )


def jdiff_times(model_key: str, batch: int, nfe: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    model, params, vae = jdiff_parts(model_key)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *LATENT)), jnp.float32)
    t = jnp.full((batch,), 500.0)
    y = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    dec = jax.jit(vae.decode_latents)
    gen = make_generator(model, vae, batch, nfe)
    labels = np.asarray(y)
    return {
        "dit_forward": median_s(lambda: fwd(params, x, t, y).block_until_ready(), reps),
        "vae_decode": median_s(lambda: dec(vae.params, x).block_until_ready(), reps),
        "latent_sample": median_s(lambda: gen(params, 0, labels), reps),
    }


def compile_once(model_key: str, batch: int, nfe: int, cache_dir: str) -> dict:
    """Child process: compiles the latent sampler with abstract DiT params against `cache_dir`."""
    from jdiff.models import abstract_params
    from jdiff.run import enable_compilation_cache

    enable_compilation_cache(cache_dir)
    model, _, vae = jdiff_parts(model_key)
    gen = make_generator(model, vae, batch, nfe)
    stats = gen.compile(abstract_params(model, (1, *LATENT), with_labels=True))
    return {"trace_lower_s": stats.trace_lower_s, "compile_s": stats.compile_s, "cache_hit": stats.cache_hit}


def compile_times(model_key: str, batch: int, nfe: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--compile-child", model_key, str(batch), str(nfe), cache]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------------------------- diffusers


def torch_times(model_key: str, batch: int, nfe: int, reps: int) -> dict | None:
    try:
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    except ImportError:
        return None
    from jdiff.models.vae import VAE_CONFIGS

    c = DIT[model_key]
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=c["heads"],
        attention_head_dim=c["hidden"] // c["heads"],
        in_channels=4,
        out_channels=8,
        num_layers=c["depth"],
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()
    vae = AutoencoderKL(**VAE_CONFIGS["sd"], sample_size=256).eval()
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(batch, 4, 32, 32)
    t = torch.full((batch,), 500, dtype=torch.int64)
    y = torch.randint(0, 1000, (batch,))
    labels = y.tolist()
    with torch.inference_mode():
        return {
            "dit_forward": median_s(lambda: dit(x, timestep=t, class_labels=y).sample, reps),
            "vae_decode": median_s(lambda: vae.decode(x / 0.18215).sample, reps),
            "latent_sample": median_s(
                lambda: pipe(labels, guidance_scale=GUIDANCE, num_inference_steps=nfe, output_type="pt"), reps
            ),
        }


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="s2,xl2", help="comma-separated: s2, xl2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--nfe", type=int, default=2, help="DDIM steps of latent_sample (each 2B DiT evaluations)")
    p.add_argument("--reps", type=int, default=2, help="timed calls after the warm-up (XL: kept at <= 2)")
    p.add_argument("--no-torch", action="store_true", help="jdiff only")
    p.add_argument("--no-compile", action="store_true", help="skip the cold/warm compile measurement")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--compile-child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.compile_child:
        key, b, nfe, cache = a.compile_child
        print(json.dumps(compile_once(key, int(b), int(nfe), cache)))
        return 0
    import jax

    rows = []
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; nfe {a.nfe}, reps {a.reps}")
    for key in a.models.split(","):
        for b in (int(s) for s in a.batches.split(",")):
            reps = min(a.reps, 2) if key == "xl2" else a.reps
            j = jdiff_times(key, b, a.nfe, reps)
            tt = None if a.no_torch else torch_times(key, b, a.nfe, reps)
            for op, sec in j.items():
                row = {"model": f"DiT-{key.upper()[:-1]}/{key[-1]}", "batch": b, "op": op, "jdiff_s": sec}
                if tt is not None:
                    row.update(diffusers_s=tt[op], ratio=tt[op] / sec)
                rows.append(row)
                ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
                peer = f"{row['diffusers_s']:.3f}" if "diffusers_s" in row else "-"
                print(f"| {row['model']} | {b} | {op} | {sec:.3f} | {peer} | {ratio} |", flush=True)
    compiles = {}
    if not a.no_compile:
        for key in a.models.split(","):
            b = max(int(s) for s in a.batches.split(","))
            compiles[key] = c = compile_times(key, b, a.nfe)
            print(
                f"compile latent sampler DiT-{key} batch {b}: cold trace+lower {c['cold']['trace_lower_s']:.1f} s + "
                f"compile {c['cold']['compile_s']:.1f} s; warm cache ({'hit' if c['warm']['cache_hit'] else 'MISS'}) "
                f"trace+lower {c['warm']['trace_lower_s']:.1f} s + compile {c['warm']['compile_s']:.1f} s",
                flush=True,
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "compile": compiles, "nfe": a.nfe}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
