"""The breadth solvers against their peers on the exact Gaussian mixture, step for step on the same grid.

* k-diffusion (MIT; ``sample_dpm_2``, ``sample_dpm_2_ancestral``, ``sample_lms``) and zju-pi/diff-sampler
  (Apache-2.0; ``ipndm_sampler``, ``ipndm_v_sampler``) are transcribed in tests/solvers/peers/;
* diffusers' ``DEISMultistepScheduler`` is imported;
* the ComfyUI-only samplers (res_multistep, heunpp2, gradient_estimation) are checked against their
  update rules written out below from the papers / the documented rules (ComfyUI's code is GPL-3).

The peers work in VE coordinates (``y = x / alpha``, ``sigma_ve = sigma / alpha``); our solvers run on
a VE and a VP process, and ``x / alpha`` is compared.
"""

import math

import pytest
import torch

from diffsample.solvers import SOLVERS, VE, DPMSolverPP, Karras, LinearVP
from diffsample.solvers.deis import DEIS
from diffsample.solvers.dpm_2 import DPM2
from diffsample.solvers.gradient_estimation import GradientEstimation
from diffsample.solvers.heunpp import HeunPP2
from diffsample.solvers.ipndm import IPNDM
from diffsample.solvers.lms import LMS
from diffsample.solvers.res_multistep import ResMultistep
from diffsample.solvers.solver import Grid
from diffsample.testbed.gmm import GaussianMixture

from peers import diff_sampler_ref, k_diffusion_ref

GMM = GaussianMixture.random(dim=8, components=6, seed=3)
PROCESSES = {"VE": VE(), "VP": LinearVP()}
TOL = 1e-9


def _grid(ns, steps, final_zero):
    n = steps if final_zero else steps + 1
    return Grid.from_t(ns, Karras()(ns, n), final_zero=final_zero)


def _ours(solver, ns, grid, z, noises=None):
    """Run ``solver`` over ``grid`` from the VE-scaled noise ``z * s_0``; returns ``x / alpha`` at the end."""
    x = z * grid.sigma_list[0]  # native x = alpha_0 * (s_0 z)
    draws = iter(noises or [])
    noise_fn = (lambda s, s_next: next(draws)) if solver.stochastic else None
    state = solver.init(x, grid)
    den = GMM.denoiser(ns)
    for i in range(grid.steps):
        x, state = solver.step(den, x, grid, i, state, noise_fn)
    return x / grid.alpha_list[-1]


def _sigmas(grid):
    return torch.tensor([s / a for s, a in zip(grid.sigma_list, grid.alpha_list)], dtype=torch.float64)


def _ve_model(x, sigma, **_):
    """The exact GMM denoiser in VE coordinates, as k-diffusion and diff-sampler call it."""
    return GMM.denoised(x, 1.0, sigma)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def z():
    return torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))


# ---- k-diffusion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize("final_zero", [True, False])
@pytest.mark.parametrize("steps", [5, 12])
def test_dpm_2_and_lms_match_k_diffusion(process, final_zero, steps, z):
    ns = PROCESSES[process]
    grid = _grid(ns, steps, final_zero)
    sigmas = _sigmas(grid)
    ref = k_diffusion_ref.sample_dpm_2(_ve_model, z * sigmas[0], sigmas)
    assert _rel(_ours(DPM2(), ns, grid, z), ref) < TOL
    for order in (2, 3, 4):
        ref = k_diffusion_ref.sample_lms(_ve_model, z * sigmas[0], sigmas, order=order)
        assert _rel(_ours(LMS(order=order), ns, grid, z), ref) < TOL, order


@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_dpm_2_ancestral_matches_k_diffusion(process, eta, z):
    ns = PROCESSES[process]
    grid = _grid(ns, 8, True)
    sigmas = _sigmas(grid)
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(32, 8, dtype=torch.float64, generator=g) for _ in range(grid.steps)]
    it = iter(noises)
    ref = k_diffusion_ref.sample_dpm_2_ancestral(_ve_model, z * sigmas[0], sigmas, eta=eta,
                                                 noise_sampler=lambda s, s_next: next(it))
    # Ours draws only on steps with a non-zero kernel std (not on the step to sigma = 0).
    ours = _ours(DPM2(eta=eta), ns, grid, z, noises)
    assert _rel(ours, ref) < TOL


# ---- zju-pi/diff-sampler ----------------------------------------------------------------------------


