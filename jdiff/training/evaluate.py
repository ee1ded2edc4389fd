"""Held-out bits/dim during training: every `run.eval_every` steps the EMA model's variational bound (and with
`run.eval_ode` the probability-flow ODE likelihood) on a fixed batch of `run.eval_num` examples of
`data.eval_split`, written to metrics.jsonl as {"step", "eval_vlb_bpd", ["eval_ode_bpd"], "eval_space",
"eval_seconds"}. The bits/dim are of what the model was trained on: of the pixels (discrete, `data.levels` values
per dimension; "eval_space": "pixels") or, for a latent run (`data.vae`), of the scaled VAE latents of the batch
(one fixed posterior draw, a continuous density per latent dimension; "eval_space": "latents"; not comparable
with pixel bits/dim). Every evaluation setting is checked before the first step (`check_evaluation`).
The same functions serve `benchmarks/likelihood.py`."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.config import ConfigError, TrainConfig
from jdiff.forward import PREDICTIONS
from jdiff.likelihood import ode_bpd, vlb_bpd

EVAL_SEED_SALT = 0xB9D  # the evaluation's noise: key(run.seed + this), the same at every evaluation


def check_evaluation(config: TrainConfig) -> None:
    """ConfigError (one line) for evaluation settings the first evaluation would fail on, so that a run
    stops before its first step, not after training to run.eval_every: a prediction with no DDPM bound (EDM
    predictions), a data.eval_split that cannot be opened (an image folder has no held-out split; a bogus
    name) or is empty. Nothing is checked when run.eval_every is 0."""
    if not config.run.eval_every:
        return
    prediction = config.diffusion.prediction
    if prediction not in PREDICTIONS:
        raise ConfigError(
            f"run.eval_every: held-out bits/dim (the DDPM variational bound) needs an {'/'.join(PREDICTIONS)} "
            f"model, this run's prediction is {prediction!r}; set run.eval_every 0"
        )
    try:
        n = len(_eval_source(config, config.data.eval_split))
    except (ConfigError, ValueError, OSError) as e:
        raise ConfigError(
            f"run.eval_every: data.eval_split {config.data.eval_split!r} cannot be read ({' '.join(str(e).split())}); "
            "choose another data.eval_split or set run.eval_every 0"
        ) from None
    if n == 0:
        raise ConfigError(f"run.eval_every: data.eval_split {config.data.eval_split!r} has no examples")


def _eval_source(config: TrainConfig, split: str):
    from jdiff.run import build_source

    data = dataclasses.replace(config.data, split=split)
    return build_source(dataclasses.replace(config, data=data))


def heldout_batch(config: TrainConfig, num: int, split: Optional[str] = None) -> dict[str, np.ndarray]:
    """The first `num` examples (fewer if the split is smaller) of `split` (default data.eval_split), with
    the run's data settings: {"image": (n, H, W, C) float32 in [-1, 1], "label": (n,) int32}."""
    source = _eval_source(config, split or config.data.eval_split)
    return source.get(np.arange(min(num, len(source))))


def make_bpd_fn(
    model: Any,
    schedule: Any,
    *,
    prediction: str,
    levels: Optional[int],
    method: str = "vlb",
    variance: Optional[str] = None,
    t_chunk: int = 10,
    **ode_options: Any,
):
    """jit of (params, images, labels, rng) -> per-example bits/dim of a model with output `prediction` on
    data of `levels` values per pixel (a run's diffusion.prediction and data.pixel_levels()): method "vlb"
    (`jdiff.likelihood.vlb_bpd`, variance None: learned for a learn_sigma model, else posterior) or "ode"
    (`jdiff.likelihood.ode_bpd` with `ode_options`). Labels condition a class-conditional model. A latent run
    (data.vae) is scored as continuous data (levels None): its images are the VAE latents the model samples."""
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
        images = heldout_inputs(s.vae, batch["image"], c.run.seed)
        cache["batch"] = (jax.device_put(images, rep), jax.device_put(batch["label"], rep))
        run = dict(prediction=c.diffusion.prediction, levels=None if c.data.vae else c.data.pixel_levels())
        cache["vlb"] = make_bpd_fn(s.model, s.schedule, **run, method="vlb")
        if c.run.eval_ode:
            cache["ode"] = make_bpd_fn(s.model, s.schedule, **run, method="ode")
        cache["key"] = jax.random.key(c.run.seed + EVAL_SEED_SALT)
    images, labels = cache["batch"]
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"step": loop.done}
    for name in ("vlb", "ode"):
        if name in cache:
            rec[f"eval_{name}_bpd"] = float(jnp.mean(cache[name](loop.state.ema_params, images, labels, cache["key"])))
    rec["eval_space"] = "pixels" if s.vae is None else "latents"
    rec["eval_seconds"] = round(time.perf_counter() - t0, 2)
    loop.writer.write(rec)
    if loop.writer.enabled:
        scores = ", ".join(f"{k[5:]} {v:.4f}" for k, v in rec.items() if k.endswith("_bpd"))
        loop.log(f"step {loop.done}: held-out {scores} (bits per {'VAE latent' if s.vae else 'pixel'} dimension)")


def heldout_inputs(vae: Any, images: np.ndarray, seed: int) -> Any:
    """What the model is scored on: the held-out `images` themselves, or for a latent run (`vae`, a
    `jdiff.pretrained.autoencoder.Autoencoder`) their scaled latents ``vae.encode_latents`` with one fixed
    posterior draw (key fold_in(key(seed + EVAL_SEED_SALT), 1)), the distribution the model was trained on."""
    if vae is None:
        return images
    key = jax.random.fold_in(jax.random.key(seed + EVAL_SEED_SALT), 1)
    return jax.jit(vae.encode_latents)(vae.params, jnp.asarray(images), key)
