"""SteinDiff (arXiv 2606.07835) against closed forms (docs/methods/steindiff.md#exact-tests-testssolverstest_steinpy): tests S1-S3, S6,
plus cost accounting, the three divergence modes and bad input."""

import math
import warnings

import pytest
import torch

from diffsample.samplers import Sampler
from diffsample.solvers import SOLVERS, VE, DPMSolverPP, Karras, LambdaUniform, LinearVP, SteinDiff, UniPC
from diffsample.solvers.solver import Grid
from diffsample.solvers.dpm_solver import History
from diffsample.solvers.stein import NotDifferentiableError, stein_trace
from diffsample.testbed.gmm import GaussianMixture


def circle_gmm(dim=2):
    ang = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    means = torch.zeros(8, dim, dtype=torch.float64)
    means[:, 0], means[:, 1] = 4 * ang.cos(), 4 * ang.sin()
    return GaussianMixture(means, torch.full((8,), 0.3), torch.ones(8))


def vp_grid(alpha, alpha_next):
    """A two-point LinearVP grid at the given alphas (sigma = sqrt(1 - alpha^2))."""
    ns = LinearVP()
    lam = torch.tensor([alpha, alpha_next], dtype=torch.float64)
    lam = torch.log(lam / torch.sqrt(1 - lam**2))
    return Grid.from_t(ns, ns.t_from_lambda(lam)), ns


def ddim(x, d, grid, i):
    """DDIM / DPM-Solver++(1) written out (arXiv 2010.02502 eq. 12, eta = 0)."""
    a, s, a1, s1 = grid.alpha_list[i], grid.sigma_list[i], grid.alpha_list[i + 1], grid.sigma_list[i + 1]
    return a1 * d + s1 * (x - a * d) / s


def one_step(solver, den, x, grid, i=0, state=None):
    with stein_trace() as trace:
        out, _ = solver.step(lambda x_, t: den(x_, t), x, grid, i, solver.init(x, grid) if state is None else state)
    return out, trace[-1]


# ---- S1: Stein identity ----------------------------------------------------------------------------
@pytest.mark.parametrize("alphas", [(0.30, 0.60), (0.90, 0.95)])
def test_s1_stein_identity_matches_oracle_coefficient(alphas):
    """The reference-free gamma (Hutchinson, 5 probes) equals the oracle E<u, x - x0> / E||u||^2
    computed from the true x0 under the forward coupling, within Monte-Carlo error."""
    gmm = circle_gmm()
    grid, ns = vp_grid(*alphas)
    gen = torch.Generator().manual_seed(0)
    n = 250_000
    x0 = gmm.sample(n, generator=gen)
    a, s = grid.alpha_list[0], grid.sigma_list[0]
    x = a * x0 + s * torch.randn(n, 2, dtype=torch.float64, generator=gen)
    den = gmm.denoiser(ns)
    u = x - ddim(x, gmm.denoised(x, a, s), grid, 0)
    oracle = float((u * (x - x0)).sum(1).mean() / (u * u).sum(1).mean())
    stein = SteinDiff(DPMSolverPP(order=1), coupling="marginal", gamma_min=None, gamma_max=None)
    out, rec = one_step(stein, den, x, grid)
    gamma = float(rec.gamma_raw[0])
    assert abs(gamma - oracle) < 0.02 * abs(oracle), (gamma, oracle)
    assert torch.allclose(out, x - gamma * u, rtol=1e-12, atol=1e-12)


