"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"; diffusers UniPCMultistepScheduler with predict_x0=True, solver_type="bh2").

Data prediction, lambda = log(alpha/sigma), h = lambda_t - lambda_s, hh = -h, B(h) = e^{hh} - 1 (bh2),
phi_1 = e^{hh} - 1 and b_k = k! phi_{k+1}(hh)/B(h) with phi_{k+1} = phi_k/hh - 1/k! (Alg. 2 of the paper).
With m_s the model's x0 at level s and earlier levels s_j (r_j = (lambda_{s_j} - lambda_s)/h,
D_j = (m_{s_j} - m_s)/r_j):
  UniP-p (predictor, eq. 8):  x_t = (sigma_t/sigma_s) x_s - alpha_t phi_1 m_s - alpha_t B(h) sum_j a_j D_j,
    a = 1/2 for p = 2, else a solves sum_j a_j r_j^(k-1) = b_k, k = 1..p-1;
  UniC-p (corrector, eq. 9), once the model has been called at the predicted x_t (the same call the next
    predictor uses, so the corrector costs no model call):
    x_t^c = (sigma_t/sigma_s) x_s - alpha_t phi_1 m_s - alpha_t B(h) (sum_j c_j D_j + c_p (m_t - m_s)),
    c = 1/2 for p = 1, else c solves the p x p system with r_p = 1 and right side b_1..b_p.
The predictor of step i has order min(order, i + 1) (multistep warm-up), 1 on the last step (to sigma = 0,
returning m_s) and on the step before it, by lower_order_final (`jdiff.sampling.multistep.multistep_order`):
"diffusers" (the default; UniPCMultistepScheduler's lower_order_final, whatever N) at most 2, "none"
unchanged, "ddim_last" 1 when N < 15 (at most 2 on the step before); the corrector of step i > 0 has the
order of step i - 1's predictor.
`order` (1, 2 or 3; default 2, UniPC-2 as in diffusers) is static. UniP-2 with bh2 is DPM-Solver++(2M).
One model call per step.
"""

from __future__ import annotations

import jax.numpy as jnp

from jdiff.sampling.base import Sampler, register
from jdiff.sampling.multistep import LOWER_ORDER_FINAL, log_alpha_sigma, multistep_order
from jdiff.spec import Spec

MAX_ORDER = 3
ORDER = Spec(int, 2, "UniPC order (Zhao et al. 2023): 1, 2 or 3", ge=1, le=MAX_ORDER, static=True)


def _b(hh, k_max):
    """b_k = k! phi_{k+1}(hh) / B(h) for k = 1..k_max (bh2: B(h) = e^{hh} - 1), diffusers' recursion."""
    h_phi_1 = jnp.expm1(hh)
    h_phi_k, fact, out = h_phi_1 / hh - 1.0, 1.0, []
    for k in range(1, k_max + 1):
        out.append(h_phi_k * fact / h_phi_1)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return out


def _solve(rks, b):
    """a with sum_j a_j rks[j]^k = b[k], k = 0..len(b)-1 (a Vandermonde system of scalars)."""
    mat = jnp.stack([jnp.stack([rk**k for rk in rks]) for k in range(len(b))])
    return jnp.linalg.solve(mat, jnp.stack(b))


def uni_update(x_s, ratio, alpha_t, h, m_s, hist_m, hist_lam, lam_s, order, max_order, m_t=None):
    """UniP (m_t None) or UniC (m_t: the model's x0 at the predicted x_t) of traced `order` <= max_order from
    level s to t: ratio = sigma_t/sigma_s, h = lambda_t - lambda_s, hist_m / hist_lam the x0 and lambda of
    the earlier levels s_1, s_2, ... (newest first)."""
    hh = -h
    phi_1 = jnp.expm1(hh)
    b = _b(hh, max_order)
    base = ratio * x_s - alpha_t * phi_1 * m_s
    out = base if m_t is None else base - alpha_t * phi_1 * 0.5 * (m_t - m_s)  # order 1
    for k in range(2, max_order + 1):
        rks = [(hist_lam[j] - lam_s) / h for j in range(k - 1)]
        d1s = [(hist_m[j] - m_s) / rks[j] for j in range(k - 1)]
        if m_t is None:
            coef = [jnp.asarray(0.5, h.dtype)] if k == 2 else list(_solve(rks, b[: k - 1]))
            res = sum(c * d for c, d in zip(coef, d1s))
        else:
            coef = list(_solve(rks + [jnp.ones_like(h)], b[:k]))
            res = sum(c * d for c, d in zip(coef[:-1], d1s)) + coef[-1] * (m_t - m_s)
        out = jnp.where(order == k, base - alpha_t * phi_1 * res, out)
    return out


def unipc_step(denoise, carry, s, noise, opts):
    k_max = opts["order"]
    x, x_last, ms, lams, sig_last = carry  # ms, lams: x0 and lambda of levels i-1, i-2, ... (k_max of each)
    g = s.row
    m_t = denoise(x, g.t, g.alpha, g.sigma).x0
    lam_t = log_alpha_sigma(g.alpha, g.sigma)
    i, n = s.index, s.num_steps
    # UniC: correct x_i with the model call at x_i; its order is that of step i-1's predictor.
    lof = opts["lower_order_final"]
    q = multistep_order(i - 1, n, k_max, lof, always=True)
    hc = jnp.where(s.is_first, 1.0, lam_t - lams[0])
    xc = uni_update(x_last, g.sigma / sig_last, g.alpha, hc, ms[0], ms[1:], lams[1:], lams[0], q, k_max, m_t=m_t)
    x = jnp.where(s.is_first, x, xc)
    # UniP from the corrected x_i to level i+1.
    p = multistep_order(i, n, k_max, lof, always=True)
    h = log_alpha_sigma(g.alpha_next, g.sigma_next) - lam_t  # +inf on the last step (order 1 there)
    hp = jnp.where(s.is_last, 1.0, h)
    x_hi = uni_update(x, g.sigma_next / g.sigma, g.alpha_next, hp, m_t, ms, lams, lam_t, p, k_max)
    x_1 = (g.sigma_next / g.sigma) * x - g.alpha_next * jnp.expm1(-h) * m_t
    x_next = jnp.where(p == 1, x_1, x_hi)
    ms = jnp.concatenate([m_t[None], ms[:-1]])
    lams = jnp.concatenate([lam_t[None], lams[:-1]])
    return x_next, x, ms, lams, g.sigma


def _init(x):
    """Carry (x, the previous (corrected) x, x0 and lambda of the MAX_ORDER previous levels, previous sigma)."""
    return (
        x,
        jnp.zeros_like(x),
        jnp.zeros((MAX_ORDER,) + x.shape, x.dtype),
        jnp.arange(1.0, MAX_ORDER + 1.0, dtype=x.dtype),
        jnp.ones((), x.dtype),
    )


UNIPC = register(
    Sampler(
        "unipc",
        unipc_step,
        nfe=lambda n: n,
        stochastic=False,
        zero_terminal_snr=True,
        options={"order": ORDER, "lower_order_final": LOWER_ORDER_FINAL},
        init=_init,
        output=lambda carry: carry[0],
    )
)
