"""Heun's method in the flow variables (diffusers FlowMatchHeunDiscreteScheduler), for any model.

In the flow variables of `jdiff.flow` (s = sigma/(alpha + sigma), x_s = x/(alpha + sigma)) the probability-flow
ODE is dx_s/ds = v = eps - x0, with (x0, eps) the model's prediction at x. Step i from s to s':
  x_e = x_s + (s' - s) v(x_s, s)                                (Euler, = DDIM / `euler`),
  x_s' = x_s + (s' - s) (v(x_s, s) + v(x_e, s'))/2              (the trapezoidal correction),
and the last step (to s' = 0) is Euler only: 2N - 1 model calls for N steps, as diffusers' scheduler (whose
interleaved timesteps stop after the final first-order step). Its start at s = 1 (alpha = 0) is finite, so it
runs on the flow schedule from its terminal level.

It differs from `heun` (EDM Alg. 1, the same trapezoid in EDM's variables x/alpha, sigma/alpha): the
correction here is (s' - s)/(2 (1 - s')) (eps' - eps) in flow variables, EDM's (s' - s)/(2 (1 - s)) (eps' - eps)
(the Euler points agree); both are second order.
"""

from __future__ import annotations

from jax import lax

from jdiff.flow import from_vp
from jdiff.sampling.base import Sampler, register


def flow_heun_step(denoise, x, s, noise, opts):
    g = s.row
    t, k = from_vp(g.alpha, g.sigma)  # flow time s and x_s = k x
    t_next, k_next = from_vp(g.alpha_next, g.sigma_next)
    d = denoise(x, g.t, g.alpha, g.sigma)
    v = d.eps - d.x0
    x_s = k * x
    x_e = x_s + (t_next - t) * v

    def correct(_):
        d2 = denoise(x_e / k_next, g.t_next, g.alpha_next, g.sigma_next)
        return x_s + (t_next - t) * 0.5 * (v + d2.eps - d2.x0)

    return lax.cond(s.is_last, lambda _: x_e, correct, None) / k_next


FLOW_HEUN = register(
    Sampler(name="flow_heun", step=flow_heun_step, nfe=lambda n: 2 * n - 1, stochastic=False, zero_terminal_snr=True)
)
