"""Decoupled model-evaluation times (LD3's second time sequence): the map, and the sampler against a
hand-written loop that evaluates the model at the decoupled times (LD3's own DPM-Solver++ update)."""

from __future__ import annotations

import math

import pytest
import torch

from diffsample.samplers import Sampler
from diffsample.solvers import SOLVERS, DiscreteVP, RectifiedFlow
from diffsample.solvers.model_time import ModelTimeMap, WithModelTimes, model_time_map
from diffsample.solvers.schedule_file import OptimizedSchedule, schedule_from_times
from diffsample.solvers.step_schedules import fixed
from diffsample.solvers.stop_time import StopTime
from diffsample.testbed.gmm import GaussianMixture

NS = DiscreteVP.from_config(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear"))
GMM = GaussianMixture.random(dim=3, components=4, seed=1)
T = [999.0, 700.0, 400.0, 150.0, 30.0]
T_MODEL = [999.0, 731.5, 380.25, 171.0, 22.5]


def _schedule(t=T, t_model=T_MODEL) -> OptimizedSchedule:
    return schedule_from_times(t, NS, model="gmm", solver="ddim", method="ld3", objective=0.0, t_model=tuple(t_model))


def test_grid_times_map_exactly_to_their_model_times_in_float32_and_float64():
    m = ModelTimeMap(T, T_MODEL, NS)
    for dtype in (torch.float64, torch.float32):
        t = torch.tensor(T, dtype=dtype)
        out = m(t)
        assert out.dtype == dtype
        assert torch.equal(out, torch.tensor(T_MODEL, dtype=dtype))
    assert not m.identity and ModelTimeMap(T, T, NS).identity


def test_between_grid_times_the_log_sigma_offset_is_interpolated_linearly():
    m = ModelTimeMap(T, T_MODEL, NS)
    u = lambda t: math.log(float(NS.sigma_ve(torch.tensor([t], dtype=torch.float64))))  # noqa: E731
    for a, b, ma, mb in zip(T[1:], T[2:], T_MODEL[1:], T_MODEL[2:]):
        for frac in (0.25, 0.5, 0.8):
            uq = (1 - frac) * u(a) + frac * u(b)
            q = float(NS.t_from_sigma_ve(torch.tensor([math.exp(uq)], dtype=torch.float64)))
            off = (1 - frac) * (u(ma) - u(a)) + frac * (u(mb) - u(b))
            assert u(float(m(torch.tensor([q], dtype=torch.float64)))) == pytest.approx(uq + off, abs=1e-9)
    # Beyond the last grid time the last offset is held.
    q = torch.tensor([5.0], dtype=torch.float64)
    assert u(float(m(q))) - u(5.0) == pytest.approx(u(T_MODEL[-1]) - u(T[-1]), abs=1e-9)


def test_model_times_outside_the_range_or_of_another_length_are_refused():
    with pytest.raises(ValueError, match="one time per grid time: 2 for 3"):
        ModelTimeMap([999.0, 500.0, 10.0], [999.0, 500.0], NS)
    with pytest.raises(ValueError, match=r"leave the noise schedule's range \[0"):
        ModelTimeMap([999.0, 500.0], [1200.0, 500.0], NS)
    with pytest.raises(ValueError, match="model times must be 5 finite numbers"):
        _schedule(t_model=[999.0, 700.0, float("nan"), 150.0, 30.0])
    with pytest.raises(ValueError, match="from method 'ld3', not 'gits'"):
        schedule_from_times(T, NS, model="m", solver="ddim", method="gits", objective=0.0, t_model=tuple(T_MODEL))


def test_sampler_evaluates_the_model_at_the_decoupled_times_as_ld3s_update_does():
    """First-order DPM-Solver++ (DDIM) with LD3's decoupled times, written out:
    ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D(x_i, t'_i)``,
    ``h_i = lambda_{i+1} - lambda_i``, the last step to sigma = 0 returning ``D(x_{N-1}, t'_{N-1})``."""
    den = GMM.denoiser(NS)
    noise = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = Sampler(SOLVERS.create("ddim"), _schedule(), len(T))(den, noise)
    assert out.nfe == len(T)
    tt = torch.tensor(T, dtype=torch.float64)
    alpha, sigma, lam = NS.alpha(tt).tolist(), NS.sigma(tt).tolist(), NS.lambda_(tt).tolist()
    x = noise * math.hypot(alpha[0], sigma[0])
    for i, tm in enumerate(T_MODEL):
        d = den(x, torch.full((x.shape[0],), tm, dtype=torch.float64))
        if i + 1 == len(T):
            x = d
            break
        h = lam[i + 1] - lam[i]
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
    torch.testing.assert_close(out.x, x, rtol=1e-12, atol=1e-12)
    # ... and it is not the coupled run.
    plain = Sampler(SOLVERS.create("ddim"), fixed(T), len(T))(den, noise)
    assert float((plain.x - out.x).abs().max()) > 1e-3


def test_single_step_solver_stages_get_the_interpolated_model_time():
    den = GMM.denoiser(NS)

    def recording(calls):
        class Recording:
            noise_schedule = NS

            def __call__(self, x, t, cond=None):
                calls.append(float(t[0]))
                return den(x, t)
        return Recording()

    asked, got = [], []
    x0 = torch.zeros(2, 3, dtype=torch.float64)
    Sampler(SOLVERS.create("dpm_2"), fixed(T), len(T))(recording(asked), x0)  # where DPM2 asks (x-independent)
    Sampler(SOLVERS.create("dpm_2"), _schedule(), len(T))(recording(got), x0)
    m = ModelTimeMap(T, T_MODEL, NS)
    assert len(asked) == len(got) and any(a not in T for a in asked)  # DPM2's midpoint stages are off the grid
    assert got == pytest.approx(m(torch.tensor(asked, dtype=torch.float64)).tolist(), rel=1e-12)
    assert set(T_MODEL) <= set(got)


def test_a_changed_grid_is_refused_rather_than_mismatched():
    with pytest.raises(ValueError, match="has 5 steps, cannot produce 6"):  # a truncated run asks for another grid
        Sampler(SOLVERS.create("ddim"), _schedule(), len(T), stop=StopTime(0.5, "sigma"))(
            GMM.denoiser(NS), torch.zeros(2, 3, dtype=torch.float64))
    # An ordinary schedule has no map; a fixed copy carries the model times along, to its own grid only.
    grid = Sampler(SOLVERS.create("ddim"), fixed(T), len(T)).grid(NS)
    assert model_time_map(fixed(T), grid) is None
    copy = WithModelTimes(fixed(T), tuple(T), tuple(T_MODEL))
    assert model_time_map(copy, grid).t_model == tuple(T_MODEL)
    other = Sampler(SOLVERS.create("ddim"), fixed([999.0, 650.0, 400.0, 150.0, 30.0]), len(T)).grid(NS)
    with pytest.raises(ValueError, match="decoupled times fitted to its own grid"):
        model_time_map(copy, other)


def test_flow_time_one_is_left_alone():
    ns = RectifiedFlow()
    m = ModelTimeMap([1.0, 0.5, 0.2], [1.0, 0.55, 0.18], ns)
    assert float(m(torch.tensor([1.0]))) == 1.0
    assert float(m(torch.tensor([0.5]))) == pytest.approx(0.55)


def test_model_times_outside_this_noise_schedule_are_refused_when_the_schedule_is_used():
    sched = schedule_from_times(T, NS, model="m", solver="ddim", method="ld3", objective=0.0,
                                t_model=(999.0, 731.5, 380.25, 171.0, -5.0))
    with pytest.raises(ValueError, match=r"model times .* outside the noise schedule's range") as info:
        Sampler(SOLVERS.create("ddim"), sched, len(T))(GMM.denoiser(NS), torch.zeros(2, 3, dtype=torch.float64))
    assert "\n" not in str(info.value)
