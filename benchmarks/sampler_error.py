"""Sampler error vs number of function evaluations (NFE), with exact noise predictors.

Two data sets in 16 dimensions, each with its exact eps*(x, t) (so every error below is the sampler's own
discretisation error, not a model's): (a) a Gaussian N(mu, S) whose covariance has eigenvalues spread over
1e-3..1, so both coarse and fine scales matter; (b) a mixture of 4 narrow (std 0.05), well-separated
(distance >= 4) isotropic Gaussians with weights 0.1..0.4, where few-step solvers break.

jdiff's samplers run their registered step functions over `make_grid`'s grids (what `jdiff.sample` scans),
one jitted step per sampler. Deterministic samplers: RMS distance to the probability-flow ODE solution from
the same x_T and the sampler's own first noise level: closed form for (a)
(`jdiff.analytic.gaussian_ode_solution`), a 400-step float64 third-order solve down to sigma/alpha = 1e-4
for (b). Stochastic samplers have no per-sample target: (a)
Frechet (2-Wasserstein) distance of the samples to the data Gaussian (exact data samples give the noise
floor), (b) the largest error of the mode weights (share of samples nearest each mode).

With --diffusers (needs torch + diffusers: `pip install -e .[bench]`), diffusers' schedulers of the same
names run the same exact predictor (a numpy/torch wrapper) from the same x_T with the same NFE, on their
default spacing and with use_karras_sigmas where they have it.

With --schedule flow (flow matching, `jdiff.flow`; --shift, default 1): the same data sets as a flow model,
the exact velocity v* = E[eps - x0 | x_s] at x_s = (1 - s) x0 + s eps, called through jdiff's "flow" prediction
(`jdiff.sampling.denoiser`), on the flow schedule's grids. Deterministic references: the closed form for (a),
a 2,000-step float64 RK4 solve of dx_s/ds = v*(x_s, s) for (b). Grids that start at s = 1 (zero SNR) run only
the samplers that can start there; karras has no finite sigma_max there and is skipped.

    python benchmarks/sampler_error.py [--samples 4096] [--nfes 5,10,20,50] [--samplers heun,exp_heun]
        [--diffusers] [--json out.jsonl] [--spacings flow,flow_sigmas] [--schedule flow --shift 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff.analytic import gaussian_ode_solution
from jdiff.metrics import frechet_distance_from_stats, gaussian_stats
from jdiff.sampling import SAMPLERS, SPACINGS, Grid, Step, check_options, make_grid
from jdiff.sampling.base import Noise
from jdiff.sampling.denoiser import Denoised, Guidance, make_denoiser

DIM = 16
NUM_MODES, MODE_STD = 4, 0.05
REF_STEPS, REF_SIGMA_MIN = 400, 1e-4
FLOW_REF_STEPS = 2000
STOCHASTIC_SPACINGS = ("trailing", "karras")
FLOW_STOCHASTIC_SPACINGS = ("flow", "flow_sigmas")


def stochastic_options(name: str) -> dict:
    return {"eta": 1.0} if name == "ddim" else {}


def label(name: str, stochastic: bool) -> str:
    return "ddim(eta=1)" if name == "ddim" and stochastic else name


# --- data: one mixture-of-Gaussians predictor serves both data sets (the same compiled programs) ---------------


class Mixture:
    """x0 ~ sum_k w_k N(mu_k, U_k diag(l_k) U_k^T). eps*(x, t) = sigma sum_k r_k(x) C_k^{-1} (x - alpha mu_k),
    C_k = alpha^2 S_k + sigma^2 I, r_k the posterior responsibilities; `model(params, x, t)` is that predictor
    with the mixture as traced params, `denoise64` the float64 x0 predictor of the reference solves."""

    def __init__(self, means, eigvals, eigvecs, weights):
        self.means, self.lam, self.u = (np.asarray(a, np.float64) for a in (means, eigvals, eigvecs))
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.params = {
            "means": jnp.asarray(self.means, jnp.float32),
            "lam": jnp.asarray(self.lam, jnp.float32),
            "u": jnp.asarray(self.u, jnp.float32),
            "logw": jnp.asarray(np.log(self.weights), jnp.float32),
        }

    @staticmethod
    def _x0_eps(p, x, a, s):
        """(x0, eps) at x (B, d) for per-example / scalar alpha a and sigma s (shape (B, 1) or ())."""
        diff = x[:, None, :] - a[..., None] * p["means"][None]  # (B, K, d)
        z = jnp.einsum("bkd,kde->bke", diff, p["u"])
        var = a[..., None] ** 2 * p["lam"][None] + s[..., None] ** 2  # (B, K, d)
        logp = p["logw"] - 0.5 * jnp.sum(z**2 / var + jnp.log(var), -1)
        resp = jax.nn.softmax(logp, axis=1)
        cinv = jnp.einsum("bke,kde->bkd", z / var, p["u"])  # C_k^{-1} (x - a mu_k)
        eps = s * jnp.sum(resp[..., None] * cinv, 1)
        return (x - s * eps) / a, eps

    @staticmethod
    def model(params, x, t):
        abar = jdiff.alpha_bar_at(LIN, t)[:, None]
        return Mixture._x0_eps(params, x, jnp.sqrt(abar), jnp.sqrt(1.0 - abar))[1]

    @staticmethod
    def velocity(params, x, t):
        """The exact velocity v* = E[eps | x_s] - E[x0 | x_s] of a flow model at x_s, s = t / 1000."""
        s = (t / 1000.0)[:, None]
        a = 1.0 - s
        diff = x[:, None, :] - a[..., None] * params["means"][None]  # (B, K, d)
        z = jnp.einsum("bkd,kde->bke", diff, params["u"])
        var = a[..., None] ** 2 * params["lam"][None] + s[..., None] ** 2
        logp = params["logw"] - 0.5 * jnp.sum(z**2 / var + jnp.log(var), -1)
        resp = jax.nn.softmax(logp, axis=1)[..., None]
        eps = s * jnp.sum(resp * jnp.einsum("bke,kde->bkd", z / var, params["u"]), 1)
        # E[x0 | x] = sum_k r_k (mu_k + a S_k C_k^{-1} (x - a mu_k)): finite at s = 1 (a = 0), unlike (x - s eps)/a
        x0 = jnp.sum(
            resp
            * (
                params["means"][None]
                + a[..., None] * jnp.einsum("bke,kde->bkd", z * params["lam"][None] / var, params["u"])
            ),
            1,
        )
        return eps - x0

    def denoise64(self, x, t, a, s):
        p = {k: jnp.asarray(v, jnp.float64) for k, v in (("means", self.means), ("lam", self.lam), ("u", self.u))}
        p["logw"] = jnp.log(jnp.asarray(self.weights, jnp.float64))
        x0, eps = self._x0_eps(p, x, jnp.full((x.shape[0], 1), a), jnp.full((x.shape[0], 1), s))
        return Denoised(x0, eps, None)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        k = rng.choice(len(self.weights), size=n, p=self.weights)
        z = rng.normal(size=(n, self.means.shape[1])) * np.sqrt(self.lam[k])
        return self.means[k] + np.einsum("bd,bed->be", z, self.u[k])


LIN = jdiff.get_schedule("linear", 1000)


def make_data(rng: np.random.Generator) -> dict[str, Mixture]:
    q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    mean = rng.normal(size=DIM) * 0.5
    lam = np.logspace(-3, 0, DIM)
    gauss = Mixture(
        np.tile(mean, (NUM_MODES, 1)), np.tile(lam, (NUM_MODES, 1)), np.tile(q, (NUM_MODES, 1, 1)), [1.0] * NUM_MODES
    )
    while True:  # well separated: every pair of modes at least 4 apart
        means = rng.normal(size=(NUM_MODES, DIM)) * 1.5
        if min(np.linalg.norm(means[i] - means[j]) for i in range(NUM_MODES) for j in range(i)) >= 4.0:
            break
    eye = np.tile(np.eye(DIM), (NUM_MODES, 1, 1))
    gmm = Mixture(means, np.full((NUM_MODES, DIM), MODE_STD**2), eye, [0.1, 0.2, 0.3, 0.4])
    return {"gaussian": gauss, "gmm": gmm}


# --- references ------------------------------------------------------------------------------------------------


def fine_ode_solution(mix: Mixture, x_T: np.ndarray, alpha0: float) -> np.ndarray:
    """The probability-flow ODE from x_T at the level alpha0 to sigma = 0, float64: REF_STEPS steps of UniPC-3
    on a Karras grid down to sigma/alpha = REF_SIGMA_MIN, then the final denoising step."""
    smp, n = SAMPLERS["unipc"], REF_STEPS
    with jax.enable_x64(True):
        s_max = np.sqrt(1.0 - alpha0**2) / alpha0
        rho = 7.0
        sig = (s_max ** (1 / rho) + np.arange(n) / (n - 1) * (REF_SIGMA_MIN ** (1 / rho) - s_max ** (1 / rho))) ** rho
        a = 1 / np.sqrt(1 + sig**2)
        nxt = lambda v, last: np.append(v[1:], last)  # noqa: E731
        grid = Grid(
            *(jnp.asarray(v) for v in (np.zeros(n), a, sig * a, nxt(np.zeros(n), -1.0), nxt(a, 1.0), nxt(sig * a, 0.0)))
        )
        opts = check_options("unipc", {"order": 3, "lower_order_final": "none"})

        def body(carry, i):
            row = jax.tree.map(lambda v: v[i], grid)
            s = Step(i, i == 0, i == n - 1, row, n)
            return smp.step(mix.denoise64, carry, s, None, opts), None

        carry, _ = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(n)))(smp.init(jnp.asarray(x_T, jnp.float64)))
        return np.asarray(smp.output(carry))


def flow_ode_solution(mix: Mixture, x_T: np.ndarray, alpha0: float, sigma0: float) -> np.ndarray:
    """The flow ODE dx_s/ds = v*(x_s, s) from the VP state x_T at (alpha0, sigma0), i.e. x_s = x_T/(alpha0 +
    sigma0) at s0 = sigma0/(alpha0 + sigma0), to s = 0, float64: FLOW_REF_STEPS uniform steps of classical RK4."""
    with jax.enable_x64(True):
        p = {k: jnp.asarray(v, jnp.float64) for k, v in (("means", mix.means), ("lam", mix.lam), ("u", mix.u))}
        p["logw"] = jnp.log(jnp.asarray(mix.weights, jnp.float64))
        s0 = sigma0 / (alpha0 + sigma0)
        ds = -s0 / FLOW_REF_STEPS
        f = lambda x, s: Mixture.velocity(p, x, jnp.full((x.shape[0],), 1000.0 * s))  # noqa: E731

        def body(x, i):
            s = s0 + i * ds
            k1 = f(x, s)
            k2 = f(x + 0.5 * ds * k1, s + 0.5 * ds)
            k3 = f(x + 0.5 * ds * k2, s + 0.5 * ds)
            k4 = f(x + ds * k3, s + ds)
            return x + ds / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4), None

        x = jnp.asarray(x_T, jnp.float64) / (alpha0 + sigma0)
        x, _ = jax.jit(lambda x: jax.lax.scan(body, x, jnp.arange(FLOW_REF_STEPS, dtype=jnp.float64)))(x)
        return np.asarray(x)


class References:
    """Per data set, the ODE solution from x_T for each distinct first level (cached); `flow`: the mixture's
    reference is `flow_ode_solution` (it starts at s = 1, where the VP reference's sigma/alpha is infinite)."""

    def __init__(self, data, x_T, flow: bool = False):
        self.data, self.x_T, self.cache, self.flow = data, np.asarray(x_T, np.float64), {}, flow

    def __call__(self, name: str, alpha0: float, sigma0: float) -> np.ndarray:
        key = (name, round(alpha0, 9), round(sigma0, 9))
        if key not in self.cache:
            mix = self.data[name]
            if name == "gaussian":
                self.cache[key] = gaussian_ode_solution(
                    mix.means[0], (mix.u[0] * mix.lam[0]) @ mix.u[0].T, self.x_T, alpha0, sigma0
                )
            elif self.flow:
                self.cache[key] = flow_ode_solution(mix, self.x_T, alpha0, sigma0)
            else:
                self.cache[key] = fine_ode_solution(mix, self.x_T, alpha0)
        return self.cache[key]


def mode_weight_error(x: np.ndarray, mix: Mixture) -> float:
    comp = np.argmin(((x[:, None] - mix.means[None]) ** 2).sum(-1), axis=1)
    return float(np.abs(np.bincount(comp, minlength=len(mix.weights)) / len(x) - mix.weights).max())


def stochastic_metric(name: str, x: np.ndarray, mix: Mixture) -> float:
    if name == "gaussian":
        cov = (mix.u[0] * mix.lam[0]) @ mix.u[0].T
        return frechet_distance_from_stats(*gaussian_stats(x), mix.means[0], cov)
    return mode_weight_error(x, mix)


def steps_for(name: str, nfe: int) -> int:
    smp, n = SAMPLERS[name], 1
    while smp.nfe(n + 1) <= nfe:
        n += 1
    return n


# --- jdiff ------------------------------------------------------------------------------------------------------


def step_program(name: str, options: dict, schedule=LIN):
    """Sampler `name`'s registered step, jitted once with the grid row, step index, step count, key and the
    traced options as arguments: one program serves every spacing, NFE and data set (`jdiff.sample` runs the
    same step in one lax.scan, a program per spacing x N). For the flow schedule the predictor is the exact
    velocity, converted by jdiff's "flow" denoiser."""
    smp = SAMPLERS[name]
    opts = check_options(name, options)
    static = {k: v for k, v in opts.items() if smp.options[k].static}
    traced = {k: jnp.asarray(v, jnp.float32) for k, v in opts.items() if not smp.options[k].static}
    level = jdiff.sampling.timesteps.level_fn(schedule)
    flow = schedule.flow_shift is not None

    @jax.jit
    def step(params, carry, row, i, n, key, traced):
        def denoise(x, t, alpha, sigma):
            x0, eps = Mixture._x0_eps(params, x, alpha, sigma)
            return Denoised(x0, eps, None)

        if flow:
            no_guidance = Guidance(None, None, None)
            denoise = make_denoiser(Mixture.velocity, params, prediction="flow", guidance=no_guidance)

        s = Step(i, i == 0, i == n - 1, row, n, level)
        return smp.step(denoise, carry, s, Noise(key, i, False), {**static, **traced})

    return lambda params, carry, row, i, n, key: step(params, carry, row, i, n, key, traced)


def run_grid(program, smp, params, grid, x, key):
    n = int(grid.t.shape[0])
    carry = smp.init(x)
    for i in range(n):
        carry = program(params, carry, Grid(*(a[i] for a in grid)), jnp.int32(i), jnp.int32(n), key)
    return np.asarray(smp.output(carry), np.float64)


def runnable(smp, schedule, spacing: str, grid) -> bool:
    """Whether `jdiff.sample` runs this sampler on this grid: a zero-SNR schedule has no karras grid, and a grid
    that starts at alpha = 0 needs a sampler that can start there."""
    zero_snr = float(schedule.alphas_cumprod[-1]) == 0.0
    if zero_snr and spacing == "karras":
        return False
    return smp.zero_terminal_snr or float(grid.alpha[0]) > 0.0


def run_jdiff(data, refs, x_T, nfes, rows, log, only=None, schedule=LIN, spacings_only=None):
    flow = schedule.flow_shift is not None
    for name in sorted(SAMPLERS if only is None else set(only) | {"ddim"}):  # ddim: the baseline of the summary
        smp = SAMPLERS[name]
        stochastic_runs = (
            [True] if smp.stochastic and name != "ddim" else ([False, True] if name == "ddim" else [False])
        )
        for stochastic in stochastic_runs:
            opts = stochastic_options(name) if stochastic else {}
            program = step_program(name, opts, schedule)
            spacings = (FLOW_STOCHASTIC_SPACINGS if flow else STOCHASTIC_SPACINGS) if stochastic else SPACINGS
            for spacing in spacings:
                if spacings_only and spacing not in spacings_only:
                    continue
                for nfe in nfes:
                    n = steps_for(name, nfe)
                    g = make_grid(schedule, spacing, n)
                    if not runnable(smp, schedule, spacing, g):
                        continue
                    for dname, mix in data.items():
                        if stochastic:
                            k0, k1 = jax.random.split(jax.random.key(2))
                            x = run_grid(program, smp, mix.params, g, jax.random.normal(k0, x_T.shape), k1)
                            metric = "frechet" if dname == "gaussian" else "mode_weight_error"
                            value = stochastic_metric(dname, x, mix)
                        else:
                            x = run_grid(program, smp, mix.params, g, x_T, jax.random.key(2))
                            metric = "rmse_to_ode"
                            value = float(
                                np.sqrt(np.mean((x - refs(dname, float(g.alpha[0]), float(g.sigma[0]))) ** 2))
                            )
                        rows.append(
                            dict(
                                lib="jdiff",
                                sampler=label(name, stochastic),
                                spacing=spacing,
                                data=dname,
                                nfe=nfe,
                                actual_nfe=smp.nfe(n),
                                metric=metric,
                                value=value,
                            )
                        )
            log(f"jdiff {label(name, stochastic)} done")


# --- diffusers --------------------------------------------------------------------------------------------------

DIFFUSERS = (
    # (name, scheduler class, kwargs, karras variant?, stochastic)
    ("DDIM", "DDIMScheduler", {"clip_sample": False}, False, False),
    ("Euler", "EulerDiscreteScheduler", {}, True, False),
    ("Heun", "HeunDiscreteScheduler", {}, True, False),
    ("DPM++2M", "DPMSolverMultistepScheduler", {"solver_order": 2}, True, False),
    ("DPM++3M", "DPMSolverMultistepScheduler", {"solver_order": 3}, True, False),
    ("UniPC", "UniPCMultistepScheduler", {}, True, False),
    ("DDPM", "DDPMScheduler", {"clip_sample": False}, False, True),
    ("EulerAncestral", "EulerAncestralDiscreteScheduler", {}, False, True),
    ("DPM++2M-SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, True, True),
)


def run_diffusers(data, refs, x_T, nfes, rows, log, only=None):
    import diffusers
    import torch

    base = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    eps_jit = jax.jit(Mixture.model)
    for dname, mix in data.items():

        def model(x, t):
            xt = jnp.asarray(x.double().numpy(), jnp.float32)
            tt = jnp.full((x.shape[0],), float(t), jnp.float32)
            return torch.from_numpy(np.asarray(eps_jit(mix.params, xt, tt), np.float32))

        for name, cls, kw, has_karras, stochastic in DIFFUSERS:
            if only and name not in only:
                continue
            for karras in (False, True) if has_karras else (False,):
                for nfe in nfes:
                    sched = getattr(diffusers, cls)(**base, **kw, **({"use_karras_sigmas": True} if karras else {}))
                    steps = (nfe + 1) // 2 if name == "Heun" else nfe
                    sched.set_timesteps(steps)
                    gen = torch.Generator().manual_seed(2)
                    x = torch.from_numpy(np.asarray(x_T, np.float32)) * sched.init_noise_sigma
                    calls = 0
                    for t in sched.timesteps:
                        inp = sched.scale_model_input(x, t)
                        eps = model(inp, t)
                        calls += 1
                        x = (
                            sched.step(eps, t, x, generator=gen).prev_sample
                            if stochastic
                            else sched.step(eps, t, x).prev_sample
                        )
                    x = x.double().numpy()
                    spacing = "karras" if karras else sched.config.get("timestep_spacing", "leading")
                    if stochastic:
                        metric, value = (
                            ("frechet" if dname == "gaussian" else "mode_weight_error"),
                            stochastic_metric(dname, x, mix),
                        )
                    else:
                        t0 = float(sched.timesteps[0])
                        if (
                            hasattr(sched, "sigmas")
                            and getattr(sched, "sigmas", None) is not None
                            and name not in ("DDIM",)
                        ):
                            s0 = float(sched.sigmas[0])
                            a0, sg0 = 1 / np.sqrt(1 + s0**2), s0 / np.sqrt(1 + s0**2)
                        else:
                            abar = float(sched.alphas_cumprod[int(t0)])
                            a0, sg0 = np.sqrt(abar), np.sqrt(1 - abar)
                        metric = "rmse_to_ode"
                        value = float(np.sqrt(np.mean((x - refs(dname, a0, sg0)) ** 2)))
                    rows.append(
                        dict(
                            lib="diffusers",
                            sampler=name,
                            spacing=spacing,
                            data=dname,
                            nfe=nfe,
                            actual_nfe=calls,
                            metric=metric,
                            value=value,
                        )
                    )
            log(f"diffusers {name} on {dname} done")


# --- report -----------------------------------------------------------------------------------------------------


def table(rows, lib, data, metric, nfes) -> list[str]:
    sel = [r for r in rows if r["lib"] == lib and r["data"] == data and r["metric"] == metric]
    keys = list(dict.fromkeys((r["sampler"], r["spacing"]) for r in sel))
    out = [
        "| sampler | spacing | " + " | ".join(f"NFE {n}" for n in nfes) + " | order |",
        "|---|---|" + "---|" * (len(nfes) + 1),
    ]
    for sampler, spacing in keys:
        vals = {r["nfe"]: r["value"] for r in sel if (r["sampler"], r["spacing"]) == (sampler, spacing)}
        order = ""
        if metric == "rmse_to_ode" and len(nfes) >= 2 and nfes[-2] in vals and nfes[-1] in vals:
            order = f"{np.log(vals[nfes[-2]] / vals[nfes[-1]]) / np.log(nfes[-1] / nfes[-2]):.2f}"
        out.append(
            f"| {sampler} | {spacing} | "
            + " | ".join(f"{vals[n]:.2e}" if n in vals else "" for n in nfes)
            + f" | {order} |"
        )
    return out


def summary(rows, nfe=10) -> list[str]:
    """At `nfe`: the best jdiff deterministic sampler vs DDIM and vs every diffusers scheduler, per data set."""
    out = []
    for data in ("gaussian", "gmm"):
        det = [r for r in rows if r["data"] == data and r["metric"] == "rmse_to_ode" and r["nfe"] == nfe]
        ours = [r for r in det if r["lib"] == "jdiff"]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["value"])
        ddim = min((r for r in ours if r["sampler"] == "ddim"), key=lambda r: r["value"])
        line = (
            f"{data}, NFE {nfe}: best jdiff {best['sampler']}/{best['spacing']} {best['value']:.2e} = "
            f"{best['value'] / ddim['value']:.2f}x the best DDIM ({ddim['spacing']}, {ddim['value']:.2e})"
        )
        theirs = [r for r in det if r["lib"] == "diffusers"]
        if theirs:
            top = min(theirs, key=lambda r: r["value"])
            ratio = best["value"] / top["value"]
            line += (
                f"; best diffusers {top['sampler']}/{top['spacing']} {top['value']:.2e} (jdiff/diffusers {ratio:.2f})"
            )
        out.append(line)
    five = [r for r in rows if r["nfe"] == 5 and r["metric"] == "rmse_to_ode" and r["lib"] == "jdiff"]
    if five:
        worst = max(five, key=lambda r: r["value"])
        out.append(
            f"NFE 5, every jdiff ODE sampler and spacing: largest error {worst['value']:.2e} "
            f"({worst['sampler']}/{worst['spacing']} on {worst['data']})"
        )
    return out


class Rows(list):
    """The result rows; each is also appended to the --json file as it is measured."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        if path:
            open(path, "w").close()

    def append(self, row):
        super().append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--nfes", default="5,10,20,50", help="comma-separated NFE budgets")
    p.add_argument("--diffusers", action="store_true", help="also run diffusers' schedulers (needs torch + diffusers)")
    p.add_argument("--diffusers-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--diffusers-names", type=lambda v: v.split(","), default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--samplers",
        type=lambda v: v.split(","),
        default=None,
        help="comma-separated jdiff samplers to run (default: every registered one; ddim always runs)",
    )
    p.add_argument("--json", default=None, help="also write JSON lines here (one per measurement, as they come)")
    p.add_argument("--spacings", type=lambda v: v.split(","), default=None, help="comma-separated subset of spacings")
    p.add_argument("--schedule", choices=("linear", "flow"), default="linear", help="flow: exact velocities")
    p.add_argument("--shift", type=float, default=1.0, help="the flow schedule's shift (with --schedule flow)")
    args = p.parse_args(argv)
    if args.schedule == "flow" and (args.diffusers or args.diffusers_only):
        p.error("--diffusers runs the linear schedule; drop it with --schedule flow")
    if not args.shift > 0:
        p.error(f"--shift must be > 0, got {args.shift}")
    schedule = LIN if args.schedule == "linear" else jdiff.get_schedule("flow", 1000, shift=args.shift)
    try:
        nfes = sorted(int(v) for v in args.nfes.split(","))
    except ValueError:
        p.error(f"--nfes must be comma-separated ints, got {args.nfes!r}")
    unknown = sorted(set(args.samplers or ()) - set(SAMPLERS))
    if unknown:
        p.error(f"unknown --samplers {unknown}; allowed: {', '.join(sorted(SAMPLERS))}")
    if args.diffusers or args.diffusers_only:
        try:
            import diffusers  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            print(f"error: --diffusers needs torch and diffusers ({e}); pip install -e .[bench]", file=sys.stderr)
            return 2

    t0 = time.time()
    log = lambda s: print(f"[{time.time() - t0:6.0f} s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    data = make_data(np.random.default_rng(0))
    x_T = jax.random.normal(jax.random.key(1), (args.samples, DIM))
    refs = References(data, x_T, flow=args.schedule == "flow")
    rows = Rows(args.json)
    if not args.diffusers_only:
        run_jdiff(data, refs, x_T, nfes, rows, log, only=args.samplers, schedule=schedule, spacings_only=args.spacings)
    if args.diffusers or args.diffusers_only:
        run_diffusers(data, refs, x_T, nfes, rows, log, only=args.diffusers_names)
    args.diffusers = args.diffusers or args.diffusers_only
    rng = np.random.default_rng(1)
    floor = stochastic_metric("gaussian", data["gaussian"].draw(rng, args.samples), data["gaussian"])
    floor_w = mode_weight_error(data["gmm"].draw(rng, args.samples), data["gmm"])
    what = "linear" if args.schedule == "linear" else f"flow (shift {args.shift:g}), exact velocities"
    print(f"schedule={what}, T=1000, {DIM} dims, {args.samples} samples, exact predictors\n")
    libs = ["jdiff"] + (["diffusers"] if args.diffusers else [])
    for data_name, title in (("gaussian", "(a) Gaussian data"), ("gmm", "(b) narrow, well-separated Gaussian mixture")):
        for lib in libs:
            print(
                f"### {title}, {lib}: RMS error to the exact ODE solution from the same x_T "
                "(order: fitted over the last two NFE)\n"
            )
            print("\n".join(table(rows, lib, data_name, "rmse_to_ode", nfes)) + "\n")
            metric = "frechet" if data_name == "gaussian" else "mode_weight_error"
            what = (
                f"Frechet distance to the data (exact samples: {floor:.2e})"
                if data_name == "gaussian"
                else f"largest mode-weight error (exact samples: {floor_w:.3f})"
            )
            print(f"### {title}, {lib}, stochastic samplers: {what}\n")
            print("\n".join(table(rows, lib, data_name, metric, nfes)) + "\n")
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
