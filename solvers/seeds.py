"""SEEDS-2 / SEEDS-3: stochastic explicit exponential derivative-free solvers (arXiv 2305.14267)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise
from diffsample.solvers.substep import from_pure_noise, point_at_lambda, sample_substep


def _phi1(x: float) -> float:
    """``(1 - e^{-x}) / x`` times ``x``: ``1 - e^{-x}``."""
    return -math.expm1(-x)


def _phi2(x: float) -> float:
    """``(e^{-x} - 1 + x) / x`` (``x phi_2(-x)`` up to sign), with its series near 0."""
    if abs(x) < 1e-4:
        return x / 2.0 - x * x / 6.0 + x**3 / 24.0
    return (math.expm1(-x) + x) / x


@dataclass(frozen=True)
class SEEDS:
    r"""SEEDS-2 and SEEDS-3 (Gonzalez et al. 2023, arXiv 2305.14267), data-prediction form on the
    variance-preserving SDE family with noise ``eta`` (the form ComfyUI's ``sample_seeds_2`` /
    ``sample_seeds_3`` use; written here from the exponential-integrator formulas, not from its
    code, and checked against them in tests/solvers/test_breadth_sde_seeds.py).

    With ``h = lambda_{i+1} - lambda_i``, ``h_eta = (1 + eta) h``, stage points
    ``lambda_i + c h`` and ``E(c) = (sigma(c) / sigma_i) e^{-eta c h}``, every stage is

    ``x(c) = E(c) x_i + alpha(c) [(1 - e^{-c h_eta}) D_i + w(c) (D_stage - D_i)] + noise(c)``

    * SEEDS-2 (``stages=2``, stage ``r``): ``x(r)`` with ``w = 0``; the final point with
      ``solver_type="phi_1"``: ``w = (1 - e^{-h_eta}) / (2 r)``; ``"phi_2"``:
      ``w = phi_2(h_eta) / r``, ``phi_2(x) = (e^{-x} - 1 + x) / x``.
    * SEEDS-3 (``stages=3``, ``r_1 < r_2``): ``x(r_1)`` with ``w = 0``; ``x(r_2)`` from ``D(x(r_1))``
      with ``w = (r_2 / r_1) phi_2(r_2 h_eta)``; the final point from ``D(x(r_2))`` with
      ``w = phi_2(h_eta) / r_2``.

    The noise is the exact noise of the linear SDE part, chained over the sub-intervals: the noise
    at a stage is ``sigma(c) s_noise sqrt(1 - e^{-2 eta c h}) z``, and from stage ``a`` to ``b``
    the accumulated noise is carried with the factor ``(sigma(b) / sigma(a)) e^{-eta (b - a) h}``
    plus a fresh ``sigma(b) s_noise sqrt(1 - e^{-2 eta (b - a) h}) z'``. Each fresh ``z`` is drawn
    through the transition hook (:func:`~diffsample.solvers.substep.sample_substep`, labelled with
    the sub-interval's times), and the carried part is the realised draw, so a hook's change of a
    stage's noise propagates as the SDE would carry it.

    * ``eta = 0``: deterministic exponential integrator; orders 2 (SEEDS-2) and 3 (SEEDS-3),
      measured on Gaussian data.
    * ``eta = 1`` (default): the reverse SDE.

    The step to ``sigma = 0`` is ``x = D`` (1 call); other steps make ``stages`` calls. A step from
    ``alpha = 0`` (rectified flow at ``t = 1``) is the ancestral Euler step.

    Raises:
        ValueError: ``stages`` not 2 or 3, ``eta < 0``, ``s_noise < 0``, stage points outside
            ``(0, 1]`` or not increasing, unknown ``solver_type``.
    """

    stages: int = 2
    eta: float = 1.0
    s_noise: float = 1.0
    r: float = 0.5
    solver_type: Literal["phi_1", "phi_2"] = "phi_1"
    r_1: float = 1.0 / 3.0
    r_2: float = 2.0 / 3.0

    def __post_init__(self) -> None:
        if isinstance(self.stages, bool) or self.stages not in (2, 3):
            raise ValueError(f"stages must be 2 or 3, got {self.stages!r}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if not self.s_noise >= 0:
            raise ValueError(f"s_noise must be >= 0, got {self.s_noise}")
        if not 0 < self.r <= 1:
            raise ValueError(f"r must be in (0, 1], got {self.r}")
        if not 0 < self.r_1 < self.r_2 <= 1:
            raise ValueError(f"need 0 < r_1 < r_2 <= 1, got r_1={self.r_1}, r_2={self.r_2}")
        if self.solver_type not in ("phi_1", "phi_2"):
            raise ValueError(f"solver_type must be 'phi_1' or 'phi_2', got {self.solver_type!r}")

    @property
    def order(self) -> int:
        return self.stages

    @property
    def stochastic(self) -> bool:
        return self.eta > 0 and self.s_noise > 0

    def init(self, x: Tensor, grid: Grid) -> None:
        return None

    def nfe(self, grid: Grid) -> int:
        return sum(1 if (grid.alpha_list[i] == 0.0 or grid.sigma_list[i + 1] == 0.0) else self.stages
                   for i in range(grid.steps))

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: None, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, None]:
        denoised = call_denoise(denoise, x, grid.t_list[i])
        if grid.alpha_list[i] == 0.0:
            return from_pure_noise(self, x, denoised, grid, i, min(self.eta, 1.0), noise_fn, self.s_noise), None
        if grid.sigma_list[i + 1] == 0.0:
            return grid.alpha_list[i + 1] * denoised, None
        lambda_, sigma = grid.lambda_list[i], grid.sigma_list[i]
        h = grid.lambda_list[i + 1] - lambda_
        h_eta = (1.0 + self.eta) * h
        if self.stages == 2:
            w_final = _phi1(h_eta) / (2.0 * self.r) if self.solver_type == "phi_1" else _phi2(h_eta) / self.r
            plan = [(self.r, 0.0), (1.0, w_final)]
        else:
            plan = [(self.r_1, 0.0), (self.r_2, (self.r_2 / self.r_1) * _phi2(self.r_2 * h_eta)),
                    (1.0, _phi2(h_eta) / self.r_2)]
        d_stage, prev_c, prev_sigma, t_prev = denoised, 0.0, sigma, grid.t_list[i]
        carried: Tensor | float = 0.0  # the noise accumulated up to the previous stage point
        for k, (c, w) in enumerate(plan):
            last = k == len(plan) - 1
            if last:
                t_c, alpha_c, sigma_c = grid.t_list[i + 1], grid.alpha_list[i + 1], grid.sigma_list[i + 1]
            else:
                t_c, alpha_c, sigma_c = point_at_lambda(grid, lambda_ + c * h)
            det = (sigma_c / sigma * math.exp(-self.eta * c * h)) * x + (alpha_c * _phi1(c * h_eta)) * denoised
            if w:
                det = det + (alpha_c * w) * (d_stage - denoised)
            x_c = det
            if self.stochastic:
                mean = det + (sigma_c / prev_sigma * math.exp(-self.eta * (c - prev_c) * h)) * carried
                std = sigma_c * self.s_noise * math.sqrt(-math.expm1(-2.0 * self.eta * (c - prev_c) * h))
                x_c = sample_substep(noise_fn, self, mean, std, grid, i, t_prev, t_c) if std > 0 else mean
                carried = x_c - det
            if last:
                return x_c, None
            d_stage = call_denoise(denoise, x_c, t_c)
            prev_c, prev_sigma, t_prev = c, sigma_c, t_c
        raise AssertionError("unreachable")
