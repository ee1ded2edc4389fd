"""Markdown table of every registered model: parameters and forward GFLOPs per image.

Parameters come from ``jax.eval_shape`` (nothing is allocated); FLOPs from XLA's cost
analysis of the lowered forward pass (batch 1, native input size, ``train=False``;
no compilation, so DiT-XL takes about a second). XLA counts a multiply-add as 2 FLOPs;
the DiT paper's "Gflops" column counts multiply-adds, so compare it with GFLOPs / 2.

    python benchmarks/model_stats.py            # table only
    python benchmarks/model_stats.py --time     # + CPU train-step time of the CPU-sized configs
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from jdiff.models import abstract_params, forward_flops, get_model, list_models, model_input_shape, tree_size

# Peebles & Xie 2023, Table 4 (params in M, Gflops = multiply-adds) at 256x256 (32x32x4 latents).
DIT_PAPER = {"s": 33, "b": 130, "l": 458, "xl": 675}
DIT_PAPER_GFLOPS = {
    "s2": 6.06,
    "s4": 1.41,
    "s8": 0.36,
    "b2": 23.01,
    "b4": 5.56,
    "b8": 1.42,
    "l2": 80.71,
    "l4": 19.70,
    "l8": 5.01,
    "xl2": 118.64,
    "xl4": 29.05,
    "xl8": 7.39,
}


def paper_ref(name: str) -> str:
    if name == "unet_ddpm_cifar10":
        return "35.7M (35,746,307 in PyTorch ports)"
    if name.startswith("dit_") and name != "dit_tiny":
        key = name[4:]
        return f"{DIT_PAPER[key[:-1]]}M, {DIT_PAPER_GFLOPS[key]} GMACs"
    return ""


def train_step_ms(name: str, batch: int = 128, steps: int = 20) -> float:
    """Mean wall time (ms) of a jitted Adam step on random data, after compilation."""
    m = get_model(name)
    h, w, c = model_input_shape(name)
    x = jax.random.normal(jax.random.key(0), (batch, h, w, c))
    t = jnp.linspace(0, 999, batch)
    p = jax.jit(m.init)(jax.random.key(1), x[:1], t[:1])["params"]
    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, s, k):
        loss_fn = lambda p: jnp.mean((m.apply({"params": p}, x, t, train=True, rngs={"dropout": k}) - x) ** 2)
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    s = opt.init(p)
    p, s, loss = step(p, s, jax.random.key(0))
    loss.block_until_ready()
    t0 = time.perf_counter()
    for i in range(steps):
        p, s, loss = step(p, s, jax.random.key(i))
    loss.block_until_ready()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", action="store_true", help="also time a batch-128 train step of CPU-sized configs")
    args = ap.parse_args()
    t_start = time.perf_counter()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}\n")
    print("| model | input HxWxC | params | fwd GFLOPs/img | GMACs/img | paper |")
    print("|---|---|---:|---:|---:|---|")
    for name in list_models():
        m = get_model(name)
        h, w, c = model_input_shape(name)
        shape = (1, h, w, c)
        labels = getattr(m, "num_classes", None) is not None
        params = abstract_params(m, shape, with_labels=labels)
        n = tree_size(params)
        fl = forward_flops(m, params, shape, with_labels=labels) / 1e9
        print(f"| {name} | {h}x{w}x{c} | {n:,} | {fl:.3f} | {fl / 2:.3f} | {paper_ref(name)} |")
    if args.time:
        print("\n| model | batch | train step (ms, Adam, after compile) |\n|---|---:|---:|")
        for name in ("unet_tiny", "unet_small", "dit_tiny"):
            print(f"| {name} | 128 | {train_step_ms(name):.1f} |")
    print(f"\n(total {time.perf_counter() - t_start:.1f} s)")


if __name__ == "__main__":
    main()
