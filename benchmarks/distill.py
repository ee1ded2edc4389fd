"""Few-step students on 8x8 digits (a benchmark script): Frechet distance (the digits classifier's features,
`benchmarks/digits_quality.py`) of distilled students at 1, 2 and 4 model calls against the real-vs-real floor,
next to the teacher's best ODE solver at the same calls, how far each student's samples lie from the teacher's
100-step DDIM samples from the same start noise (RMS per pixel, against the teacher's own DDIM at the student's
step count), and the distillation's training time relative to the teacher's.

    python benchmarks/distill.py --teacher runs/digits --student runs/digits_cd --student runs/digits_pd \
        [--num 500] [--calls 1,2,4] [--solvers ddim,dpmpp_2m,unipc] [--spacing trailing] [--json out.json]

A student (a run of `python -m jdiff.cli.distill`) is sampled with the sampler, spacing and options its
config.json records; a consistency student at every call count, a progressive one at its own step count.
Training time is steps / mean(steps_per_sec) of each run's metrics.jsonl (compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_quality import FLOOR_DRAWS, Scorer, steps_for_nfe  # noqa: E402


def draw(workdir: str, sampler: str, steps: int, spacing: str, options: dict, num: int, seed: int):
    """(images (num, 8, 8, 1) clipped to [-1, 1], balanced labels or None) from a run's EMA parameters."""
    import jax

    from jdiff import run as jrun

    run = jrun.open_run(workdir)
    y = jrun.labels_for(num, run.num_classes) if run.num_classes else None
    settings = jrun.Settings(sampler=sampler, steps=steps, spacing=spacing, options=options)
    model = jrun.build_model(run.config, run.num_classes)
    devices = jax.devices()
    gen = jrun.Generator.from_run(run, settings, batch=jrun.auto_batch(num, len(devices)), devices=devices, model=model)
    _, _, params = jrun.load_params(run, model=model)
    x, _, _ = gen.draw(params, num, seed=seed, labels=y)
    return np.clip(np.asarray(x), -1.0, 1.0), y


def train_seconds(workdir: str) -> Optional[float]:
    """steps / mean steps_per_sec over the run's metrics.jsonl records (None without records)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    recs = [json.loads(line) for line in open(path)]
    rates = [r["steps_per_sec"] for r in recs if r.get("steps_per_sec")]
    return recs[-1]["step"] / float(np.mean(rates)) if rates else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="distill", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the teacher's run directory")
    p.add_argument("--student", action="append", default=[], help="a distilled student's run directory (repeat)")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--calls", default="1,2,4", help="model-call budgets")
    p.add_argument("--solvers", default="ddim,dpmpp_2m,unipc", help="the teacher's ODE solvers (best one is kept)")
    p.add_argument("--spacing", default="trailing", help="the teacher's solvers' spacing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    calls = [int(c) for c in args.calls.split(",")]
    scorer = Scorer()
    n_ref = min(args.num, len(scorer.train_x))
    floors = []
    for k in range(FLOOR_DRAWS):
        idx = np.random.default_rng([args.seed, 0, k]).choice(len(scorer.train_x), n_ref, replace=False)
        floors.append(scorer.score(scorer.train_x[idx], scorer.train_y[idx])["frechet"])
    floor = float(np.mean(floors))
    print(f"real-vs-real floor: Frechet {floor:.2f} +- {np.std(floors):.2f} ({args.num} samples)", flush=True)
    ref, _ = draw(args.teacher, "ddim", 100, "trailing", {"eta": 0.0}, args.num, args.seed)
    rms = lambda x: float(np.sqrt(np.mean((x - ref) ** 2)))  # noqa: E731
    rows = []

    def add(who, sampler, steps, spacing, options, n_calls, workdir):
        x, y = draw(workdir, sampler, steps, spacing, options, args.num, args.seed)
        f = scorer.score(x, y)["frechet"]
        row = dict(who=who, sampler=sampler, steps=steps, spacing=spacing, calls=n_calls, frechet=f)
        row.update(over_floor=f / floor, rms_to_ddim100=rms(x))
        rows.append(row)
        print(
            f"{who:>28} {sampler} {steps} steps ({spacing}), {n_calls} calls: Frechet {f:.2f} "
            f"({f / floor:.2f}x floor), RMS to teacher DDIM-100 {row['rms_to_ddim100']:.3f}",
            flush=True,
        )

    from jdiff.sampling import get_sampler

    done = set()
    for n in calls:
        for solver in args.solvers.split(","):
            steps = steps_for_nfe(solver, n)
            if get_sampler(solver).nfe(steps) <= n and (solver, steps) not in done:
                done.add((solver, steps))
                add("teacher", solver, steps, args.spacing, {}, get_sampler(solver).nfe(steps), args.teacher)
    t_teacher = train_seconds(args.teacher)
    times = {}
    for student in args.student:
        cfg = json.load(open(os.path.join(student, "config.json")))["derived"]
        rec, method = cfg["sampler"], cfg["distill"]["method"]
        ns = [rec["steps"]] if rec["sampler"] == "ddim" else calls
        for n in ns:
            add(f"{method} {os.path.basename(student)}", rec["sampler"], n, rec["spacing"], rec["options"], n, student)
        t = train_seconds(student)
        times[student] = None if t is None or not t_teacher else t / t_teacher
        print(f"{student}: training time {times[student] and round(times[student], 2)}x the teacher's", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"floor": floor, "floor_draws": floors, "rows": rows, "time_vs_teacher": times}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
