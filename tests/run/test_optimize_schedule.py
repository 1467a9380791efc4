"""optimize_schedule (GITS, LD3) and the schedule file: exact checks on the Gaussian mixture, the JSON
round trip through every front-end, and one-line refusals."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from diffsample.run.optimize import exact_teacher, optimize_schedule
from diffsample.samplers import Sampler
from diffsample.samplers import schedule_optimizer as so
from diffsample.samplers.seeds import seeded_run
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, DiscreteVP
from diffsample.solvers.schedule_file import OptimizedSchedule, ScheduleMismatch, load_schedule
from diffsample.testbed.gmm import GaussianMixture

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
NS = DiscreteVP.from_config(SD)
GMM = GaussianMixture.random(dim=2, components=16, seed=0)
# Small sizes keep this file fast; the full-size measurement is benchmarks/optimize_schedule.py.
SMALL = dict(num_samples=96, fine_steps=20)


@pytest.fixture(scope="module")
def gits5():
    torch.set_num_threads(1)
    return optimize_schedule(GMM.denoiser(NS), solver="unipc_bh2", steps=5, method="gits", **SMALL)


@pytest.fixture(scope="module")
def ld3_5():
    torch.set_num_threads(1)
    return optimize_schedule(GMM.denoiser(NS), solver="unipc_bh2", steps=5, method="ld3", max_evals=150, **SMALL)


def _eval_rmse(schedule, steps: int, seed: int = 7, n: int = 512, solver: str = "unipc_bh2") -> float:
    """Endpoint RMSE on held-out noises against the exact PF-ODE solution (scipy) from t_max, the
    same noises (a grid starting below t_max draws them there: the VP prior scale is 1)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, dtype=torch.float64, generator=g)
    out = Sampler(SOLVERS.create(solver), schedule, steps)(GMM.denoiser(NS), noise)
    ref = GMM.reference_ode(noise, NS, 999.0, None, rtol=1e-9, atol=1e-9)
    return float(((out.x - ref) ** 2).mean().sqrt())


def test_cheapest_path_is_the_brute_force_minimum():
    rng = np.random.default_rng(0)
    p = 7
    first = rng.uniform(0, 1, p)
    cost = np.full((p, p, p), np.inf)
    for k, i, j in itertools.combinations(range(p), 3):
        cost[k, i, j] = rng.uniform(0, 1)
    for steps in (1, 2, 3, 4, 6):
        path, total = so.cheapest_path(first, cost, steps)
        best = math.inf
        for mid in itertools.combinations(range(1, p - 1), steps - 1):
            pts = (0, *mid, p - 1)
            c = first[pts[1]] + sum(cost[pts[s - 1], pts[s], pts[s + 1]] for s in range(1, steps))
            best = min(best, c)
        assert total == pytest.approx(best, rel=1e-12)
        assert path[0] == 0 and path[-1] == p - 1 and len(path) == steps + 1
        assert all(a < b for a, b in zip(path, path[1:]))
    with pytest.raises(ValueError, match="fine grid"):
        so.cheapest_path(first, cost, p)


def test_exact_teacher_follows_the_exact_ode():
    noise = seeded_run(list(range(10**12, 10**12 + 32)), (2,))["noise"].double()
    t_fine = so.fine_grid(NS, 6)
    teacher = exact_teacher(GMM.denoiser(NS), noise, t_fine)
    assert teacher.x.shape == (7, 32, 2) and teacher.denoised.shape == (6, 32, 2)
    direct = GMM.reference_ode(teacher.x[0], NS, 999.0, float(t_fine[3]), rtol=1e-10, atol=1e-10)
    assert so.rms(direct, teacher.x[3]) < 1e-6
    # The Euler/DDIM first step from the teacher's state: its local error equals the cost the DP sees.
    first, cost = so.local_costs(SOLVERS.create("euler"), teacher)
    x0, d0 = teacher.x[0], teacher.denoised[0]
    a0, s0 = float(NS.alpha(t_fine[:1])), float(NS.sigma(t_fine[:1]))
    a2, s2 = float(NS.alpha(t_fine[2:3])), float(NS.sigma(t_fine[2:3]))
    ddim = s2 / s0 * x0 + (a2 - s2 / s0 * a0) * d0  # DDIM step written out
    assert first[2] == pytest.approx(so.rms(ddim, teacher.x[2]), rel=1e-9)


