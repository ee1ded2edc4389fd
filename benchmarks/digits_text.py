"""Does a text-to-image digits run draw the digit its prompt names? Per-digit accuracy, judged by the held-out digit
classifier of `jdiff.metrics` (the one benchmarks/digits_quality.py uses: a ReLU MLP fitted on the 359 "test"
digits the diffusion model never saw).

For each template (by default the held-out ones of `jdiff.data.captions.HELD_OUT_TEMPLATES`, sentences never
trained on, and the first training template) and each guidance scale, ``--num`` samples per digit are drawn
from the run's EMA parameters with the prompt naming the digit ("a drawing of the handwritten digit seven"),
and the table gives the share the classifier assigns to that digit, per digit, their mean and minimum. The
reference row is the classifier on real "train" digits (the ceiling: its own accuracy on digits it never saw).

    python benchmarks/digits_text.py --workdir runs/digits_text [--num 100] [--guidance 1,2,4]
        [--sampler ddim --steps 50] [--templates held_out|train|all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np


def digit_accuracy(predicted: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """(10,) share of the samples asking for digit d that are classified as d."""
    return np.array([np.mean(predicted[wanted == d] == d) for d in range(10)])


def evaluate(
    workdir: str,
    *,
    num: int,
    guidances: Sequence[Optional[float]],
    templates: Sequence[str],
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
) -> list[dict]:
    """One record per (template, guidance): per-digit accuracy of `num` samples per digit."""
    import jax

    from jdiff import metrics
    from jdiff import run as jrun
    from jdiff.data.captions import DIGIT_WORDS

    run = jrun.open_run(workdir)
    if not run.config.model.is_text() or run.config.data.dataset != "digits":
        raise ValueError(
            f"{workdir} is not a text run on the digits ({run.config.model.name}, {run.config.data.dataset})"
        )
    test_x, test_y = metrics.load_digits_split("test")
    clf = metrics.train_digit_classifier(test_x, test_y, seed=0)
    model = jrun.build_run_model(run)
    _, _, params = jrun.load_params(run, model=model)
    devices = jax.devices()
    wanted = np.repeat(np.arange(10), num)
    out = []
    for g in guidances:
        settings = jrun.Settings(sampler=sampler, steps=steps, guidance=g)
        gen = jrun.Generator.from_run(run, settings, batch=jrun.auto_batch(10 * num, len(devices), 500), model=model)
        for template in templates:
            prompts = [template.format(DIGIT_WORDS[d]) for d in wanted]
            x, _, seconds = gen.draw(params, len(prompts), seed=seed, labels=gen.tokenizer(prompts))
            predicted = metrics.class_probs(clf, np.clip(x, -1, 1)).argmax(1)
            acc = digit_accuracy(predicted, wanted)
            out.append(dict(template=template, guidance=g, per_digit=acc.tolist(), mean=acc.mean(), min=acc.min()))
            print(
                f"{template!r:45} guidance {g}: mean {acc.mean():.3f} min {acc.min():.3f} ({seconds:.1f} s)", flush=True
            )
    train_x, train_y = metrics.load_digits_split("train")
    real = digit_accuracy(metrics.class_probs(clf, train_x).argmax(1), train_y)
    out.append(dict(template="real train digits (classifier ceiling)", guidance=None, per_digit=real.tolist()))
    out[-1].update(mean=real.mean(), min=real.min())
    return out


def markdown(records: list[dict]) -> str:
    head = "| prompt template | guidance | " + " | ".join(str(d) for d in range(10)) + " | mean | min |"
    lines = [head, "|" + "---|" * 14]
    for r in records:
        g = "-" if r["guidance"] is None else f"{r['guidance']:g}"
        cells = " | ".join(f"{a:.2f}" for a in r["per_digit"])
        lines.append(f"| {r['template']} | {g} | {cells} | **{r['mean']:.3f}** | {r['min']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from jdiff.data.captions import DIGIT_TEMPLATES, HELD_OUT_TEMPLATES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--num", type=int, default=100, help="samples per digit and template")
    p.add_argument("--guidance", default="none,2,4", help="comma-separated guidance scales ('none': no guidance)")
    p.add_argument("--templates", choices=("held_out", "train", "all"), default="all")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the records to this file")
    args = p.parse_args(argv)
    guidances = [None if g.strip() == "none" else float(g) for g in args.guidance.split(",")]
    templates = {"held_out": HELD_OUT_TEMPLATES, "train": DIGIT_TEMPLATES[:1]}.get(args.templates)
    templates = templates or (*HELD_OUT_TEMPLATES, DIGIT_TEMPLATES[0])
    try:
        records = evaluate(
            args.workdir,
            num=args.num,
            guidances=guidances,
            templates=templates,
            sampler=args.sampler,
            steps=args.steps,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"digits_text: {e}", file=sys.stderr)
        return 2
    print(markdown(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
