"""Sampler compile time and throughput: the `lax.scan` samplers vs a Python loop and an unrolled jit.

For each model x sampler x number of steps N, the scan sampler (`jdiff.sample` under one `jax.jit`,
ahead-of-time: trace -> lower -> compile) is timed for

  trace+lower   tracing to a jaxpr and lowering to StableHLO
  compile       XLA compilation with a cold persistent cache (a fresh temporary directory; this includes
                writing the entry, as the CLI does), in wall seconds and in process CPU seconds
  warm compile  the same program again after `jax.clear_caches()`: XLA work replaced by a cache read
  first call    trace+lower + compile + the first execution (time to the first sample in a new process)
  images/s      steady state, best of the timed calls
  overhead      per model evaluation, (sampler time - NFE x model forward time) / (NFE x model forward
                time), the forwards timed back to back in the same rounds; in wall and in CPU time
  MFU           forward FLOPs (XLA cost analysis) x NFE x images/s / peak, with the peak measured here
                by a large jitted f32 matmul (best of several measurements during the run)

On a machine shared with other jobs, wall times swing with their load; the CPU-time figures (all threads of
this process) measure the work done and are the ones to compare across rows.

Side by side, DDIM (eta = 0) written (a) as a Python loop over one jitted step and (b) as a Python loop
unrolled inside one jit (capped: its compile time grows with N), and, when torch + diffusers import, the
DDPM CIFAR-10 U-Net as a diffusers `UNet2DModel` (random weights) with `DDIMScheduler` in PyTorch.

Weights are random (their values do not change the work). Every row is printed as a JSON line as soon as
it is measured; markdown tables and the checks follow at the end. Combos whose execution would take too
long print "skipped (budget)" (their compile is still measured unless the total budget is spent).

    python benchmarks/sampler_compile.py --quick            # < 5 minutes on 2 CPU cores
    python benchmarks/sampler_compile.py                    # all models, samplers, steps (long on CPU)
    python benchmarks/sampler_compile.py --models unet_small --samplers ddim,heun --steps 10,1000 --batch 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff.models import abstract_params, forward_flops, get_model, tree_size
from jdiff.run import enable_compilation_cache
from jdiff.sampling import make_grid

# name -> (NHWC image shape, default batch on CPU)
MODELS = {"unet_small": ((8, 8, 1), 16), "unet_ddpm_cifar10": ((32, 32, 3), 2), "dit_tiny": ((8, 8, 1), 16)}
STEPS = (10, 50, 250, 1000)
QUICK = dict(
    models=("unet_small", "dit_tiny", "unet_ddpm_cifar10"),
    samplers=("ddim", "heun"),
    steps=(10, 1000),
    batch=4,
    unroll_max_steps=50,
    run_budget=8.0,
    budget=230.0,
    repeats=2,
    min_time=0.5,
)
# --quick on the 35.7M U-Net: DDIM only, batch 1, no unrolled variant (its compile alone takes minutes).
QUICK_CIFAR = dict(samplers=("ddim",), batch=1, unroll_max_steps=0, run_budget=25.0)
CACHE_HITS = "/jax/compilation_cache/cache_hits"


# ---------------------------------------------------------------------------------------------------
# Measuring.


class CacheHits:
    """Counts persistent-cache hits (a `jax.monitoring` event) while active."""

    def __init__(self):
        self.count = 0

    def _on(self, name, **kw):
        if name == CACHE_HITS:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_listener(self._on)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_listener(self._on)


def aot(jitted, *args) -> tuple[Any, dict]:
    """Ahead-of-time trace, lower and compile of `jitted` for `args`; returns (compiled, timings): wall
    seconds, and process CPU seconds (robust to other jobs on a shared machine)."""
    with CacheHits() as hits:
        t0, c0 = time.perf_counter(), time.process_time()
        traced = jitted.trace(*args)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2, c2 = time.perf_counter(), time.process_time()
        compiled = lowered.compile()
        t3, c3 = time.perf_counter(), time.process_time()
    return compiled, dict(
        trace_s=t1 - t0,
        lower_s=t2 - t1,
        trace_lower_s=t2 - t0,
        compile_s=t3 - t2,
        compile_cpu_s=c3 - c2,
        trace_lower_cpu_s=c2 - c0,
        cache_hit=hits.count > 0,
    )


def run_once(fn: Callable[[], Any]) -> float:
    return run_timed(fn)[0]


def run_timed(fn: Callable[[], Any], sync: Callable[[Any], Any] = jax.block_until_ready) -> tuple[float, float]:
    """(wall seconds, process CPU seconds summed over all threads) of fn() until its result is ready."""
    w, c = time.perf_counter(), time.process_time()
    sync(fn())
    return time.perf_counter() - w, time.process_time() - c


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of `repeats` calls (the machine may be shared: the minimum is the least disturbed)."""
    return min(run_once(fn) for _ in range(max(1, repeats)))


