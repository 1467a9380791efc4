"""CSFlow step schedules (arXiv 2606.08833) and spectra.

G1: golden values of the paper's code on its ImageNet-256 spectrum (CSF, weights, grids).
G2: every step carries mixture mass 1/N; mix = 0 and shift = 1 is exactly uniform.
G3: an exact Gaussian random field (Wiener-filter denoiser): the retained-signal fraction equals the
    denoiser's transfer times alpha, and the CSF-weighted spectral error of csflow vs uniform.
G4: Euler and Heun keep their convergence order on a csflow grid (2-D Gaussian mixture).
Plus the time conversion to VP / VE / flow schedules, RAPSD identities, spectrum files, bad input,
and the run paths (generate, CLI, attach, native loop).
"""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from diffsample.samplers import Sampler
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, VE, DiscreteVP, Grid, LinearVP, RectifiedFlow
from diffsample.solvers.csflow import (CSFlow, CSFlowSpectrumWarning, barten_csf, csflow_quantiles, mixed_cdf,
                                       pixels_per_degree, retained_signal)
from diffsample.solvers.spectrum import Spectrum, bundled_spectra, load_spectrum, radial_bins, rapsd, save_spectrum
from diffsample.testbed.gmm import GaussianMixture

# The paper's code starts at pure noise (u = 0); t_max_finite = 1 - 1e-12 is that point to 1e-12.
FLOW = RectifiedFlow(t_min=1e-3, t_max=1.0, t_max_finite=1 - 1e-12)
SCHEDULES = {
    "discreteVP": DiscreteVP.from_config({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
    "LinearVP": LinearVP(),
    "VE": VE(),
    "flow": RectifiedFlow(),
}


def jit_grid(schedule: CSFlow, n: int) -> np.ndarray:
    """The grid in the paper's time u (0 noise, 1 clean) on FLOW: u = 1 - t, clean end appended."""
    return np.append(1.0 - schedule(FLOW, n).numpy(), 1.0)


# ---- G1: golden values -----------------------------------------------------------------------------

def test_g1_barten_csf_and_geometry():
    u = np.array([0.5, 1, 2, 2.33, 4, 8, 16, 32, 50])
    golden = np.array([334.60, 555.20, 708.19, 714.90, 644.83, 406.54, 167.50, 29.32, 2.48])
    np.testing.assert_allclose(barten_csf(u), golden, rtol=1e-3, atol=0.005)  # golden values carry 2 decimals
    assert barten_csf(0.0) == 0.0
    assert pixels_per_degree() == pytest.approx(76.55, rel=1e-3)  # 0.0130634 degrees per pixel
    assert 0.5 * pixels_per_degree() == pytest.approx(38.3, rel=1e-3)


@pytest.mark.parametrize("options, golden", [
    (dict(mix=1.0), [0, .0840, .1444, .2028, .2626, .3260, .3950, .4729, .5653, .6871, 1]),
    (dict(mix=0.4), [0, .0918, .1703, .2486, .3296, .4152, .5071, .6075, .7196, .8482, 1]),
    (dict(mix=0.4, shift=3.0), [0, .0492, .0999, .1548, .2157, .2841, .3626, .4549, .5684, .7210, 1]),
])
def test_g1_schedules_n10(options, golden):
    grid = jit_grid(CSFlow(spectrum="imagenet_256", **options), 10)
    np.testing.assert_allclose(grid, golden, rtol=1e-3, atol=6e-5)  # golden values carry 4 decimals


def test_g1_weight_density_and_quarter_masses():
    w = CSFlow(spectrum="imagenet_256").weights(FLOW)
    assert w.shape == (500,) and w.sum() == pytest.approx(1.0, abs=1e-12)
    density = w * w.size  # relative to uniform
    mid = (np.arange(w.size) + 0.5) / w.size
    assert density.max() == pytest.approx(1.72, rel=3e-3)
    assert mid[density.argmax()] == pytest.approx(0.17, abs=0.006)
    for u, value in ((0.5, 1.13), (0.8, 0.41), (0.99, 0.048)):
        assert np.interp(u, mid, density) == pytest.approx(value, rel=1e-2)
    quarters = w.reshape(4, -1).sum(1)
    np.testing.assert_allclose(quarters, [0.379, 0.352, 0.206, 0.062], rtol=1e-2)


def test_g1_half_signal_frequencies():
    """The frequency bin where r is closest to 1/2 at u = 0.1 .. 0.9, in cycles per degree."""
    spec = load_spectrum("imagenet_256")
    f_cpd = spec.frequency_cpp * pixels_per_degree()
    for u, golden in zip((0.1, 0.3, 0.5, 0.7, 0.9), (1.06, 2.33, 4.86, 9.51, 31.9)):
        r = retained_signal(spec, np.array([u]))[0]  # decreasing in f
        f_half = f_cpd[np.argmin(np.abs(r - 0.5))]  # centre of the bin closest to one half
        assert f_half == pytest.approx(golden, rel=3e-3), (u, f_half)


@pytest.mark.parametrize("name, peak", [("imagenet_512", 0.195), ("blip3o_60k_512", 0.221)])
def test_g1_other_official_spectra_peaks(name, peak):
    w = CSFlow(spectrum=name).weights(FLOW)
    assert (np.argmax(w) + 0.5) / w.size == pytest.approx(peak, abs=0.006)


# ---- time conversion -------------------------------------------------------------------------------

def test_flow_time_is_one_minus_the_papers_time():
    """On a rectified flow x_t = (1 - t) x0 + t eps, csflow's t is 1 - u (u: the paper's, 1 = clean)."""
    s = CSFlow(spectrum="imagenet_256")
    u = csflow_quantiles(s.weights(FLOW), 10, 0.4, 1.0)[:-1]
    np.testing.assert_allclose(s(FLOW, 10).numpy(), 1.0 - u, atol=1e-9)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("base", ["flow", "model"])
def test_other_processes_get_the_same_noise_levels(name, base):
    """Every Gaussian path is a rescaled flow at u = alpha / (alpha + sigma) = 1 / (1 + sigma/alpha):
    on any schedule the csflow points have the VE sigma (1 - u) / u of the grid computed directly in u
    over the same range (base=flow), or are the inverse-CDF points of the weights on a uniform grid in
    the model's time (base=model)."""
    ns = SCHEDULES[name]
    s = CSFlow(spectrum="imagenet_256", base=base)
    t = s(ns, 8)
    w = s.weights(ns)
    v = csflow_quantiles(w, 8, 0.4, 1.0)[:-1]
    top = ns.t_max_finite
    if base == "flow":
        a, sg = ns.alpha(torch.tensor(top, dtype=torch.float64)), ns.sigma(torch.tensor(top, dtype=torch.float64))
        u_lo = float(a / (a + sg))
        u = u_lo + (1 - u_lo) * v
        np.testing.assert_allclose(ns.sigma_ve(t).numpy(), (1 - u) / u, rtol=1e-6)
    else:
        np.testing.assert_allclose(t.numpy(), top - (top - ns.t_zero) * v, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("base", ["flow", "model"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 400, 2000])
def test_contract_any_n(name, base, n):
    ns = SCHEDULES[name]
    t = CSFlow(spectrum="mnist", base=base)(ns, n)
    assert t.shape == (n,) and t.dtype == torch.float64
    assert t[0] == ns.t_max_finite
    assert (t >= ns.t_min).all() and (t <= ns.t_max).all()
    lam = ns.lambda_(t)
    assert (lam[1:] > lam[:-1]).all()


def test_model_base_without_mix_is_time_uniform_trailing():
    """base=model, mix=0: the continuous trailing grid (t_max .. t_zero in n equal steps, clean end dropped)."""
    ns = SCHEDULES["discreteVP"]
    t = CSFlow(mix=0.0, spectrum="mnist", base="model")(ns, 10)
    np.testing.assert_allclose(t.numpy(), np.linspace(999, 0, 11)[:-1], atol=1e-9)


def test_viewing_geometry_moves_weight():
    """More pixels per degree puts the CSF peak at lower cycles per pixel, generated earlier (noisier)."""
    near, far = CSFlow(spectrum="imagenet_256", pixels_per_degree=20.0), CSFlow(spectrum="imagenet_256",
                                                                                pixels_per_degree=300.0)
    mean_u = lambda s: float((s.weights(FLOW) * (np.arange(500) + 0.5) / 500).sum())  # noqa: E731
    assert mean_u(far) < mean_u(CSFlow(spectrum="imagenet_256")) < mean_u(near)
    same = CSFlow(spectrum="imagenet_256", pixel_size=0.000114 * 2, viewing_distance=1.0)
    np.testing.assert_allclose(same(FLOW, 6), CSFlow(spectrum="imagenet_256")(FLOW, 6), atol=1e-12)


# ---- G2: inverse-CDF property ----------------------------------------------------------------------

@pytest.mark.parametrize("mix", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_g2_every_step_carries_mass_one_over_n(mix, shift):
    w = CSFlow(spectrum="imagenet_256").weights(FLOW)
    cdf, grid = mixed_cdf(w, mix, shift), np.linspace(0, 1, w.size + 1)
    for n in (1, 2, 5, 10, 37, 100):
        v = csflow_quantiles(w, n, mix, shift)
        mass = np.diff(np.interp(v, grid, cdf))
        np.testing.assert_allclose(mass, 1.0 / n, atol=1e-6)


def test_g2_mix0_shift1_is_exactly_uniform():
    w = CSFlow(spectrum="imagenet_256").weights(FLOW)
    for n in (1, 4, 10, 33):
        assert np.array_equal(csflow_quantiles(w, n, 0.0, 1.0), np.linspace(0, 1, n + 1))
    # on a flow: n equal steps in t from the noisiest point to the clean end
    flow = RectifiedFlow(t_min=1e-3, t_max=0.98, t_max_finite=0.98)
    np.testing.assert_allclose(CSFlow(mix=0.0, spectrum="mnist")(flow, 9).numpy(), np.linspace(0.98, 0, 10)[:-1],
                               atol=1e-12)


def test_shift_matches_sd3_time_shift():
    """mix=0 with shift s: the equal quantiles q of s v / (1 + (s - 1) v), i.e. SD3's shifted grid
    t = s tau / (1 + (s - 1) tau) with tau = 1 - q on a flow from pure noise (to the accuracy of the
    piecewise-linear CDF on the 500-interval fine grid, as in the paper's code)."""
    q = np.linspace(0, 1, 8)[:-1]
    tau = 1 - q
    np.testing.assert_allclose(CSFlow(mix=0.0, shift=3.0, spectrum="mnist")(FLOW, 7).numpy(),
                               3 * tau / (1 + 2 * tau), atol=1e-5)


# ---- G3: Gaussian random field ---------------------------------------------------------------------

def field(size=32, amplitude=1e-3, f0=0.01):
    index, centres = radial_bins(size, size)
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2)
    power = amplitude * (f + f0) ** -2.0
    counts = np.bincount(index.ravel(), minlength=centres.size)
    ring = lambda a: np.bincount(index.ravel(), weights=a.ravel(), minlength=centres.size) / counts  # noqa: E731
    return power, ring, centres


def test_g3_retained_signal_is_wiener_transfer_times_alpha():
    power, ring, centres = field()
    p_ring = ring(power)
    spec = Spectrum(centres, p_ring, np.ones_like(p_ring))
    for u in (0.05, 0.3, 0.6, 0.9):
        ns = RectifiedFlow()
        t = torch.tensor(1 - u, dtype=torch.float64)
        a, s = float(ns.alpha(t)), float(ns.sigma(t))
        transfer = a * p_ring / (a * a * p_ring + s * s)  # the exact denoiser's gain per frequency
        # equal up to the paper's 1e-6 regulariser in the denominator
        bound = 1.01e-6 / (a * a * p_ring + s * s) * a * transfer
        assert (np.abs(retained_signal(spec, np.array([u]))[0] - a * transfer) <= bound).all()


def g3_errors(spec_path, solver, n, mix):
    power, ring, centres = field()
    flat = torch.as_tensor(power.ravel())
    ns = RectifiedFlow()

    class Wiener:
        noise_schedule = ns

        def __call__(self, x, t, cond=None):
            a, s = ns.alpha(t[:1]).item(), ns.sigma(t[:1]).item()
            return x * (a * flat / (a * a * flat + s * s))

    out = Sampler(SOLVERS.create(solver), CSFlow(mix=mix, spectrum=str(spec_path)), n)(
        Wiener(), torch.ones(1, flat.numel(), dtype=torch.float64))
    gen = ring(out.x[0].numpy().reshape(power.shape) ** 2)  # unit noise in every mode: exact spectrum
    rel = np.abs(gen - ring(power)) / ring(power)
    csf = barten_csf(centres * pixels_per_degree())
    return float((csf * rel).sum() / csf.sum())


@pytest.fixture(scope="module")
def field_spectrum(tmp_path_factory):
    power, ring, centres = field()
    return save_spectrum(Spectrum(centres, ring(power), np.ones(centres.size), name="field"),
                         tmp_path_factory.mktemp("g3") / "field.json")


def test_g3_machinery_converges_to_the_field_spectrum(field_spectrum):
    for mix in (0.0, 0.4):
        assert g3_errors(field_spectrum, "dpmpp_2m", 400, mix) < 0.01


def test_g3_csflow_vs_uniform(field_spectrum):
    """Measured (benchmarks/csflow_mnist.py --phase g3 has the 64 x 64 version): with Heun (EDM form,
    the paper's solver family) csflow lowers the CSF-weighted spectral error at every N = 4..10, by
    shortening the huge first step Heun overshoots on; with Euler the uniform grid is lower (csflow's
    last step starts noisier and blurs the visible mid frequencies)."""
    for n in range(4, 11):
        heun = g3_errors(field_spectrum, "heun", n, 0.4) / g3_errors(field_spectrum, "heun", n, 0.0)
        euler = g3_errors(field_spectrum, "euler", n, 0.4) / g3_errors(field_spectrum, "euler", n, 0.0)
        assert heun < 0.8, (n, heun)
        assert euler > 1.0, (n, euler)


# ---- G4: convergence order on a csflow grid ---------------------------------------------------------

@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2)])
@pytest.mark.parametrize("ns", [RectifiedFlow(), SCHEDULES["discreteVP"]], ids=["flow", "discreteVP"])
def test_g4_order_kept(name, order, ns):
    gmm = GaussianMixture.random(dim=2, components=8, seed=3)
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    schedule = CSFlow(spectrum="imagenet_256")
    ref = Sampler(SOLVERS.create("heun"), schedule, 512)(gmm.denoiser(ns), noise).x  # error ~ 1/64 of Heun's at 64
    steps = [8, 16, 32, 64]
    errors = [float((Sampler(SOLVERS.create(name), schedule, n)(gmm.denoiser(ns), noise).x - ref).pow(2).mean().sqrt())
              for n in steps]
    slope = -np.polyfit(np.log(steps[1:]), np.log(errors[1:]), 1)[0]  # 8 steps: pre-asymptotic
    assert abs(slope - order) < 0.25, (slope, errors)


