"""RES multistep (second order, data prediction, lambda time), deterministic or ancestral."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from diffsample.solvers._ve_multistep import eps_of
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise
from diffsample.solvers.transition import AncestralEta, ancestral_noise, ancestral_split_at


class ResState(NamedTuple):
    """The previous step's ``denoised``, the VE sigma it was evaluated at and the VE sigma its
    deterministic part ended at (``sigma_down``); ``None`` before the first step."""

    denoised: Tensor | None = None
    s: float = math.nan
    s_down: float = math.nan


def _phi1(z: float) -> float:
    return math.expm1(z) / z


def _phi2(z: float) -> float:
    return (_phi1(z) - 1.0) / z


@dataclass(frozen=True)
class ResMultistep(AncestralEta):
    r"""Second-order RES multistep step (Zhang et al. 2023, "Improved order analysis and design of
    exponential integrator for diffusion models", arXiv 2308.02157, the two-point multistep method),
    in the form of ComfyUI's ``sample_res_multistep`` / ``sample_res_multistep_ancestral``.

    In VE coordinates ``y = x / alpha``, ``s = sigma / alpha``, ``lambda = -log s``, with
    ``(s_down, s_up) = ancestral_split(s_i, s_{i+1}, eta)`` and ``h = lambda(s_down) - lambda_i``:

    ``y_down = e^{-h} y_i + h (b_1 D_i + b_2 D_{i-1})``,
    ``b_2 = phi_2(-h) / c_2``, ``b_1 = phi_1(-h) - b_2``,
    ``c_2 = (lambda_{i-1} - lambda(s_down of step i-1)) / h``

    with ``phi_1(z) = (e^z - 1) / z``, ``phi_2(z) = (phi_1(z) - 1) / z``. This integrates a line
    through the last two ``denoised`` exactly against ``e^{-(h - tau)}``; with ``eta = 0``
    (``c_2 = -h_{i-1} / h``) it is DPM-Solver++(2M) with ``solver_type="heun"`` and no lower-order
    final steps (tests/solvers/test_breadth_crosscheck.py checks the identity). The first step, and a
    step with ``s_down = 0``, is the Euler / DDIM step to ``s_down``. ``eta > 0`` adds fresh noise
    ``alpha_{i+1} s_up z`` through :func:`~diffsample.solvers.transition.sample_kernel`
    (the ancestral form); the step to ``sigma = 0`` is ``x = D``.

    ComfyUI's code is GPL-3 and not used; the test checks this update against the formulas above
    written out independently. Stages: 1 denoiser call per step. Deterministic order 2.

    Raises:
        ValueError: ``eta < 0``.
    """

    @property
    def order(self) -> int:
        return 2

    def init(self, x: Tensor, grid: Grid) -> ResState:
        return ResState()

    def nfe(self, grid: Grid) -> int:
        return grid.steps

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: ResState, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, ResState]:
        alpha, sigma, alpha_next = grid.alpha_list[i], grid.sigma_list[i], grid.alpha_list[i + 1]
        denoised = call_denoise(denoise, x, grid.t_list[i])
        s, s_down, s_up = ancestral_split_at(grid, i, self.eta)
        new_state = ResState(denoised, s, s_down) if math.isfinite(s) else ResState()
        if s_down == 0.0 or state.denoised is None:
            # Euler / DDIM to s_down: y = D + s_down d.
            mean = alpha_next * (denoised + s_down * eps_of(x, denoised, alpha, sigma))
        else:
            h = math.log(s) - math.log(s_down)
            c2 = (math.log(state.s_down) - math.log(state.s)) / h  # (lambda_{i-1} - lambda_old) / h
            phi1, phi2 = _phi1(-h), _phi2(-h)
            b2 = phi2 / c2
            b1 = phi1 - b2
            mean = (alpha_next * s_down / sigma) * x + (alpha_next * h) * (b1 * denoised + b2 * state.denoised)
        return ancestral_noise(noise_fn, self, mean, s_up, grid, i), new_state
