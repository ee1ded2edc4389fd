"""jdiff's named samplers reproduce the peers' samplers of those names (diffusers 0.42, k-diffusion 0.1.1)
step for step: tests/fixtures/sampler_peers.npz, written by tests/fixtures/make_sampler_fixtures.py.

The comparison is at the level of the denoiser D(x; sigma): every run uses the exact posterior mean of a 2-d
Gaussian mixture at the EDM noise level of each model call (`jdiff.analytic.gmm_x0_fn`; the fixture script
writes the same formula in torch), so the model's timestep input, which the three libraries map differently
(jdiff and diffusers' Heun: fractional Karras timesteps; DPMSolverMultistep: rounded; k-diffusion: clamped),
plays no part. jdiff runs in float32 on the peer's own noise levels (`sigmas`, saved by the script) and with the
peer's noise draws, and its own grid (`make_grid`) is checked to equal those levels. Tolerances are float32
round-off: the peers ran in float64 (diffusers' DPM-Solver in float32).
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from sampler_drive import drive, edm_grid, x0_denoiser

import jdiff
from jdiff.analytic import gmm_x0_fn
from jdiff.sampling import make_grid

FIXTURE = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "sampler_peers.npz"))
LIN = jdiff.get_schedule("linear", 1000)
DENOISE = x0_denoiser(gmm_x0_fn(FIXTURE["means"], FIXTURE["stds"], FIXTURE["weights"]))
EDM_SDE = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
# What each peer run is in jdiff: (sampler, options).
RUNS = {
    "diffusers/heun": ("heun", {}),
    "diffusers/dpmpp_2m": ("dpmpp_2m", {}),
    "diffusers/dpmpp_3m": ("dpmpp_3m", {}),
    "diffusers/dpmpp_2m_sde": ("dpmpp_2m_sde", {}),
    "k_diffusion/heun": ("heun", {}),
    "k_diffusion/edm_sde": ("edm_sde", EDM_SDE),
    "k_diffusion/edm_sde_top": ("edm_sde", dict(EDM_SDE, s_tmax=1000.0)),
    "k_diffusion/dpmpp_2m": ("dpmpp_2m", {"lower_order_final": "none"}),
    "k_diffusion/dpmpp_2m_sde": ("dpmpp_2m_sde", {"lower_order_final": "none"}),
    "k_diffusion/dpmpp_3m": ("dpmpp_3m", {"lower_order_final": "none", "solver_type": "heun"}),
}
ENTRIES = sorted({k.rsplit("/", 1)[0] for k in FIXTURE.files if k.count("/") == 4})


def _run(entry):
    peer, sampler, spacing, n = entry.split("/")
    name, options = RUNS[f"{peer}/{sampler}"]
    sigmas = FIXTURE[entry + "/sigmas"]
    z = jnp.asarray(FIXTURE["z"], jnp.float32)
    noise = FIXTURE["noise"][: int(n)] if jdiff.SAMPLERS[name].stochastic else None
    out = drive(name, z, edm_grid(sigmas), DENOISE, options, schedule=LIN, noise=noise)
    return np.asarray(out, np.float64), FIXTURE[entry + "/x"]


def test_every_peer_run_is_mapped():
    assert {e.rsplit("/", 2)[0] for e in ENTRIES} == set(RUNS)
    assert len(ENTRIES) == 4 * 4 * 5 + 6 * 5  # diffusers: 4 samplers x 4 spacings; k-diffusion: 6 on karras


@pytest.mark.parametrize("entry", ENTRIES)
def test_sampler_equals_its_peer(entry):
    ours, ref = _run(entry)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-5 * scale, err_msg=entry)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "karras"])
def test_jdiff_grid_is_the_peers_grid(spacing):
    """The levels the fixtures ran on are jdiff's own: make_grid's sigma/alpha equals diffusers' Heun sigmas
    (leading / trailing / karras: diffusers' own spacing; linspace: jdiff's timesteps given to diffusers), to
    float32 round-off: diffusers forms 1 - abar in float32, which costs it ~5e-8/(1 - abar) relative at small
    levels (8e-5 at t = 0, 1 - abar = 1e-4; jdiff derives 1 - abar in float64)."""
    for n in (3, 5, 10, 20, 50):
        g = make_grid(LIN, spacing, n)
        ours = np.asarray(g.sigma, np.float64) / np.asarray(g.alpha, np.float64)
        ref = FIXTURE[f"diffusers/heun/{spacing}/{n}/sigmas"]
        rel = np.abs(ours / ref - 1.0)
        assert np.all(rel <= 2e-6 + 5e-8 * (1.0 + ref**2) / ref**2), (n, rel)


def test_the_exponential_heun_is_not_heun():
    """The old `heun` (now `exp_heun`) is a different method: 0.05-0.9 away from EDM's Heun at 10-50 steps."""
    sigmas = FIXTURE["k_diffusion/heun/karras/20/sigmas"]
    z = jnp.asarray(FIXTURE["z"], jnp.float32)
    exp = np.asarray(drive("exp_heun", z, edm_grid(sigmas), DENOISE, schedule=LIN))
    assert np.abs(exp - FIXTURE["k_diffusion/heun/karras/20/x"]).max() > 1e-2