def measure_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted f32 (n, n) @ (n, n) matmul, best of `repeats`."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    return 2.0 * n**3 / best_time(lambda: mm(a, b), repeats)


def random_params(model, hwc: tuple[int, int, int], seed: int = 0) -> Any:
    """Random weights of the right shapes without compiling an init (kernels ~ N(0, 1/fan_in), biases 0,
    norm scales 1)."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "bias":
            return jnp.zeros(a.shape, a.dtype)
        if name == "scale":
            return jnp.ones(a.shape, a.dtype)
        fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 1
        std = 1.0 / math.sqrt(fan_in) if name == "kernel" else 0.02
        return jnp.asarray(rng.normal(0.0, std, a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(model, (1, *hwc)))


# ---------------------------------------------------------------------------------------------------
# The programs.


def scan_program(model, schedule, shape, sampler: str, steps: int):
    """jit of `jdiff.sample` (one lax.scan) from a given x_T."""

    def run(params, x_init, rng):
        return jdiff.sample(
            model.apply,
            schedule,
            shape,
            rng,
            sampler=sampler,
            num_steps=steps,
            params={"params": params},
            x_init=x_init,
        )

    return jax.jit(run)


def _ddim_update(model, params, x, t, alpha, sigma, alpha_next):
    """DDIM eta = 0 for an eps model: the update of `jdiff.sampling.ddim` without the stochastic term."""
    eps = model.apply({"params": params}, x, jnp.full((x.shape[0],), t, jnp.float32))
    x0 = (x - sigma * eps) / alpha
    return alpha_next * x0 + jnp.sqrt(jnp.maximum(1.0 - alpha_next**2, 0.0)) * eps


def loop_step_program(model):
    """One jitted DDIM step (params, x, (t, alpha, sigma, alpha_next)) -> x; a Python loop calls it N times
    with the step's four scalars from a host array (one small transfer per step, as such loops do)."""

    def step(params, x, c):
        return _ddim_update(model, params, x, c[0], c[1], c[2], c[3])

    return jax.jit(step)


def host_grid(schedule, steps: int) -> np.ndarray:
    """(N, 4) float32 rows (t, alpha, sigma, alpha_next) of the linspace grid, on the host."""
    g = make_grid(schedule, "linspace", steps)
    return np.stack([np.asarray(g.t), np.asarray(g.alpha), np.asarray(g.sigma), np.asarray(g.alpha_next)], 1)


def unrolled_program(model, schedule, steps: int):
    """N DDIM steps unrolled by a Python loop inside one jit."""

    def run(params, x):
        g = make_grid(schedule, "linspace", steps)
        for i in range(steps):
            x = _ddim_update(model, params, x, g.t[i], g.alpha[i], g.sigma[i], g.alpha_next[i])
        return x

    return jax.jit(run)


# ---------------------------------------------------------------------------------------------------
# The benchmark.


