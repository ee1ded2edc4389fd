"""Sample quality on 8x8 digits, judged by a small classifier trained on held-out digits (a benchmark script;
the classifier and the scores are `jdiff.metrics`).

Protocol (details in `jdiff.metrics`): the diffusion model trains on the digits "train" split (1,438). A ReLU
MLP (64-64 hidden units) is fitted on the held-out "test" split (359 digits the diffusion model never saw);
its accuracy is measured on the 1,438 "train" digits it never saw. For N generated samples the table reports

* conf>0.9: the share the classifier labels with max class probability > 0.9;
* the predicted-class histogram, its entropy in bits (uniform over ten classes: log2 10 = 3.32) and its
  largest / smallest count; for class-conditional sampling also the share classified as the asked-for class;
* Frechet distance of the classifier's last-hidden-layer features to those of the 359 held-out digits;
* memorisation checks: the median pixel distance of a sample to its nearest training digit (a held-out real
  digit lies about 2.05 from the training set, a copy 0) and the share of near copies, samples closer to a
  training digit than 95% of held-out real digits are (about 0.05 for a model that generalises, 1 for copies).

Reference rows put the numbers in place: N random "train" digits (the real-vs-real floor: what a perfect
generator of the training distribution scores at the same N; mean +- std over 5 draws), real digits of
classes 0-4 only (mode dropping), blurred and noisy real digits, and uniform noise.

    python benchmarks/digits_quality.py --workdir runs/digits [--num 500] [--sampler ddim --steps 50]
    python benchmarks/digits_quality.py --npz samples.npz          # images (or samples) (N, 8, 8, 1) in [-1, 1]
    ... [--json out.json | --json -] [--save-samples out.npz] [--labels balanced|null] [--guidance 2.0]
    python benchmarks/digits_quality.py --sweep --workdir runs/digits [--samplers unipc,ddim] [--nfes 5,10]
        [--spacing trailing,karras]    # one table: Frechet for every sampler x spacing x NFE
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Optional, Sequence

import numpy as np

from jdiff import metrics

FLOOR_DRAWS = 5


def load_npz(path: str, num: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(images, labels or None) from an .npz with `images` or `samples` (and optionally `labels`).

    Raises ``ValueError`` for a missing array, a wrong shape or fewer than 2 (or ``num``) images.
    """
    with np.load(path) as data:
        key = next((k for k in ("images", "samples") if k in data.files), None)
        if key is None:
            raise ValueError(f"{path} has no 'images' or 'samples' array (arrays: {data.files})")
        images = np.asarray(data[key], np.float32)
        labels = np.asarray(data["labels"]) if "labels" in data.files else None
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] != (8, 8, 1):
        raise ValueError(f"{path}:{key} must be (N, 8, 8, 1) digits, got shape {images.shape}")
    if len(images) < 2:
        raise ValueError(f"{path}:{key} holds {len(images)} image(s); the Frechet distance needs >= 2")
    if num is not None:
        if num > len(images):
            raise ValueError(f"--num {num} but {path} holds only {len(images)} images")
        images = images[:num]
        labels = None if labels is None else labels[:num]
    if labels is not None and (labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= 10):
        labels = None  # empty (unconditional) or null labels: nothing to agree with
    return images, labels


