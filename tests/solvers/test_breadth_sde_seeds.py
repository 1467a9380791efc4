"""SEEDS-2 / SEEDS-3 (arXiv 2305.14267, data prediction) against their update written out here from
the exponential-integrator formulas with the SDE noise chained over the sub-intervals, fed the same
noise on the exact GMM; their noise-free forms (eta = 0) converge with orders 2 and 3."""

from __future__ import annotations

import math

import pytest
import torch
from test_breadth_sde import measured_order

from diffsample.samplers import Sampler, prior_scale
from diffsample.solvers import VE, Karras, LinearVP
from diffsample.solvers.seeds import SEEDS
from diffsample.testbed.gmm import GaussianMixture

GMM = GaussianMixture.random(dim=4, components=3, seed=5)
SCHEDULES = {"VE": VE(), "VP": LinearVP()}


def _draws(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    return lambda *_: torch.randn(shape, dtype=torch.float64, generator=gen)


def reference_seeds(ns, grid, x, stages, eta, s_noise, r, solver_type, r_1, r_2, draw):
    """One SEEDS step per grid interval, in lambda with data prediction D:
    x(c) = (sigma_c / sigma_s) e^{-eta c h} x_s - alpha_c [expm1(-c h_eta) D + b (D_k - D)] + noise, with
    b = -phi-coefficient of the stage, and the linear SDE noise over [a, b] carried as
    n_b = e^{-eta (b - a) h} (sigma_b / sigma_a) n_a + sigma_b s_noise sqrt(-expm1(-2 eta (b - a) h)) z."""
    def at(lam):
        t = ns.t_from_lambda(torch.tensor(lam, dtype=torch.float64))
        return t, float(ns.alpha(t)), float(ns.sigma(t))

    def den(xx, t):
        tt = torch.full((xx.shape[0],), float(t), dtype=torch.float64)
        return GMM.denoised(xx, ns.alpha(tt), ns.sigma(tt))

    ei1 = lambda v: math.expm1(v)  # noqa: E731  h phi_1(h)
    ei2 = lambda v: (math.expm1(v) - v) / v  # noqa: E731  h phi_2(h)
    for i in range(grid.steps):
        d = den(x, grid.t_list[i])
        if grid.sigma_list[i + 1] == 0:
            x = d
            continue
        lam_s, lam_t, sig_s = grid.lambda_list[i], grid.lambda_list[i + 1], grid.sigma_list[i]
        h = lam_t - lam_s
        he = h * (eta + 1)
        if stages == 2:
            t1, a1, s1 = at(lam_s + r * h)
            x2 = s1 / sig_s * math.exp(-r * h * eta) * x - a1 * ei1(-r * he) * d
            n = s1 * s_noise * math.sqrt(-math.expm1(-2 * r * h * eta)) * draw()
            d2 = den(x2 + n, t1)
            a_t = grid.alpha_list[i + 1]
            if solver_type == "phi_1":
                dd = d + (d2 - d) / (2 * r)
                x_new = grid.sigma_list[i + 1] / sig_s * math.exp(-h * eta) * x - a_t * ei1(-he) * dd
            else:
                b2 = ei2(-he) / r
                x_new = grid.sigma_list[i + 1] / sig_s * math.exp(-h * eta) * x - a_t * ((ei1(-he) - b2) * d + b2 * d2)
            f = (r - 1) * h * eta
            n = n * math.exp(f) * grid.sigma_list[i + 1] / s1 + grid.sigma_list[i + 1] * s_noise * math.sqrt(
                -math.expm1(2 * f)) * draw()
            x = x_new + n
        else:
            t1, a1, s1 = at(lam_s + r_1 * h)
            t2, a2, s2 = at(lam_s + r_2 * h)
            x2 = s1 / sig_s * math.exp(-r_1 * h * eta) * x - a1 * ei1(-r_1 * he) * d
            n = s1 * s_noise * math.sqrt(-math.expm1(-2 * r_1 * h * eta)) * draw()
            d2 = den(x2 + n, t1)
            a32 = r_2 / r_1 * ei2(-r_2 * he)
            x3 = s2 / sig_s * math.exp(-r_2 * h * eta) * x - a2 * ((ei1(-r_2 * he) - a32) * d + a32 * d2)
            f = (r_1 - r_2) * h * eta
            n = n * math.exp(f) * s2 / s1 + s2 * s_noise * math.sqrt(-math.expm1(2 * f)) * draw()
            d3 = den(x3 + n, t2)
            b3 = ei2(-he) / r_2
            a_t, sig_t = grid.alpha_list[i + 1], grid.sigma_list[i + 1]
            x_new = sig_t / sig_s * math.exp(-h * eta) * x - a_t * ((ei1(-he) - b3) * d + b3 * d3)
            f = (r_2 - 1) * h * eta
            n = n * math.exp(f) * sig_t / s2 + sig_t * s_noise * math.sqrt(-math.expm1(2 * f)) * draw()
            x = x_new + n
    return x


CASES = [dict(stages=2), dict(stages=2, solver_type="phi_2", r=0.4), dict(stages=2, eta=0.5, s_noise=0.8),
         dict(stages=3), dict(stages=3, eta=0.7, r_1=0.25, r_2=0.6)]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_seeds_matches_the_reference_update(schedule, case):
    ns, steps = SCHEDULES[schedule], 7
    solver = SEEDS(**case)
    noise = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = Sampler(solver, Karras(), steps)(GMM.denoiser(ns), noise, noise_fn=_draws(8, noise.shape))
    assert ours.nfe == solver.stages * (steps - 1) + 1
    grid = ours.grid
    opts = dict(stages=2, eta=1.0, s_noise=1.0, r=0.5, solver_type="phi_1", r_1=1 / 3, r_2=2 / 3) | case
    ref = reference_seeds(ns, grid, noise * prior_scale(grid), draw=_draws(8, noise.shape), **opts)
    rel = float((ours.x - ref).norm() / ref.norm())
    assert rel < 1e-10, f"relative difference {rel:.2e}"


@pytest.mark.parametrize("stages,solver_type", [(2, "phi_1"), (2, "phi_2"), (3, "phi_1")])
def test_noise_free_order(stages, solver_type):
    solver = SEEDS(stages=stages, eta=0.0, solver_type=solver_type)
    assert not solver.stochastic
    slope, errors = measured_order(solver, LinearVP())
    assert abs(slope - stages) < 0.25, f"slope {slope:.2f}, errors {errors}"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="stages must be 2 or 3"):
        SEEDS(stages=4)
    with pytest.raises(ValueError, match="r_1 < r_2"):
        SEEDS(stages=3, r_1=0.7, r_2=0.5)
