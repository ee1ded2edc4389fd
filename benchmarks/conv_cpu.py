"""One 3x3 convolution, XLA:CPU vs PyTorch: where the CPU training gap of `train_throughput.py` comes from.

For each NHWC shape (C in = C out, SAME padding, + bias) it times the jitted forward and forward+backward
(gradients of sum(y^2) w.r.t. input and kernel) in JAX, and the same in PyTorch (`torch.nn.Conv2d`,
NCHW, all cores) when torch is installed, interleaved in rounds (medians reported). `--pinned` also times
the XLA convolution in a child process restricted to one core: the same time as unpinned means XLA ran it
on one thread.

    python benchmarks/conv_cpu.py                 # needs the optional .[bench] extra for the peer
    python benchmarks/conv_cpu.py --pinned --shapes 64x8x8x32,8x32x32x128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SHAPES = "64x8x8x32,64x4x4x64,8x32x32x128,8x16x16x256"  # unet_small and DDPM CIFAR-10 U-Net levels


def median_s(fn, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` over `reps` calls after `warmup` warm-up calls (the first compiles)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def median_ms(fn, reps: int = 15) -> float:
    """Median wall time of `fn()` in ms after two warm-up calls."""
    return 1e3 * median_s(fn, reps, warmup=2)


def jax_fns(shape):
    """(forward, forward+backward) closures of a jitted NHWC 3x3 conv + bias, blocking until done."""
    import jax
    import jax.numpy as jnp

    b, h, w, c = shape

    def conv(x, k):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + 1.0

    x = jax.random.normal(jax.random.key(0), shape)
    k = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, c, c))
    fwd = jax.jit(conv)
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1)))
    return (lambda: fwd(x, k).block_until_ready()), (lambda: jax.block_until_ready(grad(x, k)))


def torch_fns(shape):
    """The same in PyTorch (NCHW), or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    b, h, w, c = shape
    conv = torch.nn.Conv2d(c, c, 3, padding=1)
    x = torch.randn(b, c, h, w, requires_grad=True)

    def fwd():
        with torch.no_grad():
            conv(x)

    def grad():
        conv.zero_grad()
        x.grad = None
        (conv(x) ** 2).sum().backward()

    return fwd, grad


def pinned_ms(shape) -> dict:
    """XLA forward / grad ms in a child process pinned to CPU 0."""
    code = (
        f"import os, json, sys; os.sched_setaffinity(0, {{0}}); sys.path.insert(0, {os.path.dirname(__file__)!r});"
        f"import conv_cpu as m; f, g = m.jax_fns({tuple(shape)!r});"
        "print(json.dumps({'fwd': m.median_ms(f), 'grad': m.median_ms(g)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help=f"comma list of BxHxWxC (default {SHAPES})")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--pinned", action="store_true", help="also time XLA pinned to one core (child process)")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for shape in shapes:
        jf, jg = jax_fns(shape)
        peer = torch_fns(shape)
        got = {k: [] for k in ("xla_fwd", "xla_grad", "torch_fwd", "torch_grad")}
        for _ in range(args.rounds):
            got["xla_fwd"].append(median_ms(jf))
            got["xla_grad"].append(median_ms(jg))
            if peer:
                got["torch_fwd"].append(median_ms(peer[0]))
                got["torch_grad"].append(median_ms(peer[1]))
        row = {"shape": "x".join(map(str, shape)), **{k: float(np.median(v)) for k, v in got.items() if v}}
        if args.pinned:
            one = pinned_ms(shape)
            row.update(xla_fwd_1core=one["fwd"], xla_grad_1core=one["grad"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    cols = [
        ("xla_fwd", "XLA fwd ms"),
        ("xla_grad", "XLA grad ms"),
        ("xla_fwd_1core", "XLA fwd, 1 core"),
        ("torch_fwd", "PyTorch fwd ms"),
        ("torch_grad", "PyTorch grad ms"),
    ]
    cols = [(k, t) for k, t in cols if any(k in r for r in rows)]
    print("\n| shape (NHWC) | " + " | ".join(t for _, t in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in rows:
        print(f"| {r['shape']} | " + " | ".join(f"{r[k]:.2f}" if k in r else "-" for k, _ in cols) + " |")
    if not any("torch_fwd" in r for r in rows):
        print("\nPyTorch peer skipped: torch not installed (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
