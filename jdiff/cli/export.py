"""export: write a trained jdiff run as a diffusers-format pipeline directory.

`python -m jdiff.cli.export --workdir runs/digits --out runs/digits/diffusers` (EMA weights by default).

The directory (model_index.json, unet/ or transformer/, scheduler/, and vae/ for a latent run) loads in
diffusers with `from_pretrained` and in jdiff with `jdiff.pretrained.load` / `sample.py --pretrained`. The
run's schedule is written by name (beta_schedule), its prediction as prediction_type. A model diffusers cannot
express (e.g. a norm_groups that jdiff lowers for narrow layers) exits 2 with one line; a missing or
unreadable run 1. An export diffusers runs differently from jdiff (a reference-convention DiT, a
class-conditional U-Net) prints one `export: warning:` line naming the difference.

The directory is written to a temporary sibling and renamed into place at the end; a non-empty --out is
refused unless --overwrite. Ctrl-C or SIGTERM stops it with one line (status 130) and nothing written; a
second Ctrl-C exits at once (a temporary left behind is removed by the next export to that --out).
"""

import argparse
import os
import sys
from typing import Optional, Sequence

from jdiff.cli.common import Parser, fail, run_script

PROG = "export"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--workdir", required=True, help="training run directory (config.json + checkpoints/)")
    p.add_argument("--out", required=True, help="output directory (created; a non-empty one needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out as a whole")
    p.add_argument("--params", choices=("ema", "raw"), default="ema", help="EMA (default) or raw parameters")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    return p


def _abort() -> None:
    """A second Ctrl-C: exit at once (status 130); the next export to --out removes the temporary."""
    print(f"{PROG}: error: interrupted twice: stopped; nothing written", file=sys.stderr, flush=True)
    os._exit(130)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status. SIGTERM/SIGINT stop the export at the next file boundary (one
    line, status 130, no output left); a second Ctrl-C exits at once."""
    from jdiff.signals import SignalCatcher, StopFlag

    with SignalCatcher(StopFlag(), on_second=_abort) as flag:
        try:
            return _main(sys.argv[1:] if argv is None else argv, flag)
        except KeyboardInterrupt:
            fail(PROG, f"interrupted ({flag.reason or 'SIGINT'}); nothing written", 130)


def _main(argv: Sequence[str], flag) -> int:
    args = build_parser().parse_args(argv)

    def check_stop() -> bool:
        if flag.requested:
            raise KeyboardInterrupt
        return False

    import warnings

    from jdiff import run as jrun
    from jdiff._logs import quiet_absl
    from jdiff.models import CLIPText, UNetCond, abstract_params, is_text_model
    from jdiff.models.text_unet import TEXT_PARAMS
    from jdiff.pretrained import PretrainedError, PretrainedWarning, named_schedule, save
    from jdiff.pretrained.text import TextEncoder

    try:
        run = jrun.open_run(args.workdir)
    except jrun.RunError as e:
        fail(PROG, e, 1)
    config = run.config
    d = config.diffusion
    if config.model.is_text() and not config.data.vae:
        fail(
            PROG,
            "a pixel-space text model has no diffusers pipeline: StableDiffusionPipeline needs a VAE "
            "(train with --data.vae)",
            2,
        )
    if d.prediction not in ("eps", "v", "x0"):
        fail(PROG, f"prediction {d.prediction!r} has no diffusers prediction_type (supported: eps, v, x0)", 2)
    try:
        model = jrun.build_run_model(run)
        schedule = named_schedule(d.schedule, d.num_timesteps, zero_terminal_snr=d.zero_terminal_snr)
        shape = tuple(run.image_shape)
        abstract = abstract_params(model, (1, *shape), with_labels=run.num_classes is not None)
    except (ValueError, argparse.ArgumentTypeError) as e:
        fail(PROG, e, 2)
    try:
        with quiet_absl():
            _, _, params = jrun.load_params(
                run, step=args.step, which="ema" if args.params == "ema" else "params", model=model, abstract=abstract
            )
    except (jrun.CheckpointError, OSError) as e:
        fail(PROG, e, 1)
    check_stop()
    vae = getattr(config.data, "vae", None) or None
    text = {}
    if is_text_model(model):  # a StableDiffusionPipeline: the U-Net, its text encoder and the run's tokenizer
        text = dict(
            text_encoder=TextEncoder(CLIPText(**model.text_fields()), params[TEXT_PARAMS]),
            tokenizer_dir=os.path.join(args.workdir, jrun.TOKENIZER_DIR),
        )
        model, params = UNetCond(**model.unet_fields()), params["unet"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PretrainedWarning)
            out = save(
                args.out,
                model,
                params,
                **text,
                sample_shape=shape,
                schedule=schedule,
                prediction=d.prediction,
                vae_dir=vae,
                overwrite=args.overwrite,
                stop=check_stop,
            )
    except PretrainedError as e:
        fail(PROG, e, 2)
    for w in caught:
        if issubclass(w.category, PretrainedWarning):
            print(f"{PROG}: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    print(f"wrote {out} ({type(model).__name__}, {'x'.join(map(str, shape))}, prediction {d.prediction})")
    return 0


if __name__ == "__main__":
    run_script(main)
