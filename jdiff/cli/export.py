"""export: write a trained jdiff run as a diffusers-format pipeline directory.

`python -m jdiff.cli.export --workdir runs/digits --out runs/digits/diffusers` (EMA weights by default).

The directory (model_index.json, unet/ or transformer/, scheduler/, and vae/ for a latent run) loads in
diffusers with `from_pretrained` and in jdiff with `jdiff.pretrained.load` / `sample.py --pretrained`. The
run's schedule is written by name (beta_schedule), its prediction as prediction_type. A model diffusers cannot
express (e.g. a norm_groups that jdiff lowers for narrow layers) exits 2 with one line; a missing or
unreadable run 1.
"""

import argparse
import sys
from typing import Optional, Sequence

from jdiff.cli.common import Parser, fail, run_script

PROG = "export"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--workdir", required=True, help="training run directory (config.json + checkpoints/)")
    p.add_argument("--out", required=True, help="output directory (created; existing files are overwritten)")
    p.add_argument("--params", choices=("ema", "raw"), default="ema", help="EMA (default) or raw parameters")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from jdiff import run as jrun
    from jdiff._logs import quiet_absl
    from jdiff.models import abstract_params
    from jdiff.pretrained import PretrainedError, named_schedule, save

    try:
        run = jrun.open_run(args.workdir)
    except jrun.RunError as e:
        fail(PROG, e, 1)
    config = run.config
    d = config.diffusion
    if d.prediction not in ("eps", "v", "x0"):
        fail(PROG, f"prediction {d.prediction!r} has no diffusers prediction_type (supported: eps, v, x0)", 2)
    try:
        model = jrun.build_model(config, run.num_classes)
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
    vae = getattr(config.data, "vae", None) or None
    try:
        out = save(args.out, model, params, sample_shape=shape, schedule=schedule, prediction=d.prediction, vae_dir=vae)
    except PretrainedError as e:
        fail(PROG, e, 2)
    print(f"wrote {out} ({type(model).__name__}, {'x'.join(map(str, shape))}, prediction {d.prediction})")
    return 0


if __name__ == "__main__":
    run_script(main)