class Bench:
    """Runs the measurements of one invocation and keeps its rows."""

    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def peak(self) -> None:
        """Measures the matmul peak (again: on a shared machine the best of several measurements counts)."""
        self.emit(kind="peak", gflops=measure_peak() / 1e9)

    def emit(self, **row) -> dict:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def out_of_time(self) -> bool:
        return self.args.budget is not None and time.perf_counter() - self.start > self.args.budget

    def skip(self, **row) -> None:
        self.emit(**row, status="skipped (budget)")

    def sampler_only(self) -> None:
        """Compile time of each scan sampler around a trivial model (0.1 x): the part that is not the model."""
        sch, shape, n = jdiff.get_schedule("linear", 1000), (4, 8, 8, 1), max(self.args.steps)
        for sampler in self.args.samplers:
            prog = jax.jit(
                lambda x, rng: jdiff.sample(_trivial_model, sch, shape, rng, sampler=sampler, num_steps=n, x_init=x)
            )
            jax.clear_caches()
            _, tm = aot(prog, jnp.zeros(shape), jax.random.key(0))
            self.emit(
                kind="scan_trivial_model",
                sampler=sampler,
                steps=n,
                trace_lower_s=tm["trace_lower_s"],
                compile_s=tm["compile_s"],
                compile_cpu_s=tm["compile_cpu_s"],
            )

    def model(self, name: str) -> None:
        """All measurements of one model (with --quick's reduced settings for the CIFAR-10 U-Net)."""
        saved = self.args
        if saved.quick and name == "unet_ddpm_cifar10":
            self.args = argparse.Namespace(**{**vars(saved), **QUICK_CIFAR})
        try:
            self._model(name)
        finally:
            self.args = saved

    def _model(self, name: str) -> None:
        hwc, default_batch = MODELS[name]
        b = self.args.batch or default_batch
        if self.out_of_time():
            return self.skip(kind="forward", model=name, batch=b)
        self.peak()
        model = get_model(name)
        shape = (b, *hwc)
        params = random_params(model, hwc)
        sch = jdiff.get_schedule("linear", 1000)
        x_t = jax.random.normal(jax.random.key(1), shape, jnp.float32)
        t = jnp.full((b,), 500.0, jnp.float32)

        # The model alone: compile time and forward time at this batch, FLOPs per image.
        fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
        cfwd, tm = aot(fwd, params, x_t, t)
        cfwd(params, x_t, t).block_until_ready()
        t_fwd = best_time(lambda: cfwd(params, x_t, t), max(3, self.args.repeats))
        flops = forward_flops(model, params, shape) / b
        self.emit(
            kind="forward",
            model=name,
            batch=b,
            params=tree_size(params),
            trace_lower_s=tm["trace_lower_s"],
            compile_s=tm["compile_s"],
            compile_cpu_s=tm["compile_cpu_s"],
            forward_s=t_fwd,
            gflops_per_image=flops / 1e9,
        )
        ctx = dict(
            model=model,
            name=name,
            params=params,
            sch=sch,
            shape=shape,
            x_t=x_t,
            t_fwd=t_fwd,
            flops=flops,
            fwd_compile=tm["compile_s"],
            fwd_compile_cpu=tm["compile_cpu_s"],
            fwd_call=lambda x: cfwd(params, x, t),
        )

        ddim_out = {}
        for sampler in self.args.samplers:
            for n in self.args.steps:
                out = self.scan(ctx, sampler, n)
                if sampler == "ddim" and out is not None:
                    ddim_out[n] = out
        self.python_loop(ctx, ddim_out)
        self.unrolled(ctx, ddim_out)
        if name == "unet_ddpm_cifar10" and not self.args.no_torch:
            self.torch_peer(ctx)

    def _steady(self, ctx, call, nfe: int, first_run: float, forward=None, sync=jax.block_until_ready) -> dict:
        """Steady-state fields of a sampler call that took `first_run` s the first time.

        Rounds alternate one sampler call with `nfe` back-to-back model-forward calls (each fed the previous
        output), so both are timed over the same span under the same machine load; both are best-of. The
        overhead is given in wall time and in process CPU time (all threads): on a shared machine the
        latter is far less disturbed by other jobs. At least --repeats rounds, more until --min-time s are
        spent (at most 20), within the run budget.
        """
        b, forward = ctx["shape"][0], forward or ctx["fwd_call"]

        def forwards():
            x = ctx["x_t"]
            for _ in range(nfe):
                x = forward(x)
            return x

        best = best_fwd = best_cpu = best_fwd_cpu = math.inf
        reps, spent = 0, 0.0
        while reps < 20 and (reps < self.args.repeats or spent < self.args.min_time):
            if reps >= 1 and spent + 2 * first_run > self.args.run_budget:
                break
            (dt, ct), (df, cf) = run_timed(call, sync), run_timed(forwards, sync)
            best, best_fwd = min(best, dt), min(best_fwd, df)
            best_cpu, best_fwd_cpu = min(best_cpu, ct), min(best_fwd_cpu, cf)
            spent, reps = spent + dt + df, reps + 1
        return dict(
            images_per_s=b / best,
            s_per_call=best,
            repeats=reps,
            forward_s=best_fwd / nfe,
            overhead_per_nfe=(best - best_fwd) / best_fwd,
            cpu_overhead_per_nfe=(best_cpu - best_fwd_cpu) / best_fwd_cpu,
            gflops_per_s=ctx["flops"] * nfe * b / best / 1e9,
        )

    def scan(self, ctx, sampler: str, n: int):
        name, b, t_fwd = ctx["name"], ctx["shape"][0], ctx["t_fwd"]
        nfe = jdiff.SAMPLERS[sampler].nfe(n)
        base = dict(kind="scan", model=name, sampler=sampler, steps=n, nfe=nfe, batch=b)
        if self.out_of_time():
            return self.skip(**base)
        prog = scan_program(ctx["model"], ctx["sch"], ctx["shape"], sampler, n)
        args = (ctx["params"], ctx["x_t"], jax.random.key(2))
        jax.clear_caches()
        compiled, cold = aot(prog, *args)
        row = dict(
            base, **_cold_compile(cold, ctx), compile_cpu_vs_forward=cold["compile_cpu_s"] / ctx["fwd_compile_cpu"]
        )
        jax.clear_caches()
        _, warm = aot(prog, *args)
        row.update(
            warm_trace_lower_s=warm["trace_lower_s"], warm_compile_s=warm["compile_s"], warm_cache_hit=warm["cache_hit"]
        )
        est = nfe * t_fwd
        out = None
        if 2 * est > self.args.run_budget:
            row.update(status="skipped (budget)", est_run_s=est)
        else:
            first = run_once(lambda: compiled(*args))
            row.update(first_call_s=cold["trace_lower_s"] + cold["compile_s"] + first)
            row.update(self._steady(ctx, lambda: compiled(*args), nfe, first), status="ok")
            out = np.asarray(compiled(*args))
        self.emit(**row)
        return out

    def python_loop(self, ctx, ddim_out) -> None:
        """DDIM as N calls of one jitted step: compiled once, whatever N."""
        name, b, t_fwd = ctx["name"], ctx["shape"][0], ctx["t_fwd"]
        if self.out_of_time():
            return self.skip(kind="python_loop", model=name, sampler="ddim", batch=b)
        params, x_t = ctx["params"], ctx["x_t"]
        step = loop_step_program(ctx["model"])
        jax.clear_caches()
        compiled, cold = aot(step, params, x_t, host_grid(ctx["sch"], 1)[0])
        for n in self.args.steps:
            base = dict(
                kind="python_loop", model=name, sampler="ddim", steps=n, nfe=n, batch=b, **_cold_compile(cold, ctx)
            )
            if self.out_of_time():
                self.skip(**base)
                continue
            grid = host_grid(ctx["sch"], n)

            def loop():
                x = x_t
                for i in range(n):
                    x = compiled(params, x, grid[i])
                return x

            if 2 * n * t_fwd > self.args.run_budget:
                self.emit(**base, status="skipped (budget)", est_run_s=n * t_fwd)
                continue
            first = run_once(loop)
            row = dict(base, first_call_s=cold["trace_lower_s"] + cold["compile_s"] + first)
            row.update(self._steady(ctx, loop, n, first), **_diff_vs_scan(np.asarray(loop()), ddim_out.get(n)))
            self.emit(**row, status="ok")

    def unrolled(self, ctx, ddim_out) -> None:
        """DDIM unrolled inside one jit: compile time grows with N, so N is capped."""
        name, b, t_fwd = ctx["name"], ctx["shape"][0], ctx["t_fwd"]
        params, x_t = ctx["params"], ctx["x_t"]
        prev: Optional[tuple[int, float]] = None
        for n in self.args.steps:
            base = dict(kind="unrolled", model=name, sampler="ddim", steps=n, nfe=n, batch=b)
            if n > self.args.unroll_max_steps:
                self.emit(
                    **base, status=f"skipped (cap: unrolled variant limited to {self.args.unroll_max_steps} steps)"
                )
                continue
            # Compile time grows ~linearly with N: extrapolate from the previous N.
            est = None if prev is None else (prev[1] + 1.0) * n / prev[0]
            if self.out_of_time() or (est is not None and est > self.args.unroll_budget):
                self.emit(**base, status="skipped (budget)", est_compile_s=est)
                continue
            prog = unrolled_program(ctx["model"], ctx["sch"], n)
            jax.clear_caches()
            compiled, cold = aot(prog, params, x_t)
            prev = (n, cold["trace_lower_s"] + cold["compile_s"])
            row = dict(base, **_cold_compile(cold, ctx))
            if 2 * n * t_fwd > self.args.run_budget:
                self.emit(**row, status="skipped (budget)", est_run_s=n * t_fwd)
                continue
            first = run_once(lambda: compiled(params, x_t))
            row.update(first_call_s=cold["trace_lower_s"] + cold["compile_s"] + first)
            row.update(
                self._steady(ctx, lambda: compiled(params, x_t), n, first),
                **_diff_vs_scan(np.asarray(compiled(params, x_t)), ddim_out.get(n)),
            )
            self.emit(**row, status="ok")

    def torch_peer(self, ctx) -> None:
        """diffusers UNet2DModel configured like DDPM CIFAR-10 + DDIMScheduler, PyTorch eager on CPU."""
        try:
            import torch
            from diffusers import DDIMScheduler, UNet2DModel
        except ImportError as e:
            self.emit(kind="torch_diffusers", model=ctx["name"], status=f"skipped (not importable: {e.name})")
            return
        b = ctx["shape"][0]
        torch.manual_seed(0)
        unet = UNet2DModel(  # google/ddpm-cifar10-32's config
            sample_size=32,
            in_channels=3,
            out_channels=3,
            layers_per_block=2,
            block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            downsample_padding=0,
            flip_sin_to_cos=False,
            freq_shift=1,
            norm_eps=1e-6,
            dropout=0.1,
            attention_head_dim=None,  # one head over all channels, as in DDPM and jdiff (default: width 8)
        ).eval()
        n_params = sum(p.numel() for p in unet.parameters())
        sched = DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule="linear",
            beta_start=1e-4,
            beta_end=0.02,
            clip_sample=False,
            timestep_spacing="linspace",
        )
        x_t = torch.randn(b, 3, 32, 32)
        with torch.inference_mode():
            fwd = lambda: unet(x_t, 500).sample
            fwd()
            t_fwd = min(run_timed(fwd, _no_sync)[0] for _ in range(max(3, self.args.repeats)))
            self.emit(
                kind="torch_forward",
                model="diffusers UNet2DModel (DDPM CIFAR-10 config)",
                batch=b,
                params=n_params,
                forward_s=t_fwd,
                torch=torch.__version__,
                threads=torch.get_num_threads(),
            )
            for n in self.args.steps:
                base = dict(kind="torch_diffusers", model=ctx["name"], sampler="ddim", steps=n, nfe=n, batch=b)
                if self.out_of_time() or 2 * n * t_fwd > self.args.run_budget:
                    self.emit(**base, status="skipped (budget)", est_run_s=n * t_fwd)
                    continue

                def run():
                    sched.set_timesteps(n)
                    x = x_t
                    for t in sched.timesteps:
                        x = sched.step(unet(x, t).sample, t, x).prev_sample
                    return x

                first = run_timed(run, _no_sync)[0]
                tctx = dict(ctx, x_t=x_t)
                row = self._steady(tctx, run, n, first, forward=lambda x: unet(x, 500).sample, sync=_no_sync)
                self.emit(**base, first_call_s=first, **row, status="ok")


