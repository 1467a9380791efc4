"""Draws between grid points (solvers/substep.py): the transition hook is told each draw's own start and
landing times, the landing time is where the solver evaluates next (so SVDD's candidates are scored
where they land), noise_fn receives the draw's own noise levels, and the step index stays the run's."""

from __future__ import annotations

import pytest
import torch

from diffsample.samplers import Sampler
from diffsample.solvers import SOLVERS, Karras, LinearVP
from diffsample.solvers.transition import use_transition
from diffsample.testbed.gmm import GaussianMixture

GMM = GaussianMixture.random(dim=3, components=2, seed=0)
NS = LinearVP()
STAGED = ["dpmpp_sde", "seeds_2", "seeds_3", "restart"]


def _trace(name):
    events = []
    den = GMM.denoiser(NS)

    def denoise(x, t, cond=None):
        events.append(("eval", float(t[0])))
        return den(x, t)

    denoise.noise_schedule = NS

    def transition(mean, std, grid, i, draw):
        events.append(("draw", i, grid.t_list[i], grid.t_list[i + 1], grid.steps))
        return mean + std * draw()

    levels = []

    def noise_fn(sigma, sigma_next):
        levels.append((sigma, sigma_next))
        return torch.randn(4, 3, dtype=torch.float64)

    smp = Sampler(SOLVERS.create(name), Karras(), 6)
    grid = smp.grid(NS)
    x = torch.randn(4, 3, dtype=torch.float64)
    state = smp.solver.init(x, grid)
    with torch.no_grad(), use_transition(transition):
        for i in range(grid.steps):
            x, state = smp.solver.step(lambda x_, t_: denoise(x_, t_), x, grid, i, state, noise_fn)
    return events, levels, grid


@pytest.mark.parametrize("name", STAGED)
def test_a_draw_lands_where_the_solver_evaluates_next(name):
    events, levels, grid = _trace(name)
    draws = [k for k, e in enumerate(events) if e[0] == "draw"]
    assert draws and len(levels) == len(draws)
    between = 0
    for k in draws:
        _, i, t_from, t_to, steps = events[k]
        assert steps == grid.steps and 0 <= i < grid.steps
        nxt = next((e for e in events[k + 1:] if e[0] == "eval"), None)
        if nxt is not None:
            assert nxt[1] == pytest.approx(t_to, rel=1e-12), (name, events[k], nxt)
        if t_to != grid.t_list[i + 1]:
            between += 1
    assert between > 0, f"{name} made no draw between grid points"
    for (sigma, sigma_next), k in zip(levels, draws):
        _, i, t_from, t_to, _ = events[k]
        assert sigma == pytest.approx(float(NS.sigma(torch.tensor(t_from, dtype=torch.float64))), rel=1e-12)
        assert sigma_next == pytest.approx(float(NS.sigma(torch.tensor(t_to, dtype=torch.float64))), rel=1e-12)


def test_restart_jumps_are_labelled_upward():
    events, _, _ = _trace("restart")
    jumps = [e for e in events if e[0] == "draw"]
    # the default segments: K = 2 and K = 1 restarts, each jump from t_min up to t_max
    assert len(jumps) == 3 and all(e[3] > e[2] for e in jumps)
