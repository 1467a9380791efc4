"""SteinLookahead (the look-ahead hypothesis for SteinDiff's SC variant, docs/methods/steindiff.md)
and the ``stein_paper`` preset, on the exact Gaussian mixture: closed-form second moments, the base
solver recovered bit for bit at gamma = 1, exact nfe / model_evals, and bad input."""

import math

import pytest
import torch

from diffsample.samplers import Sampler
from diffsample.solvers import SOLVERS, VE, DPMSolverPP, Euler, Heun, Karras, LambdaUniform, LinearVP, SteinDiff, UniPC
from diffsample.solvers.solver import Grid
from diffsample.solvers.stein import NotDifferentiableError, stein_trace
from diffsample.solvers.stein_lookahead import SteinLookahead, _nearest_root
from diffsample.testbed.gmm import GaussianMixture


def circle_gmm(dim=2):
    ang = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    means = torch.zeros(8, dim, dtype=torch.float64)
    means[:, 0], means[:, 1] = 4 * ang.cos(), 4 * ang.sin()
    return GaussianMixture(means, torch.full((8,), 0.3), torch.ones(8))


class Counted:
    """A denoiser for :class:`Sampler` that records the times it is called at (and may drop autograd)."""

    def __init__(self, den, no_grad=False):
        self.den, self.no_grad, self.noise_schedule, self.seen = den, no_grad, den.noise_schedule, []

    def __call__(self, x, t, cond=None):
        self.seen.append(float(t[0]))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.no_grad):
            return self.den(x, t)


def run_steps(solver, den, x, grid):
    """Run ``solver`` step by step; returns the provisional outputs ``[x_0, x~_1, ..., x~_N]`` and the trace."""
    outs = [x]
    with stein_trace() as trace:
        state = solver.init(x, grid)
        for i in range(grid.steps):
            x, state = solver.step(lambda x_, t: den(x_, t), x, grid, i, state)
            outs.append(x)
    return outs, trace


def corrected_states(outs, trace):
    """The re-corrected states ``x_i = x~_i + (1 - gamma_{i-1}) (x_{i-1} - x~_i)`` (trace record ``i - 1``)."""
    gamma = {r.i: float(r.gamma[0]) for r in trace if r.corrected}
    states = [outs[0]]
    for i in range(1, len(outs)):
        g = gamma.get(i - 1)
        states.append(outs[i] if g is None else outs[i] + (1 - g) * (states[i - 1] - outs[i]))
    return states, gamma