def _trivial_model(x, t):
    return 0.1 * x


def _no_sync(x):  # PyTorch on the CPU is synchronous
    return x


def _cold_compile(cold: dict, ctx: dict) -> dict:
    """A row's cold-compile columns, with the compile time relative to one forward pass's."""
    return dict(
        trace_lower_s=cold["trace_lower_s"],
        compile_s=cold["compile_s"],
        compile_cpu_s=cold["compile_cpu_s"],
        compile_vs_forward=cold["compile_s"] / ctx["fwd_compile"],
    )


def _diff_vs_scan(x: np.ndarray, ref: Optional[np.ndarray]) -> dict:
    """Relative max difference to the scan DDIM sample from the same x_T (a correctness check)."""
    if ref is None:
        return {}
    return {"rel_diff_vs_scan": float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-12))}


# ---------------------------------------------------------------------------------------------------
# Reporting.


def _fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def add_mfu(rows: list[dict]) -> float:
    """Adds "mfu" (achieved model FLOP/s over the best measured matmul peak) to the rows; returns the peak."""
    peak = max(r["gflops"] for r in rows if r["kind"] == "peak")
    for r in rows:
        if r.get("gflops_per_s") is not None:
            r["mfu"] = round(r["gflops_per_s"] / peak, 4)
    return peak