@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize("final_zero", [True, False])
@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("max_order", [3, 4])  # orders 1 and 2 run on the first steps
def test_ipndm_matches_diff_sampler(process, final_zero, variable, max_order, z):
    ns = PROCESSES[process]
    grid = _grid(ns, 7, final_zero)
    sigmas = _sigmas(grid)
    sampler = diff_sampler_ref.ipndm_v_sampler if variable else diff_sampler_ref.ipndm_sampler
    # ComfyUI's sample_ipndm(_v) takes the step to sigma = 0 as x = D: diff-sampler's denoise_to_zero.
    t_steps = sigmas[:-1] if final_zero else sigmas
    ref = sampler(_ve_model, z, t_steps=t_steps, max_order=max_order, denoise_to_zero=final_zero)
    assert _rel(_ours(IPNDM(max_order=max_order, variable=variable), ns, grid, z), ref) < TOL


def test_ipndm_v_fourth_order_weights_are_not_ab4():
    """What the reference computes (documented in IPNDM's docstring): on a uniform grid the order-4
    iPNDM_v weights are (57, -65, 43, -11)/24, not AB4's (55, -59, 37, -9)/24."""
    from diffsample.solvers.ipndm import variable_step_weights

    w = variable_step_weights(4, [-1.0, -1.0, -1.0, -1.0])
    assert [round(24 * c, 12) for c in w] == [57, -65, 43, -11]
    assert [round(12 * c, 12) for c in variable_step_weights(3, [-1.0, -1.0, -1.0])] == [23, -16, 5]


# ---- diffusers DEIS -----------------------------------------------------------------------------------

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("order", [2, 3])
def test_deis_matches_diffusers(spacing, steps, order):
    diffusers = pytest.importorskip("diffusers")
    from diffsample.samplers import Sampler, from_eps
    from diffsample.solvers import DiscreteVP, fixed

    config = dict(SD_BETAS, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sched = diffusers.DEISMultistepScheduler(**config, solver_order=order)
    model = GMM.eps_model(sched.alphas_cumprod)
    noise = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    sched.set_timesteps(steps)
    # diffusers keeps its sigmas in float32, and its closed-form DEIS weights (differences of nearby
    # values of rho log rho) lose up to 1e-4 relative at 20 steps in float32; in float64 they agree.
    sched.sigmas = sched.sigmas.double()
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(x, t).sample, t, x).prev_sample
    # diffusers' DEIS ends at timestep 0 (sigma > 0): our grid is its timesteps plus 0, final="last".
    ns = DiscreteVP.from_config(config)
    denoiser = from_eps(lambda x_, t_: model(x_, t_).sample, ns)
    ours = Sampler(DEIS(order=order), fixed(sched.timesteps.tolist() + [0.0]), steps, final="last")(denoiser, noise)
    assert ours.nfe == steps
    rel = _rel(ours.x, x)
    assert rel < 1e-6, f"relative difference {rel:.2e}"


def test_deis_tab_weights_are_exact_integrals():
    """tAB weights against scipy's adaptive quadrature of the Lagrange basis in tab_time(s)."""
    from scipy import integrate

    from diffsample.solvers._ve_multistep import lagrange_integrals
    from diffsample.solvers.deis import tab_time

    nodes, a, b = [5.0, 9.0, 20.0, 41.0], 5.0, 2.5
    u = [float(tab_time(n)) for n in nodes]

    def basis(j, s):
        v = float(tab_time(s))
        return math.prod((v - u[m]) / (u[j] - u[m]) for m in range(len(nodes)) if m != j)

    ref = [integrate.quad(lambda s: basis(j, s), a, b, epsabs=0, epsrel=1e-13)[0] for j in range(len(nodes))]
    ours = lagrange_integrals(nodes, a, b, tab_time)
    assert max(abs(o - r) / abs(r) for o, r in zip(ours, ref)) < 1e-12


@pytest.mark.parametrize("final_zero", [True, False])
@pytest.mark.parametrize("steps", [5, 10])
def test_deis_tab_matches_diff_sampler(final_zero, steps, z):
    """diff-sampler's tAB loop (what ComfyUI's ``deis`` runs) with its weights summed over 10^6 points:
    its default 10^4 points are accurate to ~1e-4 only (trajectories 7e-4 apart at 5 steps)."""
    ns = VE()
    grid = _grid(ns, steps, final_zero)
    sigmas = _sigmas(grid)
    t_steps = sigmas[:-1] if final_zero else sigmas
    coeffs = diff_sampler_ref.get_deis_coeff_list(t_steps, 3, N=10**6, deis_mode="tab")
    ref = diff_sampler_ref.deis_sampler(_ve_model, z, t_steps=t_steps, max_order=3, coeff_list=coeffs,
                                        denoise_to_zero=final_zero)
    assert _rel(_ours(DEIS(order=3, basis="tab", lower_order_final=False), ns, grid, z), ref) < 1e-5