def test_optimised_schedule_beats_every_builtin_on_the_exact_gmm(gits5, ld3_5):
    """Held-out noises, exact reference: the LD3 schedule beats the best built-in schedule."""
    builtins = {name: STEP_SCHEDULES.create(name) for name in
                ("trailing", "linspace", "karras", "exponential", "polyexponential:rho=2")}
    errors = {name: _eval_rmse(s, 5) for name, s in builtins.items()}
    best = min(errors.values())
    ours = _eval_rmse(ld3_5, 5)
    assert ours < 0.9 * best, (ours, errors)
    # On its own calibration objective LD3 never loses to its start (GITS or the best built-in).
    assert ld3_5.objective <= min(gits5.objective, ld3_5.best_builtin[1]) + 1e-12


def test_a_free_first_time_beats_schedules_that_start_below_t_max():
    """dpmpp_2m, 3 steps, exact 2-d mixture: ddim_uniform (first time 801) beats every grid that
    starts at t_max, so LD3 with t_0 fixed at t_max (the old parametrisation) cannot reach it; with
    t_0 free LD3 beats it on held-out noises against the exact endpoint from t_max."""
    den = GMM.denoiser(NS)
    free = optimize_schedule(den, solver="dpmpp_2m", steps=3, method="ld3", max_evals=60, **SMALL)
    fixed = optimize_schedule(den, solver="dpmpp_2m", steps=3, method="ld3", max_evals=60, free_start=False, **SMALL)
    assert fixed.t[0] == 999.0 and free.t[0] < 999.0 and free.extra["ld3_free_start"] is True
    ddim = _eval_rmse(STEP_SCHEDULES.create("ddim_uniform"), 3, solver="dpmpp_2m")
    ours, pinned = (_eval_rmse(s, 3, solver="dpmpp_2m") for s in (free, fixed))
    assert pinned > ddim  # the old behaviour loses to a built-in schedule
    assert ours < 0.7 * ddim, (ours, ddim, pinned)
    assert free.objective < free.objective_builtin["ddim_uniform"]


def test_ld3_moves_a_last_time_that_starts_at_t_min():
    """exponential ends at t_min (0 here): its last softmax weight is ~0, which unit simplex steps
    could not move (the old parametrisation stayed at t = 2e-5, objective 0.022); the gap floor
    lets the fit lift it (t ~ 4, 0.0155)."""
    den = GMM.denoiser(NS)
    teacher = exact_teacher(den, seeded_run(list(range(10**12, 10**12 + 96)), (2,))["noise"].double(),
                            so.fine_grid(NS, 20))
    init = STEP_SCHEDULES.create("exponential")(NS, 6)
    assert float(init[-1]) == NS.t_min
    t, f, _ = so.ld3_schedule(SOLVERS.create("unipc_bh2"), den, teacher, 6, init, max_evals=120)
    assert float(t[0]) == 999.0 and float(t[-1]) > 1.0
    assert f < 0.8 * 0.022 and f < 0.5 * so.endpoint_rmse(SOLVERS.create("unipc_bh2"), den, teacher, init)


def test_ld3_with_a_fixed_first_time_refuses_a_start_below_t_max():
    teacher = exact_teacher(GMM.denoiser(NS), seeded_run(list(range(8)), (2,))["noise"].double(), so.fine_grid(NS, 6))
    with pytest.raises(ValueError, match="must start at t_max = 999.0, got 801.0"):
        so.ld3_schedule(SOLVERS.create("dpmpp_2m"), GMM.denoiser(NS), teacher, 3,
                        torch.tensor([801.0, 401.0, 1.0], dtype=torch.float64), free_start=False)


