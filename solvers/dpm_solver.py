"""DPM-Solver++ multistep (1, 2M, 3M) and its SDE variants."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

from diffsample.solvers.numerics import expm1_neg
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise
from diffsample.solvers.transition import sample_kernel


class History(NamedTuple):
    """Past ``denoised`` values and their ``lambda_``, newest first."""

    denoised: tuple[Tensor, ...] = ()
    lambda_: tuple[float, ...] = ()


@dataclass(frozen=True)
class DPMSolverPP:
    r"""DPM-Solver++ multistep in data prediction (Lu et al. 2022, arXiv 2211.01095, Algorithm 2;
    SDE variants: section 5 and k-diffusion ``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde``).

    With ``h = lambda_{i+1} - lambda_i``, ``h_eta = (1 + eta) h`` and ``D_i`` the denoiser output:

    ``x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} x_i + alpha_{i+1} (1 - e^{-h_eta}) D_i``
    ``          + alpha_{i+1} [phi-weighted divided differences of D]  (order 2, 3)``
    ``          + sigma_{i+1} sqrt(1 - e^{-2 eta h}) z                  (eta > 0)``

    * order 1 is DDIM (= :class:`Euler` with eta = 0);
    * order 2 ("2M") adds ``c * (D_i - D_{i-1}) / r`` with ``r = h_{i-1} / h`` and
      ``c = (1 - e^{-h_eta}) / 2`` (``solver_type="midpoint"``, diffusers' and k-diffusion's
      default) or ``c = 1 - (1 - e^{-h_eta}) / h_eta`` (``"heun"``);
    * order 3 ("3M") adds ``phi_2 d1 - w phi_3 d2`` with ``d1 ~ h D'``, ``d2 ~ h^2 D'' / 2`` the
      divided differences of the official code, ``phi_2 = 1 - (1 - e^{-h_eta}) / h_eta`` and
      ``phi_3 = phi_2 / h_eta - 1/2``. The Taylor expansion of the exact integral
      ``alpha_{i+1} int_0^h e^{-(h - tau)} D(lambda_i + tau) dtau`` needs ``w = 2``
      (``third_order="taylor"``, the default). The official DPM-Solver code, diffusers'
      ``multistep_dpm_solver_third_order_update`` and k-diffusion's ``sample_dpmpp_3m_sde`` use
      ``w = 1`` (``third_order="reference"``, kept to reproduce them): on exact Gaussian data that
      form converges with order 2 only, the Taylor form with order 3 (tests/solvers/test_order.py).

    Lower orders are used while history builds up (first step order 1, second step at most 2).
    The step that ends at ``sigma = 0`` is always the first-order step ``x = D`` (the limit
    ``h -> inf``; higher-order terms diverge there). ``lower_order_final`` additionally lowers the
    last two steps to orders 1 and 2 when the run has fewer than 15 steps, as diffusers'
    ``DPMSolverMultistepScheduler`` does.

    Stages: 1 denoiser call per step. Deterministic order: ``order`` (global error O(h^order)).

    Raises:
        ValueError: order not in {1, 2, 3}, ``eta < 0``, unknown ``solver_type`` or ``third_order``.
    """

    order: int = 2
    eta: float = 0.0
    solver_type: Literal["midpoint", "heun"] = "midpoint"
    lower_order_final: bool = True
    third_order: Literal["taylor", "reference"] = "taylor"

    def __post_init__(self) -> None:
        if self.order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {self.order!r}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {self.solver_type!r}")
        if self.third_order not in ("taylor", "reference"):
            raise ValueError(f"third_order must be 'taylor' or 'reference', got {self.third_order!r}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def init(self, x: Tensor, grid: Grid) -> History:
        return History()

    def nfe(self, grid: Grid) -> int:
        return grid.steps

    def order_at(self, grid: Grid, i: int, available: int) -> int:
        """Order used on step ``i`` given ``available`` denoised values (incl. the current one)."""
        order = min(self.order, available)
        if grid.sigma_list[i + 1] == 0.0:
            return 1
        if self.lower_order_final and grid.steps < 15:
            order = min(order, grid.steps - i)
        return order

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: History, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, History]:
        lambda_, lambda_next = grid.lambda_list[i], grid.lambda_list[i + 1]
        sigma, sigma_next, alpha_next = grid.sigma_list[i], grid.sigma_list[i + 1], grid.alpha_list[i + 1]
        denoised = call_denoise(denoise, x, grid.t_list[i])
        history = History((denoised,) + state.denoised[: self.order - 1], (lambda_,) + state.lambda_[: self.order - 1])
        order = self.order_at(grid, i, len(history.denoised))
        if sigma_next == 0.0:
            # Step to the clean end: the exponential integrator's limit h -> inf is x = D.
            return alpha_next * denoised, history

        h = lambda_next - lambda_
        eta_h = self.eta * h if self.eta else 0.0  # h = inf at alpha = 0 (flow t = 1): avoid 0 * inf
        h_eta = h + eta_h
        c1 = expm1_neg(h_eta)  # 1 - e^{-h_eta}
        # First-order (DDIM / SDE-DDIM) part.
        x_next = (sigma_next / sigma * math.exp(-eta_h)) * x + (alpha_next * c1) * denoised
        if order >= 2:
            d_prev, lambda_prev = history.denoised[1], history.lambda_[1]
            r0 = (lambda_ - lambda_prev) / h
            d1_0 = (denoised - d_prev) / r0
            if order == 2:
                c2 = 0.5 * c1 if self.solver_type == "midpoint" else 1.0 - c1 / h_eta
                x_next = x_next + (alpha_next * c2) * d1_0
            else:
                # Third order: divided differences over the last three points.
                d_prev2, lambda_prev2 = history.denoised[2], history.lambda_[2]
                r1 = (lambda_prev - lambda_prev2) / h
                d1_1 = (d_prev - d_prev2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = 1.0 - c1 / h_eta
                phi_3 = phi_2 / h_eta - 0.5
                w = 2.0 if self.third_order == "taylor" else 1.0
                x_next = x_next + (alpha_next * phi_2) * d1 - (alpha_next * w * phi_3) * d2
        # Fresh noise (SDE variants).
        if self.eta > 0:
            x_next = sample_kernel(noise_fn, self, x_next, sigma_next * math.sqrt(expm1_neg(2.0 * eta_h)), grid, i)
        return x_next, history
