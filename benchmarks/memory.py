"""Per-device memory of training: the train state's shards and the compiled train step's peak, per model, mesh
shape and remat setting, without allocating any weights.

For each model (default: the DDPM CIFAR-10 U-Net `unet_ddpm_cifar10` on 32x32x3, `dit_b2` and `dit_xl2` on
32x32x4 latents with 1000 classes) at a global batch of 256, on 8 (fake CPU) devices, each mesh shape DxF
(data x fsdp, default 8x1, 4x2, 1x8): the same state shardings and jitted step as train.py
(`jdiff.training.Setup`), lowered from `jax.eval_shape` abstract arguments and
compiled ahead of time (`Setup.compile_step`); the figures are XLA's memory analysis of the compiled,
partitioned step (`MemoryReport`): per device, the state (parameters + EMA + AdamW moments, float32), the
step's arguments, outputs, temporaries and peak. Float32 compute (model.dtype float32), AdamW, EMA.

Remat: XLA:CPU drops jax.checkpoint's optimisation barriers before common-subexpression elimination, which
merges the recomputation back into the forward pass, so a CPU compile shows no saving (measured: the
U-Net's step peak with remat was within 1% of the one without). The effect of remat is therefore measured
without a backend: `saved` is the bytes of the residuals that `jax.vjp` of the model keeps for the backward
pass (activations, and the weights the backward reads) at the per-device batch (batch / 8), with and without
remat. They count every intermediate before XLA's fusion, so the figure without remat is an upper bound.

These are the CPU backend's buffer assignments: GPU/TPU compilers fuse and schedule differently, so read them
as estimates (the state and argument sizes are exact). Results are appended to a JSON file as they come
(re-running skips the configurations already there), and a markdown table is printed. CPU compilation of
dit_xl2 takes many minutes per mesh.

    python benchmarks/memory.py                                # everything (slow: dit_xl2)
    python benchmarks/memory.py --models dit_b2 --meshes 8x1,1x8 --json /tmp/mem.json
    python benchmarks/memory.py --table benchmarks/memory.json   # only print the table of a results file
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__":  # 8 fake CPU devices, set before jax is imported
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

MODELS = {  # name: (preset whose settings are used, overrides)
    "unet_ddpm_cifar10": ("cifar10", {}),
    "dit_b2": ("digits", {"diffusion.num_timesteps": 1000}),
    "dit_xl2": ("digits", {"diffusion.num_timesteps": 1000}),
}
GiB = 2**30


def saved_bytes(name: str, remat: bool, batch: int) -> int:
    """Bytes of the residuals jax.vjp keeps for the backward pass of the model at `batch` examples (train
    mode, no allocation: jax.eval_shape of the pullback, whose leaves are the residuals)."""
    import jax
    import jax.numpy as jnp

    from jdiff.models import get_model, model_input_shape

    hwc = model_input_shape(name)
    num_classes = 1000 if name.startswith("dit") else None
    model = get_model(name, num_classes=num_classes, remat=remat)
    x = jax.ShapeDtypeStruct((batch, *hwc), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    y = None if num_classes is None else jax.ShapeDtypeStruct((batch,), jnp.int32)
    key = jax.random.PRNGKey(0)

    def init():
        y1 = None if y is None else jnp.zeros((1,), jnp.int32)
        return model.init({"params": key, "dropout": key}, jnp.zeros((1, *hwc)), jnp.zeros((1,)), y1)

    def pullback(p, x, t, y):
        out = lambda p: jnp.sum(model.apply(p, x, t, y, train=True, rngs={"dropout": key}) ** 2)  # noqa: E731
        return jax.vjp(out, p)[1]

    res = jax.eval_shape(pullback, jax.eval_shape(init), x, t, y)
    return sum(r.size * r.dtype.itemsize for r in jax.tree.leaves(res))


def measure(name: str, mesh_text: str, remat: bool, batch: int, devices) -> dict:
    import jax

    from jdiff.config import apply_overrides, get_preset
    from jdiff.models import get_model, model_input_shape, tree_size
    from jdiff.run import build_schedule, replicated
    from jdiff.run.mesh import make_mesh
    from jdiff.training.setup import Setup, train_step_args, with_remat

    preset, over = MODELS[name]
    d, f = (int(v) for v in mesh_text.split("x"))
    config = apply_overrides(
        get_preset(preset),
        {**over, "model.name": name, "optim.batch_size": batch, "run.mesh": f"data={d},fsdp={f}", "model.remat": remat},
    )
    hwc = model_input_shape(name)
    num_classes = 1000 if name.startswith("dit") else None
    model = with_remat(get_model(name, num_classes=num_classes), config)
    mesh = make_mesh(devices, config.run.mesh)
    pieces = {k: v for k, v in train_step_args(config).items() if k in ("tx", "loss_fn", "lr_schedule")}
    s = Setup(  # derives the sharded init and step functions (nothing is allocated: compile_step lowers abstractly)
        config=config,
        mesh=mesh,
        source=None,
        model=model,
        schedule=jax.device_put(build_schedule(config), replicated(mesh)),
        **pieces,
        num_classes=num_classes,
        image_shape=hwc,
    )
    t0 = time.perf_counter()
    _, rep = s.compile_step()
    return {
        "model": name,
        "mesh": mesh_text,
        "remat": remat,
        "batch": batch,
        "devices": len(devices),
        "params_M": round(tree_size(s.abstract_state.params) / 1e6, 2),
        "state_bytes": rep.state,
        "argument_bytes": rep.arguments,
        "output_bytes": rep.outputs,
        "alias_bytes": rep.alias,
        "temp_bytes": rep.temp,
        "peak_bytes": rep.peak,
        "compile_s": round(time.perf_counter() - t0, 1),
        "backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def fits(n: float) -> str:
    """Which accelerator memories hold n bytes with 10% to spare (for the runtime and fragmentation)."""
    return "16 GB, 80 GB" if n < 0.9 * 16e9 else "80 GB" if n < 0.9 * 80e9 else "neither"


def table(rows: list[dict]) -> str:
    out = [
        "| model | params | mesh (data x fsdp) | state / device | step peak / device | temporaries | "
        "saved activations, no remat -> remat | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(MODELS)}
    rows = [r for r in rows if not r["remat"]]
    for r in sorted(rows, key=lambda r: (order.get(r["model"], 99), -int(r["mesh"].split("x")[0]))):
        s0, s1 = r.get("saved_bytes"), r.get("saved_remat_bytes")
        saved = "-" if s0 is None else f"{s0 / GiB:.2f} -> {s1 / GiB:.2f} GiB"
        out.append(
            f"| {r['model']} | {r['params_M']:.0f}M | {r['mesh']} | {r['state_bytes'] / GiB:.2f} GiB | "
            f"{r['peak_bytes'] / GiB:.2f} GiB | {r['temp_bytes'] / GiB:.2f} GiB | {saved} | {fits(r['peak_bytes'])} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--meshes", default="8x1,4x2,1x8", help="comma-separated DxF (data x fsdp), D*F = 8")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--json", default="benchmarks/memory.json", help="results file (appended; done ones skipped)")
    p.add_argument("--table", metavar="JSON", help="only print the table of this results file")
    a = p.parse_args(argv)
    if a.table:
        with open(a.table) as fh:
            print(table([json.loads(line) for line in fh if line.strip()]))
        return 0
    import jax

    devices = jax.devices()[:8]
    if len(devices) < 8:
        print("memory.py needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)", file=sys.stderr)
        return 1
    done = []
    if os.path.exists(a.json):
        with open(a.json) as fh:
            done = [json.loads(line) for line in fh if line.strip()]
    have = {(r["model"], r["mesh"], r["batch"]) for r in done if not r["remat"]}
    for name in a.models.split(","):
        if name not in MODELS:
            p.error(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
        saved = {}
        for mesh in a.meshes.split(","):
            if (name, mesh, a.batch) in have:
                continue
            if not saved:  # the per-device batch is batch / 8 on every mesh
                saved = {remat: saved_bytes(name, remat, a.batch // len(devices)) for remat in (False, True)}
            r = measure(name, mesh, False, a.batch, devices)
            r.update(saved_bytes=saved[False], saved_remat_bytes=saved[True])
            print(json.dumps(r), flush=True)
            with open(a.json, "a") as fh:
                fh.write(json.dumps(r) + "\n")
            done.append(r)
            jax.clear_caches()
    print(table([r for r in done if r["batch"] == a.batch]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
