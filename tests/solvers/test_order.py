"""Empirical convergence order on Gaussian data with the exact denoiser and the exact flow map
(diffrax ``test_ode_order`` style): every deterministic solver x {VP, VE, rectified flow}."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from diffsample.samplers import Sampler, prior_scale
from diffsample.solvers import SOLVERS, VE, DiscreteVP, DPMSolverPP, Karras, LinearVP, RectifiedFlow
from diffsample.testbed.gmm import GaussianMixture

MU, S = torch.tensor([0.5, -0.3, 1.2]), 0.4
GAUSS = GaussianMixture(MU[None], torch.tensor([S]), torch.tensor([1.0]))
SCHEDULES = {
    "VP": LinearVP(),
    "discreteVP": DiscreteVP.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    "VE": VE(),
    "flow": RectifiedFlow(t_min=1e-2, t_max_finite=0.99),
}
# order 0: no convergence order is claimed (SteinDiff corrects steps by O(1)); tested in test_stein.py
DETERMINISTIC = [n for n in SOLVERS if not SOLVERS.create(n).stochastic and SOLVERS.create(n).order > 0]
STEPS = [32, 64, 128, 256]
# iPNDM_v's 4th-order weights do not sum to 1 off a geometric grid: its order 2 shows from ~256 steps.
LONG_STEPS = {"ipndm_v": [256, 512, 1024, 2048]}


def exact_flow(x, ns, t0, t1):
    """Probability-flow map for Gaussian data: x_1 = a1 mu + (std1 / std0) (x_0 - a0 mu)."""
    t0, t1 = torch.tensor(t0, dtype=torch.float64), torch.tensor(t1, dtype=torch.float64)
    a0, s0, a1, s1 = ns.alpha(t0), ns.sigma(t0), ns.alpha(t1), ns.sigma(t1)
    std0, std1 = torch.sqrt(a0**2 * S**2 + s0**2), torch.sqrt(a1**2 * S**2 + s1**2)
    return a1 * MU + std1 / std0 * (x - a0 * MU)


def measured_order(solver, ns, steps=STEPS):
    noise = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for n in steps:
        result = Sampler(solver, Karras(), n, final="last")(GAUSS.denoiser(ns), noise)
        ref = exact_flow(noise * prior_scale(result.grid), ns, result.grid.t_list[0], result.grid.t_list[-1])
        errors.append(float((result.x - ref).abs().max()))
    slope = -np.polyfit(np.log(steps[1:]), np.log(errors[1:]), 1)[0]
    return slope, errors


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_convergence_order(name, schedule):
    solver = SOLVERS.create(name)
    if hasattr(solver, "lower_order_final"):
        # The asymptotic order of the method itself: diffusers' lower-order final steps (UniPC:
        # order <= steps - i on every run) add an O(h^2) last-step term when stopping at sigma > 0.
        solver = dataclasses.replace(solver, lower_order_final=False)
    slope, errors = measured_order(solver, SCHEDULES[schedule], LONG_STEPS.get(name, STEPS))
    assert abs(slope - solver.order) < 0.25, f"{name} on {schedule}: slope {slope:.2f}, errors {errors}"


def test_reference_third_order_is_only_second_order():
    """The 3M formula of diffusers / k-diffusion / official DPM-Solver (half-weight d2 term)
    converges with order 2; ours (Taylor weight) with order 3 and a much smaller error."""
    ns = SCHEDULES["VP"]
    slope_ref, err_ref = measured_order(DPMSolverPP(order=3, third_order="reference"), ns)
    slope_ours, err_ours = measured_order(DPMSolverPP(order=3), ns)
    assert abs(slope_ref - 2) < 0.25
    assert abs(slope_ours - 3) < 0.25
    assert err_ours[-1] < err_ref[-1] / 5


def test_euler_equals_ddim_and_dpm1():
    """Euler(eta=0) == DPM-Solver++(1) == DDIM (closed form) on any schedule."""
    from diffsample.solvers import Euler, LambdaUniform

    noise = torch.randn(16, 3, dtype=torch.float64)
    for ns in SCHEDULES.values():
        den = GAUSS.denoiser(ns)
        a = Sampler(Euler(), LambdaUniform(), 7)(den, noise)
        b = Sampler(DPMSolverPP(order=1), LambdaUniform(), 7)(den, noise)
        assert torch.allclose(a.x, b.x, rtol=1e-12, atol=1e-12)
        # DDIM (arXiv 2010.02502 eq. 12, eta = 0) in native space, written out.
        g = a.grid
        x = noise * prior_scale(g)
        for i in range(g.steps):
            t = torch.full((16,), g.t_list[i], dtype=torch.float64)
            d = den(x, t)
            eps = (x - g.alpha_list[i] * d) / g.sigma_list[i]
            x = g.alpha_list[i + 1] * d + g.sigma_list[i + 1] * eps
        assert torch.allclose(a.x, x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_stochastic_solvers_converge_weakly_to_gaussian_moments(name):
    """Weak convergence: the sample std error shrinks with steps and ends within 4 % of the target;
    the mean is right within sampling error. (The plug-in posterior mean drops Var(x0 | x_t), so
    ancestral sampling is biased at finite steps: std 0.32 instead of 0.40 at 15 Karras steps.)"""
    from diffsample.samplers import SeededNoiseFn, seeded_noise

    ns = SCHEDULES["VP"]
    n = 4000
    seeds = range(n)
    noise = seeded_noise(seeds, (3,), dtype=torch.float64)
    std_error = {}
    for steps in (30, 240):
        result = Sampler(SOLVERS.create(name), Karras(), steps)(
            GAUSS.denoiser(ns), noise, noise_fn=SeededNoiseFn(seeds, (3,), dtype=torch.float64))
        std_error[steps] = float((result.x.std(0) - S).mean().abs())
        assert torch.all((result.x.mean(0) - MU).abs() < 4 * S / math.sqrt(n) + 0.002)
    noise_floor = 3 * S / math.sqrt(2 * n)  # ~3 standard errors of a sample std
    assert std_error[240] < max(0.5 * std_error[30], noise_floor), std_error
    assert std_error[240] < 0.04 * S, std_error
