"""Held-out bits/dim during training: every `run.eval_every` steps the EMA model's variational bound (and with
`run.eval_ode` the probability-flow ODE likelihood) on a fixed batch of `run.eval_num` examples of
`data.eval_split`, written to metrics.jsonl as {"step", "eval_vlb_bpd", ["eval_ode_bpd"], "eval_seconds"}.
The same functions serve `benchmarks/likelihood.py`."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.config import TrainConfig
from jdiff.likelihood import ode_bpd, vlb_bpd

EVAL_SEED_SALT = 0xB9D  # the evaluation's noise: key(run.seed + this), the same at every evaluation


def heldout_batch(config: TrainConfig, num: int, split: Optional[str] = None) -> dict[str, np.ndarray]:
    """The first `num` examples (fewer if the split is smaller) of `split` (default data.eval_split), with
    the run's data settings: {"image": (n, H, W, C) float32 in [-1, 1], "label": (n,) int32}."""
    from jdiff.run import build_source

    data = dataclasses.replace(config.data, split=split or config.data.eval_split)
    source = build_source(dataclasses.replace(config, data=data))
    return source.get(np.arange(min(num, len(source))))


def make_bpd_fn(
    model: Any,
    schedule: Any,
    *,
    prediction: str,
    levels: int,
    method: str = "vlb",
    variance: Optional[str] = None,
    t_chunk: int = 10,
    **ode_options: Any,
):
    """jit of (params, images, labels, rng) -> per-example bits/dim of a model with output `prediction` on
    data of `levels` values per pixel (a run's diffusion.prediction and data.pixel_levels()): method "vlb"
    (`jdiff.likelihood.vlb_bpd`, variance None: learned for a learn_sigma model, else posterior) or "ode"
    (`jdiff.likelihood.ode_bpd` with `ode_options`). Labels condition a class-conditional model."""
    conditional = model.num_classes is not None

    def bpd(params, images, labels, rng):
        def model_fn(x, t, y=None):
            return model.apply({"params": params}, x, t, y if conditional else None)

        y = labels if conditional else None
        if method == "vlb":
            return vlb_bpd(
                model_fn,
                schedule,
                images,
                rng,
                prediction=prediction,
                variance=variance,
                levels=levels,
                labels=y,
                t_chunk=t_chunk,
            )
        return ode_bpd(model_fn, schedule, images, rng, prediction=prediction, levels=levels, labels=y, **ode_options)

    if method not in ("vlb", "ode"):
        raise ValueError(f"Unknown method {method!r}; allowed values: ['vlb', 'ode'].")
    return jax.jit(bpd)


def evaluate_bpd(loop) -> None:
    """Periodic action: every run.eval_every steps (0: never), held-out bits/dim of the EMA parameters."""
    c = loop.config
    if not loop.due(c.run.eval_every):
        return
    s = loop.setup
    cache = loop.cache.setdefault("heldout_bpd", {})
    if not cache:
        from jdiff.run import replicated

        batch = heldout_batch(c, c.run.eval_num)
        rep = replicated(s.mesh)
        cache["batch"] = (jax.device_put(batch["image"], rep), jax.device_put(batch["label"], rep))
        run = dict(prediction=c.diffusion.prediction, levels=c.data.pixel_levels())
        cache["vlb"] = make_bpd_fn(s.model, s.schedule, **run, method="vlb")
        if c.run.eval_ode:
            cache["ode"] = make_bpd_fn(s.model, s.schedule, **run, method="ode")
        cache["key"] = jax.random.key(c.run.seed + EVAL_SEED_SALT)
    images, labels = cache["batch"]
    t0 = time.perf_counter()
    rec = {"step": loop.done}
    for name in ("vlb", "ode"):
        if name in cache:
            rec[f"eval_{name}_bpd"] = float(jnp.mean(cache[name](loop.state.ema_params, images, labels, cache["key"])))
    rec["eval_seconds"] = round(time.perf_counter() - t0, 2)
    loop.writer.write(rec)
    if loop.writer.enabled:
        loop.log(f"step {loop.done}: held-out " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in rec.items() if "bpd" in k))
