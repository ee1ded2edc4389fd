"""Training throughput (images/s) of jdiff's U-Nets, side by side with the same architecture in PyTorch.

For each model (default: `unet_small` on 8x8x1 and the DDPM CIFAR-10 U-Net `unet_ddpm_cifar10` on 32x32x3):

  jdiff    the compiled step that train.py runs, built the same way (`jdiff.training.setup(config)`: its
           mesh of all devices, init_fn and step_fn: eps-MSE loss, grads, global-norm clipping, AdamW, EMA,
           metric accumulation), with the hyper-parameters of the model's training preset (digits / cifar10).
           The data source is the digits set at the model's input shape (no dataset download needed). Reported:
           compile time (trace + lower + XLA compile), the first step, and steady-state images/s.
  PyTorch  diffusers' `UNet2DModel` configured as the same architecture (same widths, blocks, attention levels
           and heads, dropout; the parameter counts of both sides are printed), eager, train mode, one step =
           t ~ U{0..T-1}, noise, q_sample, eps-MSE, backward, clip_grad_norm_, AdamW (fused when available,
           weight decay on matrices only as in jdiff), EMA of the parameters with torch._foreach_lerp_.
           Threads: torch.set_num_threads(os.cpu_count()); XLA uses all cores by default.

Both step on one fixed batch (jdiff: the first batch of `Setup.batches`, PyTorch: random; data loading is not
measured); each step is timed to completion (`jax.block_until_ready` on the jdiff side). The measurements are
interleaved in rounds (jdiff block, PyTorch block, the order alternating between rounds) so that load from other
jobs affects both alike; a round gives batch / median step time, and the figures reported are the medians over
rounds. "jdiff / torch" > 1 means jdiff trains faster. Every measurement is printed as a JSON line; a markdown
table follows at the end.

The PyTorch peer needs the optional `bench` extra (`pip install -e ".[bench]"`, i.e.
`pip install torch==2.13.0 diffusers`; a plain `pip install torch` pulls a multi-GB CUDA build). Without it
only the jdiff figures are reported.

    python benchmarks/train_throughput.py --quick                   # smoke run, tiny batches, a few minutes
    python benchmarks/train_throughput.py --json train_tp.jsonl     # full run (both models)
    python benchmarks/train_throughput.py --models unet_small --batch 128 --steps 20 --rounds 5
    python benchmarks/train_throughput.py --batch unet_small=64,unet_ddpm_cifar10=16 --no-torch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from jdiff.config import TrainConfig, apply_overrides, get_preset
from jdiff.models import abstract_params, model_config, model_input_shape, tree_size
from jdiff.models.layers import num_groups
from jdiff.run import build_model, build_schedule, replicated
from jdiff.training import setup
from jdiff.training.step import init_accumulator


class Defaults(NamedTuple):
    preset: str  # training preset whose optimizer / EMA / schedule settings are used
    batch: int
    steps: int  # timed steps per round and framework
    warmup: int


MODELS = {"unet_small": Defaults("digits", 64, 10, 3), "unet_ddpm_cifar10": Defaults("cifar10", 8, 3, 1)}
QUICK = {"unet_small": Defaults("digits", 8, 2, 1), "unet_ddpm_cifar10": Defaults("cifar10", 2, 1, 1)}
QUICK_ROUNDS = 2
NO_TORCH = "PyTorch peer skipped: torch/diffusers not installed"


# ---------------------------------------------------------------------------------------------------
# Output.


class Emitter:
    """Prints each record as a JSON line (and appends it to --json) and keeps it for the final table."""

    def __init__(self, path: Optional[str]):
        self.rows: list[dict] = []
        self.file = open(path, "w") if path else None

    def __call__(self, **row: Any) -> dict:
        self.rows.append(row)
        line = json.dumps(row, default=str)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        return row

    def close(self) -> None:
        if self.file:
            self.file.close()


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(rows: list[dict]) -> str:
    """The per-model summary rows as a markdown table."""
    head = (
        "| model | batch | params jdiff | params torch | jdiff compile s | jdiff img/s | torch img/s | jdiff / torch |"
    )
    lines = [head, "|" + "---|" * head.count(" |")]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['jdiff_params']:,} | "
            f"{'-' if r['torch_params'] is None else format(r['torch_params'], ',')} | "
            f"{_fmt(r['jdiff_compile_s'])} | {_fmt(r['jdiff_images_per_s'])} | "
            f"{_fmt(r['torch_images_per_s'])} | {_fmt(r['ratio'], '.2f')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# jdiff side.


def train_config(name: str, batch: int) -> TrainConfig:
    """The training preset of `name` (unconditional model) with the benchmark's batch size; the data is the
    digits set at the model's input shape (only its first batch is used)."""
    h, _, c = model_input_shape(name)
    return apply_overrides(
        get_preset(MODELS[name].preset),
        {
            "model.name": name,
            "optim.batch_size": batch,
            "data.class_conditional": False,
            "data.dataset": "digits",
            "data.image_size": h,
            "data.channels": c,
        },
    )


