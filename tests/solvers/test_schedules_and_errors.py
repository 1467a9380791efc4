"""Step schedules, grids, registries and bad input."""

import math

import pytest
import torch

from diffsample.core.registry import REQUIRED
from diffsample.samplers import Sampler
from diffsample.solvers import (SOLVERS, STEP_SCHEDULES, VE, DiscreteVP, DPMSolverPP, Euler, Grid, Karras,
                                LambdaUniform, LinearVP, RectifiedFlow, UniPC, fixed, parse_spec)

SCHEDULES = [LinearVP(), VE(), RectifiedFlow(), DiscreteVP.from_config({"beta_schedule": "linear"})]


@pytest.mark.parametrize("ns", SCHEDULES, ids=repr)
def test_lambda_inverse_roundtrip(ns):
    t = torch.linspace(ns.t_min, ns.t_max_finite, 57, dtype=torch.float64)
    assert torch.allclose(ns.t_from_lambda(ns.lambda_(t)), t, rtol=1e-9, atol=1e-9)
    assert torch.allclose(ns.lambda_(t), torch.log(ns.alpha(t) / ns.sigma(t)), rtol=1e-9, atol=1e-9)


def test_discrete_vp_fractional_timesteps_interpolate_log_sigma():
    ns = DiscreteVP.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    t = torch.tensor([10.0, 11.0, 10.25], dtype=torch.float64)
    s = ns.sigma_ve(t)
    expected = torch.exp(0.75 * torch.log(s[0]) + 0.25 * torch.log(s[1]))
    assert torch.isclose(s[2], expected, rtol=1e-12)


# Explicit lists (sigmas, timesteps) need their values and fix their own point count:
# tests/solvers/test_breadth_schedules.py.
LISTS = [n for n in STEP_SCHEDULES.names() if any(o.default is REQUIRED for o in STEP_SCHEDULES.options(n))]


@pytest.mark.parametrize("name", [n for n in STEP_SCHEDULES.names() if n not in LISTS])
@pytest.mark.parametrize("ns", SCHEDULES, ids=repr)
@pytest.mark.parametrize("final", ["zero", "last"])
def test_every_schedule_every_step_count(name, ns, final):
    if name == "flow_shift" and not isinstance(ns, RectifiedFlow):
        with pytest.raises(ValueError, match="RectifiedFlow"):
            STEP_SCHEDULES.create(name)(ns, 5)
        return
    for steps in [1, 2, 3, 5, 8, 20, 50]:
        if name == "lcm" and steps + (final == "last") > 50:  # a subset of its 50-point distillation grid
            with pytest.raises(ValueError, match="valid: 1 to 50"):
                Sampler(Euler(), STEP_SCHEDULES.create(name), steps, final=final).grid(ns)
            continue
        grid = Sampler(Euler(), STEP_SCHEDULES.create(name), steps, final=final).grid(ns)
        assert grid.steps == steps
        assert (grid.lambda_[1:] > grid.lambda_[:-1]).all()
        assert grid.final_zero == (final == "zero")


def test_karras_matches_k_diffusion_formula():
    ns = VE()
    t = Karras(rho=7.0)(ns, 10)
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    expected = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(t, expected, rtol=1e-12)


def test_lambda_uniform_is_uniform():
    ns = LinearVP()
    lam = ns.lambda_(LambdaUniform()(ns, 9))
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(8), rtol=1e-9)


def test_registry_unknown_names_list_valid_choices():
    with pytest.raises(ValueError, match="unknown solver 'nope'.*dpmpp_2m"):
        SOLVERS.create("nope")
    with pytest.raises(ValueError, match="unknown step schedule 'nope'.*karras"):
        STEP_SCHEDULES.create("nope")


def test_registry_options():
    assert SOLVERS.create("unipc_bh2:predictor_order=3").order == 4
    assert SOLVERS.create("dpmpp_2m:solver_type=heun").solver_type == "heun"
    assert parse_spec("cfg:scale=2.5,x=a") == ("cfg", {"scale": 2.5, "x": "a"})
    assert parse_spec("jeffrey:target=0:0.5,1:0.5,scale=2") == ("jeffrey", {"target": "0:0.5,1:0.5", "scale": 2})
    with pytest.raises(ValueError, match="expected key=value"):
        parse_spec("cfg:2.5")
    with pytest.raises(ValueError, match="unknown option 'nope' for solver 'euler'; valid: eta=0.0"):
        SOLVERS.create("euler:nope=1")


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
def test_bad_steps(bad):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        Sampler(Euler(), Karras(), bad)


def test_bad_orders_and_options():
    with pytest.raises(ValueError, match="order must be 1, 2 or 3, got 4"):
        DPMSolverPP(order=4)
    with pytest.raises(ValueError, match="UniPC order must be 1, 2 or 3, got 0"):
        UniPC(predictor_order=0)
    with pytest.raises(ValueError, match="variant"):
        UniPC(variant="bh3")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        Euler(eta=-1)
    with pytest.raises(ValueError, match="final must be"):
        Sampler(Euler(), Karras(), 4, final="end")
    with pytest.raises(ValueError, match="rho must be > 0"):
        Karras(rho=0)


def test_schedule_that_cannot_produce_steps():
    with pytest.raises(ValueError, match="fixed schedule has 3 points, cannot produce 5"):
        Sampler(Euler(), fixed([999, 500, 10]), 5).grid(SCHEDULES[3])
    # 2000 integer timesteps out of 1000 training steps repeat: not strictly decreasing.
    with pytest.raises(ValueError, match="not strictly decreasing"):
        Sampler(Euler(), STEP_SCHEDULES.create("linspace"), 2000).grid(SCHEDULES[3])
    with pytest.raises(ValueError, match="leave the schedule's range"):
        Grid.from_t(VE(), torch.tensor([100.0, 1.0]))


def test_final_zero_grid():
    grid = Sampler(Euler(), Karras(), 4).grid(VE())
    assert grid.sigma_list[-1] == 0 and grid.alpha_list[-1] == 1 and math.isinf(grid.lambda_list[-1])