def test_s1_identity_with_exact_trace():
    """Stein's lemma itself with the closed-form divergence of Appendix A: E<u, x - a x0> = s^2 E[div u]."""
    gmm = circle_gmm()
    grid, _ = vp_grid(0.3, 0.6)
    gen = torch.Generator().manual_seed(1)
    n = 400_000
    x0 = gmm.sample(n, generator=gen)
    a, s, a1, s1 = grid.alpha_list[0], grid.sigma_list[0], grid.alpha_list[1], grid.sigma_list[1]
    x = a * x0 + s * torch.randn(n, 2, dtype=torch.float64, generator=gen)
    # Appendix A: div D = d sum_j w_j c_j + sum_j w_j m_j . (g_j - g_bar)
    mu, s2 = gmm.means, gmm.stds**2
    v = a**2 * s2 + s**2
    c = a * s2 / v
    diff = x[:, None] - a * mu[None]
    w = torch.softmax(-0.5 * (diff**2).sum(-1) / v - torch.log(v), dim=1)
    m = mu[None] + c[None, :, None] * diff
    g = -diff / v[None, :, None]
    gbar = (w[:, :, None] * g).sum(1, keepdim=True)
    div_d = 2 * (w * c).sum(1) + (w * (m * (g - gbar)).sum(-1)).sum(1)
    d = (w[:, :, None] * m).sum(1)
    cd = a1 - s1 * a / s  # DDIM: T = (s1/s) x + cd D
    u = x - ddim(x, d, grid, 0)
    div_u = 2 * (1 - s1 / s) - cd * div_d
    lhs = float((u * (x - a * x0)).sum(1).mean())
    rhs = float(s**2 * div_u.mean())
    assert abs(lhs - rhs) < 0.02 * abs(lhs)


# ---- S2: one-step MSE decrease -------------------------------------------------------------------
@pytest.mark.parametrize("alphas", [(0.30, 0.60), (0.90, 0.95)])
def test_s2_one_step_mse_decrease(alphas):
    gmm = circle_gmm()
    grid, ns = vp_grid(*alphas)
    gen = torch.Generator().manual_seed(2)
    n = 200_000
    x0 = gmm.sample(n, generator=gen)
    a, s = grid.alpha_list[0], grid.sigma_list[0]
    x = a * x0 + s * torch.randn(n, 2, dtype=torch.float64, generator=gen)
    t = ddim(x, gmm.denoised(x, a, s), grid, 0)
    out, _ = one_step(SteinDiff(DPMSolverPP(order=1), coupling="marginal", gamma_min=None, gamma_max=None),
                      gmm.denoiser(ns), x, grid)
    mse = lambda y: float(((y - x0) ** 2).sum(1).mean())  # noqa: E731
    tweedie = mse(gmm.denoised(x, a, s))
    assert tweedie <= mse(out) < mse(t)
    # E_{k-1} = E_k - b^2 / c exactly for the oracle coefficient (floating point).
    u = x - t
    b, cc = float((u * (x - x0)).sum(1).mean()), float((u * u).sum(1).mean())
    assert mse(x - (b / cc) * u) == pytest.approx(mse(x) - b**2 / cc, rel=1e-9)


# ---- S3: Gaussian closed form (signs and scales) --------------------------------------------------
def gaussian_batch(grid, i, s_data, dim=6, n=512, seed=3):
    """Zero-mean isotropic batch at grid point i, rescaled so mean ||x||^2 = dim (a^2 s^2 + sigma^2) exactly."""
    a, s = grid.alpha_list[i], grid.sigma_list[i]
    x = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x * math.sqrt(dim * (a * a * s_data**2 + s * s) / float((x * x).sum(1).mean()))


