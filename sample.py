#!/usr/bin/env python
"""Draw samples from a trained jdiff run: `python sample.py --workdir runs/digits`.

Loads the run's checkpoint (EMA parameters by default; config.json gives the model, image shape,
prediction type and noise schedule), samples in batches sharded over all devices, and writes a PNG grid
and an .npz of the raw float images (and labels) to --out (default: WORKDIR/samples). `--trajectory` also
writes the denoising steps of the first samples as a strip PNG and an animated GIF. The same arguments
and seed give identical images. JAX's persistent compilation cache (--cache-dir) makes later runs of the
same program skip XLA compilation; the output reports compile time and, on a cache hit, the time saved.

Errors in arguments, a missing or unreadable checkpoint, or a request that does not fit the model (guidance
on an unconditional model, labels out of range, steps > T) print one line on stderr and exit with status 2
(arguments) or 1 (checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Optional, Sequence

from jdiff import SAMPLERS, SPACINGS

PROG = "sample.py"
DEFAULT_CACHE = os.path.join("~", ".cache", "jdiff", "xla")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        _fail(message, 2)


def _fail(message, code: int):
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def _labels(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one label")
    return out


def _both(flag: str) -> tuple[str, str]:
    """A hyphenated flag and its underscore spelling (train.py's style): --batch-size, --batch_size."""
    return flag, "--" + flag[2:].replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--workdir", required=True, help="training run directory (config.json + checkpoints/)")
    p.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampling steps, <= the model's T (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity in [0, 1] (default 0)")
    p.add_argument("--spacing", choices=SPACINGS, default="linspace", help="timestep spacing")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (class-conditional models; 1 = plain conditional)")
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--labels", type=_labels, default=None, metavar="0,1,2",
                     help="class labels, cycled over the samples (default: 0..C-1 repeated)")
    lab.add_argument("--class", dest="class_", type=int, default=None, metavar="C", help="one class for all samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(*_both("--batch-size"), type=int, default=256,
                   help="global batch (rounded up to a multiple of the device count; default 256)")
    p.add_argument("--params", choices=("ema", "raw"), default="ema", help="EMA (default) or raw parameters")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--out", default=None, help="output directory (default: WORKDIR/samples)")
    p.add_argument("--trajectory", action="store_true", help="also write the denoising steps (PNG strip + GIF)")
    p.add_argument(*_both("--trajectory-every"), type=int, default=None, metavar="K",
                   help="keep every K-th step in the trajectory (default: steps // 10)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(*_both("--cache-dir"), default=DEFAULT_CACHE,
                       help=f"persistent compilation cache (default {DEFAULT_CACHE})")
    cache.add_argument(*_both("--no-cache"), action="store_true", help="no persistent compilation cache")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                   help="clip the predicted x0 to [-1, 1] at every step (default on)")
    p.add_argument(*_both("--no-progress"), action="store_true", help="no progress bar")
    return p


def _write(out_dir, stem, images, labels, traj, req, which, prediction, image_shape, *, columns) -> list[str]:
    """PNG grid + .npz (+ trajectory PNG strip and GIF); returns the paths."""
    from jdiff import inference
    from jdiff.training.samples import image_grid, save_png

    up = inference.upscale_for(image_shape)
    path = lambda suffix: os.path.join(out_dir, stem + suffix)
    written = [
        save_png(image_grid(images, columns=columns, upscale=up), path(".png")),
        inference.write_npz(path(".npz"), images, labels, sampler=req.sampler, steps=req.steps, eta=req.eta,
                            spacing=req.spacing, seed=req.seed, params=which, prediction=prediction,
                            guidance=float("nan") if req.guidance is None else req.guidance),
    ]
    if traj is not None:
        written += inference.write_trajectory(traj, path("_trajectory.png"), path("_trajectory.gif"), up)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.trajectory_every is not None and not args.trajectory:
        _fail("--trajectory-every needs --trajectory", 2)

    from jdiff import inference
    from jdiff.training.checkpoint import (CheckpointError, load_for_inference, read_run_config,
                                           silence_closed_loop_noise)

    labels = (args.class_,) if args.class_ is not None else args.labels
    every = None
    if args.trajectory:
        every = args.trajectory_every if args.trajectory_every is not None else max(1, args.steps // 10)
    req = inference.Request(num=args.num, sampler=args.sampler, steps=args.steps, eta=args.eta,
                            spacing=args.spacing, guidance=args.guidance, labels=labels, seed=args.seed,
                            batch_size=args.batch_size, clip=args.clip, trajectory_every=every)
    try:
        config, derived = read_run_config(args.workdir)  # cheap: validate before loading any weights
        num_classes = derived.get("num_classes")
        inference.check_request(req, config.num_timesteps, num_classes)
    except CheckpointError as e:
        _fail(e, 1)
    except ValueError as e:
        _fail(e, 2)

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only-manager notices
    silence_closed_loop_noise()
    try:
        cache_dir = None if args.no_cache else inference.enable_compilation_cache(args.cache_dir)
    except OSError as e:
        _fail(f"cannot use --cache-dir {args.cache_dir}: {e}", 2)
    try:
        config, model, schedule, params = load_for_inference(
            args.workdir, step=args.step, which="ema" if args.params == "ema" else "params")
    except (CheckpointError, OSError) as e:
        _fail(e, 1)

    import jax

    image_shape = tuple(derived["image_shape"])
    devices = jax.devices()
    batch = inference.global_batch(req, len(devices))
    out_dir = args.out or os.path.join(args.workdir, "samples")
    stem = f"{req.sampler}_{req.steps}steps_seed{req.seed}"
    stem += f"_g{req.guidance:g}" if req.guidance is not None else ""
    print(f"{config.model} ({args.params} params) from {args.workdir}: {req.num} samples "
          f"{'x'.join(map(str, image_shape))}, {req.sampler} {req.steps} steps ({req.spacing}, eta {req.eta:g}, "
          f"prediction {config.objective}), {len(devices)} device(s), batch {batch}", flush=True)
    try:
        sampler = inference.BatchSampler(model, schedule, params, req, image_shape, num_classes, batch=batch,
                                         prediction=config.objective, devices=devices, cache_dir=cache_dir)
        stats = sampler.compile()
        print(f"compile: {stats.describe(cache_dir)}", flush=True)
        y = inference.sample_labels(req, num_classes)
        images, traj, spent = inference.draw(sampler, req, y, progress=not args.no_progress)
    except ValueError as e:  # arguments that jdiff.sample rejects
        _fail(e, 2)
    print(f"sampling: {req.num} images in {spent:.2f} s ({req.num / spent:.1f} images/s)", flush=True)

    try:
        written = _write(out_dir, stem, images, y, traj, req, args.params, config.objective, image_shape,
                         columns=num_classes if (y is not None and labels is None and req.num >= num_classes)
                         else math.ceil(math.sqrt(req.num)))  # one column per class when labels cycle
    except OSError as e:
        _fail(f"cannot write to {out_dir}: {e}", 1)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
