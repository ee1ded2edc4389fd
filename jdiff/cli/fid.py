"""FID (and KID, Inception Score, precision/recall) of a run, a sample file or an image folder, in JAX.

    python -m jdiff.cli.fid --workdir RUN --num 50000 --ref STATS.npz --inception inception.safetensors
    python -m jdiff.cli.fid --samples RUN/samples/ddim_50steps_seed0.npz --ref STATS.npz --inception W
    python -m jdiff.cli.fid --images FOLDER --save-stats STATS.npz --inception W     # reference statistics

The images come from exactly one source: ``--workdir`` draws ``--num`` samples from a trained run with the
run's sampler settings (config.json's ``sampling`` section: sampler, steps, spacing, guidance, options;
``--sampler`` / ``--steps`` / ``--spacing`` / ``--guidance`` / ``--seed`` override them), ``--samples`` reads
the images of a sample.py .npz or of an ADM reference batch (``arr_0``), ``--images`` the image files of a
folder (png, jpg, ...; as pytorch-fid's loader, converted to RGB). Samples in [-1, 1] are quantised to 8 bits
as the PNGs sample.py writes. Features come from pytorch-fid's FID Inception network
(`jdiff.metrics.inception`) with the weights of ``--inception`` (a .safetensors; see
`jdiff.cli.convert_inception`), batch by batch over all devices, memory flat in N.

``--ref`` is a statistics .npz (pytorch-fid's ``mu``/``sigma``, or an ADM reference batch); ``--kid`` and
``--precision-recall`` also need the reference's images (``--ref`` an ADM batch or a sample .npz),
``--inception-score`` needs none. The last line on stdout is one JSON object of the results. Usage errors
print one line and exit 2, a missing or unreadable file exits 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Iterator, Optional, Sequence

import numpy as np

from jdiff.cli.common import Parser, both, fail

PROG = "fid"
IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")  # pytorch-fid's
DEFAULT_BATCH = 64


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run: draw --num samples with its sampler settings")
    src.add_argument("--samples", metavar="FILE.npz", help="a sample.py .npz or an ADM reference batch")
    src.add_argument("--images", metavar="FOLDER", help="a folder of image files")
    p.add_argument("--inception", required=True, metavar="W.safetensors", help="FID Inception weights")
    p.add_argument("--ref", metavar="STATS.npz", help="reference statistics (mu, sigma) for FID")
    p.add_argument(*both("--save-stats"), metavar="OUT.npz", help="write mu, sigma of the images (pytorch-fid)")
    p.add_argument("--num", type=int, default=None, help="images to use (--workdir: required; others: all)")
    p.add_argument(*both("--batch-size"), type=int, default=None, help=f"images per step (default {DEFAULT_BATCH})")
    p.add_argument("--kid", action="store_true", help="Kernel Inception Distance (needs reference images)")
    p.add_argument(*both("--precision-recall"), action="store_true", help="k=3 precision/recall (reference images)")
    p.add_argument(*both("--inception-score"), action="store_true", help="Inception Score (10 splits)")
    run = p.add_argument_group("--workdir sampling (defaults: the run's sampling settings)")
    run.add_argument("--sampler", default=None)
    run.add_argument("--steps", type=int, default=None)
    run.add_argument("--spacing", default=None)
    run.add_argument("--guidance", type=float, default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--params", choices=("ema", "raw"), default="ema")
    run.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(*both("--no-progress"), action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (Ctrl-C: one line, status 130)."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        fail(PROG, "interrupted", 130)


def _check_args(args) -> None:
    if args.workdir is None:
        for flag in ("sampler", "steps", "spacing", "guidance", "step"):
            if getattr(args, flag) is not None:
                fail(PROG, f"--{flag} applies to --workdir only", 2)
    elif args.num is None:
        fail(PROG, "--workdir needs --num (e.g. --num 50000)", 2)
    if args.num is not None and args.num < 2:
        fail(PROG, f"--num must be >= 2 (a covariance needs two images), got {args.num}", 2)
    if args.batch_size is not None and args.batch_size < 1:
        fail(PROG, f"--batch-size must be >= 1, got {args.batch_size}", 2)
    if not (args.ref or args.save_stats or args.inception_score):
        fail(PROG, "nothing to compute: give --ref, --save-stats or --inception-score", 2)
    if (args.kid or args.precision_recall) and not args.ref:
        fail(PROG, "--kid and --precision-recall need --ref with reference images", 2)
    for path, flag in ((args.inception, "--inception"), (args.ref, "--ref"), (args.samples, "--samples")):
        if path is not None and not os.path.isfile(path):
            fail(PROG, f"{flag} {path} not found", 1)
    if args.images is not None and not os.path.isdir(args.images):
        fail(PROG, f"--images {args.images} is not a directory", 1)


def _main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    from jdiff import metrics
    from jdiff.metrics.stats_io import npz_images

    ref_stats, ref_images = None, None
    if args.ref:
        try:
            ref_stats = metrics.load_stats(args.ref)
            if args.kid or args.precision_recall:
                npz_images(args.ref)  # fails early if the reference holds no images
                ref_images = args.ref
        except ValueError as e:
            fail(PROG, f"--ref: {e}", 1)
        if ref_stats[0].shape != (2048,):
            fail(PROG, f"--ref {args.ref}: mu has {ref_stats[0].size} dimensions, Inception pool3 has 2048", 1)
    try:
        inception = metrics.load_inception(args.inception)
    except ValueError as e:
        fail(PROG, e, 1)
    batch = args.batch_size or DEFAULT_BATCH
    keep = args.kid or args.precision_recall
    try:
        batches, source = _source(args, batch)
        t0 = time.perf_counter()
        stats, feats, logits = metrics.stream_stats(inception, batches, keep=keep, logits=args.inception_score)
        seconds = time.perf_counter() - t0
    except ValueError as e:
        fail(PROG, e, 1)
    if stats.count < 2:
        fail(PROG, f"{source} has {stats.count} image(s); statistics need at least 2", 1)
    mu, sigma = stats.finalize()
    out = {"source": source, "num": stats.count, "seconds": round(seconds, 2)}
    if args.save_stats:
        try:
            out["stats"] = metrics.save_stats(args.save_stats, mu, sigma)
        except OSError as e:
            fail(PROG, f"cannot write --save-stats {args.save_stats}: {e}", 1)
    if ref_stats is not None:
        out["fid"] = metrics.frechet_distance_from_stats(mu, sigma, *ref_stats)
        out["ref"] = args.ref
    if args.inception_score:
        splits = min(metrics.scores.IS_SPLITS, stats.count)
        out["inception_score"], out["inception_score_std"] = metrics.inception_score(logits, splits)
        out["inception_score_splits"] = splits
    if keep:
        ref_batches = _progress(metrics.iter_npz_images(ref_images, batch), args, "reference")
        try:
            _, ref_feats, _ = metrics.stream_stats(inception, ref_batches, keep=True)
        except ValueError as e:
            fail(PROG, f"--ref: {e}", 1)
        if args.kid:
            size = min(1000, len(feats), len(ref_feats))
            out["kid"], out["kid_std"] = metrics.kernel_inception_distance(feats, ref_feats, subset_size=size)
            out["kid_subset_size"] = size
        if args.precision_recall:
            out["precision"], out["recall"] = metrics.precision_recall(ref_feats, feats)
    print(json.dumps(out), flush=True)
    return 0


def _progress(it: Iterator[np.ndarray], args, what: str) -> Iterator[np.ndarray]:
    from tqdm.auto import tqdm

    with tqdm(desc=what, unit="img", disable=True if args.no_progress else None, file=sys.stderr) as bar:
        for x in it:
            yield x
            bar.update(len(x))


def _source(args, batch: int):
    """(iterator of image batches in [0, 1], a name for the output)."""
    from jdiff import metrics

    if args.samples is not None:
        return _progress(metrics.iter_npz_images(args.samples, batch, args.num), args, "features"), args.samples
    if args.images is not None:
        return _progress(_folder(args.images, batch, args.num), args, "features"), args.images
    return _run_samples(args, batch), args.workdir


def _folder(folder: str, batch: int, limit: Optional[int]) -> Iterator[np.ndarray]:
    """The image files of ``folder`` (sorted names) as RGB float32 in [0, 1], in batches of one size."""
    from PIL import Image

    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))[:limit]
    if not names:
        raise ValueError(f"--images {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    pending: list[np.ndarray] = []
    for name in names:
        try:
            with Image.open(os.path.join(folder, name)) as im:
                x = np.asarray(im.convert("RGB"), np.float32) / 255.0
        except OSError as e:
            raise ValueError(f"cannot read image {os.path.join(folder, name)}: {e}") from None
        if pending and (len(pending) == batch or x.shape != pending[0].shape):
            yield np.stack(pending)
            pending = []
        pending.append(x)
    yield np.stack(pending)


def _run_samples(args, batch: int) -> Iterator[np.ndarray]:
    """Samples of the run (config.json's sampling settings unless overridden), in [0, 1]."""
    import jax

    from jdiff import run as jrun
    from jdiff._logs import quiet_absl
    from jdiff.metrics import to_unit_range
    from jdiff.models import abstract_params

    try:
        run = jrun.open_run(args.workdir)
    except jrun.RunError as e:
        fail(PROG, e, 1)
    cfg = run.config
    if cfg.model.is_text():
        fail(PROG, f"{args.workdir} is a text model: sample it with sample.py --prompt, then fid.py --samples", 2)
    sampler = args.sampler or cfg.sampling.sampler
    settings = jrun.Settings(
        sampler=sampler,
        steps=args.steps or cfg.sampling.steps,
        spacing=args.spacing or cfg.sampling.spacing,
        options=dict(cfg.sampling.options) if sampler == cfg.sampling.sampler else {},
        guidance=args.guidance if args.guidance is not None else cfg.sampling.guidance_scale,
        clip=True,
        trajectory_every=None,
    )
    devices = jax.devices()
    vae = _run_vae(cfg)
    try:
        model = jrun.build_run_model(run)
        gen = jrun.Generator.from_run(
            run,
            settings,
            batch=jrun.auto_batch(args.num, len(devices), args.batch_size),
            devices=devices,
            model=model,
            vae=vae,
        )
        abstract = abstract_params(model, (1, *run.image_shape), with_labels=run.num_classes is not None)
        gen.compile(abstract)
    except ValueError as e:
        fail(PROG, e, 2)
    try:
        with quiet_absl():
            _, _, params = jrun.load_params(
                run, step=args.step, which="ema" if args.params == "ema" else "params", model=model, abstract=abstract
            )
    except (jrun.CheckpointError, OSError) as e:
        fail(PROG, e, 1)
    labels = jrun.labels_for(args.num, run.num_classes)
    for _, x, _, _ in gen.batches(params, args.num, seed=args.seed, labels=labels, progress=not args.no_progress):
        if not np.all(np.isfinite(x)):
            fail(PROG, "samples are not finite; no statistics", 1)
        x = to_unit_range(x)
        yield np.repeat(x, 3, -1) if x.shape[-1] == 1 else x


def _run_vae(config):
    """The AutoencoderKL a latent run (data.vae) decodes through, or None; a missing or unreadable one exits 1."""
    if not config.data.vae:
        return None
    from jdiff.pretrained.autoencoder import load_autoencoder_dir
    from jdiff.pretrained.files import PretrainedError

    try:
        return load_autoencoder_dir(config.data.vae)
    except PretrainedError as e:
        fail(PROG, f"the run's VAE (data.vae): {e}", 1)


if __name__ == "__main__":
    from jdiff.cli.common import run_script

    run_script(main)
