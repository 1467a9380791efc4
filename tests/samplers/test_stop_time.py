"""Sampler(stop=StopTime(...)): the grid ends exactly at the stop for every step schedule, every
solver runs to it (deterministic ones agree with the exact probability-flow ODE solved to the stop),
the return modes and their accounting, bad input, the generation schedules and the Hermite
spectrum's API (arXiv 2606.13796; docs/methods/truncation.md)."""

import math
import warnings

import numpy as np
import pytest
import torch

from diffsample.core.registry import REQUIRED
from diffsample.samplers import Sampler
from diffsample.samplers.hermite import directions, fit_t0, hermite_spectrum
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, DiscreteVP, Karras, LinearVP, RectifiedFlow, VE, fixed
from diffsample.solvers.stop_time import StopTime, stop_grid
from diffsample.solvers.truncation import TruncationSchedule
from diffsample.testbed.gmm import GaussianMixture

GMM = GaussianMixture.random(dim=2, components=3, seed=3, std_range=(0.2, 0.4))
SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread avoids contention


def _schedules():
    for name in STEP_SCHEDULES.names():
        if any(o.default is REQUIRED for o in STEP_SCHEDULES.options(name)):
            continue  # explicit lists (sigmas, timesteps) fix their own point count
        for ns_name, ns in (("linear_vp", LinearVP()), ("discrete_vp", DiscreteVP.from_config(SD_CONFIG)),
                            ("rectified_flow", RectifiedFlow()), ("ve", VE())):
            if name == "flow_shift" and ns_name != "rectified_flow":
                continue
            yield pytest.param(name, ns, id=f"{name}-{ns_name}")


@pytest.mark.parametrize("name, ns", list(_schedules()))
@pytest.mark.parametrize("stop", [StopTime(0.3, "ou_time"), StopTime(0.05, "sigma"), StopTime(2.0, "logsnr")],
                         ids=["ou_time", "sigma", "logsnr"])
def test_grid_ends_exactly_at_the_stop_for_every_step_schedule(name, ns, stop):
    steps = 7
    if name == "laplace" and stop.sigma_ve(ns) > 0.5:
        # Laplace clips its points to the range as its peer does; from sigma ~0.5 up, 7 points clip together.
        with pytest.raises(ValueError, match="clipped points coincide"):
            Sampler(SOLVERS.create("euler"), STEP_SCHEDULES.create(name), steps, stop=stop).grid(ns)
        return
    grid = Sampler(SOLVERS.create("euler"), STEP_SCHEDULES.create(name), steps, stop=stop).grid(ns)
    assert grid.steps == steps and not grid.final_zero
    assert grid.sigma_list[-1] / grid.alpha_list[-1] == pytest.approx(stop.sigma_ve(ns), rel=1e-9)
    # Every point lies between the first point of the untruncated grid and the stop.
    plain = Sampler(SOLVERS.create("euler"), STEP_SCHEDULES.create(name), steps, final="last").grid(ns)
    assert grid.lambda_list[0] == pytest.approx(plain.lambda_list[0], abs=1e-9)
    assert all(b > a for a, b in zip(grid.lambda_list, grid.lambda_list[1:]))


def test_schedules_that_include_their_ends_spread_their_points_down_to_the_stop():
    ns = LinearVP()
    stop = StopTime(0.3)
    s_stop, s_max = stop.sigma_ve(ns), ns.sigma_ve_range()[1]
    grid = stop_grid(ns, Karras(sigma_max=None), 6, stop)
    s = np.array(grid.sigma_list) / np.array(grid.alpha_list)
    ramp = np.linspace(0, 1, 7)
    expected = (s_max ** (1 / 7) + ramp * (s_stop ** (1 / 7) - s_max ** (1 / 7))) ** 7  # EDM eq. 5 to the stop
    assert s == pytest.approx(expected, rel=1e-9)


def test_fixed_schedule_is_cut_at_the_stop():
    ns = LinearVP()
    stop = StopTime(0.1, "ou_time")
    t_stop = stop.t(ns)
    assert 0.05 < t_stop < 0.2
    grid = stop_grid(ns, fixed([1.0, 0.7, 0.5, 0.2, 0.05, 0.01]), 6, stop)
    assert grid.t_list == pytest.approx((1.0, 0.7, 0.5, 0.2, t_stop), abs=1e-12)
    assert grid.sigma_list[-1] / grid.alpha_list[-1] == pytest.approx(math.sqrt(math.expm1(0.1)))
    with pytest.raises(ValueError, match="below the first grid point"):
        stop_grid(ns, fixed([0.05, 0.01]), 2, stop)