@pytest.mark.parametrize("ns", [VE(), LinearVP()], ids=["VE", "VP"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("param_space", ["native", "edm"])
def test_s3_gaussian_marginal_is_tweedie(ns, order, param_space):
    """Marginal coupling on N(0, s^2 I) data with a linear candidate sends x to E[x0 | x] (native
    space) or alpha_next E[x0 | x] (edm space: the posterior mean in x / alpha coordinates, mapped
    back to the next point's scale)."""
    s_data, dim = 0.7, 6
    gauss = GaussianMixture(torch.zeros(1, dim), torch.tensor([s_data]), torch.tensor([1.0]))
    grid = Grid.from_t(ns, LambdaUniform()(ns, 6), final_zero=True)
    i = 2
    x = gaussian_batch(grid, i, s_data, dim)
    # 2M with D_prev = 0 keeps the candidate linear in x and history-free: T = r x + a1 c1 (1 + 1/(2 r0)) D.
    state = History((torch.zeros_like(x),), (grid.lambda_list[i - 1],)) if order == 2 else History()
    solver = SteinDiff(DPMSolverPP(order=order), probe_dist="rademacher", probes=1, gamma_min=None,
                       gamma_max=None, param_space=param_space, coupling="marginal", apply_steps="all")
    out, rec = one_step(solver, gauss.denoiser(ns), x, grid, i, state)
    a, s = grid.alpha_list[i], grid.sigma_list[i]
    tweedie = a * s_data**2 / (a * a * s_data**2 + s * s) * x
    scale = 1.0 if param_space == "native" else grid.alpha_list[i + 1]
    assert torch.allclose(out, scale * tweedie, rtol=1e-9, atol=1e-12), float((out - scale * tweedie).abs().max())
    plain, _ = DPMSolverPP(order=order).step(gauss.denoiser(ns), x, grid, i, state)
    assert not torch.allclose(out, plain)  # the correction did something


@pytest.mark.parametrize("ns", [VE(), LinearVP()], ids=["VE", "VP"])
def test_s3_gaussian_transition_is_ddpm_posterior_mean(ns):
    """Transition coupling: x* is the state at t_{i+1}; the exact coefficient gives E[x_{i+1} | x_i]
    = a v' / (a^2 v' + s^2) x with a = alpha_i / alpha_{i+1}, v' = alpha_{i+1}^2 s_data^2 + sigma_{i+1}^2."""
    s_data, dim = 0.7, 6
    gauss = GaussianMixture(torch.zeros(1, dim), torch.tensor([s_data]), torch.tensor([1.0]))
    grid = Grid.from_t(ns, LambdaUniform()(ns, 6), final_zero=True)
    i = 1
    x = gaussian_batch(grid, i, s_data, dim)
    solver = SteinDiff(DPMSolverPP(order=1), probe_dist="rademacher", probes=1, gamma_min=None, gamma_max=None,
                       coupling="transition", apply_steps="all")
    out, _ = one_step(solver, gauss.denoiser(ns), x, grid, i)
    a = grid.alpha_list[i] / grid.alpha_list[i + 1]
    s2 = grid.sigma_list[i] ** 2 - a**2 * grid.sigma_list[i + 1] ** 2
    v1 = grid.alpha_list[i + 1] ** 2 * s_data**2 + grid.sigma_list[i + 1] ** 2
    assert torch.allclose(out, a * v1 / (a * a * v1 + s2) * x, rtol=1e-9, atol=1e-12)


def test_s3_edm_gamma_equals_one_over_one_minus_ratio():
    """EDM, Gaussian data, DDIM candidate: gamma* = 1 / (1 - sigma_next / sigma) (the jump to D)."""
    s_data, dim = 0.5, 4
    gauss = GaussianMixture(torch.zeros(1, dim), torch.tensor([s_data]), torch.tensor([1.0]))
    ns = VE()
    grid = Grid.from_t(ns, Karras()(ns, 5), final_zero=True)
    x = gaussian_batch(grid, 1, s_data, dim)
    _, rec = one_step(SteinDiff(DPMSolverPP(order=1), probe_dist="rademacher", probes=1, gamma_max=None,
                                          coupling="marginal", apply_steps="all"),
                      gauss.denoiser(ns), x, grid, 1)
    expected = 1 / (1 - grid.sigma_list[2] / grid.sigma_list[1])
    assert float(rec.gamma_raw[0]) == pytest.approx(expected, rel=1e-10)


# ---- S6: probe variance ----------------------------------------------------------------------------
def gamma_spread(batch, probes, fixed_x, seeds=50, dist="gaussian"):
    gmm = circle_gmm(8)
    grid, ns = vp_grid(0.5, 0.7)
    den = gmm.denoiser(ns)
    gammas = []
    for seed in range(seeds):
        solver = SteinDiff(DPMSolverPP(order=1), probes=probes, probe_dist=dist, gamma_min=None, gamma_max=None, seed=seed,
                           coupling="marginal",
                           div_mode="finite_diff", fd_eps=1e-7)  # batched probes: fast; same estimator
        gen = torch.Generator().manual_seed(0 if fixed_x else 1000 + seed)
        x0 = gmm.sample(batch, generator=gen)
        x = grid.alpha_list[0] * x0 + grid.sigma_list[0] * torch.randn(batch, 8, dtype=torch.float64, generator=gen)
        gammas.append(float(one_step(solver, den, x, grid)[1].gamma_raw[0]))
    return torch.tensor(gammas).std().item()


def test_s6_probe_variance_scales_with_batch_and_probes():
    """Spread of gamma over 50 seeds: ~1/sqrt(B) over batches (B = 4 vs 256: ratio ~8) and, for a fixed
    batch, ~1/sqrt(probes) from the Hutchinson part alone (1 vs 16 probes: ratio ~4)."""
    ratio_b = gamma_spread(4, 5, False) / gamma_spread(256, 5, False)
    assert 4.0 < ratio_b < 16.0, ratio_b
    ratio_p = gamma_spread(16, 1, True) / gamma_spread(16, 16, True)
    assert 2.5 < ratio_p < 6.5, ratio_p


# ---- cost accounting, modes, wrapper behaviour -------------------------------------------------------
@pytest.mark.parametrize("div_mode,per_step", [("vjp", 1 + 2 * 3), ("jvp", 2 * 3), ("finite_diff", 1 + 3)])
def test_nfe_unchanged_and_probes_counted(div_mode, per_step):
    gmm = circle_gmm(4)
    solver = SteinDiff(DPMSolverPP(order=2), probes=3, div_mode=div_mode, apply_steps=2)
    result = Sampler(solver, Karras(), 6)(gmm.denoiser(VE()), torch.randn(5, 4, dtype=torch.float64))
    assert result.nfe == 6 == solver.nfe(result.grid)
    assert result.model_evals == 2 * per_step + 4 == solver.model_evals(result.grid)


def test_div_modes_agree():
    """VJP, JVP and finite differences estimate the same v^T J v on the same probes."""
    gmm = circle_gmm(4)
    grid, ns = vp_grid(0.4, 0.6)
    x = 0.4 * gmm.sample(64, generator=torch.Generator().manual_seed(5)) + 0.9 * torch.randn(64, 4, dtype=torch.float64)
    gammas = {}
    for mode in ("vjp", "jvp", "finite_diff"):
        solver = SteinDiff(DPMSolverPP(order=1), div_mode=mode, stats="per_sample", gamma_min=None, gamma_max=None,
                           fd_eps=1e-6)
        gammas[mode] = one_step(solver, gmm.denoiser(ns), x, grid)[1].gamma_raw
    assert torch.allclose(gammas["vjp"], gammas["jvp"], rtol=1e-9)
    assert torch.allclose(gammas["vjp"], gammas["finite_diff"], rtol=1e-4)


def test_gamma_one_reproduces_base_and_unipc_wraps():
    """gamma clipped to exactly 1 gives the plain solver's trajectory (UniPC: corrector included)."""
    gmm = circle_gmm(4)
    noise = torch.randn(6, 4, dtype=torch.float64)
    for base in (DPMSolverPP(order=2), UniPC()):
        plain = Sampler(base, Karras(), 7)(gmm.denoiser(LinearVP()), noise)
        wrapped = Sampler(SteinDiff(base, gamma_min=1.0, gamma_max=1.0, param_space="edm", apply_steps="all"), Karras(), 7)(
            gmm.denoiser(LinearVP()), noise)
        assert torch.allclose(plain.x, wrapped.x, rtol=1e-10, atol=1e-12)
        assert wrapped.model_evals == 7 * 11


def test_registered_variants_run():
    gmm = circle_gmm(4)
    for name in ("stein-dpm", "stein-unipc"):
        solver = SOLVERS.create(name)
        assert isinstance(solver, SteinDiff) and solver.apply_steps == 1 and solver.coupling == "transition"
        result = Sampler(solver, Karras(), 5)(gmm.denoiser(VE()), torch.randn(8, 4, dtype=torch.float64))
        assert torch.isfinite(result.x).all() and result.nfe == 5


def test_seeded_probes_are_reproducible_and_shape_independent():
    gmm = circle_gmm(4)
    noise = torch.randn(3, 4, dtype=torch.float64)
    run = lambda n, **kw: Sampler(SteinDiff(DPMSolverPP(), apply_steps="all", **kw), Karras(), 4)(gmm.denoiser(VE()), n).x  # noqa: E731
    assert torch.equal(run(noise), run(noise))
    assert torch.equal(run(noise).reshape(3, 2, 2), run(noise.reshape(3, 2, 2)))
    assert not torch.equal(run(noise, seed=1), run(noise, seed=2))


def test_no_corrected_step_is_the_base_solver():
    """apply_steps=0 keeps the base trajectory and its convergence order and costs nothing extra."""
    gmm = circle_gmm(4)
    noise = torch.randn(3, 4, dtype=torch.float64)
    solver = SteinDiff(UniPC(), apply_steps=0)
    a = Sampler(solver, Karras(), 6)(gmm.denoiser(LinearVP()), noise)
    b = Sampler(UniPC(), Karras(), 6)(gmm.denoiser(LinearVP()), noise)
    assert torch.equal(a.x, b.x) and a.model_evals == 6 and solver.order == UniPC().order
    assert SteinDiff(UniPC()).order == 0


def test_apply_steps_callable_and_trace():
    gmm = circle_gmm(4)
    solver = SteinDiff(DPMSolverPP(order=2), apply_steps=lambda i, grid: i % 2 == 1)
    with stein_trace() as trace:
        Sampler(solver, Karras(), 5)(gmm.denoiser(VE()), torch.randn(8, 4, dtype=torch.float64))
    assert [r.corrected for r in trace] == [False, True, False, True, False]


# ---- bad input ---------------------------------------------------------------------------------------
def test_batch_of_one_warns():
    gmm = circle_gmm(4)
    with pytest.warns(UserWarning, match="one sample"):
        Sampler(SteinDiff(DPMSolverPP(), apply_steps=1), Karras(), 3)(gmm.denoiser(VE()), torch.randn(1, 4, dtype=torch.float64))


def test_non_differentiable_denoiser_suggests_finite_diff():
    gmm = circle_gmm(4)
    inner = gmm.denoiser(VE())

    class Frozen:
        noise_schedule = VE()

        def __call__(self, x, t, cond=None):
            return inner(x.detach(), t)

    noise = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(NotDifferentiableError, match="finite_diff"):
        Sampler(SteinDiff(DPMSolverPP()), Karras(), 3)(Frozen(), noise)
    with pytest.raises(NotDifferentiableError, match="finite_diff"):
        Sampler(SteinDiff(DPMSolverPP(), div_mode="jvp"), Karras(), 3)(Frozen(), noise)
    result = Sampler(SteinDiff(DPMSolverPP(), div_mode="finite_diff"), Karras(), 3)(Frozen(), noise)
    assert torch.isfinite(result.x).all()


def test_nonfinite_gamma_falls_back_and_is_counted():
    """A candidate equal to x (u = 0) gives 0/0: the step keeps the plain candidate and is flagged."""

    class Identity:
        order, stochastic = 1, False

        def init(self, x, grid):
            return ()

        def nfe(self, grid):
            return grid.steps

        def step(self, denoise, x, grid, i, state, noise_fn=None):
            return x + 0 * denoise(x, torch.full((x.shape[0],), grid.t_list[i])), state

    gmm = circle_gmm(4)
    noise = torch.randn(4, 4, dtype=torch.float64)
    with stein_trace() as trace, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Sampler(SteinDiff(Identity(), apply_steps="all"), Karras(), 3)(gmm.denoiser(VE()), noise)
    assert sum(r.fallback for r in trace) == 3
    assert result.events == {"stein_fallback": 3}
    assert any("non-finite gamma" in str(w.message) for w in caught)
    assert torch.allclose(result.x, noise * result.grid.sigma_list[0] * math.sqrt(1 + 1 / result.grid.sigma_list[0] ** 2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(probes=0), "probes"), (dict(probe_dist="uniform"), "probe_dist"), (dict(div_mode="hessian"), "div_mode"),
    (dict(coupling="joint"), "coupling"), (dict(stats="median"), "stats"), (dict(param_space="flow"), "param_space"),
    (dict(apply_steps="some"), "apply_steps"), (dict(apply_steps=-1), "apply_steps"),
    (dict(gamma_min=2.0, gamma_max=1.0), "gamma_min"), (dict(fd_eps=0.0), "fd_eps"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SteinDiff(DPMSolverPP(), **kwargs)
    with pytest.raises(ValueError, match="base"):
        SteinDiff(object())
