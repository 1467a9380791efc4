"""Heun's two coordinate spaces against the exact Gaussian flow map: from the rectified-flow point
t = 1 (alpha = 0, VE sigma infinite) both are finite, count their calls and keep order 2; the flow
space keeps order 2 on VP and VE models and beats the VE space on a step that cuts sigma 12x."""

import numpy as np
import pytest
import torch

from diffsample.samplers import Sampler, prior_scale
from diffsample.solvers import VE, FlowShift, Grid, Heun, Karras, LinearVP, RectifiedFlow
from diffsample.testbed.gmm import GaussianMixture

MU, S = torch.tensor([0.5, -0.3, 1.2]), 0.4
GAUSS = GaussianMixture(MU[None], torch.tensor([S]), torch.tensor([1.0]))
FLOW = RectifiedFlow()


def _run(steps: int, final: str = "last", space: str = "ve"):
    calls = []
    denoiser = GAUSS.denoiser(FLOW)

    class Counted:
        noise_schedule = FLOW

        def __call__(self, x, t, cond=None):
            calls.append(float(t.reshape(-1)[0]))
            return denoiser(x, t, cond)

    counted = Counted()

    noise = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = Sampler(Heun(space=space), FlowShift(shift=3.0), steps, final=final)(counted, noise)
    return noise, result, calls


@pytest.mark.parametrize("space, first_step_calls", [("ve", 1), ("flow", 2)])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_heun_from_pure_noise_is_finite_and_counts_calls(steps, space, first_step_calls):
    _, result, calls = _run(steps, space=space)
    assert result.grid.alpha_list[0] == 0.0
    assert torch.isfinite(result.x).all()
    assert len(calls) == Heun(space=space).nfe(result.grid)
    last_step_calls = 1 if result.grid.final_zero else 2
    if steps > 1:
        assert len(calls) == first_step_calls + 2 * (steps - 2) + last_step_calls


@pytest.mark.parametrize("space", ["ve", "flow"])
def test_heun_from_pure_noise_keeps_order_two(space):
    """error * steps^2 stays within a small band from 16 to 256 steps (an order-1 method's grows
    16x; the flow space's error is 5-20x smaller and converges less monotonically, so a fitted
    slope is a noisy statistic there)."""
    scaled, steps = [], [16, 32, 64, 128, 256]
    for n in steps:
        noise, result, _ = _run(n, space=space)
        t_end = torch.tensor(result.grid.t_list[-1], dtype=torch.float64)
        a1, s1 = FLOW.alpha(t_end), FLOW.sigma(t_end)
        # From t = 1 (x = noise) the exact flow map is x_t = a mu + sqrt(a^2 S^2 + s^2) noise.
        exact = a1 * MU + torch.sqrt(a1**2 * S**2 + s1**2) * noise
        scaled.append(float((result.x - exact).abs().max()) * n**2)
    assert max(scaled) / min(scaled) < 6.0, f"error * steps^2: {scaled}"


def _exact(x, ns, t0, t1):
    t0, t1 = torch.tensor(t0, dtype=torch.float64), torch.tensor(t1, dtype=torch.float64)
    a0, s0, a1, s1 = ns.alpha(t0), ns.sigma(t0), ns.alpha(t1), ns.sigma(t1)
    std0, std1 = torch.sqrt(a0**2 * S**2 + s0**2), torch.sqrt(a1**2 * S**2 + s1**2)
    return a1 * MU + std1 / std0 * (x - a0 * MU)


@pytest.mark.parametrize("ns", [LinearVP(), VE()], ids=["VP", "VE"])
def test_flow_space_keeps_order_two(ns):
    noise = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors, steps = [], [32, 64, 128, 256]
    for n in steps:
        result = Sampler(Heun(space="flow"), Karras(), n, final="last")(GAUSS.denoiser(ns), noise)
        x0 = noise * prior_scale(result.grid)  # the Sampler's initial state
        ref = _exact(x0, ns, result.grid.t_list[0], result.grid.t_list[-1])
        errors.append(float((result.x - ref).abs().max()))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - 2.0) < 0.25, f"slope {slope:.2f}, errors {errors}"


def test_flow_space_beats_ve_space_on_a_large_sigma_cut():
    """One step from VE sigma 157 to 13 (csflow's first step on the bundled model): the VE-space
    trapezoid weights the second estimate by (12 - 1) / 2 and overshoots."""
    ns = VE(sigma_max=200.0)
    grid = Grid.from_t(ns, torch.tensor([157.0, 13.0], dtype=torch.float64))
    x = torch.randn(256, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 157.0
    denoiser = GAUSS.denoiser(ns)
    exact = _exact(x, ns, 157.0, 13.0)
    errors = {}
    for space in ("ve", "flow"):
        x_next, _ = Heun(space=space).step(denoiser, x, grid, 0, None)
        errors[space] = float((x_next - exact).pow(2).mean().sqrt())
    assert errors["flow"] < 0.5 * errors["ve"], errors