def test_schedule_object_and_file_round_trip(ld3_5, tmp_path):
    assert ld3_5.steps == 5 and ld3_5.t[0] <= 999.0 and ld3_5.model.startswith("gmm:dim=2")
    path = tmp_path / "s.json"
    saved = ld3_5.save(path)
    data = json.loads(path.read_text())
    for key in ("model", "solver", "steps", "method", "objective", "t", "command", "sigma_ve"):
        assert key in data
    again = load_schedule(str(path))
    assert again.t == ld3_5.t and again.model == ld3_5.model and str(again) == f"file:path={path}"
    spec = STEP_SCHEDULES.create(f"file:path={path}")
    assert torch.equal(spec(NS, 5), ld3_5(NS, 5))
    # Sampler (native loops, generate) and the times it evaluates at.
    den = GMM.denoiser(NS)
    out = Sampler(SOLVERS.create("unipc_bh2"), saved, 5)(den, torch.zeros(2, 2, dtype=torch.float64))
    assert out.grid.t_list[:5] == pytest.approx(list(ld3_5.t)) and out.grid.final_zero


def test_schedule_refuses_other_step_counts_and_warns_on_another_noise_schedule(gits5):
    with pytest.raises(ValueError, match="has 5 steps, cannot produce 6"):
        gits5(NS, 6)
    with pytest.raises(ValueError, match="final='last'"):
        Sampler(SOLVERS.create("euler"), gits5, 5, final="last").grid(NS)
    other = DiscreteVP.from_config({"num_train_timesteps": 1000})  # DDPM linear betas
    with pytest.warns(ScheduleMismatch, match="made for noise schedule"):
        gits5(other, 5)
    assert gits5.mismatch(model="mnist", solver="dpmpp_2m") == [
        f"schedule {gits5} was optimised for model {gits5.model!r}, used with 'mnist'",
        f"schedule {gits5} was optimised for solver 'unipc_bh2', used with 'dpmpp_2m'"]
    assert gits5.mismatch(model=gits5.model, solver="unipc_bh2") == []


@pytest.mark.parametrize("content, match", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": "x"}', "not a diffsample step schedule"),
    ('{"format": "diffsample.step_schedule", "model": "m", "solver": "euler", "method": "gits", "objective": 1, '
     '"t": [999, 500, 700]}', "not strictly decreasing"),
    ('{"format": "diffsample.step_schedule", "model": "m", "solver": "euler", "method": "gits", "objective": 1, '
     '"t": [999, 500], "steps": 3}', "'steps' is 3 but 't' has 2"),
    ('{"format": "diffsample.step_schedule", "model": "m", "solver": "euler", "method": "nope", "objective": 1, '
     '"t": [999, 500]}', "unknown schedule method 'nope'"),
    ('{"format": "diffsample.step_schedule", "model": "m", "solver": "euler", "method": "gits", "objective": 1, '
     '"t": []}', "non-empty list"),
    ('{"format": "diffsample.step_schedule", "version": 3, "model": "m", "solver": "euler", "method": "ld3", '
     '"objective": 1, "t": [999, 500]}', "unknown version 3; this diffsample reads versions 1, 2"),
    ('{"format": "diffsample.step_schedule", "version": 2, "model": "m", "solver": "euler", "method": "ld3", '
     '"objective": 1, "t": [999, 500], "t_model": [999]}', "'t_model' must list one finite number per time"),
    ('{"format": "diffsample.step_schedule", "version": 2, "model": "m", "solver": "euler", "method": "gits", '
     '"objective": 1, "t": [999, 500], "t_model": [999, 480]}', "from method 'ld3', not 'gits'"),
])
def test_malformed_schedule_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        STEP_SCHEDULES.create(f"file:path={path}")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_schedule(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(steps=True), "steps must be an integer >= 1"),
    (dict(steps=3, method="ays"), "unknown method 'ays'; valid: gits, ld3"),
    (dict(steps=3, solver="euler_ancestral"), "deterministic solver"),
    (dict(steps=3, solver="nope"), "unknown solver 'nope'"),
    (dict(steps=30, fine_steps=20), "fine_steps"),
    (dict(steps=3, pool=4), "pool must be an integer >= 5, got 4"),
    (dict(steps=3, pool=8, ld3_samples=2, method="ld3"), r"ld3_samples \(2\) cannot be combined with pool="),
    (dict(steps=3, method="gits", decoupled=True), "decoupled model times are fitted by method 'ld3', not 'gits'"),
    (dict(steps=3, method="ld3", decoupled="yes"), "decoupled must be True or False, got 'yes'"),
    (dict(steps=3, method="ld3", decoupled=True, decoupled_evals=0), "decoupled_evals must be an integer >= 1, got 0"),
])
def test_bad_arguments_are_refused_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimize_schedule(GMM.denoiser(NS), num_samples=4, **kwargs)