@pytest.mark.parametrize("name", SOLVERS.names())
def test_every_solver_runs_to_the_stop(name):
    flow = name == "flow_sde"
    ns = RectifiedFlow() if flow else LinearVP()
    stop = StopTime(0.3, "ou_time")
    steps = 40
    sampler = Sampler(SOLVERS.create(name), STEP_SCHEDULES.create("karras"), steps, stop=stop)
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = sampler(GMM.denoiser(ns), noise)
    assert result.nfe == sampler.solver.nfe(result.grid)
    assert torch.isfinite(result.x).all()
    if not sampler.solver.stochastic and not name.startswith("stein"):
        t_start, t_stop = result.grid.t_list[0], result.grid.t_list[-1]
        ref = GMM.reference_ode(noise * math.hypot(result.grid.alpha_list[0], result.grid.sigma_list[0]), ns,
                                t_start, t_stop)
        assert (result.x - ref).abs().max() < 0.05


def test_return_modes_and_their_accounting():
    ns = LinearVP()
    noise = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runs = {mode: Sampler(SOLVERS.create("dpmpp_2m"), Karras(), 12, stop=StopTime(0.3), stop_return=mode)(
        GMM.denoiser(ns), noise) for mode in ("noisy", "denoised", "rescaled", "ou")}
    grid = runs["noisy"].grid
    alpha, sigma = grid.alpha_list[-1], grid.sigma_list[-1]
    x = runs["noisy"].x
    assert alpha == pytest.approx(math.exp(-0.15)) and sigma == pytest.approx(math.sqrt(1 - math.exp(-0.3)))
    assert torch.allclose(runs["rescaled"].x, x / alpha)
    assert torch.allclose(runs["ou"].x, x)  # VP: alpha^2 + sigma^2 = 1
    assert torch.allclose(runs["denoised"].x, GMM.denoised(x, alpha, sigma))
    assert runs["denoised"].nfe == runs["noisy"].nfe + 1 == 13
    assert runs["denoised"].model_evals == runs["noisy"].model_evals + 1
    assert runs["rescaled"].nfe == runs["ou"].nfe == 12
    # On rectified flow the "ou" return is the VP-coordinates state.
    rf = RectifiedFlow()
    out = Sampler(SOLVERS.create("euler"), Karras(), 12, stop=StopTime(0.3), stop_return="ou")(GMM.denoiser(rf), noise)
    plain = Sampler(SOLVERS.create("euler"), Karras(), 12, stop=StopTime(0.3))(GMM.denoiser(rf), noise)
    t = out.grid.t_list[-1]
    assert torch.allclose(out.x, plain.x / math.hypot(1 - t, t))


def test_stop_at_zero_is_the_untruncated_run():
    ns = LinearVP()
    noise = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plain = Sampler(SOLVERS.create("dpmpp_2m"), Karras(), 10)(GMM.denoiser(ns), noise)
    zero = Sampler(SOLVERS.create("dpmpp_2m"), Karras(), 10, stop=StopTime(0.0), stop_return="denoised")(
        GMM.denoiser(ns), noise)
    assert torch.equal(plain.x, zero.x) and zero.nfe == plain.nfe