@pytest.mark.parametrize("basis", ["tab", "rho"])
def test_deis_other_bases_have_order_3(basis):
    """The registry default (log_rho) is in test_order.py; the other bases on the VP process."""
    from test_order import SCHEDULES, measured_order

    slope, errors = measured_order(DEIS(basis=basis, lower_order_final=False), SCHEDULES["VP"])
    assert abs(slope - 3) < 0.25, (slope, errors)


@pytest.mark.parametrize("process", list(PROCESSES))
def test_deis_rho_basis_is_lms(process, z):
    """rhoAB-DEIS and k-diffusion's LMS are the same variable-step Adams-Bashforth update in VE sigma."""
    ns = PROCESSES[process]
    grid = _grid(ns, 9, False)
    for order in (2, 3, 4):
        a = _ours(DEIS(order=order, basis="rho", lower_order_final=False), ns, grid, z)
        assert _rel(a, _ours(LMS(order=order), ns, grid, z)) < 1e-12


# ---- ComfyUI-only samplers: the update rules written out ----------------------------------------------


def _res_reference(sigmas, z, eta=0.0, noises=()):
    """RES two-point multistep (arXiv 2308.02157) in VE coordinates, lambda = -log sigma: the step
    integrates ``e^{-(h - tau)}`` against the line through the last two denoised values, whose slope
    in lambda is taken over the previous step's deterministic length (ComfyUI's c2 for the ancestral
    form): ``y_down = e^{-h} y + (1 - e^{-h}) D + (h - 1 + e^{-h}) (D - D_prev) / delta``."""
    y, prev, it = z * sigmas[0], None, iter(noises)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D = _ve_model(y, s)
        up = 0.0 if eta == 0 or s_next == 0 else min(s_next, eta * s_next * math.sqrt(1 - (s_next / s) ** 2))
        down = math.sqrt(s_next**2 - up**2)
        if down == 0 or prev is None:
            y_new = D + down * (y - D) / s
        else:
            h = math.log(s / down)
            slope = (D - prev[0]) / (math.log(prev[1]) - math.log(prev[2]))  # per unit lambda
            y_new = math.exp(-h) * y + (1 - math.exp(-h)) * D + (h - 1 + math.exp(-h)) * slope
        if up > 0:
            y_new = y_new + up * next(it)
        prev = (D, s, down)
        y = y_new
    return y


@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize("final_zero", [True, False])
def test_res_multistep_follows_its_formula(process, final_zero, z):
    ns = PROCESSES[process]
    grid = _grid(ns, 9, final_zero)
    assert _rel(_ours(ResMultistep(), ns, grid, z), _res_reference(_sigmas(grid), z)) < TOL
    # eta = 0: DPM-Solver++(2M) with the "heun" second-order term, no lower-order final steps.
    dpm = DPMSolverPP(order=2, solver_type="heun", lower_order_final=False)
    assert _rel(_ours(ResMultistep(), ns, grid, z), _ours(dpm, ns, grid, z)) < 1e-12


@pytest.mark.parametrize("process", list(PROCESSES))
def test_res_multistep_ancestral_follows_its_formula(process, z):
    ns = PROCESSES[process]
    grid = _grid(ns, 9, True)
    g = torch.Generator().manual_seed(2)
    noises = [torch.randn(32, 8, dtype=torch.float64, generator=g) for _ in range(grid.steps)]
    ours = _ours(SOLVERS.create("res_multistep_ancestral"), ns, grid, z, noises)
    assert _rel(ours, _res_reference(_sigmas(grid), z, eta=1.0, noises=noises)) < TOL


def _heunpp2_reference(sigmas, z):
    """Heun++ (ComfyUI heunpp2's rules): Euler on the last step, an Euler-Heun blend with weight
    sigma_{i+1} / (2 sigma_0) on the one before, and a three-slope blend with weights
    sigma_{i+1} / (3 sigma_0), sigma_{i+2} / (3 sigma_0) elsewhere."""
    y, last = z * sigmas[0], len(sigmas) - 1
    s0 = float(sigmas[0])
    for i in range(last):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        d = (y - _ve_model(y, s)) / s
        y1 = y + (s1 - s) * d
        if i + 1 == last:
            y = y1
            continue
        d1 = (y1 - _ve_model(y1, s1)) / s1
        if i + 2 == last:
            w = s1 / (2 * s0)
            y = y + (s1 - s) * ((1 - w) * d + w * d1)
            continue
        s2 = float(sigmas[i + 2])
        y2 = y1 + (s2 - s1) * d1
        d2 = (y2 - _ve_model(y2, s2)) / s2
        w1, w2 = s1 / (3 * s0), s2 / (3 * s0)
        y = y + (s1 - s) * ((1 - w1 - w2) * d + w1 * d1 + w2 * d2)
    return y


