"""Heun from the rectified-flow point t = 1 (alpha = 0, VE sigma infinite): finite, 2 calls per
step except the first (its Euler limit) and the last to sigma = 0, and still order 2 against the
exact Gaussian flow map."""

import numpy as np
import pytest
import torch

from diffsample.samplers import Sampler
from diffsample.solvers import FlowShift, Heun, RectifiedFlow
from diffsample.testbed.gmm import GaussianMixture

MU, S = torch.tensor([0.5, -0.3, 1.2]), 0.4
GAUSS = GaussianMixture(MU[None], torch.tensor([S]), torch.tensor([1.0]))
FLOW = RectifiedFlow()


def _run(steps: int, final: str = "last"):
    calls = []
    denoiser = GAUSS.denoiser(FLOW)

    class Counted:
        noise_schedule = FLOW

        def __call__(self, x, t, cond=None):
            calls.append(float(t.reshape(-1)[0]))
            return denoiser(x, t, cond)

    counted = Counted()

    noise = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = Sampler(Heun(), FlowShift(shift=3.0), steps, final=final)(counted, noise)
    return noise, result, calls


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_heun_from_pure_noise_is_finite_and_counts_calls(steps):
    _, result, calls = _run(steps)
    assert result.grid.alpha_list[0] == 0.0
    assert torch.isfinite(result.x).all()
    assert len(calls) == Heun().nfe(result.grid)


def test_heun_from_pure_noise_keeps_order_two():
    errors, steps = [], [16, 32, 64, 128]
    for n in steps:
        noise, result, _ = _run(n)
        t_end = torch.tensor(result.grid.t_list[-1], dtype=torch.float64)
        a1, s1 = FLOW.alpha(t_end), FLOW.sigma(t_end)
        # From t = 1 (x = noise) the exact flow map is x_t = a mu + sqrt(a^2 S^2 + s^2) noise.
        exact = a1 * MU + torch.sqrt(a1**2 * S**2 + s1**2) * noise
        errors.append(float((result.x - exact).abs().max()))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - 2.0) < 0.3, f"slope {slope:.2f}, errors {errors}"
