"""Restart sampling (arXiv 2306.14878, Algorithm 1) against the algorithm written out here in VE
coordinates (EDM Heun steps, forward jumps), fed the same noise on the exact GMM; without restarts it
is Heun (order 2)."""

from __future__ import annotations

import math

import pytest
import torch
from test_breadth_sde import measured_order

from diffsample.samplers import Sampler, prior_scale
from diffsample.solvers import VE, Heun, Karras, LinearVP
from diffsample.solvers.restart import Restart
from diffsample.testbed.gmm import GaussianMixture

GMM = GaussianMixture.random(dim=4, components=3, seed=6)
SCHEDULES = {"VE": VE(), "VP": LinearVP()}


def _draws(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    return lambda *_: torch.randn(shape, dtype=torch.float64, generator=gen)


def reference_restart(ns, sigmas, x, s_min_target, s_max, restarts, n_restart, s_noise, draw):
    """Algorithm 1 of arXiv 2306.14878 on VE sigmas ``sigmas`` (trailing 0): Heun (EDM Alg. 1) down the
    main grid; on reaching the point nearest s_min_target (log distance), ``restarts`` times: jump
    x += s_noise sqrt(s_max^2 - s_min^2) z, then Heun over Karras(rho=7) sigmas s_max -> s_min."""
    def den(y, s):
        t = ns.t_from_sigma_ve(torch.full((y.shape[0],), float(s), dtype=torch.float64))
        a = ns.alpha(t)
        return GMM.denoised(a[:, None] * y, a, ns.sigma(t))

    def heun(y, s, s_next):
        d = (y - den(y, s)) / s
        y_next = y + (s_next - s) * d
        if s_next == 0:
            return y_next
        return y + (s_next - s) * 0.5 * (d + (y_next - den(y_next, s_next)) / s_next)

    positive = [k for k in range(1, len(sigmas)) if sigmas[k] > 0]
    k_min = min(positive, key=lambda k: abs(math.log(sigmas[k]) - math.log(s_min_target)))
    for i in range(len(sigmas) - 1):
        x = heun(x, sigmas[i], sigmas[i + 1])
        if i + 1 == k_min:
            s_min = sigmas[k_min]
            sub = [(s_max ** (1 / 7) + j / n_restart * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
                   for j in range(n_restart + 1)]
            sub[-1] = s_min
            for _ in range(restarts):
                x = x + s_noise * math.sqrt(s_max**2 - s_min**2) * draw()
                for j in range(n_restart):
                    x = heun(x, sub[j], sub[j + 1])
    return x


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("opts", [dict(), dict(restart_sigma_min=0.3, restart_sigma_max=1.5, restarts=3,
                                                restart_steps=2, s_noise=0.9)], ids=["defaults", "custom"])
def test_restart_matches_algorithm_1(schedule, opts):
    ns, steps = SCHEDULES[schedule], 10
    solver = Restart(**opts)
    full = dict(restart_sigma_min=0.1, restart_sigma_max=2.0, restarts=2, restart_steps=4, s_noise=1.0) | opts
    noise = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ours = Sampler(solver, Karras(), steps)(GMM.denoiser(ns), noise, noise_fn=_draws(3, noise.shape))
    grid = ours.grid
    assert ours.nfe == 2 * steps - 1 + 2 * full["restarts"] * full["restart_steps"]
    sigmas = [s / a for s, a in zip(grid.sigma_list, grid.alpha_list)]
    ref = reference_restart(ns, sigmas, noise * prior_scale(grid) / grid.alpha_list[0], full["restart_sigma_min"],
                            full["restart_sigma_max"], full["restarts"], full["restart_steps"], full["s_noise"],
                            _draws(3, noise.shape))
    rel = float((ours.x - ref).norm() / ref.norm())
    assert rel < 1e-9, f"relative difference {rel:.2e}"


def test_without_restarts_it_is_heun_of_order_2():
    noise = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    den = GMM.denoiser(LinearVP())
    a = Sampler(Restart(restarts=0), Karras(), 9)(den, noise).x
    b = Sampler(Heun(), Karras(), 9)(den, noise).x
    assert torch.equal(a, b)
    assert not Restart(restarts=0).stochastic and not Restart(s_noise=0.0).stochastic
    slope, errors = measured_order(Restart(restarts=0), LinearVP())
    assert abs(slope - 2) < 0.25, f"slope {slope:.2f}, errors {errors}"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="restarts must be"):
        Restart(restarts=-1)
    with pytest.raises(ValueError, match="restart_sigma_min < restart_sigma_max"):
        Restart(restart_sigma_min=3.0, restart_sigma_max=2.0)