@pytest.mark.parametrize("ns", [VE(), LinearVP()], ids=["VE", "VP"])
@pytest.mark.parametrize("base", [DPMSolverPP(order=1), DPMSolverPP(order=2), Heun()], ids=["ddim", "2m", "heun"])
def test_gaussian_data_gets_the_exact_marginal_second_moment(ns, base):
    """On N(0, s^2 I) data the denoiser is linear, the transport exact, and the Stein condition is the
    closed form mean ||x_i||^2 = d (alpha_i^2 s^2 + sigma_i^2) at every re-corrected point; the base
    solver alone misses it."""
    s_data, dim = 0.7, 6
    gauss = GaussianMixture(torch.zeros(1, dim, dtype=torch.float64), torch.tensor([s_data], dtype=torch.float64), torch.ones(1))
    grid = Grid.from_t(ns, LambdaUniform()(ns, 5), final_zero=True)
    den = gauss.denoiser(ns)
    x = grid.sigma_list[0] * torch.randn(300, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    outs, trace = run_steps(SteinLookahead(base, gamma_min=None, gamma_max=None), den, x, grid)
    states, gamma = corrected_states(outs, trace)
    assert sorted(gamma) == list(range(grid.steps - 1))  # every step but the last is re-corrected
    for i in range(1, grid.steps):
        target = dim * (grid.alpha_list[i] ** 2 * s_data**2 + grid.sigma_list[i] ** 2)
        moment = float((states[i] ** 2).sum(1).mean())
        assert moment == pytest.approx(target, rel=1e-9), (i, moment, target)
    plain, _ = run_steps(base, den, x, grid)
    misses = [abs(float((plain[i] ** 2).sum(1).mean()) / (dim * (grid.alpha_list[i] ** 2 * s_data**2
              + grid.sigma_list[i] ** 2)) - 1) for i in range(1, grid.steps)]
    assert max(misses) > 1e-3  # the correction had something to do


def test_transported_output_is_the_exact_evaluation_on_gaussian_data():
    """With a linear denoiser the served m~ + delta J u equals D at the corrected state, so a DDIM
    step from the corrected state with a fresh evaluation reproduces the next provisional output."""
    s_data, dim = 0.5, 4
    gauss = GaussianMixture(torch.zeros(1, dim, dtype=torch.float64), torch.tensor([s_data], dtype=torch.float64), torch.ones(1))
    ns = VE()
    grid = Grid.from_t(ns, Karras()(ns, 5), final_zero=True)
    den = gauss.denoiser(ns)
    x = grid.sigma_list[0] * torch.randn(64, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    base = DPMSolverPP(order=1)
    outs, trace = run_steps(SteinLookahead(base, gamma_min=None, gamma_max=None), den, x, grid)
    states, _ = corrected_states(outs, trace)
    for i in range(1, grid.steps):
        fresh, _ = base.step(lambda x_, t: den(x_, t), states[i], grid, i, base.init(x, grid))
        assert torch.allclose(fresh, outs[i + 1], rtol=1e-10, atol=1e-12)
    # Without transport the step uses m~ evaluated at the provisional state: a different trajectory.
    outs_nt, _ = run_steps(SteinLookahead(base, gamma_min=None, gamma_max=None, transport=False), den, x, grid)
    assert not torch.allclose(outs_nt[-1], outs[-1])


def test_stein_discrepancy_vanishes_on_a_mixture():
    """On the non-Gaussian 16-D circle mixture (transport to first order only) the Stein discrepancy
    |mean <x - alpha D(x), x> / (d sigma^2) - 1| at the re-corrected states, with the exact D, is
    below 1e-3 where the base solver's states are off by up to ~1.4 (Heun, 8 steps, EDM)."""
    gmm = circle_gmm(16)
    ns = VE(sigma_min=0.002, sigma_max=80.0)
    den = gmm.denoiser(ns)
    grid = Grid.from_t(ns, Karras()(ns, 8), final_zero=True)
    x = grid.sigma_list[0] * torch.randn(2000, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    outs, trace = run_steps(SteinLookahead(Heun(), gamma_min=None, gamma_max=None), den, x, grid)
    states, _ = corrected_states(outs, trace)

    def discrepancy(y, i):
        a, s = grid.alpha_list[i], grid.sigma_list[i]
        d = den(y, torch.full((y.shape[0],), grid.t_list[i], dtype=torch.float64))
        return abs(float(((y - a * d) * y).sum(1).mean()) / (16 * s * s) - 1)

    before = [discrepancy(outs[i], i) for i in range(1, grid.steps)]
    after = [discrepancy(states[i], i) for i in range(1, grid.steps)]
    assert max(after) < 1e-3 and max(before) > 1.0, (after, before)


@pytest.mark.parametrize("base", [DPMSolverPP(order=2), DPMSolverPP(order=3), Euler(), Heun()], ids=["2m", "3m", "euler", "heun"])
@pytest.mark.parametrize("ns", [VE(), LinearVP()], ids=["VE", "VP"])
def test_gamma_one_is_the_base_solver_bit_for_bit(base, ns):
    gmm = circle_gmm(3)
    noise = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sampler = lambda s: Sampler(s, Karras(), 6)(gmm.denoiser(ns), noise)  # noqa: E731
    plain, fixed = sampler(base), sampler(SteinLookahead(base, gamma_min=1.0, gamma_max=1.0))
    assert torch.equal(plain.x, fixed.x)
    assert fixed.nfe == plain.nfe and fixed.model_evals == plain.model_evals + 2 * 5
    free = sampler(SteinLookahead(base, gamma_min=None, gamma_max=None))
    assert not torch.allclose(free.x, plain.x)


@pytest.mark.parametrize("apply_steps, corrected", [("all", 5), ("all_but_last", 4), (2, 2), (0, 0), (10, 5)])
@pytest.mark.parametrize("base, calls", [(DPMSolverPP(order=2), 6), (Heun(), 11)], ids=["2m", "heun"])
def test_nfe_and_model_evals_are_exact(apply_steps, corrected, base, calls):
    """Denoiser calls: the base's (the look-ahead call is the next step's own); model_evals: + 2 per
    re-corrected step (one VJP through one call). 6 steps to sigma = 0: 5 steps can be re-corrected."""
    den = Counted(circle_gmm().denoiser(VE()))
    solver = SteinLookahead(base, gamma_min=None, gamma_max=None, apply_steps=apply_steps)
    with stein_trace() as trace:
        res = Sampler(solver, Karras(), 6)(den, torch.randn(8, 2, dtype=torch.float64))
    assert len(den.seen) == res.nfe == calls == solver.nfe(res.grid)
    assert res.model_evals == calls + 2 * corrected == solver.model_evals(res.grid)
    assert sum(r.corrected for r in trace) == corrected
    assert solver.order == (0 if apply_steps != 0 else base.order) and solver.batch_coupled == (apply_steps != 0)


def test_nearest_root():
    assert _nearest_root(-2.0, 1.0, 1.0) == pytest.approx(1.0)  # roots 1, -2
    assert _nearest_root(2.0, -3.0, 1.0) == pytest.approx(1.0)  # roots 1, 2
    assert _nearest_root(1.0, 2.0, 0.0) == -0.5  # linear
    assert _nearest_root(1.0, 0.0, 1.0) == 0.0  # no real root: minimiser -b / 2c
    assert math.isnan(_nearest_root(1.0, 0.0, 0.0))


def test_not_differentiable_denoiser_is_refused():
    den = Counted(circle_gmm().denoiser(VE()), no_grad=True)
    with pytest.raises(NotDifferentiableError, match="no gradient"):
        Sampler(SteinLookahead(DPMSolverPP()), Karras(), 4)(den, torch.randn(4, 2, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(base=UniPC()), "UniPC"),
    (dict(base=DPMSolverPP(eta=1.0)), "deterministic"),
    (dict(base="dpmpp_2m"), "deterministic solver"),
    (dict(base=DPMSolverPP(), gamma_min=2.0, gamma_max=1.0), "gamma_min"),
    (dict(base=DPMSolverPP(), apply_steps="first"), "apply_steps"),
    (dict(base=DPMSolverPP(), apply_steps=-1), "apply_steps"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SteinLookahead(**kwargs)


# ---- registry presets -----------------------------------------------------------------------------
def test_stein_paper_preset_is_algorithm_1():
    """stein_paper: marginal coupling, every step, batch statistics, 5 Gaussian VJP probes, gamma_min
    only; the base by name, Heun's two calls per step differentiated."""
    s = SOLVERS.create("stein_paper")
    assert isinstance(s, SteinDiff) and isinstance(s.base, DPMSolverPP) and s.base.order == 2
    assert (s.coupling, s.apply_steps, s.stats, s.probes, s.probe_dist, s.div_mode, s.gamma_min, s.gamma_max) == (
        "marginal", "all", "batch", 5, "gaussian", "vjp", 0.0, None)
    heun = SOLVERS.create("stein-paper:base=heun,gamma_min=0.5,param_space=edm")
    assert isinstance(heun.base, Heun) and heun.gamma_min == 0.5 and heun.param_space == "edm"
    grid = Grid.from_t(VE(), Karras()(VE(), 3), final_zero=True)
    assert heun.model_evals(grid) == (2 + 2 + 1) * 11
    with pytest.raises(ValueError, match="base must be one of dpmpp_2m, unipc_bh2, heun; got 'euler'"):
        SOLVERS.create("stein_paper:base=euler")


def test_stein_lookahead_preset():
    s = SOLVERS.create("stein-lookahead:base=heun,gamma_min=None,gamma_max=None,apply_steps=2")
    assert isinstance(s, SteinLookahead) and isinstance(s.base, Heun)
    assert (s.gamma_min, s.gamma_max, s.apply_steps, s.transport) == (None, None, 2, True)
    with pytest.raises(ValueError, match="base must be one of dpmpp_2m, dpmpp_3m, euler, heun; got 'unipc_bh2'"):
        SOLVERS.create("stein_lookahead:base=unipc_bh2")
    assert "HYPOTHESIS" in SOLVERS.summary("stein_lookahead")
    assert "own variant" in SOLVERS.summary("stein_dpm") and "stein_paper" in SOLVERS.summary("stein_dpm")
