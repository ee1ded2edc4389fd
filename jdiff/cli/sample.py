"""sample.py: draw samples from a trained jdiff run, `python sample.py --workdir runs/digits`, or from a
diffusers-format checkpoint, `python sample.py --pretrained ddpm-cifar10-32` (jdiff.pretrained; a DiT pipeline's
latents are decoded by its vae/, classifier-free guidance 4 by default as in diffusers' DiTPipeline), or from a
Stable Diffusion 1.x/2.x pipeline, `python sample.py --pretrained DIR --prompt "a photo of a cat"` (guidance 7.5
and the negative prompt as in StableDiffusionPipeline; `jdiff.pretrained.text_to_image`).

Loads the run's checkpoint (EMA parameters by default; config.json gives the model, image shape, prediction
type and noise schedule), samples in batches sharded over all devices, and writes a PNG grid and an .npz of
the raw float images (and labels) to --out (default: WORKDIR/samples). `--trajectory` also writes the
denoising steps of the first samples as a strip PNG and an animated GIF. The same arguments and seed give
identical images. JAX's persistent compilation cache (--cache-dir) makes later runs of the same program skip
XLA compilation. Each sampler option (e.g. --eta) is a flag, derived from the sampler registry.

Errors in arguments, or a request that does not fit the model (guidance on an unconditional model, labels
out of range, steps > T, an option the sampler does not have), print one line on stderr and exit with status
2; a missing or unreadable run or checkpoint exits with status 1. This module never imports jdiff.training.
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np

from jdiff.cli.common import Parser, both, fail

PROG = "sample.py"
DEFAULT_CACHE = os.path.join("~", ".cache", "jdiff", "xla")
GRID_MAX = 1024  # the PNG grid shows at most the first GRID_MAX samples (the .npz has them all)


def _labels(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one label")
    return out


def build_parser() -> Parser:
    from jdiff.sampling import SAMPLERS, SPACINGS, all_options

    p = Parser(prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training run directory (config.json + checkpoints/)")
    src.add_argument(
        "--pretrained",
        metavar="PATH",
        help="a diffusers-format pipeline or model directory (UNet2DModel / DiT, optional vae/; see README)",
    )
    p.add_argument(
        *both("--timestep-convention"),
        choices=("reference", "diffusers"),
        default=None,
        help="--pretrained DiT: time embedding of the DiT reference code (default) or of diffusers' DiT",
    )
    p.add_argument("--num", type=int, default=None, help="number of samples (default 64; with prompts: one each)")
    p.add_argument(
        "--sampler",
        choices=list(SAMPLERS),
        default=None,
        help="default: the sampler a distilled run records (with its steps, spacing and options), else ddim",
    )
    p.add_argument("--steps", type=int, default=None, help="sampling steps, <= the model's T (default 50)")
    p.add_argument(
        "--spacing",
        choices=SPACINGS,
        default=None,
        help="timestep spacing (default: a distilled run's; text-to-image: the scheduler config's, else leading; "
        "else flow for a flow schedule, else linspace)",
    )
    opts = p.add_argument_group("sampler options (each applies to the samplers named)")
    for name, (spec, samplers) in all_options().items():
        opts.add_argument(
            *both(f"--{name}"),
            dest=f"option:{name}",
            default=None,
            metavar=spec.kind.__name__.upper(),
            help=f"{spec.summary()} ({', '.join(samplers)})",
        )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (class-conditional models; 1 = plain conditional; --pretrained DiT: 4)",
    )
    lab = p.add_mutually_exclusive_group()
    lab.add_argument(
        "--labels",
        type=_labels,
        default=None,
        metavar="0,1,2",
        help="class labels, cycled over the samples (default: 0..C-1 repeated)",
    )
    lab.add_argument("--class", dest="class_", type=int, default=None, metavar="C", help="one class for all samples")
    text = p.add_argument_group("text-to-image (--pretrained Stable Diffusion pipelines)")
    text.add_argument(
        "--prompt", action="append", default=None, metavar="TEXT", help="a prompt (repeat for several; cycled)"
    )
    text.add_argument(*both("--prompts-file"), default=None, metavar="FILE", help="prompts, one per line")
    text.add_argument(
        *both("--negative-prompt"), default=None, metavar="TEXT", help='negative prompt for every image (default "")'
    )
    text.add_argument(
        *both("--clip-skip"), type=int, default=None, metavar="N", help="text-encoder layers left out (default 0)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        *both("--batch-size"),
        type=int,
        default=None,
        help="global batch, a multiple of the device count (default: up to 256, chosen to fit)",
    )
    p.add_argument("--params", choices=("ema", "raw"), default=None, help="EMA (default) or raw parameters (runs)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (runs; default: latest)")
    p.add_argument("--out", default=None, help="output directory (default: WORKDIR/samples or PATH/samples)")
    p.add_argument("--trajectory", action="store_true", help="also write the denoising steps (PNG strip + GIF)")
    p.add_argument(
        *both("--trajectory-every"),
        type=int,
        default=None,
        metavar="K",
        help="keep every K-th step in the trajectory (default: steps // 10)",
    )
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        *both("--cache-dir"), default=DEFAULT_CACHE, help=f"persistent compilation cache (default {DEFAULT_CACHE})"
    )
    cache.add_argument(*both("--no-cache"), action="store_true", help="no persistent compilation cache")
    p.add_argument(
        "--clip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clip the predicted x0 to [-1, 1] at every step (default on; latent runs: the decoded images)",
    )
    p.add_argument(*both("--no-progress"), action="store_true", help="no progress bar")
    return p


def _options(args) -> dict:
    """The sampler options given on the command line, parsed with their Specs."""
    from jdiff.sampling import all_options

    out = {}
    for name, (spec, _) in all_options().items():
        text = getattr(args, f"option:{name}")
        if text is not None:
            out[name] = spec.parse(name, text)
    return out


DEFAULTS = {"sampler": "ddim", "steps": 50, "spacing": None}  # spacing None: the schedule's default


def _fill_defaults(args, recorded: Optional[dict]) -> None:
    """Sets the unset --sampler / --steps / --spacing and sampler options: from `recorded` (the sampler a
    distilled student's config.json records, `jdiff.training.distill`) unless another sampler is asked for,
    else from DEFAULTS."""
    rec = recorded if recorded and args.sampler in (None, recorded.get("sampler")) else {}
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, rec.get(name, default))
    for name, value in rec.get("options", {}).items():
        if getattr(args, f"option:{name}", None) is None:
            setattr(args, f"option:{name}", str(value))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (Ctrl-C: one line, status 130)."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        fail(PROG, "interrupted", 130)


def _main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.trajectory_every is not None and not args.trajectory:
        fail(PROG, "--trajectory-every needs --trajectory", 2)
    for name in ("num", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(PROG, f"--{name} must be >= 1, got {getattr(args, name)}", 2)
    if not 0 <= args.seed < 2**32:
        fail(PROG, f"--seed must be in [0, {2**32 - 1}], got {args.seed}", 2)
    if args.trajectory_every is not None and args.trajectory_every < 1:
        fail(PROG, f"--trajectory-every must be >= 1, got {args.trajectory_every}", 2)

    if args.guidance is not None and not math.isfinite(args.guidance):
        fail(PROG, f"--guidance must be a finite number, got {args.guidance}", 2)
    text_flags = _text_flags(args)
    if args.pretrained is not None:
        _fill_defaults(args, None)
        return _sample_pretrained(args, text_flags)
    args.num = args.num or 64
    args.params = args.params or "ema"
    if args.timestep_convention is not None:
        fail(PROG, "--timestep-convention applies to --pretrained DiT checkpoints only", 2)

    from jdiff import run as jrun
    from jdiff._logs import quiet_absl

    try:
        run = jrun.open_run(args.workdir)  # the one read of config.json
    except jrun.RunError as e:
        fail(PROG, e, 1)
    config = run.config
    prompts = _run_prompts(args, text_flags, config)
    _fill_defaults(args, run.derived.get("sampler"))
    out_dir = args.out or os.path.join(args.workdir, "samples")
    out_shape = tuple(run.derived.get("decoded_shape", run.image_shape))  # a latent run (data.vae) writes images
    _check_out(args, out_dir, out_shape)
    labels = (args.class_,) if args.class_ is not None else args.labels

    import jax

    from jdiff.models import abstract_params

    devices = jax.devices()
    cache_dir = _compilation_cache(args)
    try:
        settings, options, drawn = _settings(args, args.guidance)
        y = None if prompts else jrun.labels_for(args.num, run.num_classes, labels)
        batch = jrun.auto_batch(args.num, len(devices), args.batch_size)
        model = jrun.build_run_model(run)
        prediction = config.diffusion.prediction
        vae = _run_vae(config, run.derived.get("vae_fingerprint"))
        gen = jrun.Generator.from_run(run, settings, batch=batch, devices=devices, model=model, vae=vae)
        if prompts:  # a text run: token ids of the prompts, cycled over the samples
            y = jrun.tokens_for(gen.tokenizer, args.num, prompts)
        if gen.settings.guidance is not None and config.data.label_dropout == 0:
            what = "caption" if prompts else "label"
            print(
                f"warning: {args.workdir} was trained without {what} dropout (data.label_dropout 0): its "
                f"unconditional prediction was never trained, so guidance {gen.settings.guidance:g} extrapolates "
                "from an untrained input",
                file=sys.stderr,
            )
        drawn["spacing"] = gen.settings.spacing  # None resolved to the schedule's default
        print(
            f"{config.model.name} ({args.params} params) from {args.workdir}: {args.num} samples "
            f"{'x'.join(map(str, run.image_shape))}, {args.sampler} {args.steps} steps ({gen.settings.spacing}"
            + "".join(f", {k} {v}" for k, v in options.items())
            + f", prediction {prediction}), {len(devices)} device(s), batch {batch}",
            flush=True,
        )
        abstract = abstract_params(model, (1, *run.image_shape), with_labels=run.num_classes is not None)
        stats = gen.compile(abstract)  # validates the request before any weights are read
    except ValueError as e:
        fail(PROG, e, 2)
    print(f"compile: {stats.describe(cache_dir)}", flush=True)
    try:
        with quiet_absl():  # orbax's read-only-manager notices
            _, _, params = jrun.load_params(
                run, step=args.step, which="ema" if args.params == "ema" else "params", model=model, abstract=abstract
            )
    except (jrun.CheckpointError, OSError) as e:
        fail(PROG, e, 1)
    meta = dict(drawn, params=args.params)
    if prompts:
        meta["prompts"] = np.asarray([prompts[i % len(prompts)] for i in range(args.num)])
    columns = len(prompts) if prompts else run.num_classes
    return _write_samples(args, gen, params, y, labels, columns, out_dir, meta, prediction, options)


def _run_prompts(args, text_flags: list[str], config) -> list[str]:
    """The prompts of sample.py on a text run (--prompt / --prompts-file), [] for a label run; one line and exit
    2 for text flags on a label run, label flags on a text run, or a text run without prompts."""

    if not config.model.is_text():
        if text_flags:
            fail(
                PROG,
                f"{text_flags[0]} applies to text models (a text run or a --pretrained SD pipeline); "
                f"{args.workdir} is {config.model.name}, conditioned on labels",
                2,
            )
        return []
    for flag, given in (("--labels", args.labels), ("--class", args.class_)):
        if given is not None:
            fail(PROG, f"{flag} does not apply to the text model of {args.workdir} (use --prompt)", 2)
    for flag, given in (("--negative-prompt", args.negative_prompt), ("--clip-skip", args.clip_skip)):
        if given is not None:
            fail(PROG, f"{flag} applies to --pretrained SD pipelines; a text run's guidance uses the empty caption", 2)
    return _prompts(args, f"{args.workdir} is a text model ({config.model.name})")


def _prompts(args, what: str) -> list[str]:
    """The prompts of --prompt and --prompts-file, in order; one line and exit 2 when there are none."""
    from jdiff.pretrained.text import read_prompts_file

    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            prompts += read_prompts_file(args.prompts_file)
        except ValueError as e:
            fail(PROG, e, 2)
    if not prompts:
        fail(PROG, f"{what}: give --prompt TEXT or --prompts-file FILE", 2)
    return prompts


def _check_out(args, out_dir: str, out_shape: Sequence[int]) -> None:
    """Before any work: an unwritable --out, or one without room for the .npz, fails at once (status 2)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        fail(PROG, f"cannot write to --out {out_dir}: {e.strerror or e}", 2)
    need, free = args.num * math.prod(out_shape) * 4, shutil.disk_usage(out_dir).free
    if need > free:
        fail(
            PROG,
            f"--num {args.num} needs {need / 2**30:.1f} GiB for the .npz in {out_dir}, {free / 2**30:.1f} GiB free",
            2,
        )


def _compilation_cache(args) -> Optional[str]:
    """The persistent compilation cache in use (None with --no-cache); exit 2 with one line if --cache-dir fails."""
    from jdiff import run as jrun

    try:
        return None if args.no_cache else jrun.enable_compilation_cache(args.cache_dir)
    except OSError as e:
        fail(PROG, f"cannot use --cache-dir {args.cache_dir}: {e}", 2)


def _settings(args, guidance: Optional[float]):
    """(jrun.Settings, sampler options, the drawn sampler/steps/spacing also recorded in the .npz) of the flags."""
    from jdiff import run as jrun

    options = _options(args)
    drawn = {"sampler": args.sampler, "steps": args.steps, "spacing": args.spacing}
    settings = jrun.Settings(**drawn, options=options, guidance=guidance, clip=args.clip, trajectory_every=_every(args))
    return settings, options, drawn


def _every(args) -> Optional[int]:
    if not args.trajectory:
        return None
    return args.trajectory_every if args.trajectory_every is not None else max(1, args.steps // 10)


def _write_samples(args, gen, params, y, labels, num_classes, out_dir, meta, prediction, options) -> int:
    """Draws the samples and writes the PNG grid, the .npz (with `meta`) and the trajectory; returns 0."""
    from jdiff import run as jrun
    from jdiff.sampling import check_options

    guidance = gen.settings.guidance
    stem = f"{args.sampler}_{args.steps}steps_seed{args.seed}" + (f"_g{guidance:g}" if guidance is not None else "")
    path = lambda suffix: os.path.join(out_dir, stem + suffix)
    meta = dict(
        meta,
        batch_size=gen.batch,
        seed=args.seed,
        prediction=prediction,
        guidance=float("nan") if guidance is None else guidance,
        **check_options(args.sampler, options),
    )
    try:
        stream = jrun.NpzStream(path(".npz"), args.num, gen.output_shape)
    except OSError as e:
        fail(PROG, f"cannot write to {out_dir}: {e}", 1)
    try:
        grid, traj, spent = _sample_to(stream, gen, params, args, y)
        print(f"sampling: {args.num} images in {spent:.2f} s ({args.num / spent:.1f} images/s)", flush=True)
        cycle = y is not None and labels is None and args.num >= num_classes  # one column per class
        columns = num_classes if cycle else math.ceil(math.sqrt(len(grid)))
        up = jrun.upscale_for(gen.output_shape)
        written = [
            jrun.save_png(jrun.image_grid(grid, columns=columns, upscale=up), path(".png")),
            stream.finish(y, **meta),
        ]
        if traj is not None:
            written += jrun.write_trajectory(traj, path("_trajectory.png"), path("_trajectory.gif"), up)
    except OSError as e:
        fail(PROG, f"cannot write to {out_dir}: {e}", 1)
    finally:
        stream.abort()  # removes the temporary files unless finish() ran
    for p in written:
        print(f"wrote {p}")
    return 0


def _text_flags(args) -> list[str]:
    """The text-to-image flags given."""
    named = (("--prompt", args.prompt), ("--prompts-file", args.prompts_file))
    named += (("--negative-prompt", args.negative_prompt), ("--clip-skip", args.clip_skip))
    return [flag for flag, value in named if value is not None]


def _sample_pretrained(args, text_flags: list[str]) -> int:
    """sample.py --pretrained PATH: a diffusers-format checkpoint (jdiff.pretrained.load); a latent model's
    samples are decoded by its vae/. A bad directory exits 1 with one line, a request that does not fit 2."""
    for flag, value in (("--step", args.step), ("--params", args.params)):
        if value is not None:
            fail(PROG, f"{flag} applies to --workdir runs only", 2)
    from jdiff import run as jrun
    from jdiff.pretrained import PretrainedError, PretrainedUsageError, load

    try:
        pre = load(args.pretrained, timestep_convention=args.timestep_convention)
    except PretrainedUsageError as e:  # an argument that does not apply to this checkpoint
        fail(PROG, f"--pretrained {args.pretrained}: {e}", 2)
    except PretrainedError as e:
        fail(PROG, f"--pretrained {args.pretrained}: {e}", 1)
    if pre.kind == "unet_cond":
        return _sample_text(args, pre)
    if text_flags:
        fail(PROG, f"{text_flags[0]} applies to text-to-image pipelines; {args.pretrained} has no text encoder", 2)
    args.num = args.num or 64
    out_dir = args.out or os.path.join(args.pretrained, "samples")
    labels = (args.class_,) if args.class_ is not None else args.labels
    guidance = args.guidance if args.guidance is not None else (pre.guidance if pre.num_classes else None)

    import jax

    devices = jax.devices()
    cache_dir = _compilation_cache(args)
    try:
        settings, options, drawn = _settings(args, guidance)
        y = jrun.labels_for(args.num, pre.num_classes, labels)
        batch = jrun.auto_batch(args.num, len(devices), args.batch_size)
        gen = jrun.Generator.from_run(pre, settings, batch=batch, devices=devices)
        drawn["spacing"] = gen.settings.spacing  # None resolved to the schedule's default
        _check_out(args, out_dir, gen.output_shape)
        print(
            f"{type(pre.model).__name__} from {args.pretrained}: {args.num} samples "
            f"{'x'.join(map(str, gen.output_shape))}"
            + (f" (latents {'x'.join(map(str, pre.sample_shape))} decoded by vae/)" if pre.vae is not None else "")
            + f", {args.sampler} {args.steps} steps ({gen.settings.spacing}"
            + "".join(f", {k} {v}" for k, v in options.items())
            + f", prediction {pre.prediction}"
            + (", learned-variance output" if pre.variance == "learned" else "")
            + (f", guidance {guidance:g}" if guidance is not None else "")
            + f"), {len(devices)} device(s), batch {batch}",
            flush=True,
        )
        stats = gen.compile(pre.params)
    except ValueError as e:
        fail(PROG, e, 2)
    print(f"compile: {stats.describe(cache_dir)}", flush=True)
    meta = dict(drawn, pretrained=os.path.abspath(args.pretrained))
    return _write_samples(args, gen, pre.params, y, labels, pre.num_classes, out_dir, meta, pre.prediction, options)


def _sample_text(args, pre) -> int:
    """sample.py --pretrained SD_PIPELINE --prompt TEXT: `jdiff.pretrained.text_to_image` batch by batch (prompts
    cycled over --num); writes the PNG grid and the .npz (images in [-1, 1], prompts, settings)."""
    from jdiff import run as jrun
    from jdiff.pretrained import text_to_image

    for flag, given in (("--labels", args.labels), ("--class", args.class_), ("--trajectory", args.trajectory or None)):
        if given is not None:
            fail(PROG, f"{flag} does not apply to a text-to-image pipeline (use --prompt)", 2)
    prompts = _prompts(args, f"{args.pretrained} is a text-to-image pipeline")
    num = args.num = args.num or len(prompts)
    prompts = [prompts[i % len(prompts)] for i in range(num)]
    guidance = args.guidance if args.guidance is not None else pre.guidance
    out_dir = args.out or os.path.join(args.pretrained, "samples")
    image_shape = (pre.sample_shape[0] * 2 ** (len(pre.vae.module.block_out_channels) - 1),) * 2 + (3,)
    _check_out(args, out_dir, image_shape)
    _compilation_cache(args)
    import jax

    try:
        options = _options(args)
        batch = jrun.auto_batch(num, 1, args.batch_size)
    except ValueError as e:
        fail(PROG, e, 2)
    negative = args.negative_prompt if args.negative_prompt is not None else ""
    clip_skip = args.clip_skip or 0
    print(
        f"{type(pre.model).__name__} from {args.pretrained}: {num} images for {len(set(prompts))} prompt(s), "
        f"{args.sampler} {args.steps} steps, guidance {guidance:g}, prediction {pre.prediction}, batch {batch}",
        flush=True,
    )
    images = []
    try:
        for start in range(0, num, batch):
            chunk = prompts[start : start + batch]
            chunk += [chunk[-1]] * (batch - len(chunk))  # the last batch padded: one compiled program
            out = text_to_image(
                pre,
                chunk,
                negative_prompts=negative,
                sampler=args.sampler,
                num_steps=args.steps,
                guidance_scale=guidance,
                rng=jax.random.fold_in(jax.random.key(args.seed), start),
                options=options,
                spacing=args.spacing,
                clip_skip=clip_skip,
            )
            images.append(np.asarray(out)[: num - start])
    except ValueError as e:
        fail(PROG, e, 2)
    images = np.concatenate(images)
    if not np.isfinite(images).all():
        fail(PROG, f"{int((~np.isfinite(images)).sum())} image values are not finite; nothing written", 1)
    stem = os.path.join(out_dir, f"{args.sampler}_{args.steps}steps_seed{args.seed}_g{guidance:g}")
    try:
        up = jrun.upscale_for(images.shape[1:])
        columns = math.ceil(math.sqrt(min(len(images), GRID_MAX)))
        written = [jrun.save_png(jrun.image_grid(images[:GRID_MAX], columns=columns, upscale=up), stem + ".png")]
        np.savez(
            stem + ".npz",
            images=images,
            prompts=np.asarray(prompts),
            negative_prompt=np.asarray(negative),
            guidance=np.float32(guidance),
            sampler=args.sampler,
            steps=args.steps,
            seed=args.seed,
            clip_skip=clip_skip,
            pretrained=os.path.abspath(args.pretrained),
        )
        written.append(stem + ".npz")
    except OSError as e:
        fail(PROG, f"cannot write to {out_dir}: {e}", 1)
    for path in written:
        print(f"wrote {path}")
    return 0


def _run_vae(config, fingerprint):
    """The AutoencoderKL a latent run (data.vae) decodes through, or None; a missing or unreadable one, or one
    whose fingerprint is not the run's recorded one, exits 1."""
    if not config.data.vae:
        return None
    from jdiff.pretrained.autoencoder import load_autoencoder_dir
    from jdiff.pretrained.files import PretrainedError

    try:
        return load_autoencoder_dir(config.data.vae, fingerprint)
    except PretrainedError as e:
        fail(PROG, f"the run's VAE (data.vae): {e}", 1)


def _sample_to(stream, gen, params, args, labels):
    """Draws all samples batch by batch into `stream`; returns (the first GRID_MAX images for the grid, the
    trajectory of batch 0 or None, seconds spent). Non-finite samples stop it with one line."""
    grid, traj, spent = [], None, 0.0
    for start, x, tr, seconds in gen.batches(
        params, args.num, seed=args.seed, labels=labels, progress=not args.no_progress
    ):
        bad = int((~np.isfinite(x)).sum())
        if bad:
            fail(PROG, f"samples {start}..{start + len(x) - 1} are not finite ({bad} values); nothing written", 1)
        stream.add(start, x)
        grid.append(x[: max(0, GRID_MAX - start)])
        traj, spent = tr if start == 0 else traj, spent + seconds
    return np.concatenate(grid), traj, spent