@pytest.mark.parametrize("make, match", [
    (lambda: StopTime(-0.1), "stop must be >= 0"),
    (lambda: StopTime(float("nan")), "stop must be finite"),
    (lambda: StopTime(float("inf"), "sigma"), "stop must be finite"),
    (lambda: StopTime(0.3, "seconds"), "stop unit must be one of"),
    (lambda: StopTime(1.0, "t_rf"), "t_rf"),
    (lambda: Sampler(SOLVERS.create("euler"), Karras(), 5, stop=StopTime(0.3), stop_return="clean"), "stop_return"),
    (lambda: Sampler(SOLVERS.create("euler"), Karras(), 5, stop=0.3), "stop must be a StopTime"),
    (lambda: Sampler(SOLVERS.create("euler"), Karras(), 5, stop=StopTime(11.0)).grid(LinearVP()),
     "below the first grid point"),
    (lambda: Sampler(SOLVERS.create("euler"), Karras(), 5, stop=StopTime(1e-9)).grid(LinearVP()),
     "below the model's smallest noise level"),
    (lambda: StopTime(2000, "native").sigma_ve(DiscreteVP.from_config(SD_CONFIG)), "outside the schedule's time range"),
    (lambda: TruncationSchedule("power", t0=0.3, beta=-1.0), "beta must be"),
    (lambda: TruncationSchedule("cosine", t0=0.3), "kind must be one of"),
    (lambda: TruncationSchedule("power", t0=0.0), "t0 must be"),
    (lambda: TruncationSchedule("geometric", start=0.1, end=0.2, generations=5), "start must be >= end"),
])
def test_bad_input_is_one_line_naming_the_option(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_truncation_schedules_and_the_small_noise_warning():
    power = TruncationSchedule("power", t0=0.3, beta=2.0)
    assert [power.t0_at(i) for i in (0, 1, 9)] == pytest.approx([0.3, 0.075, 0.003])
    geo = TruncationSchedule("geometric", start=0.05, end=1e-4, generations=20)
    assert geo.t0_at(0) == pytest.approx(0.05) and geo.t0_at(19) == pytest.approx(1e-4)
    assert geo.t0_at(30) == pytest.approx(1e-4)
    assert geo.t0_at(10) == pytest.approx(0.05 * (1e-4 / 0.05) ** (10 / 19))
    assert TruncationSchedule("constant", t0=0.2).stop(5) == StopTime(0.2, "ou_time")
    ns = DiscreteVP.from_config(SD_CONFIG)  # smallest trained level: timestep 0, OU time -log(1 - 0.00085)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert power.stop(3, ns).value == pytest.approx(0.3 / 16)
    with pytest.warns(UserWarning, match="below the model's smallest trained noise level"):
        power.stop(100, ns)  # 0.3 / 101^2 = 2.9e-5 < 8.5e-4


def test_hermite_spectrum_of_exact_samples_matches_the_closed_form_within_its_errors():
    from diffsample.testbed.truncation import projected_hermite_moments

    gen = torch.Generator().manual_seed(4)
    zs = []
    for _ in range(20):  # independent replicates: the standard errors are honest
        x = GMM.sample(4000, gen)
        spec = hermite_spectrum(x, n_max=8, basis="axes")
        exact = projected_hermite_moments(GMM, spec.directions, n_max=8)
        zs.append((spec.moments - exact)[1:] / spec.se[1:])
    z = np.abs(np.stack(zs))
    assert 0.9 < np.mean(z < 2) and np.mean(z < 1) < 0.8 and z.max() < 4.5
    assert spec.energy == pytest.approx((spec.moments ** 2).mean(1))
    assert spec.moments[0] == pytest.approx(1.0) and spec.se[0] == pytest.approx(0.0)
    # Masking: with a standard-normal reference every degree >= 1 is unresolved.
    gauss = torch.randn(5000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    spec = hermite_spectrum(x, ref=gauss, n_max=4, n_dirs=8)
    assert spec.mask[0].all() and spec.mask[1:].mean() < 0.2


def test_directions_and_fit_t0():
    for basis in ("random", "axes", "dct"):
        w = directions((3, 4, 4), 16, basis)
        assert w.shape == (16, 48) and np.allclose(np.linalg.norm(w, axis=1), 1)
    w = directions((3, 4, 4), 48, "dct")
    assert np.allclose(w @ w.T, np.eye(48), atol=1e-12)  # the full 2-D DCT-II basis is orthonormal
    k = np.arange(1, 9)
    fit = fit_t0(np.exp(-k * 0.3 / 2), k)
    assert fit.t0 == pytest.approx(0.3) and fit.intercept == pytest.approx(0.0, abs=1e-12)
    limit = 0.2 * np.exp(-k * 0.15) / (1 - 0.8 * np.exp(-k * 0.15))
    assert fit_t0(limit, k, intercept=False).t0 > 0.3  # a collapsed loop reads as a larger effective t0
    with pytest.raises(ValueError, match="same length"):
        fit_t0([0.9, 0.8], [1, 2, 3])
    with pytest.raises(ValueError, match="basis must be one of"):
        hermite_spectrum(np.zeros((10, 2)), basis="fourier")
