"""The Solver protocol over every registered solver (docs/design.md, "Solver"): a full run calls the
denoiser exactly ``nfe(grid)`` times, first at the step's own point, never at sigma = 0; a
deterministic solver never draws noise; a stochastic one draws only through the transition hook,
once per step with a non-zero kernel std."""

import pytest
import torch

from diffsample.solvers import SOLVERS, LinearVP, RectifiedFlow
from diffsample.solvers.solver import Grid
from diffsample.solvers.transition import use_transition
from diffsample.testbed.gmm import GaussianMixture

GMM = GaussianMixture.random(dim=3, components=2, seed=0)


def _grid(ns, flow: bool) -> Grid:
    hi = ns.t_max_finite if flow else ns.t_max
    return Grid.from_t(ns, torch.linspace(hi, ns.t_min + 0.05, 5, dtype=torch.float64), final_zero=True)


@pytest.mark.parametrize("name", SOLVERS.names())
def test_denoiser_calls_and_noise_draws_follow_the_protocol(name):
    solver = SOLVERS.create(name)
    flow = name == "flow_sde"
    ns = RectifiedFlow(t_min=1e-2, t_max_finite=0.99) if flow else LinearVP()
    grid = _grid(ns, flow)
    denoiser = GMM.denoiser(ns)
    calls, draws, kernels = [], [0], []

    def denoise(x, t):
        calls.append((step[0], float(t[0])))
        assert float(ns.sigma(t[:1].double())) > 0, "denoise called at sigma = 0"
        return denoiser(x, t)

    def noise_fn(sigma, sigma_next):
        draws[0] += 1
        return torch.randn(4, 3, dtype=torch.float64, generator=gen)

    def transition(mean, std, grid_, i, draw):
        kernels.append((i, std))
        return mean + std * draw()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    state = solver.init(x, grid)
    step = [0]
    with torch.no_grad(), use_transition(transition):
        for i in range(grid.steps):
            step[0] = i
            first = len(calls)
            x, state = solver.step(denoise, x, grid, i, state, noise_fn if solver.stochastic else None)
            assert len(calls) > first, f"step {i} made no denoiser call"
            assert calls[first] == (i, pytest.approx(grid.t_list[i], rel=1e-6)), "first call not at the step's point"
    assert len(calls) == solver.nfe(grid)
    if solver.stochastic:
        assert draws[0] == len(kernels) >= 1, "a stochastic draw bypassed the transition hook"
        assert all(std > 0 for _, std in kernels)
    else:
        assert draws[0] == 0 and not kernels