class JdiffStep:
    """Calling it runs one jdiff training step (`jdiff.training.setup(config).step_fn`) to completion."""

    def __init__(self, name: str, batch: int):
        s = setup(train_config(name, batch))
        self.state = s.init_fn()
        self.acc = jax.device_put(init_accumulator(), replicated(s.mesh))
        self.schedule = s.schedule
        with s.batches(0, 1) as batches:
            self.batch = next(batches)
        self.params = tree_size(self.state.params)
        self.devices = s.mesh.devices.size
        t0 = time.perf_counter()
        self.step = s.step_fn.lower(self.state, self.batch, self.schedule, self.acc).compile()
        self.compile_s = time.perf_counter() - t0

    def __call__(self) -> None:
        self.state, self.acc = self.step(self.state, self.batch, self.schedule, self.acc)
        jax.block_until_ready((self.state, self.acc))


# ---------------------------------------------------------------------------------------------------
# PyTorch side.


def import_torch() -> Optional[tuple[Any, Any]]:
    """(torch, diffusers.UNet2DModel), or None when the optional peer is not installed."""
    try:
        import torch
        from diffusers import UNet2DModel
    except ImportError:
        return None
    return torch, UNet2DModel


def _norm_widths(name: str) -> list[int]:
    """Channel counts of every GroupNorm in the jdiff model (from its abstract parameter tree)."""
    h, w, c = model_input_shape(name)
    params = abstract_params(build_model(train_config(name, 1), None), (1, h, w, c))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [
        leaf.shape[0]
        for path, leaf in flat
        if "norm" in jax.tree_util.keystr(path) and jax.tree_util.keystr(path).endswith("['scale']")
    ]