def test_mnist_and_tiny_pipelines_plumbing(tmp_path):
    """The bundled model (solver teacher) and the tiny latent-UNet / flow-transformer pipelines give
    valid schedules in their own time unit (plumbing only: tiny sizes)."""
    torch.set_num_threads(1)
    from diffsample.pipelines import sample_pipeline
    from diffsample.testbed.tiny_pipelines import build

    small = dict(num_samples=4, fine_steps=6, teacher_substeps=1)
    mnist = optimize_schedule("mnist", solver="dpmpp_2m", steps=3, method="ld3", max_evals=3, ld3_samples=2, **small)
    assert mnist.model == "mnist" and mnist.t[0] == 999.0 and len(mnist.t) == 3
    assert mnist.extra["ld3_samples"] == 2  # a class-conditional fit on a subset of the calibration noises
    for family in ("sd", "sd3"):
        pipe = build(family)
        sched = optimize_schedule(pipe, solver="dpmpp_2m", steps=2, method="ld3", max_evals=4, **small)
        ns_max = 1.0 if family == "sd3" else 999.0
        assert sched.t[0] == pytest.approx(ns_max) and len(sched.t) == 2
        out = sample_pipeline(pipe, "a red fox", solver="dpmpp_2m", schedule=sched, steps=2, output_type="latent")
        assert torch.isfinite(out.latents).all()


# ---- stratified calibration (pool=) ----------------------------------------------------------------
def test_weighted_rms_matches_the_hand_computation():
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.zeros_like(a)
    per_sample = torch.tensor([0.0, 12.5, 1.0], dtype=torch.float64)  # mean squares over the 2 dims
    w = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    assert so.rms(a, b, w) == pytest.approx(math.sqrt(float((per_sample * w).sum() / w.sum())), rel=1e-12)
    assert so.rms(a, b, torch.ones(3)) == pytest.approx(so.rms(a, b), rel=1e-12)


