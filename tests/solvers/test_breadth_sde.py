"""DPM-Solver++(2S) ancestral and DPM-Solver++ SDE against k-diffusion's own loops (transcribed in
peers/k_diffusion_sde_ref.py), fed the same noise, on the exact Gaussian mixture; their deterministic
limits (eta = 0) converge with order 2 on Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peers import k_diffusion_sde_ref as kd

from diffsample.samplers import Sampler, prior_scale
from diffsample.solvers import VE, Karras, LinearVP
from diffsample.solvers.dpmpp_2s_ancestral import DPMSolverPP2SAncestral
from diffsample.solvers.dpmpp_sde import DPMSolverPPSDE
from diffsample.testbed.gmm import GaussianMixture

GMM = GaussianMixture.random(dim=4, components=3, seed=1)
SCHEDULES = {"VE": VE(), "VP": LinearVP()}


def _draws(seed: int, shape):
    gen = torch.Generator().manual_seed(seed)
    return lambda *_: torch.randn(shape, dtype=torch.float64, generator=gen)


def _kdiff_model(ns):
    """k-diffusion's model: VE-scaled input ``x / alpha`` and the VE sigma -> denoised."""
    def model(x_ve, sigma_ve):
        t = ns.t_from_sigma_ve(sigma_ve.double())
        alpha = ns.alpha(t)
        return GMM.denoised(alpha[:, None] * x_ve, alpha, ns.sigma(t))
    return model


def _ours_and_grid(solver, ns, steps, noise, noise_seed):
    res = Sampler(solver, Karras(), steps)(GMM.denoiser(ns), noise, noise_fn=_draws(noise_seed, noise.shape))
    return res


def _kdiff_sigmas(grid):
    return torch.tensor([s / a for s, a in zip(grid.sigma_list, grid.alpha_list)], dtype=torch.float64)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.0)])
@pytest.mark.parametrize("steps", [4, 11])
def test_dpmpp_2s_ancestral_matches_k_diffusion(schedule, eta, s_noise, steps):
    ns = SCHEDULES[schedule]
    noise = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    ours = _ours_and_grid(DPMSolverPP2SAncestral(eta=eta, s_noise=s_noise), ns, steps, noise, 7)
    grid = ours.grid
    sigmas = _kdiff_sigmas(grid)
    ref = kd.sample_dpmpp_2s_ancestral(_kdiff_model(ns), noise * prior_scale(grid) / grid.alpha_list[0], sigmas,
                                       eta=eta, s_noise=s_noise, noise_sampler=_draws(7, noise.shape))
    assert ours.nfe == 2 * steps - 1
    rel = float((ours.x - ref).norm() / ref.norm())
    assert rel < 1e-5, f"relative difference {rel:.2e}"


def _brownian_sampler(seed, shape):
    """k-diffusion's Brownian-tree law for the two draws of a dpmpp_sde step, built from fresh draws:
    ``(sigma, sigma_s)`` gets ``z1``, ``(sigma, sigma_next)`` gets ``c z1 + sqrt(1 - c^2) z'`` with
    ``c = sqrt((sigma - sigma_s) / (sigma - sigma_next))`` (the increments of one Brownian motion)."""
    draw, last = _draws(seed, shape), {}

    def sampler(sigma, sigma_next):
        sigma, sigma_next = float(sigma), float(sigma_next)
        if last.get("sigma") != sigma:  # first draw of a step
            last.update(sigma=sigma, sigma_s=sigma_next, z1=draw())
            return last["z1"]
        c = math.sqrt((sigma - last["sigma_s"]) / (sigma - sigma_next))
        return c * last["z1"] + math.sqrt(1.0 - c * c) * draw()

    return sampler


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("noise_kind", ["brownian", "independent"])
@pytest.mark.parametrize("eta,s_noise,r", [(1.0, 1.0, 0.5), (0.7, 0.9, 0.3)])
@pytest.mark.parametrize("steps", [4, 11])
def test_dpmpp_sde_matches_k_diffusion(schedule, noise_kind, eta, s_noise, r, steps):
    ns = SCHEDULES[schedule]
    noise = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    ours = _ours_and_grid(DPMSolverPPSDE(eta=eta, s_noise=s_noise, r=r, noise=noise_kind), ns, steps, noise, 9)
    grid = ours.grid
    sampler = _brownian_sampler(9, noise.shape) if noise_kind == "brownian" else _draws(9, noise.shape)
    ref = kd.sample_dpmpp_sde(_kdiff_model(ns), noise * prior_scale(grid) / grid.alpha_list[0], _kdiff_sigmas(grid),
                              eta=eta, s_noise=s_noise, noise_sampler=sampler, r=r)
    assert ours.nfe == 2 * steps - 1
    rel = float((ours.x - ref).norm() / ref.norm())
    assert rel < 1e-5, f"relative difference {rel:.2e}"


def _exact_flow(x, ns, t0, t1, mu, s):
    t0, t1 = torch.tensor(t0, dtype=torch.float64), torch.tensor(t1, dtype=torch.float64)
    a0, s0, a1, s1 = ns.alpha(t0), ns.sigma(t0), ns.alpha(t1), ns.sigma(t1)
    return a1 * mu + torch.sqrt(a1**2 * s**2 + s1**2) / torch.sqrt(a0**2 * s**2 + s0**2) * (x - a0 * mu)


def measured_order(solver, ns, steps=(32, 64, 128, 256)):
    """Slope of the max error against the exact probability-flow map on Gaussian data (run stops at
    the last Karras point, sigma > 0)."""
    mu, s = torch.tensor([0.5, -0.3, 1.2], dtype=torch.float64), 0.4
    gauss = GaussianMixture(mu[None], torch.tensor([s]), torch.tensor([1.0]))
    noise = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for n in steps:
        res = Sampler(solver, Karras(), n, final="last")(gauss.denoiser(ns), noise)
        ref = _exact_flow(noise * prior_scale(res.grid), ns, res.grid.t_list[0], res.grid.t_list[-1], mu, s)
        errors.append(float((res.x - ref).abs().max()))
    return -np.polyfit(np.log(steps[1:]), np.log(errors[1:]), 1)[0], errors


@pytest.mark.parametrize("solver", [DPMSolverPP2SAncestral(eta=0.0), DPMSolverPPSDE(eta=0.0),
                                    DPMSolverPPSDE(eta=0.0, r=0.4)], ids=["2s_a", "sde", "sde_r0.4"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_noise_free_limit_is_second_order(solver, schedule):
    assert not solver.stochastic
    slope, errors = measured_order(solver, SCHEDULES[schedule])
    assert abs(slope - 2) < 0.25, f"slope {slope:.2f}, errors {errors}"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="eta"):
        DPMSolverPP2SAncestral(eta=-1)
    with pytest.raises(ValueError, match="r must be"):
        DPMSolverPPSDE(r=0.0)
    with pytest.raises(ValueError, match="brownian, independent"):
        DPMSolverPPSDE(noise="tree")