def diffusers_config(name: str) -> tuple[dict, list[str]]:
    """`UNet2DModel` kwargs for jdiff's U-Net config `name`, and notes on what does not match exactly.

    For `unet_ddpm_cifar10` this is the google/ddpm-cifar10-32 config (freq_shift 0 as in jdiff, same cost).
    """
    cfg = model_config(name)
    h, w, c = model_input_shape(name)
    unsupported = {
        k: cfg[k]
        for k in (
            "num_classes",
            "learn_sigma",
            "num_head_channels",
            "use_scale_shift_norm",
            "resblock_updown",
            "out_channels",
        )
        if cfg[k]
    }
    if unsupported:
        raise ValueError(f"no diffusers UNet2DModel peer for {name} with {unsupported}")
    widths = [cfg["ch"] * m for m in cfg["ch_mult"]]
    attn = [min(h, w) // 2**i in tuple(cfg["attention_resolutions"]) for i in range(len(widths))]
    notes = []
    heads = cfg["num_heads"]
    head_dims = {wd // heads for wd, a in zip(widths, attn) if a} | {widths[-1] // heads}
    head_dim = None if heads == 1 else max(head_dims)  # None: one head of full width (DDPM)
    if len(head_dims) > 1 and heads > 1:
        notes.append(f"attention head width differs: jdiff {sorted(head_dims)}, diffusers {head_dim}")
    groups = num_groups(widths[0], cfg["norm_groups"])
    jdiff_groups = sorted({num_groups(n, cfg["norm_groups"]) for n in _norm_widths(name)})
    if jdiff_groups != [groups]:
        notes.append(
            f"GroupNorm groups differ (same params and FLOPs): jdiff {jdiff_groups} by width, "
            f"diffusers {groups} everywhere"
        )
    kwargs = dict(
        sample_size=(h, w),
        in_channels=c,
        out_channels=c,
        block_out_channels=tuple(widths),
        layers_per_block=cfg["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=head_dim,
        norm_num_groups=groups,
        norm_eps=1e-6,
        dropout=cfg["dropout"],
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=0,
    )
    return kwargs, notes


def make_adamw(torch: Any, params: list, config: TrainConfig) -> tuple[Any, str]:
    """AdamW as in jdiff (decay on ndim >= 2 only); fused CPU kernel when available, else foreach."""
    opt = config.optim
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    kw = dict(lr=opt.lr, betas=(opt.adam_b1, opt.adam_b2), eps=opt.adam_eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw), "foreach"


class TorchStep:
    """Calling it runs one equivalent PyTorch training step (eager, CPU) of diffusers' `UNet2DModel`."""

    def __init__(self, name: str, batch: int, peer: tuple[Any, Any], channels_last: bool):
        torch, unet_cls = peer
        self.torch = torch
        self.config = train_config(name, batch)
        kwargs, self.notes = diffusers_config(name)
        torch.manual_seed(self.config.run.seed)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = unet_cls(**kwargs).to(memory_format=fmt).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)
        self.ema = [p.detach().clone() for p in self.params]
        self.opt, self.opt_impl = make_adamw(torch, self.params, self.config)
        sched = build_schedule(self.config)
        self.sqrt_ab = torch.tensor(np.asarray(sched.sqrt_alphas_cumprod, np.float32))
        self.sqrt_1m_ab = torch.tensor(np.asarray(sched.sqrt_one_minus_alphas_cumprod, np.float32))
        h, w, c = model_input_shape(name)
        self.x0 = (torch.rand(batch, c, h, w) * 2 - 1).contiguous(memory_format=fmt)
        self.fmt = fmt
        self.step_count = 0

    def __call__(self) -> None:
        torch, cfg, b = self.torch, self.config.optim, self.x0.shape[0]
        t = torch.randint(0, len(self.sqrt_ab), (b,))
        noise = torch.randn_like(self.x0, memory_format=self.fmt)
        x_t = self.sqrt_ab[t].view(b, 1, 1, 1) * self.x0 + self.sqrt_1m_ab[t].view(b, 1, 1, 1) * noise
        loss = torch.nn.functional.mse_loss(self.model(x_t, t).sample, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        self.opt.step()
        decay = ema_decay(self.step_count, cfg.ema_decay, cfg.ema_warmup)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - decay)
        self.step_count += 1


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """Host-side copy of `jdiff.training.optim.ema_decay_at` (no JAX call inside the timed PyTorch step)."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


# ---------------------------------------------------------------------------------------------------
# Timing.


def time_steps(step: Callable[[], None], n: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of each of `n` calls of `step`."""
    wall, cpu = [], []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return wall, cpu


def first_and_warmup(step: Callable[[], None], warmup: int) -> float:
    """Runs the first step (returned: its wall seconds; jdiff: already compiled) and `warmup - 1` more."""
    first = time_steps(step, 1)[0][0]
    time_steps(step, max(0, warmup - 1))
    return first


def measure_round(
    emit: Emitter, step: Callable[[], None], *, model: str, framework: str, rnd: int, batch: int, steps: int
) -> float:
    """One timed block; emits and returns its images/s (batch / median step time)."""
    wall, cpu = time_steps(step, steps)
    med = statistics.median(wall)
    emit(
        kind="round",
        model=model,
        framework=framework,
        round=rnd,
        batch=batch,
        steps=steps,
        step_s=med,
        cpu_s=statistics.median(cpu),
        images_per_s=batch / med,
        step_s_all=wall,
    )
    return batch / med


# ---------------------------------------------------------------------------------------------------
# Driver.


def bench_model(emit: Emitter, name: str, args: argparse.Namespace, peer: Optional[tuple[Any, Any]]) -> dict:
    """Compile, warm up and time jdiff (and the PyTorch peer) for `name`; returns the summary row."""
    batch, steps, warmup = args.batch[name], args.steps[name], args.warmup[name]
    jd = JdiffStep(name, batch)
    first = first_and_warmup(jd, warmup)
    emit(
        kind="jdiff_compile",
        model=name,
        batch=batch,
        devices=jd.devices,
        compile_s=jd.compile_s,
        first_exec_s=first,
        time_to_first_step_s=jd.compile_s + first,
    )
    runners: list[tuple[str, Callable[[], None]]] = [("jdiff", jd)]
    tp = None
    if peer is not None:
        tp = TorchStep(name, batch, peer, args.torch_channels_last)
        first_t = first_and_warmup(tp, warmup)
        emit(
            kind="torch_first_step",
            model=name,
            batch=batch,
            first_step_s=first_t,
            optimizer=tp.opt_impl,
            channels_last=args.torch_channels_last,
        )
        runners.append(("torch", tp))
    emit(
        kind="params",
        model=name,
        jdiff_params=jd.params,
        torch_params=tp.n_params if tp else None,
        match=(tp.n_params == jd.params) if tp else None,
        notes=tp.notes if tp else [],
    )
    ips: dict[str, list[float]] = {fw: [] for fw, _ in runners}
    for rnd in range(args.rounds):
        order = runners if rnd % 2 == 0 else runners[::-1]
        for fw, step in order:
            time.sleep(args.pause)  # let the other framework's worker threads go idle
            ips[fw].append(measure_round(emit, step, model=name, framework=fw, rnd=rnd, batch=batch, steps=steps))
    jd_ips = statistics.median(ips["jdiff"])
    t_ips = statistics.median(ips["torch"]) if tp else None
    return emit(
        kind="summary",
        model=name,
        batch=batch,
        steps=steps,
        rounds=args.rounds,
        jdiff_params=jd.params,
        torch_params=tp.n_params if tp else None,
        jdiff_compile_s=jd.compile_s,
        jdiff_images_per_s=jd_ips,
        torch_images_per_s=t_ips,
        ratio=jd_ips / t_ips if t_ips else None,
        round_ratios=[a / b for a, b in zip(ips["jdiff"], ips["torch"])] if tp else None,
    )


def environment(peer: Optional[tuple[Any, Any]], threads: Optional[int]) -> dict:
    """Versions, devices and thread counts."""
    env = dict(
        kind="env",
        python=platform.python_version(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.local_devices()],
    )
    if peer is not None:
        import diffusers

        torch = peer[0]
        env.update(
            torch=torch.__version__,
            diffusers=diffusers.__version__,
            torch_threads=threads,
            torch_interop_threads=torch.get_num_interop_threads(),
        )
    return env


def per_model(text: Optional[str], defaults: dict[str, int], flag: str) -> dict[str, int]:
    """Parses '8' (every model) or 'unet_small=64,unet_ddpm_cifar10=8' over `defaults`."""
    out = dict(defaults)
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, _, val = item.rpartition("=")
        try:
            n = int(val)
        except ValueError:
            raise SystemExit(f"bad {flag} value {item!r}: expected N or MODEL=N") from None
        if key and key not in MODELS:
            raise SystemExit(f"bad {flag} model {key!r}; allowed: {', '.join(MODELS)}")
        out.update({key: n} if key else {k: n for k in out})
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}")
    per = "N for every model or MODEL=N,... (defaults: {})"
    for flag, field in (("batch", "batch"), ("steps", "steps"), ("warmup", "warmup")):
        dflt = ", ".join(f"{k}={getattr(v, field)}" for k, v in MODELS.items())
        p.add_argument(f"--{flag}", help=("timed steps per round, " if flag == "steps" else "") + per.format(dflt))
    p.add_argument("--rounds", type=int, default=None, help="alternating jdiff/torch rounds (default 3)")
    p.add_argument("--pause", type=float, default=0.2, help="seconds of idle before each timed block")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch/diffusers peer")
    p.add_argument("--torch-channels-last", action="store_true", help="NHWC memory format for the PyTorch peer")
    p.add_argument("--json", metavar="PATH", help="also write the JSON lines to PATH")
    p.add_argument(
        "--quick", action="store_true", help=f"smoke run: tiny batches, 1-2 timed steps, {QUICK_ROUNDS} rounds"
    )
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {bad}; allowed: {', '.join(MODELS)}")
    base = QUICK if args.quick else MODELS
    for field in ("batch", "steps", "warmup"):
        val = per_model(getattr(args, field), {k: getattr(v, field) for k, v in base.items()}, f"--{field}")
        if min(val.values()) < (0 if field == "warmup" else 1):
            p.error(f"--{field} must be >= {0 if field == 'warmup' else 1}")
        setattr(args, field, val)
    args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else 3)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    peer = None if args.no_torch else import_torch()
    threads = None
    if peer is None and not args.no_torch:
        print(NO_TORCH, flush=True)
    if peer is not None:
        peer[0].set_num_threads(os.cpu_count() or 1)
        threads = peer[0].get_num_threads()
    emit = Emitter(args.json)
    try:
        emit(**environment(peer, threads))
        summaries = [bench_model(emit, name, args, peer) for name in args.models]
    finally:
        emit.close()
    print()
    if peer is not None:
        print(
            f"PyTorch {peer[0].__version__}, {threads} threads; jax {jax.__version__} on "
            f"{len(jax.local_devices())} {jax.default_backend()} device(s), {os.cpu_count()} cores"
        )
    print(markdown_table(summaries))
    for r in emit.rows:
        if r.get("kind") == "params" and r["torch_params"] is not None:
            same = "same" if r["match"] else "DIFFERENT"
            print(
                f"\n{r['model']}: {same} parameter count (jdiff {r['jdiff_params']:,}, "
                f"diffusers {r['torch_params']:,})" + "".join(f"; {n}" for n in r["notes"])
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
