"""SA-Solver reproduces diffusers' SASolverScheduler (data prediction) step for step on the exact GMM
eps-model, fed the same noise; with tau = 0 it is a deterministic Adams predictor-corrector whose
order is measured on Gaussian data; its weights integrate the Lagrange interpolant exactly."""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from test_breadth_sde import measured_order  # noqa: E402

from diffsample.samplers import Sampler, from_eps  # noqa: E402
from diffsample.solvers import DiscreteVP, LinearVP, fixed  # noqa: E402
from diffsample.solvers.sa_solver import SASolver, exp_moments, sa_weights  # noqa: E402
from diffsample.testbed.gmm import GaussianMixture  # noqa: E402

import diffusers.schedulers.scheduling_sasolver as sa_module  # noqa: E402

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
GMM = GaussianMixture.random(dim=8, components=6, seed=3)


def _noises(steps, shape):
    gen = torch.Generator().manual_seed(100 + steps)
    return [torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(steps)]


def _run_diffusers(sched, model, noise, steps, z, monkeypatch):
    draws = iter(z)
    monkeypatch.setattr(sa_module, "randn_tensor", lambda *a, **k: next(draws))
    sched.set_timesteps(steps)
    # diffusers keeps sigmas in float32 and expands its Lagrange polynomials in absolute lambda: at
    # predictor order 4 that alone moves the result by ~3e-5; float64 sigmas compare the formulas.
    sched.sigmas = sched.sigmas.double()
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(x, t).sample, t, x).prev_sample
    return x, sched.timesteps.clone()


def _run_ours(solver, model, noise, timesteps, z):
    ns = DiscreteVP.from_config(SD_BETAS)
    sampler = Sampler(solver, fixed(timesteps.tolist() + [0.0]), len(timesteps), final="last")
    sigma_of_step = {}

    def noise_fn(sigma, sigma_next):  # the draw of step k is z[k], as diffusers draws one per step
        return z[sigma_of_step[sigma]]

    grid = sampler.grid(ns)
    sigma_of_step.update({s: k for k, s in enumerate(grid.sigma_list[:-1])})
    return sampler(from_eps(lambda x, t: model(x, t).sample, ns), noise, noise_fn=noise_fn)


@pytest.mark.parametrize("tau,window", [(0.0, False), (0.6, False), (1.0, False), (1.0, True)])
@pytest.mark.parametrize("orders", [(1, 1), (2, 2), (3, 4), (2, 3), (4, 1)])
@pytest.mark.parametrize("steps", [6, 15])
def test_sa_solver_matches_diffusers(monkeypatch, orders, tau, window, steps):
    p, c = orders
    kwargs = {} if window else {"tau_func": lambda t: tau}
    sched = diffusers.SASolverScheduler(**SD_BETAS, predictor_order=p, corrector_order=c, **kwargs)
    model = GMM.eps_model(sched.alphas_cumprod)
    noise = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    z = _noises(steps, noise.shape)
    ref, timesteps = _run_diffusers(sched, model, noise, steps, z, monkeypatch)
    if window:  # diffusers' default tau_func: 1 for 200 <= t <= 800, as a VE sigma range
        ns = DiscreteVP.from_config(SD_BETAS)
        lo, hi = (float(ns.sigma_ve(torch.tensor(t, dtype=torch.float64))) for t in (200.0, 800.0))
        solver = SASolver(p, c, tau=1.0, tau_sigma_range=(lo * (1 - 1e-9), hi * (1 + 1e-9)))  # ends included
    else:
        solver = SASolver(p, c, tau=tau)
    ours = _run_ours(solver, model, noise, timesteps, z)
    assert ours.nfe == steps
    rel = float((ours.x - ref).norm() / ref.norm())
    assert rel < 1e-5, f"relative difference {rel:.2e}"


@pytest.mark.parametrize("c", [1.0, 1.7])
@pytest.mark.parametrize("h", [1e-3, 0.3, 0.9, 2.5])
def test_exp_moments_match_quadrature(c, h):
    """Both branches (series below c h = 1, recurrence above) against Gauss-Legendre quadrature."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(40)
    u = -h / 2 * (1 - x)  # nodes on [-h, 0]
    for k, val in enumerate(exp_moments(c, h, 3)):
        ref = float((h / 2) * np.sum(w * np.exp(c * u) * u**k))
        assert math.isclose(val, ref, rel_tol=1e-12, abs_tol=1e-300), (k, val, ref)


def test_weights_integrate_the_interpolant_exactly():
    """For D(lambda) a polynomial of degree < order, sum_j w_j D(lambda_j) is the exact integral
    (1 + tau^2) int e^{(1 + tau^2)(lambda - lambda_t)} D(lambda) dlambda over the step."""
    import numpy as np

    lam = [0.4, 0.1, -0.35]
    lam_t, h, tau = 0.9, 0.5, 0.8
    cc = 1 + tau * tau
    poly = lambda v: 1.3 - 0.7 * v + 0.45 * v * v  # noqa: E731
    w = sa_weights(lam, lam_t, h, tau)
    x, gw = np.polynomial.legendre.leggauss(40)
    v = lam_t - h / 2 * (1 - x)
    ref = cc * (h / 2) * float(np.sum(gw * np.exp(cc * (v - lam_t)) * poly(v)))
    assert math.isclose(sum(wj * poly(l) for wj, l in zip(w, lam)), ref, rel_tol=1e-12)


@pytest.mark.parametrize("orders,expected", [((1, 1), 1), ((2, 1), 1), ((1, 2), 2), ((2, 3), 3), ((3, 4), 4)])
def test_noise_free_order(orders, expected):
    solver = SASolver(*orders, tau=0.0, lower_order_final=False)
    assert not solver.stochastic and solver.order == expected
    slope, errors = measured_order(solver, LinearVP())
    assert abs(slope - expected) < 0.3, f"slope {slope:.2f}, errors {errors}"


@pytest.mark.parametrize("orders,expected", [((1, 2), 2), ((2, 3), 3), ((3, 4), 4)])
def test_pece_noise_free_order_and_calls(orders, expected):
    """PECE (ComfyUI's sa_solver_pece) re-evaluates every corrected state: same order, one more call
    per corrected step."""
    solver = SASolver(*orders, tau=0.0, lower_order_final=False, pece=True)
    slope, errors = measured_order(solver, LinearVP())
    assert abs(slope - expected) < 0.3, f"slope {slope:.2f}, errors {errors}"
    res = Sampler(solver, fixed([800.0, 500.0, 200.0, 50.0]), 4)(GMM.denoiser(DiscreteVP.from_config(SD_BETAS)),
                                                                   torch.randn(4, 8, dtype=torch.float64))
    assert res.nfe == solver.nfe(res.grid) == 4 + 3


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="predictor_order must be 1, 2, 3 or 4"):
        SASolver(predictor_order=5)
    with pytest.raises(ValueError, match="tau must be >= 0"):
        SASolver(tau=-0.1)
    with pytest.raises(ValueError, match="tau_sigma_range"):
        SASolver(tau_sigma_range=(2.0, 1.0))
