"""The accelerator benchmark: train-step time, images/s and MFU, sampling images/s and memory per device, in
float32 and bfloat16, for

  unet_ddpm_cifar10  the DDPM CIFAR-10 U-Net (35.7M) on 32x32x3, the cifar10 preset's step and sampler
  dit_xl2            DiT-XL/2 (675M) on 32x32x4 latents (the dit_latent preset without its VAE: the step the
                     latent cache feeds), class-conditional, sampled with guidance
  latent_sampler     dit_xl2 + the SD VAE decoder (sd-vae-ft-ema's architecture, random weights): the whole
                     latent sampler of dit_latent, latents to 256x256x3 images in one program (no training)

The train step is the one train.py runs (`jdiff.training.setup(config).step_fn`: loss, gradients, clipping,
AdamW, EMA), compiled ahead of time and timed over --steps steps on one random batch (data loading is not
measured). `--batch` is per device; the global batch is batch x devices.

MFU (Chowdhery et al. 2022, App. B) = model FLOPs per second / (peak FLOP/s per device x devices). Model FLOPs
come from jdiff's counter (`jdiff.models.forward_flops`: XLA's cost analysis of the forward pass, a multiply-add
= 2 FLOPs): a train step is 3 forward passes per image (forward + backward ~ 2 forwards), a sampler NFE x the
forward (x2 with classifier-free guidance, whose batch is doubled) + the VAE decoder once. The peak is looked up
by `jax.devices()[0].device_kind` in PEAK_TFLOPS (dense, per chip/GPU) or given with --peak-tflops; unknown
devices (CPUs) get no MFU. "float32" peaks are those of the precision JAX's default float32 matmuls run at:
TF32 tensor cores on A100/H100/H200, one bf16 pass on TPUs.

Memory per device: the train step's XLA memory plan (`jdiff.training.setup.MemoryReport`: state, batch,
activations, gradients) and, where the backend reports it (GPU, TPU; not CPU), the measured peak of
`device.memory_stats()` since the process started (so it includes the workloads printed before it).

    python benchmarks/accelerator.py                                  # GPU/TPU host: all workloads, both dtypes
    python benchmarks/accelerator.py --quick                          # CPU smoke run, small stand-ins (minutes)
    python benchmarks/accelerator.py --workloads dit_xl2 --dtypes bfloat16 --batch 32 --peak-tflops 989
    python benchmarks/accelerator.py --coordinator_address auto ...   # every host of a pod (docs/training-at-scale.md)

--quick replaces the models by CPU-sized stand-ins of the same families (unet_tiny, dit_tiny, the tiny VAE),
with batch 2 per device, 2 timed steps and 2 sampler steps; its figures only show that the script works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any, Optional

import numpy as np

# device_kind substring (checked in order) -> dense peak TFLOP/s per device: (bfloat16, float32 at JAX's default
# matmul precision). NVIDIA datasheets (SXM, without sparsity; float32 = TF32), Google Cloud TPU pages (per chip).
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("H200", (989.4, 494.7)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.4, 494.7)),
    ("A100", (312.0, 156.0)),
    ("TPU v6 lite", (918.0, 918.0)),  # v6e (Trillium)
    ("TPU v6e", (918.0, 918.0)),
    ("TPU v5 lite", (197.0, 197.0)),  # v5e
    ("TPU v5e", (197.0, 197.0)),
    ("TPU v5p", (459.0, 459.0)),
    ("TPU v5", (459.0, 459.0)),  # v5p reports "TPU v5"
    ("TPU v4", (275.0, 275.0)),
)
DTYPES = ("float32", "bfloat16")


def device_peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
    """Dense peak TFLOP/s of one device of `device_kind` for `dtype` (see PEAK_TFLOPS), None if unknown."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return peaks[0 if dtype == "bfloat16" else 1]
    return None