def report(rows: list[dict]) -> str:
    peaks = [r["gflops"] for r in rows if r["kind"] == "peak"]
    out = [
        f"Peak (jitted 2048^3 f32 matmul, best of {len(peaks)} measurements during the run): "
        f"{max(peaks):.1f} GFLOP/s (min {min(peaks):.1f})",
        "",
    ]
    fwd = {r["model"]: r for r in rows if r["kind"] == "forward" and r.get("compile_s") is not None}
    out.append("Model forward (one jitted call):")
    out.append(
        _table(
            ["model", "batch", "params", "GFLOPs/image", "compile s", "compile CPU s", "forward ms"],
            [
                [
                    m,
                    r["batch"],
                    r["params"],
                    r["gflops_per_image"],
                    r["compile_s"],
                    r["compile_cpu_s"],
                    1e3 * r["forward_s"],
                ]
                for m, r in fwd.items()
            ],
        )
    )
    scan = [r for r in rows if r["kind"] == "scan"]
    out += ["", "Scan samplers (jdiff.sample, one jit + lax.scan):"]
    out.append(
        _table(
            [
                "model",
                "sampler",
                "steps",
                "NFE",
                "trace+lower s",
                "compile s",
                "compile CPU s",
                "compile / fwd compile (CPU)",
                "warm-cache compile s",
                "first call s",
                "images/s",
                "overhead/NFE wall",
                "overhead/NFE CPU",
                "MFU",
                "status",
            ],
            [
                [
                    r["model"],
                    r["sampler"],
                    r["steps"],
                    r["nfe"],
                    r.get("trace_lower_s"),
                    r.get("compile_s"),
                    r.get("compile_cpu_s"),
                    r.get("compile_cpu_vs_forward"),
                    r.get("warm_compile_s"),
                    r.get("first_call_s"),
                    r.get("images_per_s"),
                    _pct(r.get("overhead_per_nfe")),
                    _pct(r.get("cpu_overhead_per_nfe")),
                    _pct(r.get("mfu"), sign=False),
                    r.get("status"),
                ]
                for r in scan
            ],
        )
    )
    ddim = [
        r
        for r in rows
        if r["kind"] in ("scan", "python_loop", "unrolled", "torch_diffusers")
        and r.get("sampler") == "ddim"
        and "steps" in r
    ]
    ddim.sort(key=lambda r: (r["model"], r["steps"]))
    out += [
        "",
        "DDIM (eta = 0) four ways: scan (one jit) | Python loop over a jitted step | unrolled in one jit"
        " | PyTorch diffusers (eager):",
    ]
    out.append(
        _table(
            [
                "model",
                "steps",
                "variant",
                "trace+lower s",
                "compile s",
                "first call s",
                "images/s",
                "ms/step",
                "overhead/NFE wall",
                "overhead/NFE CPU",
                "status",
            ],
            [
                [
                    r["model"],
                    r["steps"],
                    r["kind"],
                    r.get("trace_lower_s"),
                    r.get("compile_s"),
                    r.get("first_call_s"),
                    r.get("images_per_s"),
                    None if r.get("s_per_call") is None else 1e3 * r["s_per_call"] / r["steps"],
                    _pct(r.get("overhead_per_nfe")),
                    _pct(r.get("cpu_overhead_per_nfe")),
                    r.get("status"),
                ]
                for r in ddim
            ],
        )
    )
    out += [
        "",
        "Checks (targets: compile flat in N, 1000 within 1.3x of 10; close to one model call's compile;"
        " warm cache near zero; overhead < 5%):",
    ]
    out += checks(rows, fwd)
    return "\n".join(out)