# ---- Heun (EDM form) on a csflow grid ---------------------------------------------------------------

def test_heun_extrapolates_the_denoised_estimates_on_csflow_first_step():
    """Why ``heun`` fails on csflow grids at few steps (docs/methods/csflow.md, Heun). ``heun`` is EDM's
    trapezoid in the VE sigma: on a step ``s0 -> s1`` (ratio ``r = s0 / s1``) with denoised estimates
    ``D0`` at the start and ``D1`` at the Euler-predicted point its update is exactly
    ``y1 = D0 + (r - 1) / 2 (D1 - D0) + (s1 / s0) (y0 - D0)`` (``y = x / alpha``): for ``r > 3`` it
    extrapolates past ``D1``. csflow's grid is uniform in flow time, so its first step from the
    DDPM schedule's ``s = 157`` is a ratio of ~12 at 10 steps (the extrapolation weight 5.5), where
    ``D`` changes most (from about the data mean to a blurred digit); karras' is 1.8."""
    ns = SCHEDULES["discreteVP"]
    t = CSFlow(spectrum="mnist")(ns, 10)
    grid = Grid.from_t(ns, t, final_zero=True)
    d0, d1 = torch.full((1, 3), 0.2, dtype=torch.float64), torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64)
    x0 = torch.tensor([[3.0, -7.0, 11.0]], dtype=torch.float64)

    def denoise(x, t_, cond=None):
        return d0 if abs(float(t_.flatten()[0]) - grid.t_list[0]) < 1e-9 else d1

    x1, _ = SOLVERS.create("heun").step(denoise, x0, grid, 0, None)
    s0, s1 = grid.sigma_list[0] / grid.alpha_list[0], grid.sigma_list[1] / grid.alpha_list[1]
    r = s0 / s1
    expected = d0 + (r - 1) / 2 * (d1 - d0) + (s1 / s0) * (x0 / grid.alpha_list[0] - d0)
    torch.testing.assert_close(x1 / grid.alpha_list[1], expected, rtol=1e-12, atol=1e-12)
    assert r > 10  # csflow: s 157 -> 13
    karras = STEP_SCHEDULES.create("karras")(ns, 10)
    sk = (ns.sigma(karras) / ns.alpha(karras))[:2]
    assert float(sk[0] / sk[1]) < 3  # karras: s 157 -> 86, an interpolation