def test_stratified_set_is_an_unbiased_and_lower_variance_estimate_of_the_pool_mean_square():
    """A pool whose mean square a few samples dominate (as on the 64-D mixture): the weighted mean
    square of the stratified set averages to the pool's (exact expectation checked by Monte Carlo,
    within 4 standard errors) and varies far less than a plain random set of the same size."""
    g = torch.Generator().manual_seed(0)
    pool, n = 4000, 64
    sq = torch.rand(pool, generator=g, dtype=torch.float64) * 1e-4
    rare = torch.randperm(pool, generator=g)[:6]
    sq[rare] = 0.5  # six samples in another component
    probe = (sq + 1e-5 * torch.rand(pool, generator=g, dtype=torch.float64)).sqrt()  # a probe grid sees them too
    idx, w = so.stratify(probe[None], n, torch.Generator().manual_seed(1))
    assert idx.numel() == n == w.numel() and idx.unique().numel() == n
    assert float(w.sum()) == pytest.approx(pool) and set(rare.tolist()) <= set(idx[: n // 2].tolist())
    strat, plain = [], []
    for k in range(2000):
        idx, w = so.stratify(probe[None], n, torch.Generator().manual_seed(k))
        strat.append(float((sq[idx] * w).sum() / w.sum()))
        plain.append(float(sq[torch.randperm(pool, generator=torch.Generator().manual_seed(k))[:n]].mean()))
    strat_t, plain_t = torch.tensor(strat), torch.tensor(plain)
    truth = float(sq.mean())
    assert abs(float(strat_t.mean()) - truth) < 4 * float(strat_t.std()) / math.sqrt(len(strat)) + 1e-12
    assert float(strat_t.std()) < 0.01 * float(plain_t.std())


def test_stratify_refuses_bad_sizes():
    with pytest.raises(ValueError, match=r"2 <= num_samples < pool \(10\), got 10"):
        so.stratify(torch.rand(2, 10), 10)
    with pytest.raises(ValueError, match="shape"):
        so.stratify(torch.rand(10), 4)


def test_pool_calibration_records_its_strata_and_beats_the_builtins_on_held_out_noises():
    torch.set_num_threads(1)
    sched = optimize_schedule(GMM.denoiser(NS), solver="unipc_bh2", steps=5, method="ld3", max_evals=150,
                              num_samples=64, pool=256, fine_steps=20, free_start=False)
    cal = sched.calibration
    assert (cal["pool"], cal["stratum_top"], cal["stratum_random"]) == (256, 32, 32)
    assert "karras" in cal["probes"] and sched.t[0] == 999.0
    ours = _eval_rmse(sched, 5)
    for spec in ("karras", "exponential", "align_your_steps"):
        assert ours < _eval_rmse(STEP_SCHEDULES.create(spec), 5), spec


def test_pool_and_a_precomputed_teacher_are_exclusive():
    teacher = exact_teacher(GMM.denoiser(NS), seeded_run(range(4), (2,))["noise"].double(), so.fine_grid(NS, 6))
    with pytest.raises(ValueError, match="either teacher= .* or pool="):
        optimize_schedule(GMM.denoiser(NS), steps=2, num_samples=4, pool=8, teacher=teacher)


def test_pool_calibration_on_the_class_conditional_mnist_model():
    """Plumbing of pool= on a network model (solver teacher, class labels follow the chosen noises)."""
    torch.set_num_threads(1)
    sched = optimize_schedule("mnist", solver="dpmpp_2m", steps=2, method="gits", num_samples=4, pool=10,
                              fine_steps=4, teacher_substeps=1)
    assert sched.calibration["pool"] == 10 and sched.calibration["stratum_top"] == 2
    assert len(sched.t) == 2 and math.isfinite(sched.objective)


# ---- decoupled model times (LD3's second time sequence) ------------------------------------------
@pytest.fixture(scope="module")
def ld3_pair():
    """Coupled and decoupled LD3 (dpmpp_2m, 4 steps, t_0 fixed) on the same calibration noises."""
    torch.set_num_threads(1)
    from diffsample.run.optimize import calibration_teacher

    den = GMM.denoiser(NS)
    teacher = calibration_teacher(den, **SMALL)
    kw = dict(solver="dpmpp_2m", steps=4, method="ld3", free_start=False, max_evals=120, teacher=teacher, **SMALL)
    return optimize_schedule(den, **kw), optimize_schedule(den, decoupled=True, decoupled_evals=240, **kw)


def test_decoupled_model_times_cut_the_held_out_error_of_ld3(ld3_pair):
    """On the exact 2-D mixture at 4 steps, LD3 with decoupled model times has under 0.8x the
    held-out endpoint error of LD3 on the grid alone (0.32x at these sizes when written)."""
    coupled, decoupled = ld3_pair
    assert coupled.t_model is None and decoupled.t_model is not None
    assert decoupled.t_model[0] == decoupled.t[0] == 999.0 and decoupled.t_model != decoupled.t
    # Each model time stays within half the grid's smallest log-sigma gap of its grid time.
    u = torch.log(NS.sigma_ve(torch.tensor(decoupled.t, dtype=torch.float64)))
    um = torch.log(NS.sigma_ve(torch.tensor(decoupled.t_model, dtype=torch.float64)))
    assert float((um - u).abs().max()) <= 0.5 * float((u[:-1] - u[1:]).abs().min()) + 1e-9
    assert decoupled.objective < decoupled.extra["ld3_objective_coupled"] == pytest.approx(coupled.objective)
    e_coupled = _eval_rmse(coupled, 4, solver="dpmpp_2m")
    e_decoupled = _eval_rmse(decoupled, 4, solver="dpmpp_2m")
    assert e_decoupled < 0.8 * e_coupled, (e_decoupled, e_coupled)


def test_decoupled_schedule_file_round_trip_and_version(ld3_pair, tmp_path):
    _, decoupled = ld3_pair
    path = tmp_path / "dec.json"
    decoupled.save(path)
    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["t_model"] == list(decoupled.t_model)
    again = load_schedule(str(path))
    assert again.t_model == decoupled.t_model and again.t == decoupled.t
    noise = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = Sampler(SOLVERS.create("dpmpp_2m"), decoupled, 4)(GMM.denoiser(NS), noise).x
    b = Sampler(SOLVERS.create("dpmpp_2m"), STEP_SCHEDULES.create(f"file:path={path}"), 4)(GMM.denoiser(NS), noise).x
    assert torch.equal(a, b)
    coupled_file = tmp_path / "c.json"
    ld3_pair[0].save(coupled_file)
    assert json.loads(coupled_file.read_text())["version"] == 1 and "t_model" not in json.loads(coupled_file.read_text())


def test_decoupled_params_round_trip_and_bad_window():
    p = so.DecoupledParams(so.LogSigmaParams(NS, 4, False), 0.5)
    t = torch.tensor([999.0, 600.0, 250.0, 40.0], dtype=torch.float64)
    tm = torch.tensor([999.0, 640.0, 230.0, 45.0], dtype=torch.float64)
    t2, tm2 = p.times(p.z(t, tm))
    torch.testing.assert_close(t2, t, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(tm2, tm, rtol=1e-9, atol=1e-7)
    teacher = exact_teacher(GMM.denoiser(NS), torch.zeros(2, 2, dtype=torch.float64), so.fine_grid(NS, 6))
    with pytest.raises(ValueError, match=r"window must be a number in \(0, 0.5\], got 0.8"):
        so.ld3_decoupled(SOLVERS.create("euler"), GMM.denoiser(NS), teacher, 3, t[:3], window=0.8)
    with pytest.raises(ValueError, match="must start at t_max"):
        so.ld3_decoupled(SOLVERS.create("euler"), GMM.denoiser(NS), teacher, 3, t[1:])


def test_with_a_pool_the_decoupled_fit_is_kept_only_if_the_rest_of_the_pool_agrees():
    torch.set_num_threads(1)
    den = GMM.denoiser(NS)
    s = optimize_schedule(den, solver="dpmpp_2m", steps=4, method="ld3", num_samples=64, pool=400, fine_steps=12,
                          free_start=False, max_evals=40, decoupled=True, decoupled_evals=60)
    errs = s.extra["pool_rest_rmse"]
    assert s.extra["pool_rest_samples"] == 400 - 64
    assert s.extra["decoupled_kept"] == (errs["decoupled"] <= errs["coupled"])
    assert (s.t_model is not None) == s.extra["decoupled_kept"]
    assert all(0 < v < 1 for v in errs.values())