def sample_checkpoint(
    workdir: str,
    *,
    num: int,
    step: int | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float | None = None,
    variance: str | None = None,
    seed: int = 0,
    labels: str = "balanced",
    guidance: float | None = None,
    spacing: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(images (num, 8, 8, 1) in [-1, 1], asked-for labels or None, info dict) drawn from a run's EMA params
    with `jdiff.run.Generator` (what sample.py uses). ValueError if the run cannot be loaded or is not digits.

    ``labels`` (class-conditional runs): "balanced" (num / 10 of each digit) or "null" (unconditional).
    """
    import jax

    from jdiff import run as jrun

    try:
        run = jrun.open_run(workdir)
    except jrun.RunError as e:
        raise ValueError(str(e)) from None
    d = run.config.data
    if d.dataset != "digits" or d.image_size not in (None, 8) or d.channels not in (None, 1):
        raise ValueError(
            f"{workdir} was trained on {d.dataset!r} (image_size={d.image_size}, "
            f"channels={d.channels}); this benchmark scores 8x8 grey digits only"
        )
    num_classes = run.num_classes
    y, mode = None, "unconditional"
    if num_classes:
        if labels == "balanced":
            y, mode = jrun.labels_for(num, num_classes), "balanced labels"
        else:
            y, mode = np.full(num, num_classes, np.int32), "null label"  # the null label: unconditional
        if guidance is not None:
            mode += f", guidance {guidance:g}"
    else:
        guidance = None
    options = {k: v for k, v in (("eta", eta), ("variance", variance)) if v is not None}
    settings = jrun.Settings(sampler=sampler, steps=steps, spacing=spacing, options=options, guidance=guidance)
    model = jrun.build_model(run.config, num_classes)
    devices = jax.devices()
    gen = jrun.Generator.from_run(run, settings, batch=jrun.auto_batch(num, len(devices)), devices=devices, model=model)
    try:
        _, _, params = jrun.load_params(run, step=step, model=model)
    except jrun.CheckpointError as e:
        raise ValueError(str(e)) from None
    t0 = time.time()
    x, _, _ = gen.draw(params, num, seed=seed, labels=y)
    info = {
        "workdir": workdir,
        "step": step or "latest",
        "sampler": sampler,
        "steps": steps,
        "spacing": gen.settings.spacing,
        "eta": eta,
        "variance": variance,
        "prediction": run.config.diffusion.prediction,
        "conditioning": mode,
        "sample_seconds": round(time.time() - t0, 2),
    }
    if y is not None and labels != "balanced":
        y = None  # null labels ask for no class
    return np.clip(x, -1.0, 1.0), y, info


def reference_sets(train_x: np.ndarray, train_y: np.ndarray, n: int, seed: int) -> dict[str, np.ndarray]:
    """Degraded / biased real sets of n images (n <= 1438) to place the numbers."""
    from scipy import ndimage

    rng = np.random.default_rng([seed, 1])
    base = train_x[rng.choice(len(train_x), n, replace=False)]
    low = np.flatnonzero(train_y < 5)
    return {
        "real digits 0-4 only": train_x[rng.choice(low, n, replace=len(low) < n)],
        "real + noise (sigma 0.5)": np.clip(base + rng.normal(0, 0.5, base.shape), -1, 1).astype(np.float32),
        "real, blurred (sigma 1 px)": ndimage.gaussian_filter(base, sigma=(0, 1, 1, 0), mode="constant", cval=-1.0),
        "uniform noise": rng.uniform(-1, 1, base.shape).astype(np.float32),
    }


class Scorer:
    """The fixed parts of the protocol, built once: the digit splits, the classifier (trained on the test
    split), its reference features, its accuracy on the train split and the near-copy threshold."""

    def __init__(self):
        self.test_x, self.test_y = metrics.load_digits_split("test")
        self.train_x, self.train_y = metrics.load_digits_split("train")
        self.clf = metrics.train_digit_classifier(self.test_x, self.test_y, seed=0)
        self.ref = metrics.hidden_features(self.clf, self.test_x)
        self.accuracy = float(np.mean(metrics.class_probs(self.clf, self.train_x).argmax(1) == self.train_y))
        self.copy_at = metrics.near_copy_threshold(self.test_x, self.train_x)

    def score(self, images: np.ndarray, labels: np.ndarray | None) -> dict:
        """The table row of `images` (see `jdiff.metrics.score_images`)."""
        kw = dict(train_images=self.train_x, copy_threshold=self.copy_at)
        return metrics.score_images(self.clf, images, self.ref, labels=labels, **kw)


def evaluate(images: np.ndarray, labels: np.ndarray | None, seed: int = 0, scorer: Optional[Scorer] = None) -> dict:
    """Classifier, floor, reference rows and the scores of `images`; returns a JSON-able dict. `scorer`: a
    `Scorer` to reuse (built here when None)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # tiny matrices: threaded BLAS only adds overhead
        return _evaluate(images, labels, seed, scorer)


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The largest step count N whose model evaluations `SAMPLERS[sampler].nfe(N)` are at most `nfe` (>= 1)."""
    from jdiff.sampling import get_sampler

    smp, n = get_sampler(sampler), 1
    while smp.nfe(n + 1) <= nfe:
        n += 1
    return n


def sweep(
    workdir: str,
    *,
    samplers: Sequence[str],
    nfes: Sequence[int],
    spacings: Sequence[str],
    num: int,
    step: int | None = None,
    seed: int = 0,
    labels: str = "balanced",
    guidance: float | None = None,
    log=print,
) -> dict:
    """Frechet distance (and the other scores) of `num` samples of a run for every sampler x spacing x NFE
    (each sampler at its default options, with the most steps whose model calls fit the NFE). Returns
    {"floor": the real-vs-real row, "rows": [row + sampler/spacing/nfe/steps/frechet_over_floor], ...}."""
    from threadpoolctl import threadpool_limits

    scorer = Scorer()
    n_ref = min(num, len(scorer.train_x))
    with threadpool_limits(limits=1):
        floors = []
        for k in range(FLOOR_DRAWS):
            idx = np.random.default_rng([seed, 0, k]).choice(len(scorer.train_x), n_ref, replace=False)
            floors.append(scorer.score(scorer.train_x[idx], scorer.train_y[idx])["frechet"])
    floor = float(np.mean(floors))
    rows = []
    for sampler in samplers:
        for spacing in spacings:
            for nfe in nfes:
                steps = steps_for_nfe(sampler, nfe)
                images, y, info = sample_checkpoint(
                    workdir,
                    num=num,
                    step=step,
                    sampler=sampler,
                    steps=steps,
                    seed=seed,
                    labels=labels,
                    guidance=guidance,
                    spacing=spacing,
                )
                with threadpool_limits(limits=1):
                    row = scorer.score(images, y)
                from jdiff.sampling import get_sampler

                row.update(
                    sampler=sampler,
                    spacing=info["spacing"],
                    nfe=nfe,
                    actual_nfe=get_sampler(sampler).nfe(steps),
                    steps=steps,
                    frechet_over_floor=row["frechet"] / floor,
                    sample_seconds=info["sample_seconds"],
                )
                rows.append(row)
                log(
                    f"{sampler} {info['spacing']} NFE {row['actual_nfe']} ({steps} steps): "
                    f"Frechet {row['frechet']:.2f} "
                    f"({row['frechet_over_floor']:.2f}x floor)"
                )
    return {
        "workdir": workdir,
        "num": num,
        "floor": {"frechet": floor, "frechet_std": float(np.std(floors)), "draws": floors},
        "classifier_accuracy": scorer.accuracy,
        "rows": rows,
    }


def sweep_markdown(result: dict) -> str:
    """The sweep as one table: Frechet (and its ratio to the real-vs-real floor) per sampler x spacing x NFE."""
    f = result["floor"]
    nfes = sorted({r["nfe"] for r in result["rows"]})
    lines = [
        f"Run {result['workdir']}, {result['num']} samples per cell; real-vs-real floor Frechet "
        f"{f['frechet']:.2f} ± {f['frechet_std']:.2f}. Cells: Frechet (ratio to the floor); a sampler with 2N - 1 "
        "model calls (heun, edm_sde) runs the most steps that fit the column's NFE.",
        "",
        "| sampler | spacing | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|---|" + "---|" * len(nfes),
    ]
    keys = list(dict.fromkeys((r["sampler"], r["spacing"]) for r in result["rows"]))
    for sampler, spacing in keys:
        cells = {r["nfe"]: r for r in result["rows"] if (r["sampler"], r["spacing"]) == (sampler, spacing)}
        lines.append(
            f"| {sampler} | {spacing} | "
            + " | ".join(
                f"{cells[n]['frechet']:.2f} ({cells[n]['frechet_over_floor']:.2f}x)" if n in cells else "-"
                for n in nfes
            )
            + " |"
        )
    return "\n".join(lines)


def _evaluate(images: np.ndarray, labels: np.ndarray | None, seed: int, scorer: Optional["Scorer"] = None) -> dict:
    t0 = time.time()
    c = scorer or Scorer()
    test_x, train_x, train_y, clf, ref, acc, copy_at = (
        c.test_x,
        c.train_x,
        c.train_y,
        c.clf,
        c.ref,
        c.accuracy,
        c.copy_at,
    )
    n = len(images)
    n_ref = min(n, len(train_x))
    kw = dict(train_images=train_x, copy_threshold=copy_at)

    floors = []
    for k in range(FLOOR_DRAWS):
        idx = np.random.default_rng([seed, 0, k]).choice(len(train_x), n_ref, replace=False)
        row = metrics.score_images(clf, train_x[idx], ref, labels=train_y[idx], **kw)
        floors.append(row)
    floor = dict(floors[0])
    floor["frechet_draws"] = [r["frechet"] for r in floors]
    floor["frechet"] = float(np.mean(floor["frechet_draws"]))
    floor["frechet_std"] = float(np.std(floor["frechet_draws"]))

    rows = {"samples": metrics.score_images(clf, images, ref, labels=labels, **kw), "real train digits (floor)": floor}
    for name, x in reference_sets(train_x, train_y, n_ref, seed).items():
        rows[name] = metrics.score_images(clf, x, ref, **kw)
    heldout_nn = float(np.median(metrics.nearest_distances(test_x, train_x)))
    return {
        "classifier": {
            "hidden": list(metrics.CLASSIFIER_HIDDEN),
            "alpha": metrics.CLASSIFIER_ALPHA,
            "trained_on": f"digits test split ({len(test_x)})",
            "accuracy_on_train_split": acc,
            "num_eval": len(train_x),
        },
        "reference": {
            "set": f"digits test split ({len(test_x)})",
            "feature_dim": int(ref.shape[1]),
            "heldout_nn_train_median": heldout_nn,
            "near_copy_threshold": copy_at,
            "near_copy_percentile": metrics.COPY_PERCENTILE,
        },
        "rows": rows,
        "eval_seconds": round(time.time() - t0, 2),
    }


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    c, r = result["classifier"], result["reference"]
    lines = []
    if "samples_info" in result:
        lines.append("Samples: " + ", ".join(f"{k}={v}" for k, v in result["samples_info"].items()))
    lines += [
        f"Classifier: MLP {'-'.join(map(str, c['hidden']))} ReLU (alpha {c['alpha']:g}) trained on {c['trained_on']}; "
        f"accuracy on the {c['num_eval']} train-split digits it never saw: {100 * c['accuracy_on_train_split']:.1f}%.",
        f"Frechet reference: {r['feature_dim']}-d last-hidden features of the {r['set']}. "
        f"Held-out real digits lie {r['heldout_nn_train_median']:.2f} (median pixel L2) from their nearest training "
        f"digit; {r['near_copy_percentile']:g}% of them closer than {r['near_copy_threshold']:.2f} (near-copy cut).",
        "",
        f"| set | N | conf>0.9 | class counts 0-9 | entropy (bits, max {metrics.MAX_ENTROPY_BITS:.2f}) | max/min "
        "| Frechet | label agreement | NN-train dist | near copies |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        fd = _fmt(row["frechet"], 2)
        if "frechet_std" in row:
            fd += f" ± {row['frechet_std']:.2f}"
        lines.append(
            f"| {name} | {row['num']} | {_fmt(row['confident_share'])} | {' '.join(map(str, row['class_counts']))} | "
            f"{_fmt(row['class_entropy_bits'], 2)} | {_fmt(row['class_max_min_ratio'], 2)} | {fd} | "
            f"{_fmt(row.get('label_agreement'))} | {_fmt(row.get('nn_train_median'), 2)} | "
            f"{_fmt(row.get('near_copy_share'))} |"
        )
    lines.append("")
    lines.append(
        f"(label agreement: share classified as the digit asked for / the true digit; "
        f"floor row: Frechet mean ± std over {FLOOR_DRAWS} draws; evaluation {result['eval_seconds']:.1f} s)"
    )
    return "\n".join(lines)


def _finite(obj):
    """JSON-safe copy: inf / nan floats -> None."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: score --npz samples or samples of a --workdir run; prints the table (and --json)."""
    p = argparse.ArgumentParser(prog="digits_quality", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workdir", default=None, help="training run to sample from (default: runs/digits)")
    src.add_argument("--npz", default=None, help="score these samples: .npz with images or samples (N, 8, 8, 1)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--num", type=int, default=None, help="number of samples (default 500; --npz: all)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--spacing",
        default=None,
        help="timestep spacing (default: the run's schedule's, flow or linspace; --sweep: comma list)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="score every sampler of --samplers x --spacing x --nfes on the run (one table of Frechet distances)",
    )
    p.add_argument("--samplers", default=None, help="--sweep: comma-separated samplers (default: all registered)")
    p.add_argument("--nfes", default="5,10", help="--sweep: comma-separated model-call budgets (default 5,10)")
    p.add_argument("--eta", type=float, default=None, help="eta of samplers that have it (DDIM)")
    p.add_argument("--variance", default=None, help="DDPM step variance: posterior, beta or learned")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--labels",
        choices=("balanced", "null"),
        default="balanced",
        help="class-conditional models: balanced = N/10 of each digit, null = unconditional",
    )
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--save-samples", default=None, help="write the scored samples to this .npz")
    p.add_argument("--json", default=None, help="also write the result as JSON to this path ('-': stdout)")
    args = p.parse_args(argv)
    if args.num is not None and args.num < 2:
        p.error("--num must be >= 2")

    if args.sweep:
        return _main_sweep(p, args)
    try:
        if args.npz:
            images, labels = load_npz(args.npz, args.num)
            info = {"npz": args.npz}
        else:
            workdir = args.workdir or "runs/digits"
            images, labels, info = sample_checkpoint(
                workdir,
                num=args.num or 500,
                step=args.step,
                sampler=args.sampler,
                steps=args.steps,
                eta=args.eta,
                variance=args.variance,
                seed=args.seed,
                labels=args.labels,
                guidance=args.guidance,
                spacing=args.spacing,
            )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.save_samples:
        extra = {} if labels is None else {"labels": labels}
        np.savez_compressed(args.save_samples, images=images, **extra)
    result = evaluate(images, labels, seed=args.seed)
    result["samples_info"] = info
    print(markdown(result))
    _write_json(result, args.json)
    return 0


def _write_json(result: dict, dest: Optional[str]) -> None:
    """--json: the result as JSON to the file `dest`, to stdout for "-", nowhere for None."""
    if not dest:
        return
    text = json.dumps(_finite(result), indent=1)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w") as f:
            f.write(text + "\n")


def _main_sweep(p: argparse.ArgumentParser, args) -> int:
    from jdiff.sampling import SAMPLERS, SPACINGS

    if args.npz:
        p.error("--sweep samples a --workdir run; it does not take --npz")
    samplers = sorted(SAMPLERS) if args.samplers is None else [x.strip() for x in args.samplers.split(",") if x.strip()]
    spacings = [x.strip() for x in args.spacing.split(",") if x.strip()] if args.spacing else [None]
    try:
        nfes = [int(x) for x in args.nfes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--nfes must be comma-separated ints, got {args.nfes!r}")
    if not nfes or min(nfes) < 1:
        p.error(f"--nfes must be comma-separated ints >= 1, got {args.nfes!r}")
    for name in samplers:
        if name not in SAMPLERS:
            p.error(f"unknown sampler {name!r} in --samplers; allowed: {', '.join(sorted(SAMPLERS))}")
    for name in spacings:
        if name not in SPACINGS:
            p.error(f"unknown spacing {name!r} in --spacing; allowed: {', '.join(SPACINGS)}")
    try:
        result = sweep(
            args.workdir or "runs/digits",
            samplers=samplers,
            nfes=nfes,
            spacings=spacings,
            num=args.num or 500,
            step=args.step,
            seed=args.seed,
            labels=args.labels,
            guidance=args.guidance,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(sweep_markdown(result))
    _write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
