"""SA-Solver on a grid that ends at sigma = 0 (Karras, the default of every sampler here) against diffusers'
SASolverScheduler, which never reaches sigma = 0: its grids end at the training sigma_min and its
lower-order-final rule counts the steps to there. The last step of our grid is ``x = D`` (not an Adams
step), so the run must equal diffusers on the grid up to sigma_min followed by one evaluation of the
denoiser; counting ``x = D`` as a step ran order 2 on the large step before it (SW1 0.83 against 0.04
on the 2-D GMM at 5 Karras steps, and ``sa_solver_pece`` 2.5)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffsample.samplers import Sampler, from_eps  # noqa: E402
from diffsample.solvers import DiscreteVP, Karras, LinearVP  # noqa: E402
from diffsample.solvers.sa_solver import SASolver  # noqa: E402
from diffsample.testbed.gmm import GaussianMixture  # noqa: E402

import diffusers.schedulers.scheduling_sasolver as sa_module  # noqa: E402

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
GMM = GaussianMixture.random(dim=2, components=8, seed=0)


@pytest.mark.parametrize("orders", [(2, 2), (3, 4), (2, 1)])
@pytest.mark.parametrize("steps", [4, 5, 8])
def test_the_step_to_zero_is_not_an_adams_step(monkeypatch, orders, steps):
    p, c = orders
    ns = DiscreteVP.from_config(SD_BETAS)
    sampler = Sampler(SASolver(p, c, tau=1.0), Karras(), steps)
    grid = sampler.grid(ns)
    assert grid.final_zero
    gen = torch.Generator().manual_seed(steps)
    noise = torch.randn(64, 2, dtype=torch.float64, generator=gen)
    z = [torch.randn(64, 2, dtype=torch.float64, generator=gen) for _ in range(steps - 1)]

    sched = diffusers.SASolverScheduler(**SD_BETAS, predictor_order=p, corrector_order=c, tau_func=lambda t: 1.0)
    model = GMM.eps_model(sched.alphas_cumprod)
    draws = iter(z)
    monkeypatch.setattr(sa_module, "randn_tensor", lambda *a, **k: next(draws))
    sched.set_timesteps(steps - 1)
    # diffusers on our grid up to its last positive sigma (exact times, float64 sigmas)
    sched.sigmas = torch.tensor([s / a for s, a in zip(grid.sigma_list[:-1], grid.alpha_list[:-1])],
                                dtype=torch.float64)
    sched.timesteps = grid.t[:-2].clone()
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(x, t).sample, t, x).prev_sample
    t_last = torch.full((x.shape[0],), grid.t_list[-2], dtype=torch.float64)
    ref = GMM.denoised(x, ns.alpha(t_last), ns.sigma(t_last))  # the step to sigma = 0: x = D

    index = {s: k for k, s in enumerate(grid.sigma_list[:-1])}
    ours = sampler(from_eps(lambda x_, t_: model(x_, t_).sample, ns), noise, noise_fn=lambda s, s_next: z[index[s]])
    assert ours.nfe == steps
    rel = float((ours.x - ref).norm() / ref.norm())
    assert rel < 1e-5, f"relative difference {rel:.2e}"


def test_without_the_order_2_term_the_noise_free_order_stays():
    """``order2_term=False`` (ComfyUI's plain Lagrange weights) keeps the noise-free order min(c, p + 1)."""
    from test_breadth_sde import measured_order

    solver = SASolver(2, 2, tau=0.0, lower_order_final=False, order2_term=False)
    slope, errors = measured_order(solver, LinearVP(), steps=(256, 512, 1024))  # pre-asymptotic below
    assert abs(slope - 2) < 0.3, f"slope {slope:.2f}, errors {errors}"