def _pct(v, sign: bool = True) -> Optional[str]:
    return None if v is None else f"{100 * v:{'+' if sign else ''}.1f}%"


def checks(rows: list[dict], fwd: dict) -> list[str]:
    lines = []
    scan = [r for r in rows if r["kind"] == "scan" and r.get("compile_s") is not None]
    for m in sorted({r["model"] for r in scan}):
        for s in sorted({r["sampler"] for r in scan if r["model"] == m}):
            rs = {r["steps"]: r for r in scan if r["model"] == m and r["sampler"] == s}
            lo, hi = min(rs), max(rs)
            if lo != hi:
                ratio = rs[hi]["compile_s"] / rs[lo]["compile_s"]
                cpu = rs[hi]["compile_cpu_s"] / rs[lo]["compile_cpu_s"]
                ok = lambda v: "within" if v <= 1.3 else "NOT within"
                lines.append(
                    f"- {m} {s}: compile N={hi} / N={lo} = {ratio:.2f}x wall ({ok(ratio)} 1.3x), "
                    f"{cpu:.2f}x CPU ({ok(cpu)} 1.3x); scan compile / forward compile (CPU) = "
                    f"{rs[lo]['compile_cpu_vs_forward']:.2f}x (N={lo}), "
                    f"{rs[hi]['compile_cpu_vs_forward']:.2f}x (N={hi})"
                )
    if scan:
        warm = [r["warm_compile_s"] / r["compile_s"] for r in scan if r.get("warm_compile_s") is not None]
        hits = sum(bool(r["warm_cache_hit"]) for r in scan)
        lines.append(
            f"- warm persistent cache: compile {100 * min(warm):.1f}%..{100 * max(warm):.1f}% of cold "
            f"(cache hit in {hits}/{len(scan)} programs)"
        )
    for kind in ("scan", "python_loop", "unrolled", "torch_diffusers"):
        rs = [r for r in rows if r["kind"] == kind and r.get("overhead_per_nfe") is not None]
        if rs:
            lines.append(
                f"- {kind} overhead per NFE beyond the model call (wall | CPU time): "
                + ", ".join(
                    f"{r['model']}/{r['sampler']}/N={r['steps']}: {100 * r['overhead_per_nfe']:+.1f}% | "
                    f"{100 * r['cpu_overhead_per_nfe']:+.1f}%"
                    for r in rs
                )
            )
    triv = [r for r in rows if r["kind"] == "scan_trivial_model"]
    if triv:
        lines.append(
            "- compile of the scan with a trivial model (the sampler's own part): "
            + ", ".join(f"{r['sampler']}: {r['compile_s']:.2f}s ({r['compile_cpu_s']:.2f}s CPU)" for r in triv)
        )
    rs = [r for r in rows if r["kind"] == "unrolled" and r.get("compile_s") is not None]
    if rs:
        lines.append(
            "- unrolled compile: "
            + ", ".join(
                f"{r['model']}/N={r['steps']}: {r['compile_s']:.1f}s, {r['compile_cpu_s']:.1f}s CPU "
                f"({r['compile_vs_forward']:.1f}x fwd)"
                for r in rs
            )
        )
    diffs = [r["rel_diff_vs_scan"] for r in rows if "rel_diff_vs_scan" in r]
    if diffs:
        lines.append(
            f"- python_loop / unrolled vs scan DDIM from the same x_T: max relative difference {max(diffs):.1e}"
        )
    return lines


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few combos and a small batch (< 5 min on 2 CPU cores)")
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--samplers", default=None, help=f"comma list of {', '.join(sorted(jdiff.SAMPLERS))}")
    p.add_argument("--steps", default=None, help="comma list of step counts (default 10,50,250,1000)")
    p.add_argument("--batch", type=int, default=None, help="batch for every model (default: per model)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls after the first (default 3)")
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="keep timing a combo until this many seconds are spent (default 2; quick 0.5)",
    )
    p.add_argument(
        "--run-budget", type=float, default=None, help="max estimated seconds of execution per combo (default 120)"
    )
    p.add_argument("--budget", type=float, default=None, help="total seconds; later combos are skipped")
    p.add_argument("--unroll-max-steps", type=int, default=None, help="cap of the unrolled variant (default 250)")
    p.add_argument(
        "--unroll-budget",
        type=float,
        default=120.0,
        help="skip an unrolled N whose extrapolated compile exceeds this many seconds",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch/diffusers peer")
    p.add_argument("--json", default=None, help="also write the JSON lines to this file")
    a = p.parse_args(argv)
    q = QUICK if a.quick else {}
    a.models = _list(a.models, q.get("models", tuple(MODELS)), MODELS)
    a.samplers = _list(a.samplers, q.get("samplers", tuple(sorted(jdiff.SAMPLERS))), jdiff.SAMPLERS)
    a.steps = tuple(int(s) for s in a.steps.split(",")) if a.steps else q.get("steps", STEPS)
    a.batch = a.batch or q.get("batch")
    a.repeats = a.repeats or q.get("repeats", 3)
    a.run_budget = a.run_budget or q.get("run_budget", 120.0)
    a.min_time = a.min_time if a.min_time is not None else q.get("min_time", 2.0)
    a.budget = a.budget or q.get("budget")
    a.unroll_max_steps = a.unroll_max_steps or q.get("unroll_max_steps", 250)
    if any(s < 1 or s > 1000 for s in a.steps):
        p.error("--steps must be in [1, 1000]")
    return a


def _list(text, default, allowed) -> tuple:
    items = tuple(s.strip() for s in text.split(",")) if text else tuple(default)
    bad = [s for s in items if s not in allowed]
    if bad:
        raise SystemExit(f"unknown {bad}; allowed: {', '.join(sorted(allowed))}")
    return items


def main(argv=None) -> int:
    args = parse_args(argv)
    cache_dir = enable_compilation_cache(tempfile.mkdtemp(prefix="jdiff-bench-xla-cache-"))  # as sample.py
    try:
        env = dict(
            kind="env",
            jax=jax.__version__,
            backend=jax.default_backend(),
            devices=[str(d) for d in jax.devices()],
            cpu_count=os.cpu_count(),
            python=platform.python_version(),
            machine=platform.machine(),
            models=list(args.models),
            samplers=list(args.samplers),
            steps=list(args.steps),
            batch=args.batch,
            run_budget_s=args.run_budget,
            budget_s=args.budget,
            unroll_max_steps=args.unroll_max_steps,
        )
        print(json.dumps(env), flush=True)
        bench = Bench(args)
        bench.peak()
        bench.sampler_only()
        for name in args.models:
            bench.model(name)
        bench.peak()
        bench.emit(kind="total", seconds=time.perf_counter() - bench.start)
        add_mfu(bench.rows)
        print()
        print(report(bench.rows))
        if args.json:
            with open(args.json, "w") as f:
                for r in [env] + bench.rows:
                    f.write(json.dumps(r) + "\n")
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
