"""The rectified-flow SDE (``flow_sde``) on exact Gaussian data: it keeps the flow's marginals."""

from __future__ import annotations

import math

import pytest
import torch

from diffsample.samplers import Sampler, SeededNoiseFn, seeded_noise
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, FlowSDE, LinearVP, RectifiedFlow
from diffsample.testbed.gmm import GaussianMixture

MU, S = torch.tensor([0.5, -0.3, 1.2], dtype=torch.float64), 0.4
GAUSS = GaussianMixture(MU[None], torch.tensor([S]), torch.tensor([1.0]))
RF = RectifiedFlow()


def test_noise_level_zero_is_the_flow_euler_step():
    noise = seeded_noise(range(8), (3,), dtype=torch.float64)
    smp = lambda solver: Sampler(solver, STEP_SCHEDULES.create("linspace"), 12)  # noqa: E731
    a = smp(FlowSDE(0.0))(GAUSS.denoiser(RF), noise).x
    b = smp(SOLVERS.create("euler"))(GAUSS.denoiser(RF), noise).x
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_converges_weakly_to_the_data_moments():
    n = 4000
    noise = seeded_noise(range(n), (3,), dtype=torch.float64)
    err = {}
    for steps in (25, 200):
        res = Sampler(SOLVERS.create("flow_sde"), STEP_SCHEDULES.create("linspace"), steps)(
            GAUSS.denoiser(RF), noise, noise_fn=SeededNoiseFn(range(n), (3,), dtype=torch.float64))
        assert torch.all((res.x.mean(0) - MU).abs() < 4 * S / math.sqrt(n) + 0.01)
        err[steps] = float((res.x.std(0) - S).mean().abs())
    assert err[200] < max(0.5 * err[25], 3 * S / math.sqrt(2 * n)), err
    assert err[200] < 0.04 * S, err


def test_refuses_non_flow_schedules_and_bad_options():
    with pytest.raises(ValueError, match="RectifiedFlow"):
        Sampler(FlowSDE(), STEP_SCHEDULES.create("linspace"), 3)(GAUSS.denoiser(LinearVP()), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="noise_level"):
        FlowSDE(-1.0)
