"""Sampler error vs number of function evaluations (NFE), with an exact noise predictor.

Data are Gaussian, x0 ~ N(mu, S) (a 16-dimensional S with eigenvalues spread over 1e-3..1, so both coarse
and fine scales matter), and the model is the exact eps*(x, t) of `jdiff.analytic`, so every error below is
the sampler's own discretisation error, not a model's.

Deterministic samplers: RMS distance to the closed-form probability-flow ODE solution from the same x_T
(`jdiff.analytic.gaussian_ode_solution`). Stochastic samplers (DDPM, DDIM eta=1) have no per-sample target;
for them the table gives the Frechet (2-Wasserstein) distance between the sample and data Gaussians, with the
same statistic for exact samples of the data as the noise floor.

    python benchmarks/sampler_error.py [--schedule linear] [--samples 4096] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

import jdiff
from jdiff.analytic import gaussian_eps_fn, gaussian_ode_solution
from jdiff.metrics import frechet_distance_from_stats, gaussian_stats
from jdiff.sampling import make_grid

NFES = (5, 10, 20, 50, 100, 250)
DETERMINISTIC = (
    ("ddim", "linspace"),
    ("ddim", "karras"),
    ("euler", "karras"),
    ("heun", "karras"),
    ("dpmpp_2m", "trailing"),
    ("dpmpp_2m", "karras"),
)
STOCHASTIC = (("ddpm", "linspace", 0.0), ("ddim", "linspace", 1.0))


def frechet(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    """Squared 2-Wasserstein distance between N(mean(x), cov(x)) and N(mean, cov)."""
    return frechet_distance_from_stats(*gaussian_stats(x), mean, cov)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedule", default="linear", choices=sorted(jdiff.schedules.BETA_SCHEDULES))
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--json", default=None, help="also write JSON lines here")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(args.dim, args.dim)))
    mean = rng.normal(size=args.dim) * 0.5
    cov = (q * np.logspace(-3, 0, args.dim)) @ q.T
    sch = jdiff.get_schedule(args.schedule, 1000)
    eps_fn = gaussian_eps_fn(sch, mean, cov)
    shape = (args.samples, args.dim)
    x_T = jax.random.normal(jax.random.key(1), shape)
    rows = []

    for sampler, spacing in DETERMINISTIC:
        nfe_per_step = 2 if sampler == "heun" else 1
        for nfe in NFES:
            n = (nfe + 1) // 2 if sampler == "heun" else nfe
            g = make_grid(sch, spacing, n)
            ref = gaussian_ode_solution(mean, cov, np.asarray(x_T), float(g.alpha[0]), float(g.sigma[0]))
            x = jdiff.sample(
                eps_fn, sch, shape, jax.random.key(0), sampler=sampler, num_steps=n, spacing=spacing, x_init=x_T
            )
            err = float(np.sqrt(np.mean((np.asarray(x, np.float64) - ref) ** 2)))
            rows.append(
                dict(
                    sampler=sampler,
                    spacing=spacing,
                    nfe=nfe,
                    actual_nfe=n * nfe_per_step - (nfe_per_step - 1),
                    metric="rmse_to_exact_ode",
                    value=err,
                )
            )
    floor = frechet(rng.multivariate_normal(mean, cov, size=args.samples), mean, cov)
    for sampler, spacing, eta in STOCHASTIC:
        for nfe in NFES + (1000,):
            x = jdiff.sample(
                eps_fn,
                sch,
                shape,
                jax.random.key(2),
                sampler=sampler,
                num_steps=nfe,
                spacing=spacing,
                options={"eta": eta} if "eta" in jdiff.SAMPLERS[sampler].options else {},
            )
            rows.append(
                dict(
                    sampler=f"{sampler}(eta={eta})" if sampler == "ddim" else sampler,
                    spacing=spacing,
                    nfe=nfe,
                    metric="frechet_to_data",
                    value=frechet(np.asarray(x, np.float64), mean, cov),
                )
            )

    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"schedule={args.schedule}, T=1000, data N(mu, S) in {args.dim} dims, {args.samples} samples\n")
    print(
        "Deterministic samplers: RMS error to the exact ODE solution from the same x_T "
        "(heun uses 2N-1 evaluations: at most the column's NFE)"
    )
    nfes = sorted({r["nfe"] for r in rows if r["metric"] == "rmse_to_exact_ode"})
    print("| sampler | spacing | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|---|" + "---|" * len(nfes))
    for sampler, spacing in DETERMINISTIC:
        vals = {
            r["nfe"]: r["value"]
            for r in rows
            if r["sampler"] == sampler and r["spacing"] == spacing and r["metric"] == "rmse_to_exact_ode"
        }
        print(f"| {sampler} | {spacing} | " + " | ".join(f"{vals[n]:.2e}" if n in vals else "" for n in nfes) + " |")
    print(
        f"\nStochastic samplers: Frechet distance of the samples to the data Gaussian (exact data samples: {floor:.2e})"
    )
    nfes = NFES + (1000,)
    print("| sampler | spacing | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|---|" + "---|" * len(nfes))
    for name in sorted({r["sampler"] for r in rows if r["metric"] == "frechet_to_data"}):
        vals = {r["nfe"]: r["value"] for r in rows if r["sampler"] == name and r["metric"] == "frechet_to_data"}
        print(f"| {name} | linspace | " + " | ".join(f"{vals[n]:.2e}" for n in nfes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