def mfu(flops_per_s: float, peak_tflops: Optional[float], devices: int) -> Optional[float]:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all `devices` (None without a peak)."""
    return None if not peak_tflops else flops_per_s / (peak_tflops * 1e12 * devices)


@dataclasses.dataclass(frozen=True)
class Workload:
    model: str  # registered model
    quick_model: str  # its CPU stand-in (--quick)
    preset: str  # training preset: optimizer, loss, EMA, sampler settings
    shape: tuple[int, int, int]  # what the model sees (latents for DiT)
    train: bool
    vae: Optional[str] = None  # VAE_CONFIGS name of the decoder in the sampler


WORKLOADS = {
    "unet_ddpm_cifar10": Workload("unet_ddpm_cifar10", "unet_tiny", "cifar10", (32, 32, 3), True),
    "dit_xl2": Workload("dit_xl2", "dit_tiny", "dit_latent", (32, 32, 4), True),
    "latent_sampler": Workload("dit_xl2", "dit_tiny", "dit_latent", (32, 32, 4), False, vae="sd"),
}
QUICK_VAE = "tiny"


def train_config(w: Workload, model: str, dtype: str, global_batch: int):
    """The preset of `w` with `model`, `dtype` and the batch; the data source is the digits set at 32x32x3
    (never read: the step runs on a random batch; DiT's latent shape replaces the image shape)."""
    from jdiff.config import apply_overrides, get_preset

    return apply_overrides(
        get_preset(w.preset),
        {
            "model.name": model,
            "model.dtype": dtype,
            "optim.batch_size": global_batch,
            "data.dataset": "digits",
            "data.image_size": 32,
            "data.channels": 3,
            "data.vae": None,
            "data.random_flip": False,
        },
    )


def build(w: Workload, model: str, dtype: str, global_batch: int):
    """The run's Setup on all devices, with the workload's input shape."""
    from jdiff.training import setup

    s = setup(train_config(w, model, dtype, global_batch))
    if s.image_shape != w.shape:
        s = dataclasses.replace(s, image_shape=w.shape)
    return s


def random_batch(s, seed: int = 0) -> dict:
    import jax

    from jdiff.run.mesh import batch_sharding

    rng = np.random.default_rng(seed)
    b = s.config.optim.batch_size
    host = {
        "image": rng.uniform(-1, 1, (b, *s.image_shape)).astype(np.float32),
        "label": rng.integers(0, max(s.num_classes or 1, 1), b).astype(np.int32),
    }
    return jax.device_put(host, batch_sharding(s.mesh))


def model_flops_per_image(s) -> float:
    """Forward FLOPs of one image (jdiff's counter, batch 1)."""
    from jdiff.models import forward_flops

    labels = s.num_classes is not None
    return forward_flops(s.model, s.abstract_state.params, (1, *s.image_shape), with_labels=labels)


def time_train(s, steps: int) -> dict:
    """Compiles the step, runs one (warm-up), then `steps` more: ms per step, images/s, the memory plan."""
    import jax

    from jdiff.run import replicated
    from jdiff.training.setup import MemoryReport
    from jdiff.training.step import init_accumulator

    t0 = time.perf_counter()
    compiled = s.step_fn.lower(*s.abstract_step_args()).compile()
    compile_s = time.perf_counter() - t0
    state, batch = s.init_fn(), random_batch(s)
    acc = jax.device_put(init_accumulator(), replicated(s.mesh))
    state, acc = compiled(state, batch, s.schedule, acc)
    jax.block_until_ready((state, acc))
    t0 = time.perf_counter()
    for _ in range(steps):
        state, acc = compiled(state, batch, s.schedule, acc)
    jax.block_until_ready((state, acc))
    dt = (time.perf_counter() - t0) / steps
    plan = MemoryReport.of(s.abstract_state, compiled)
    return {"compile_s": compile_s, "step_s": dt, "state": state, "plan_bytes": plan.peak}


def random_vae_params(vae_module, seed: int = 1):
    """Random weights for the VAE: kernels N(0, 1/fan_in), norm scales 1, vectors small (drawn with numpy:
    compiling Flax's init of the 84M-parameter VAE takes minutes on a CPU)."""
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(vae_module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, a):
        if getattr(path[-1], "key", "") == "scale":
            return jnp.ones(a.shape, a.dtype)
        scale = float(np.prod(a.shape[:-1])) ** -0.5 if len(a.shape) > 1 else 0.02
        return jnp.asarray(rng.standard_normal(a.shape, np.float32) * scale)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def time_sampling(s, params, w: Workload, vae_name: Optional[str], dtype: str, nfe: int, batch: int, reps: int):
    """Images/s of the preset's sampler (NFE `nfe`) on this host's devices, and its model FLOPs per image."""
    import jax
    import jax.numpy as jnp

    from jdiff.models.vae import get_vae
    from jdiff.pretrained.autoencoder import Autoencoder
    from jdiff.run import Generator, Settings

    c = s.config
    guided = s.num_classes is not None and c.sampling.guidance_scale is not None
    settings = Settings(
        sampler=c.sampling.sampler,
        steps=nfe,
        spacing=c.sampling.spacing,
        options=dict(c.sampling.options),
        guidance=c.sampling.guidance_scale if guided else None,
    )
    decode, decode_params, decode_flops = None, None, 0.0
    if vae_name is not None:
        module = get_vae(vae_name, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        vae = Autoencoder(module, random_vae_params(module))
        decode, decode_params = vae.decode_latents, vae.params
        z = jax.ShapeDtypeStruct((1, *w.shape), jnp.float32)
        cost = jax.jit(vae.decode_latents).lower(vae.params, z).cost_analysis()
        decode_flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    gen = Generator(
        s.model,
        s.schedule,
        settings,
        image_shape=w.shape,
        num_classes=s.num_classes,
        prediction=c.diffusion.prediction,
        batch=batch,
        devices=jax.local_devices(),
        decode=decode,
        decode_params=decode_params,
    )
    labels = None if s.num_classes is None else np.arange(batch) % s.num_classes
    params = jax.device_get(params) if jax.process_count() > 1 else params
    gen(params, 0, labels)  # compiles
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        gen(params, r, labels)
        times.append(time.perf_counter() - t0)
    per_image = nfe * model_flops_per_image(s) * (2 if guided else 1) + decode_flops
    out_shape = gen.output_shape
    return {"sample_s": float(np.median(times)), "flops_per_image": per_image, "output_shape": out_shape}


def device_peak_bytes() -> Optional[int]:
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def run_one(name: str, dtype: str, args) -> dict:
    import jax

    w = WORKLOADS[name]
    model = w.quick_model if args.quick else w.model
    vae_name = (QUICK_VAE if args.quick else w.vae) if w.vae else None
    devices = jax.device_count()
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or device_peak_tflops(kind, dtype)
    s = build(w, model, dtype, args.batch * devices)
    row: dict[str, Any] = {"workload": name, "model": model, "dtype": dtype, "device": kind, "devices": devices}
    row.update(batch_per_device=args.batch, image_shape=list(w.shape), peak_tflops=peak)
    fwd = model_flops_per_image(s)
    row["fwd_gflops_per_image"] = fwd / 1e9
    if w.train:
        t = time_train(s, args.steps)
        params = t["state"].ema_params
        ips = s.config.optim.batch_size / t["step_s"]
        row.update(compile_s=t["compile_s"], step_ms=t["step_s"] * 1e3, train_images_per_s=ips)
        row.update(train_mfu=mfu(3 * fwd * ips, peak, devices), step_plan_bytes=t["plan_bytes"])
    else:
        params = s.init_fn().ema_params
    local = jax.local_device_count()
    smp = time_sampling(s, params, w, vae_name, dtype, args.nfe, args.batch * local, args.reps)
    sips = args.batch * local / smp["sample_s"]
    row.update(nfe=args.nfe, sample_images_per_s=sips, sample_output_shape=list(smp["output_shape"]))
    row["sample_gflops_per_image"] = smp["flops_per_image"] / 1e9
    row.update(sample_mfu=mfu(smp["flops_per_image"] * sips, peak, local))
    row["device_peak_bytes"] = device_peak_bytes()
    return row


def _f(x, spec=".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def markdown_table(rows: list[dict]) -> str:
    out = [
        "| workload | model | dtype | devices | batch/dev | step ms | train img/s | train MFU | sample img/s (NFE) "
        "| sample MFU | step memory plan GiB/dev | device peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pct = lambda k: "n/a" if r.get(k) is None else f"{100 * r[k]:.1f}%"  # noqa: E731
        out.append(
            f"| {r['workload']} | {r['model']} | {r['dtype']} | {r['devices']} | {r['batch_per_device']} | "
            f"{_f(r.get('step_ms'))} | {_f(r.get('train_images_per_s'))} | {pct('train_mfu')} | "
            f"{_f(r['sample_images_per_s'], '.2f')} ({r['nfe']}) | {pct('sample_mfu')} | "
            f"{_gib(r.get('step_plan_bytes'))} | {_gib(r['device_peak_bytes'])} |"
        )
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated compute dtypes")
    ap.add_argument("--quick", action="store_true", help="CPU-sized stand-ins, batch 2, 2 steps, NFE 2")
    ap.add_argument("--batch", type=int, help="batch per device (default 32; --quick 2)")
    ap.add_argument("--steps", type=int, help="timed train steps (default 10; --quick 2)")
    ap.add_argument("--nfe", type=int, help="sampler steps (default 50; --quick 2)")
    ap.add_argument("--reps", type=int, help="timed sampler calls, median (default 3; --quick 1)")
    ap.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device (default: PEAK_TFLOPS by device)")
    ap.add_argument("--json", help="also write the records as JSON lines to this file")
    ap.add_argument("--coordinator_address", help="multi-host: HOST:PORT or 'auto' (TPU pod, SLURM)")
    ap.add_argument("--num_processes", type=int)
    ap.add_argument("--process_id", type=int)
    args = ap.parse_args(argv)
    quick = dict(batch=2, steps=2, nfe=2, reps=1)
    full = dict(batch=32, steps=10, nfe=50, reps=3)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
        if getattr(args, k) < 1:
            ap.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    args.workloads = [x for x in args.workloads.split(",") if x]
    args.dtypes = [x for x in args.dtypes.split(",") if x]
    bad = [x for x in args.workloads if x not in WORKLOADS] + [x for x in args.dtypes if x not in DTYPES]
    if bad:
        ap.error(f"unknown workload/dtype {bad}; workloads: {', '.join(WORKLOADS)}; dtypes: {', '.join(DTYPES)}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        ap.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from jdiff.run import maybe_initialize_distributed

    maybe_initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    import jax

    primary = jax.process_index() == 0
    if primary:
        print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}", file=sys.stderr)
    rows, out = [], open(args.json, "w") if args.json and primary else None
    for name in args.workloads:
        for dtype in args.dtypes:
            row = run_one(name, dtype, args)
            rows.append(row)
            if primary:
                print(json.dumps(row), flush=True)
                if out:
                    out.write(json.dumps(row) + "\n")
    if out:
        out.close()
    if primary:
        print("\n" + markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