# ---- RAPSD ------------------------------------------------------------------------------------------

def test_rapsd_parseval_and_rings():
    """Ring means times ring sizes sum to sum |FFT|^2 / (H W) = sum x^2 (Parseval), image by image."""
    x = torch.randn(3, 1, 12, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    index, centres = radial_bins(12, 20)
    counts = np.bincount(index.ravel(), minlength=centres.size)
    for k in range(3):
        _, p = rapsd(x[k:k + 1])
        assert (p * counts).sum() == pytest.approx(float((x[k] ** 2).sum()), rel=1e-10)
    assert centres.size == 10 and centres[0] > 0
    assert centres[-1] < math.hypot(0.5, 0.5)


def test_rapsd_of_a_cosine_and_of_white_noise():
    h = w = 16
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    img = np.cos(2 * np.pi * 3 * xx / w)[None]  # all power at |f| = 3/16 cycles per pixel
    f, p = rapsd(img)
    index, centres = radial_bins(h, w)
    k = index[0, 3]
    assert p[k] == pytest.approx(2 * (h * w / 2) ** 2 / (h * w) / (index == k).sum())
    assert np.delete(p, k).max() < 1e-20
    noise = torch.randn(4000, 16, 16, generator=torch.Generator().manual_seed(0))
    _, pn = rapsd(noise)
    np.testing.assert_allclose(pn, 1.0, rtol=0.06)


def test_rapsd_luma_and_latent_channels():
    rgb = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    np.testing.assert_allclose(rapsd(rgb)[1], rapsd(luma)[1], rtol=1e-12)
    four = torch.rand(5, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    np.testing.assert_allclose(rapsd(four)[1], np.mean([rapsd(four[:, c])[1] for c in range(4)], axis=0), rtol=1e-12)


def test_load_images_folder_and_npz(tmp_path):
    from PIL import Image

    from diffsample.solvers.spectrum import load_images

    g = np.random.default_rng(0)
    grey = (g.random((3, 18, 21)) * 255).astype(np.uint8)
    for k, a in enumerate(grey):
        Image.fromarray(a).save(tmp_path / f"{k}.png")
    x = load_images(tmp_path, resolution=16)
    assert x.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(x[:, 0].numpy(), grey[:, 1:17, 2:18] / 127.5 - 1, atol=1e-6)  # centre crop
    assert load_images(tmp_path).shape == (3, 1, 18, 18)  # default: the smallest side
    Image.fromarray((g.random((18, 21, 3)) * 255).astype(np.uint8)).save(tmp_path / "rgb.png")
    assert load_images(tmp_path, max_images=4).shape == (4, 3, 18, 18)  # one RGB file: all read as RGB
    np.savez(tmp_path / "a.npz", floats=g.random((5, 8, 8, 3)).astype(np.float32) * 2 - 1)
    y = load_images(tmp_path / "a.npz")
    assert y.shape == (5, 3, 8, 8) and y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match="resolution 40"):
        load_images(tmp_path, resolution=40)
    with pytest.raises(ValueError, match="no array 'x'"):
        load_images(tmp_path / "a.npz", key="x")


def test_bundled_mnist_spectrum_is_the_heldout_digits():
    from diffsample.testbed.mnist import load_digits

    spec = load_spectrum("mnist")
    x, _ = load_digits("heldout")
    f, p = rapsd(x)
    np.testing.assert_allclose(spec.rapsd_data, p, rtol=1e-12)
    np.testing.assert_allclose(spec.frequency_cpp, f, rtol=1e-12)
    assert spec.provenance["command"].startswith("diffsample spectrum") and spec.provenance["date"]
    assert set(bundled_spectra()) >= {"mnist", "imagenet_256", "imagenet_512", "blip3o_60k_512"}


# ---- bad input ---------------------------------------------------------------------------------------

def _spectrum_file(tmp_path, **change):
    data = json.loads(json.dumps(load_spectrum("mnist").to_json()))
    data.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("spec, words", [
    ("csflow:mix=-0.1", ["mix", "[0, 1]", "-0.1"]),
    ("csflow:mix=1.5", ["mix", "[0, 1]", "1.5"]),
    ("csflow:shift=0", ["shift", "> 0"]),
    ("csflow:pixels_per_degree=-3", ["pixels_per_degree", "> 0"]),
    ("csflow:pixels_per_degree=30,viewing_distance=1", ["pixels_per_degree", "not both"]),
    ("csflow:viewing_distance=0", ["viewing_distance", "> 0"]),
    ("csflow:base=sigma", ["base", "flow", "model"]),
    ("csflow:spectrum=imagenet_1024", ["spectrum", "imagenet_1024", "imagenet_256", "mnist"]),
])
def test_bad_options(spec, words):
    with pytest.raises(ValueError) as err:
        STEP_SCHEDULES.create(spec)
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_bad_spectrum_files(tmp_path):
    n = len(load_spectrum("mnist").rapsd_data)
    cases = [
        (dict(rapsd_data=[float("nan")] + [1.0] * (n - 1)), "NaN"),
        (dict(rapsd_data=[0.0] * n), "zero"),
        (dict(rapsd_noise=[1.0] * (n - 1)), "mismatched lengths"),
        (dict(frequency_cpp=[0.3] * n), "increasing"),
    ]
    for change, words in cases:
        with pytest.raises(ValueError, match=words) as err:
            CSFlow(spectrum=_spectrum_file(tmp_path, **change))
        assert "spectrum" in str(err.value)
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(ValueError, match="spectrum.*JSON"):
        CSFlow(spectrum=str(tmp_path / "notjson.json"))


def test_n_checked():
    with pytest.raises(ValueError, match="integer >= 1"):
        CSFlow(spectrum="mnist")(FLOW, 0)


# ---- default spectrum, the run layer and the CLI ------------------------------------------------------

def test_default_spectrum_warns_once_per_grid_and_has_a_note():
    s = STEP_SCHEDULES.create("csflow")
    assert "imagenet_256" in s.note and s.spectrum_data.name == "imagenet_256"
    with pytest.warns(CSFlowSpectrumWarning, match="no spectrum given; using the bundled imagenet_256"):
        s(FLOW, 4)
    assert STEP_SCHEDULES.create("csflow:spectrum=mnist").note is None


def test_schedule_for_model_uses_the_bundled_spectrum():
    from diffsample.run.generate import schedule_for_model

    assert schedule_for_model("csflow", None) == "csflow:spectrum=mnist"
    assert schedule_for_model("csflow:mix=1", "mnist") == "csflow:mix=1,spectrum=mnist"
    assert schedule_for_model("csflow:spectrum=imagenet_512", "mnist") == "csflow:spectrum=imagenet_512"
    assert schedule_for_model("csflow", "/some/folder") == "csflow"
    assert schedule_for_model("karras", None) == "karras"


def test_generate_records_spectrum_and_note():
    from diffsample.run.generate import generate

    with warnings.catch_warnings():
        warnings.simplefilter("error", CSFlowSpectrumWarning)
        r = generate(None, solver="dpmpp_2m", schedule="csflow", steps=3, num_samples=2)
    assert r.record["schedule"] == "csflow:spectrum=mnist" and r.record["notes"] == []
    assert r.record["nfe"] == 3 and torch.isfinite(r.samples).all()


def test_cli_generate_and_spectrum(tmp_path):
    from click.testing import CliRunner

    from diffsample.cli.main import main

    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(main, ["generate", "--schedule", "csflow:mix=1", "--steps", "3", "--num-samples", "2",
                               "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["schedule"] == "csflow:mix=1,spectrum=mnist"
    bad = runner.invoke(main, ["generate", "--schedule", "csflow:mix=-1", "--steps", "3", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "mix" in bad.output and not (tmp_path / "b").exists()
    npz = tmp_path / "imgs.npz"
    np.savez(npz, images=(np.random.default_rng(0).random((20, 12, 12)) * 255).astype(np.uint8))
    res = runner.invoke(main, ["spectrum", str(npz), "--out", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    spec = load_spectrum(tmp_path / "s.json")
    assert spec.frequency_cpp.size == 6 and spec.provenance["num_images"] == 20
    assert spec.provenance["command"].startswith("diffsample spectrum")
    res = runner.invoke(main, ["spectrum", str(tmp_path / "missing"), "--out", str(tmp_path / "m.json")])
    assert res.exit_code == 2 and not (tmp_path / "m.json").exists()
    res = runner.invoke(main, ["spectrum", str(npz), "--out", str(tmp_path / "c.json"), "--resolution", "64"])
    assert res.exit_code == 2 and "resolution" in res.output and not (tmp_path / "c.json").exists()


# ---- latent models: VAE-latent spectra, pipeline spacing, native loop and attach ------------------------

@pytest.fixture(scope="module")
def tiny():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffsample.testbed import tiny_pipelines as tp

    return {family: tp.build(family) for family in ("sd", "sd3")}


def _digits(n=24):
    from diffsample.testbed.mnist import load_digits

    return load_digits("heldout")[0][:n]


def test_latent_spectrum_of_normalised_latents(tiny):
    from diffsample.pipelines.spectrum import latent_spectrum, vae_factor

    pipe = tiny["sd3"]
    images = _digits()
    spec = latent_spectrum(pipe, images, name="sd3_tiny")
    with torch.no_grad():  # independently: the encoder's mean, SD3's shift and scale, RAPSD per channel
        z = pipe.vae.encode(images.expand(-1, 3, -1, -1)).latent_dist.mean
    z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    f, p = rapsd(z, channels="mean")
    assert vae_factor(pipe.vae) == 2 and spec.provenance["latent_factor"] == 2
    np.testing.assert_allclose(spec.frequency_cpp, f / 2, rtol=1e-12)
    np.testing.assert_allclose(spec.rapsd_data, p, rtol=1e-5)
    assert (spec.rapsd_noise == 1).all() and spec.provenance["image_size"] == 16


def test_pipeline_spacing(tiny):
    from diffsample.pipelines.spectrum import csflow_for_pipeline, pipeline_spacing

    assert pipeline_spacing(tiny["sd"]) == {"base": "model"}
    assert pipeline_spacing(tiny["sd3"], 16, 16) == {"base": "flow", "shift": tiny["sd3"].scheduler.config.shift}
    s = csflow_for_pipeline(tiny["sd3"], spectrum="mnist", height=16, width=16, mix=0.0)
    from diffsample.pipelines import PipelineDenoiser

    ns = PipelineDenoiser.from_pipeline(tiny["sd3"]).process.noise_schedule
    q = np.linspace(0, 1, 7)[:-1]
    v = q / (3 - 2 * q)  # the pipeline's shift-3 spacing, uniform from t_max_finite to the clean end
    np.testing.assert_allclose(s(ns, 6).numpy(), ns.t_max_finite * (1 - v), atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_native_loop_and_attach_run_csflow(tiny, family, tmp_path):
    """csflow on a latent pipeline: the native loop evaluates at csflow's points, and attach (the
    pipeline's own loop with the shim) gives the same latents."""
    from diffsample import attach, detach
    from diffsample.pipelines import PipelineDenoiser, sample_pipeline
    from diffsample.pipelines.spectrum import csflow_for_pipeline, latent_spectrum
    from diffsample.testbed import tiny_pipelines as tp

    pipe = tiny[family]
    path = save_spectrum(latent_spectrum(pipe, _digits(), name=family), tmp_path / f"{family}.json")
    schedule = csflow_for_pipeline(pipe, spectrum=str(path), height=16, width=16)
    kw = tp.call_kwargs(family, steps=5, batch=2)
    extra = {k: kw[k] for k in ("max_sequence_length",) if k in kw}
    out = sample_pipeline(pipe, kw["prompt"], solver="dpmpp_2m", schedule=schedule, steps=5, num_images_per_prompt=2,
                          cfg_scale=kw["guidance_scale"], height=16, width=16, output_type="latent",
                          generator=torch.Generator().manual_seed(0), **extra)
    ns = PipelineDenoiser.from_pipeline(pipe).process.noise_schedule
    np.testing.assert_allclose(out.result.grid.t[:-1].numpy(), schedule(ns, 5).numpy(), rtol=1e-12)
    attach(pipe, "dpmpp_2m", schedule=schedule)
    try:
        ours = torch.as_tensor(pipe(**kw, generator=torch.Generator().manual_seed(0)).images).float()
        assert pipe.scheduler.report()["nfe"] == 5
    finally:
        detach(pipe)
    # SD3: attach and the native loop differ by ~1e-3 for every schedule that starts at t_max_finite
    # (karras and lambda_uniform too); flow_shift, which starts at t = 1, agrees to 1e-6.
    tol = 2e-3 if family == "sd3" else 1e-4
    assert float((ours - out.latents.float()).norm() / out.latents.float().norm()) < tol


def test_cli_spectrum_of_pipeline_latents(tiny, tmp_path):
    from click.testing import CliRunner

    from diffsample.cli.main import main
    from diffsample.pipelines.spectrum import latent_spectrum

    folder = tmp_path / "sd3"
    tiny["sd3"].save_pretrained(folder, safe_serialization=True)
    npz = tmp_path / "digits.npz"
    np.savez(npz, images=np.load(__import__("diffsample").testbed.mnist.data.HELDOUT_NPZ)["images"][:24])
    res = CliRunner().invoke(main, ["spectrum", str(npz), "--pipeline", str(folder), "--out", str(tmp_path / "l.json")])
    assert res.exit_code == 0, res.output
    spec = load_spectrum(tmp_path / "l.json")
    ref = latent_spectrum(tiny["sd3"], _digits())
    np.testing.assert_allclose(spec.rapsd_data, ref.rapsd_data, rtol=1e-5)
    assert spec.provenance["pipeline"] == str(folder) and spec.provenance["latent_factor"] == 2
