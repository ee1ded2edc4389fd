"""FID during training: every `run.fid_every` steps, the FID of `run.fid_num` samples of the EMA model (drawn
with the sampling.* settings of the preview grids, the same noise each time) against the reference statistics
`run.fid_ref`, with the FID Inception weights `run.fid_inception` (`jdiff.metrics`), written to metrics.jsonl as
{"step", "fid", "fid_num", "fid_seconds"}. Samples and features run on the primary host's devices of the run's mesh."""

from __future__ import annotations

import time

import jax
import numpy as np

FID_SEED_SALT = 0xF1D  # the samples' noise: run.seed + this, the same at every evaluation


def _prepare(loop) -> dict:
    """The generator, the Inception network and the reference statistics (built once, kept in loop.cache)."""
    from jdiff import metrics
    from jdiff.run import Generator, Settings, auto_batch, labels_for

    c, s = loop.config, loop.setup
    devices = [d for d in s.mesh.devices.flat if d.process_index == jax.process_index()]  # the run's, this host's
    settings = Settings(
        sampler=c.sampling.sampler,
        steps=c.sampling.steps,
        spacing=c.sampling.spacing,
        options=dict(c.sampling.options),
        guidance=c.sampling.guidance_scale,
    )
    gen = Generator.from_run(  # latent runs (data.vae) decode through the run's VAE
        s.run_info(), settings, batch=auto_batch(c.run.fid_num, len(devices)), devices=devices, model=s.model, vae=s.vae
    )
    return {
        "gen": gen,
        "inception": metrics.load_inception(c.run.fid_inception, devices=devices),
        "ref": metrics.load_stats(c.run.fid_ref),
        "labels": labels_for(c.run.fid_num, s.num_classes),
    }


def evaluate_fid(loop) -> None:
    """Periodic action: every run.fid_every steps (0: never), the FID of the EMA model's samples. The weights
    and statistics files are read after the first step, so a wrong path stops the run then (ValueError)."""
    c = loop.config
    if not c.run.fid_every:
        return
    cache = loop.cache.setdefault("fid", {})
    if not cache and loop.primary:
        cache.update(_prepare(loop))
    if not loop.due(c.run.fid_every):
        return
    from jdiff import metrics
    from jdiff.run import local_copy

    ema = local_copy(loop.state.ema_params)  # a collective under fsdp: every host takes part
    if not loop.primary:
        return
    t0 = time.perf_counter()

    def batches():
        seed = c.run.seed + FID_SEED_SALT
        for start, x, _, _ in cache["gen"].batches(ema, c.run.fid_num, seed=seed, labels=cache["labels"]):
            if not np.all(np.isfinite(x)):
                raise ValueError(f"samples {start}..{start + len(x) - 1} are not finite")
            x = metrics.to_unit_range(x)
            yield np.repeat(x, 3, -1) if x.shape[-1] == 1 else x

    rec = {"step": loop.done, "fid_num": c.run.fid_num}
    try:
        stats, _, _ = metrics.stream_stats(cache["inception"], batches())
        rec["fid"] = metrics.frechet_distance_from_stats(*stats.finalize(), *cache["ref"])
    except ValueError as e:  # non-finite samples: recorded as such, never as a number
        rec["fid"], rec["fid_error"] = None, " ".join(str(e).split())
    rec["fid_seconds"] = round(time.perf_counter() - t0, 2)
    loop.writer.write(rec)
    if loop.writer.enabled:
        loop.log(f"step {loop.done}: FID {rec['fid']:.4g}" if rec["fid"] is not None else f"FID: {rec['fid_error']}")
