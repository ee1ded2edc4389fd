"""Held-out negative log-likelihood in bits/dim of a trained run: the variational bound (all T terms + prior +
decoder, `jdiff.likelihood.vlb_bpd`) and the probability-flow ODE (`jdiff.likelihood.ode_bpd`), on the first
--num examples of the test split, with the time of each evaluation (compiled once, then timed again).

    python benchmarks/likelihood.py --workdir runs/digits [--num 64] [--methods vlb,ode] [--variance posterior]
    ... [--probe rademacher|gaussian|exact] [--rtol 1e-5] [--labels true|null] [--params ema|params] [--json out]

Class-conditional runs are scored with the true labels (-log p(x | y)) or, with --labels null, with the null
label (-log p(x), the model's unconditional mode). Exit status 2 for bad arguments, 1 for a run that cannot be
loaded.
"""

import argparse
import json
import math
import sys
import time

import jax
import numpy as np


def evaluate(args) -> dict:
    from jdiff.run import build_schedule, load_for_inference
    from jdiff.training.evaluate import EVAL_SEED_SALT, heldout_batch, make_bpd_fn

    config, model, _, params = load_for_inference(args.workdir, step=args.step, which=args.params)
    schedule = build_schedule(config)
    batch = heldout_batch(config, args.num, split=args.split)
    images, labels = batch["image"], batch["label"]
    if args.labels == "null" and model.num_classes is not None:
        labels = np.full_like(labels, model.num_classes)
    key = jax.random.key(config.run.seed + EVAL_SEED_SALT)
    out = {
        "workdir": args.workdir,
        "step": args.step,
        "model": config.model.name,
        "loss": config.diffusion.loss,
        "learned_variance": config.learned_variance(),
        "T": schedule.num_timesteps,
        "levels": config.data.pixel_levels(),
        "examples": int(len(images)),
        "labels": args.labels if model.num_classes is not None else "unconditional",
        "rows": [],
    }
    rows = []
    run = dict(prediction=config.diffusion.prediction, levels=config.data.pixel_levels())
    for method in args.methods:
        variants = args.variance if method == "vlb" else [None]
        for variance in variants:
            if method == "vlb":
                if variance == "auto":
                    variance = "learned" if config.learned_variance() else "posterior"
                fn = make_bpd_fn(model, schedule, **run, method="vlb", variance=variance, t_chunk=args.t_chunk)
                name = f"vlb ({variance})"
            else:
                fn = make_bpd_fn(model, schedule, **run, method="ode", probe=args.probe, rtol=args.rtol, atol=args.rtol)
                name = f"ode ({args.probe}, rtol {args.rtol:g})"
            t0 = time.perf_counter()
            bpd = np.asarray(fn(params, images, labels, key))
            first = time.perf_counter() - t0
            again = first
            if args.repeat:  # the second call is the evaluation alone (the first also compiles)
                t0 = time.perf_counter()
                np.asarray(fn(params, images, labels, key))
                again = time.perf_counter() - t0
            row = {
                "method": name,
                "bpd": float(bpd.mean()),
                "se": float(bpd.std() / math.sqrt(len(bpd))),
                "compile_s": round(first - again, 2),
                "eval_s": round(again, 2),
                "ms_per_example": round(1000 * again / len(bpd), 1),
            }
            rows.append(row)
            print(
                f"| {row['method']} | {row['bpd']:.4f} ± {row['se']:.4f} | {row['eval_s']:.2f} s "
                f"({row['ms_per_example']:.1f} ms/example) | {row['compile_s']:.1f} s |",
                flush=True,
            )
    out["rows"] = rows
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="likelihood", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/digits")
    p.add_argument("--num", type=int, default=64, help="held-out examples (the first N of --split)")
    p.add_argument("--split", default=None, help="split to score (default: the run's data.eval_split)")
    p.add_argument("--methods", default="vlb,ode", help="comma-separated: vlb, ode")
    p.add_argument("--variance", default="auto", help="comma-separated VLB variances: auto, posterior, beta, learned")
    p.add_argument("--t-chunk", type=int, default=10, help="VLB timesteps per model call")
    p.add_argument("--probe", default="rademacher", choices=("rademacher", "gaussian", "exact"))
    p.add_argument("--rtol", type=float, default=1e-5, help="ODE solver rtol = atol")
    p.add_argument("--labels", default="true", choices=("true", "null"))
    p.add_argument("--params", default="ema", choices=("ema", "params"))
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--no-repeat", dest="repeat", action="store_false", help="evaluate once (the time then includes compiling)"
    )
    p.add_argument("--json", default=None, help="also write the result as JSON to this path")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.variance = [v.strip() for v in args.variance.split(",") if v.strip()]
    if not args.methods or set(args.methods) - {"vlb", "ode"}:
        p.error(f"--methods takes vlb and/or ode, got {','.join(args.methods)!r}")
    if set(args.variance) - {"auto", "posterior", "beta", "learned"}:
        p.error(f"--variance takes auto, posterior, beta, learned; got {','.join(args.variance)!r}")
    if args.num < 1 or args.t_chunk < 1 or not args.rtol > 0:
        p.error("--num and --t-chunk must be >= 1 and --rtol > 0")
    print(f"held-out bits/dim of {args.workdir} ({args.num} examples); jax {jax.__version__}, {jax.devices()[0]}")
    print("| method | bits/dim (± s.e.) | time per evaluation | compile |")
    print("|---|---|---|---|")
    try:
        result = evaluate(args)
    except ValueError as e:  # a missing run / checkpoint (RunError), a variance the model does not have
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