def _gradient_estimation_reference(sigmas, z, gamma):
    """Permenter & Yuan (arXiv 2306.04848) Algorithm 2 in VE sigma: the slope used is
    ``gamma d_i + (1 - gamma) d_{i-1}`` after the first step; the last step to 0 returns D."""
    y, d_prev = z * sigmas[0], None
    for i in range(len(sigmas) - 1):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        D = _ve_model(y, s)
        d = (y - D) / s
        if s1 == 0:
            y = D
        else:
            slope = d if d_prev is None else gamma * d + (1 - gamma) * d_prev
            y = y + (s1 - s) * slope
        d_prev = d
    return y


@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize("final_zero", [True, False])
def test_heunpp2_and_gradient_estimation_follow_their_formulas(process, final_zero, z):
    ns = PROCESSES[process]
    grid = _grid(ns, 8, final_zero)
    sigmas = _sigmas(grid)
    assert _rel(_ours(HeunPP2(), ns, grid, z), _heunpp2_reference(sigmas, z)) < TOL
    for gamma in (2.0, 1.5):
        ours = _ours(GradientEstimation(gamma=gamma), ns, grid, z)
        assert _rel(ours, _gradient_estimation_reference(sigmas, z, gamma)) < TOL


def test_registry_names_and_peer_aliases():
    expected = {"ipndm": IPNDM(), "ipndm_v": IPNDM(variable=True), "deis": DEIS(), "lms": LMS(),
                "res_multistep": ResMultistep(), "res_multistep_ancestral": ResMultistep(eta=1.0),
                "dpm_2": DPM2(), "dpm_2_ancestral": DPM2(eta=1.0), "heunpp2": HeunPP2(),
                "gradient_estimation": GradientEstimation()}
    for name, solver in expected.items():
        assert SOLVERS.create(name) == solver, name
    for alias, name in {"dpm2": "dpm_2", "dpm2_ancestral": "dpm_2_ancestral", "deis_multistep": "deis",
                        "ddpm": "euler_ancestral"}.items():
        assert SOLVERS.canonical(alias) == name


@pytest.mark.parametrize("bad", [dict(max_order=5), dict(max_order=0)])
def test_bad_options_name_the_value(bad):
    with pytest.raises(ValueError, match=str(list(bad.values())[0])):
        IPNDM(**bad)
    with pytest.raises(ValueError, match="basis"):
        DEIS(basis="t")
    with pytest.raises(ValueError, match="eta"):
        DPM2(eta=-1.0)


BREADTH = ["ipndm", "ipndm_v", "deis", "lms", "res_multistep", "res_multistep_ancestral", "dpm_2", "dpm_2_ancestral",
           "heunpp2", "gradient_estimation"]


@pytest.mark.parametrize("name", BREADTH)
def test_short_runs_and_flow_grids_from_t_1(name):
    """1-3 steps, and rectified-flow grids that start at t = 1 (alpha = 0, infinite VE sigma): finite
    samples and exactly nfe(grid) denoiser calls."""
    from diffsample.samplers import Sampler, SeededNoiseFn, seeded_noise
    from diffsample.solvers import STEP_SCHEDULES, RectifiedFlow

    solver = SOLVERS.create(name)
    noise = seeded_noise(range(16), (8,), dtype=torch.float64)
    for ns, schedule in ((RectifiedFlow(), STEP_SCHEDULES.create("flow_shift")), (LinearVP(), Karras())):
        calls = []
        den = GMM.denoiser(ns)

        class Counting:
            noise_schedule = ns

            def __call__(self, x, t, cond=None):
                calls.append(1)
                return den(x, t)

        for steps in (1, 2, 3):
            calls.clear()
            result = Sampler(solver, schedule, steps)(Counting(), noise,
                                                    noise_fn=SeededNoiseFn(range(16), (8,), dtype=torch.float64))
            assert torch.isfinite(result.x).all(), (name, ns, steps)
            assert len(calls) == solver.nfe(result.grid), (name, ns, steps)


def test_noise_acting_terms_switch_to_the_ancestral_forms():
    """A noise-acting guidance term (NoiseTilt, SVDD) runs res_multistep / dpm_2 as their ancestral forms."""
    from diffsample.samplers.stochastic_variant import stochastic_variant

    for name, ancestral in (("res_multistep", "res_multistep_ancestral"), ("dpm_2", "dpm_2_ancestral")):
        variant = stochastic_variant(name)
        assert SOLVERS.create(str(variant)) == SOLVERS.create(ancestral)
    assert stochastic_variant("ipndm") is None and stochastic_variant("deis") is None
