"""CSFlow perceptual step schedules (Galinska, Pogodzinski & Lenssen, arXiv 2606.08833).

Denoising generates low spatial frequencies first. CSFlow spends a run's steps where the
frequencies a human viewer sees best are generated:

1. From the data spectrum ``P_d(f)`` and the noise spectrum ``P_n(f)`` (:mod:`.spectrum`), the
   fraction of frequency ``f``'s power that is signal at noise level ``s = sigma / alpha`` is
   ``r(f, u) = u^2 P_d / (u^2 P_d + (1 - u)^2 P_n + 1e-6)``, written in the time ``u = 1 / (1 + s)``
   (``u = 0`` pure noise, ``u = 1`` clean; ``x_t / (alpha + sigma) = u x0 + (1 - u) eps`` for every
   Gaussian path, so ``u`` is the flow-matching time of the paper's code, read backwards).
   ``u`` and ``1 - u`` are clipped to ``[1e-6, 1]``, and ``r`` to ``[0, 1]``.
2. A fine grid of ``M = 500`` equal intervals from the noisy end to the clean end; in interval
   ``i`` the signal generated is ``dr_i(f) = max(r(f, end) - r(f, start), 0)``.
3. Each interval's weight is the average contrast sensitivity of the frequencies it generates,
   ``w_i = int CSF(f) dr_i(f) df / int dr_i(f) df`` (trapezoid rule over ``f`` in cycles per
   degree), normalised to sum 1. ``CSF`` is Barten's model (:func:`barten_csf`); cycles per pixel
   become cycles per degree through the viewing geometry (:func:`pixels_per_degree`).
4. The step CDF mixes the weights' CDF with the default spacing's,
   ``mix * cumsum(w) + (1 - mix) * shift v / (1 + (shift - 1) v)`` (``v`` in [0, 1] along the fine
   grid; ``shift > 1`` concentrates the default spacing at the noisy end like SD3's shift), and
   the ``N`` steps are its equal quantiles: every step carries mass ``1 / N``.

The fine grid is uniform in ``u`` (``base="flow"``, the paper's code: for a rectified flow
``x_t = (1 - t) x0 + t eps``, ``t = 1 - u``) or uniform in the model's own time variable
(``base="model"``: diffusers timesteps for a discrete VP model, whose default spacing is then the
time-uniform one). ``r`` depends on the noise level only, so both bases use the same physics; they
differ in the default spacing and in the measure the weights are masses of. The grid starts at the
noisiest time with a finite log-SNR, ``t_max_finite`` (``t_max``, except on a rectified flow that
reaches pure noise: there ``1 - 1e-3`` by default, where the paper's code starts at pure noise), so
that every solver, Heun's VE-coordinate step included, can take the first step; the fine grid runs
from ``u = alpha / (alpha + sigma)`` there to 1.
Times map back to the model through the VE sigma ``s = (1 - u) / u`` (``t_from_sigma_ve``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from diffsample.solvers.solver import NoiseSchedule
from diffsample.solvers.spectrum import Spectrum, bundled_spectra, load_spectrum
from diffsample.solvers.step_schedules import check_steps

PIXEL_SIZE = 0.000114
"""Default pixel pitch in metres (0.114 mm; the paper's display)."""
VIEWING_DISTANCE = 0.5
"""Default viewing distance in metres."""
FINE_INTERVALS = 500
"""Intervals ``M`` of the fine grid the weights are computed on."""
DEFAULT_SPECTRUM = "imagenet_256"
"""The spectrum used when none is given (the paper's ImageNet 256 x 256 spectrum)."""
BASES = ("flow", "model")


class CSFlowSpectrumWarning(UserWarning):
    """csflow ran without a spectrum and used :data:`DEFAULT_SPECTRUM`."""


def barten_csf(u: np.ndarray | float) -> np.ndarray:
    """Barten's contrast sensitivity at spatial frequency ``u`` (cycles per degree, >= 0).

    ``CSF(u) = (M_opt(u) / k) / sqrt((2 / T) (1/X0^2 + 1/Xmax^2 + u^2/Nmax^2) (1/(n p E) +
    phi0 / (1 - exp(-(u/u0)^2))))`` with ``M_opt(u) = exp(-2 pi^2 sigma^2 u^2)``, ``sigma = 0.5/60``
    deg, ``k = 3``, ``T = 0.1`` s, ``X0 = 60`` deg, ``Xmax = 12`` deg, ``Nmax = 15`` cycles,
    ``n = 0.03``, ``p = 1.2e6`` photons / (s deg^2 Td), ``E = 500`` Td, ``phi0 = 3e-8`` s deg^2,
    ``u0 = 7`` cpd (Barten 1999; the parameters of arXiv 2606.08833). ``CSF(0) = 0`` (the lateral
    inhibition term diverges there). Peak about 715 near 2.3 cpd.

    Returns:
        float64 array shaped like ``u``.
    """
    u = np.asarray(u, dtype=np.float64)
    out = np.zeros_like(u)
    pos = u > 0
    v = u[pos]
    m_opt = np.exp(-2 * np.pi**2 * (0.5 / 60) ** 2 * v**2)
    eye = 2 / 0.1 * (1 / 60**2 + 1 / 12**2 + v**2 / 15**2)
    noise = 1 / (0.03 * 1.2e6 * 500) + 3e-8 / -np.expm1(-((v / 7) ** 2))
    out[pos] = (m_opt / 3.0) / np.sqrt(eye * noise)
    return out


def pixels_per_degree(pixel_size: float = PIXEL_SIZE, viewing_distance: float = VIEWING_DISTANCE) -> float:
    """Pixels per degree of visual angle of pixels ``pixel_size`` metres wide seen from
    ``viewing_distance`` metres: ``1 / degrees(2 atan(pixel_size / (2 viewing_distance)))``
    (76.55 at the defaults, so 0.5 cycles per pixel is 38.3 cycles per degree).

    Raises:
        ValueError: a size or distance that is not a finite number > 0.
    """
    for label, value in (("pixel_size", pixel_size), ("viewing_distance", viewing_distance)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"csflow {label} must be a finite number > 0 (metres), got {value!r}")
    return 1.0 / math.degrees(2 * math.atan(pixel_size / (2 * viewing_distance)))


def retained_signal(spectrum: Spectrum, u: np.ndarray) -> np.ndarray:
    """``r(f, u)``, the signal fraction of each frequency at times ``u`` (0 noise, 1 clean): shape
    ``(len(u), F)`` (module docstring, step 1)."""
    u = np.asarray(u, dtype=np.float64)[:, None]
    a2 = np.clip(u, 1e-6, 1.0) ** 2
    s2 = np.clip(1.0 - u, 1e-6, 1.0) ** 2
    signal = a2 * spectrum.rapsd_data[None, :]
    return np.clip(signal / (signal + s2 * spectrum.rapsd_noise[None, :] + 1e-6), 0.0, 1.0)


def interval_weights(spectrum: Spectrum, u_nodes: np.ndarray, ppd: float) -> np.ndarray:
    """Normalised CSF weight of each interval between consecutive ``u_nodes`` (increasing, 0 noise ->
    1 clean): shape ``(len(u_nodes) - 1,)``, summing to 1 (module docstring, steps 2-3).

    An interval that generates no signal (``dr = 0`` at every frequency) gets weight 0.

    Raises:
        ValueError: every interval has weight 0 (a spectrum the CSF cannot see at ``ppd``).
    """
    f_cpd = spectrum.frequency_cpp * ppd
    dr = np.maximum(np.diff(retained_signal(spectrum, u_nodes), axis=0), 0.0)
    num = _trapezoid(dr * barten_csf(f_cpd)[None, :], f_cpd)
    den = _trapezoid(dr, f_cpd)
    w = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    total = w.sum()
    if not (np.isfinite(total) and total > 0):
        raise ValueError(f"csflow: spectrum {spectrum.name!r} gives no positive weight at {ppd:.4g} pixels per degree")
    return w / total


def mixed_cdf(weights: np.ndarray, mix: float, shift: float) -> np.ndarray:
    """The step CDF on the fine grid's ``M + 1`` nodes (module docstring, step 4): nondecreasing
    from exactly 0 to exactly 1."""
    grid = np.linspace(0.0, 1.0, weights.size + 1)
    cdf_csf = np.concatenate([[0.0], np.cumsum(weights)])
    cdf_csf = np.clip(np.maximum.accumulate(cdf_csf), 0.0, 1.0)
    cdf_csf[-1] = 1.0
    cdf_uni = np.clip(shift * grid / (1.0 + (shift - 1.0) * grid), 0.0, 1.0)
    cdf = np.clip(np.maximum.accumulate(mix * cdf_csf + (1.0 - mix) * cdf_uni), 0.0, 1.0)
    cdf[0], cdf[-1] = 0.0, 1.0
    return cdf


def csflow_quantiles(weights: np.ndarray, n: int, mix: float = 0.4, shift: float = 1.0) -> np.ndarray:
    """The ``n + 1`` grid positions ``v`` in [0, 1] (0 noisiest, 1 clean) that split the mixed CDF
    of ``weights`` (``M`` interval masses on a uniform fine grid) into ``n`` equal parts; the
    paper's inference-time schedule (arXiv 2606.08833), shape ``(n + 1,)``, ``v[0] = 0``,
    ``v[n] = 1``. With ``mix = 0`` and ``shift = 1`` it is ``linspace(0, 1, n + 1)``.

    Where the CDF is flat the left end of the flat stretch is returned (``np.interp``).
    """
    cdf = mixed_cdf(weights, mix, shift)
    grid = np.linspace(0.0, 1.0, weights.size + 1)
    q = np.linspace(0.0, 1.0, n + 1)
    if mix == 0.0 and shift == 1.0:
        return q
    return np.interp(q, cdf, grid)


@dataclass(frozen=True)
class CSFlow:
    """CSFlow step schedule (arXiv 2606.08833; method in the module docstring).

    ``csflow(noise_schedule, n)`` returns ``n`` times, noisiest first, in the noise schedule's own
    time unit (shape ``(n,)``, float64, strictly decreasing, in ``[t_min, t_max_finite]``): the first ``n``
    of the ``n + 1`` boundaries of ``n`` equal-mass steps from the noisiest time to the clean end
    (the clean end itself is the sampler's ``sigma = 0`` point), like ``trailing``. Points past the
    model's cleanest time ``t_min`` (large ``n`` on a short range) are spread evenly up to it.

    Args:
        mix: weight of the CSF CDF against the default spacing, in [0, 1] (0: the default spacing;
            1: the CSF weights alone).
        shift: warp of the default spacing, ``v -> shift v / (1 + (shift - 1) v)`` (> 0; > 1 puts
            more steps at the noisy end, as SD3 / FLUX's flow shift).
        pixels_per_degree: viewing geometry as pixels per degree of visual angle (> 0); or give
            ``pixel_size`` and ``viewing_distance`` (metres; defaults 0.000114 and 0.5, i.e. 76.55
            pixels per degree). Not both.
        pixel_size: pixel pitch in metres (> 0).
        viewing_distance: viewing distance in metres (> 0).
        spectrum: a bundled spectrum name (:func:`~diffsample.solvers.spectrum.bundled_spectra`) or
            a spectrum JSON file; ``None``: the ImageNet 256 spectrum, with a
            :class:`CSFlowSpectrumWarning` when the grid is built.
        base: the fine grid and default spacing: ``"flow"`` (uniform in ``u``, the paper's) or
            ``"model"`` (uniform in the model's own time).

    Raises:
        ValueError: ``mix`` outside [0, 1], ``shift <= 0``, a geometry value <= 0 or non-finite,
            ``pixels_per_degree`` together with ``pixel_size`` / ``viewing_distance``, an unknown
            ``base``, an unknown spectrum name or a bad spectrum file (each names the option).
    """

    mix: float = 0.4
    shift: float = 1.0
    pixels_per_degree: float | None = None
    pixel_size: float | None = None
    viewing_distance: float | None = None
    spectrum: str | None = None
    base: Literal["flow", "model"] = "flow"

    def __post_init__(self) -> None:
        if not (isinstance(self.mix, (int, float)) and 0.0 <= self.mix <= 1.0):
            raise ValueError(f"csflow mix must be in [0, 1] (0: default spacing, 1: CSF weights only), got {self.mix!r}")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"csflow shift must be a finite number > 0 (1: no shift), got {self.shift!r}")
        if self.base not in BASES:
            raise ValueError(f"csflow base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.pixels_per_degree is not None:
            if self.pixel_size is not None or self.viewing_distance is not None:
                raise ValueError("csflow: give pixels_per_degree or pixel_size / viewing_distance, not both")
            ppd = self.pixels_per_degree
            if not (isinstance(ppd, (int, float)) and math.isfinite(ppd) and ppd > 0):
                raise ValueError(f"csflow pixels_per_degree must be a finite number > 0, got {ppd!r}")
            ppd = float(ppd)
        else:
            ppd = pixels_per_degree(PIXEL_SIZE if self.pixel_size is None else self.pixel_size,
                                    VIEWING_DISTANCE if self.viewing_distance is None else self.viewing_distance)
        name = DEFAULT_SPECTRUM if self.spectrum is None else self.spectrum
        try:
            spectrum = load_spectrum(name)
        except ValueError as exc:
            raise ValueError(f"csflow spectrum: {exc}") from None
        object.__setattr__(self, "_ppd", ppd)
        object.__setattr__(self, "_spectrum", spectrum)

    @property
    def ppd(self) -> float:
        """The viewing geometry in pixels per degree."""
        return self._ppd

    @property
    def spectrum_data(self) -> Spectrum:
        """The spectrum the weights come from."""
        return self._spectrum

    @property
    def note(self) -> str | None:
        """One line for a run record when the default spectrum was used, else ``None``."""
        if self.spectrum is not None:
            return None
        return (f"csflow: no spectrum given; using the bundled {DEFAULT_SPECTRUM} spectrum (pass spectrum=NAME or a "
                f"JSON file; bundled: {', '.join(bundled_spectra())})")

    def fine_grid(self, ns: NoiseSchedule, m: int = FINE_INTERVALS) -> tuple[np.ndarray, np.ndarray]:
        """The ``m + 1`` fine-grid nodes from the noisiest time to the clean end: ``(u, t)``, ``u``
        increasing from ``u(t_max_finite)`` to 1 and ``t`` the model times (``t[-1] = t_zero``, the clean end)."""
        if self.base == "flow":
            u_lo = _u_of_t(ns, torch.tensor([ns.t_max_finite], dtype=torch.float64))[0]
            u = u_lo + (1.0 - u_lo) * np.linspace(0.0, 1.0, m + 1)
            u[-1] = 1.0
            t = _t_of_u(ns, u)
        else:
            t = np.linspace(ns.t_max_finite, ns.t_zero, m + 1)
            u = _u_of_t(ns, torch.as_tensor(t))
            u[-1] = 1.0
        return u, t

    def weights(self, ns: NoiseSchedule, m: int = FINE_INTERVALS) -> np.ndarray:
        """Interval masses of the CSF part on the fine grid, shape ``(m,)``, summing to 1."""
        u, _ = self.fine_grid(ns, m)
        return interval_weights(self._spectrum, u, self._ppd)

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        if self.spectrum is None:
            warnings.warn(self.note, CSFlowSpectrumWarning, stacklevel=2)
        u_nodes, _ = self.fine_grid(ns)
        w = interval_weights(self._spectrum, u_nodes, self._ppd)
        v = csflow_quantiles(w, n, self.mix, self.shift)[:-1]  # drop the clean end
        # Past the cleanest time the model may be evaluated at (v_hi): spread those points evenly up to it.
        if self.base == "flow":
            u_hi = float(_u_of_t(ns, torch.tensor([ns.t_min], dtype=torch.float64))[0])
            v_hi = (u_hi - u_nodes[0]) / (1.0 - u_nodes[0])
        else:
            v_hi = (ns.t_max_finite - ns.t_min) / (ns.t_max_finite - ns.t_zero)
        beyond = v >= v_hi
        if beyond.any():
            k = int(np.argmax(beyond))  # k >= 1: v[0] = 0 < v_hi
            v[k:] = np.linspace(v[k - 1], v_hi, n - k + 1)[1:]
        if self.base == "flow":  # piecewise linear in u on the fine grid, then the model's time
            t = _t_of_u(ns, u_nodes[0] + (1.0 - u_nodes[0]) * v)
        else:
            t = ns.t_max_finite - (ns.t_max_finite - ns.t_zero) * v
        t = torch.as_tensor(t, dtype=torch.float64).clamp(ns.t_min, ns.t_max_finite)
        t[0] = ns.t_max_finite
        return t


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trapezoid rule of each row of ``y`` over ``x``."""
    return (0.5 * (y[:, 1:] + y[:, :-1]) * np.diff(x)[None, :]).sum(axis=1)


def _u_of_t(ns: NoiseSchedule, t: Tensor) -> np.ndarray:
    """``u = alpha / (alpha + sigma)`` at model times ``t`` (0 at pure noise, 1 when clean)."""
    alpha, sigma = ns.alpha(t), ns.sigma(t)
    return (alpha / (alpha + sigma)).numpy()


def _t_of_u(ns: NoiseSchedule, u: np.ndarray) -> np.ndarray:
    """Model times at ``u`` through the VE sigma ``(1 - u) / u`` (``u = 0``: ``t_max``; ``u = 1``: ``t_zero``)."""
    u = np.asarray(u, dtype=np.float64)
    out = np.empty_like(u)
    clean, noise = u >= 1.0, u <= 0.0
    mid = ~(clean | noise)
    out[clean], out[noise] = ns.t_zero, ns.t_max
    if mid.any():
        s = torch.as_tensor((1.0 - u[mid]) / u[mid])
        out[mid] = ns.t_from_sigma_ve(s).numpy()
    return out
