"""UniPC: unified predictor-corrector multistep solver (bh1 / bh2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

from diffsample.solvers.numerics import solve_small
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise


class UniPCState(NamedTuple):
    """History (newest first), the sample the last predictor started from, and its order."""

    denoised: tuple[Tensor, ...] = ()
    lambda_: tuple[float, ...] = ()
    x_base: Tensor | None = None
    order: int = 0


def _coefficients(h: float, rks: list[float], order: int, variant: str) -> tuple[float, float, list[list[float]], list[float]]:
    """``h_phi_1``, ``B(h)`` and the order-``order`` system ``R rho = b`` of UniPC (arXiv 2302.04867
    Algorithms 2-3, data prediction; the same construction as ``multistep_uni_{p,c}_bh_update``)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if variant == "bh1" else math.expm1(hh)
    factorial = 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, rows, b


@dataclass(frozen=True)
class UniPC:
    r"""UniPC multistep (Zhao et al. 2023, arXiv 2302.04867): predictor UniP-p and corrector UniC.

    Data prediction, in lambda time. The predictor of order ``p`` (``order``) extrapolates
    ``D`` from the last ``p`` evaluations; ``B(h) = h`` (``variant="bh1"``) or ``e^h - 1``
    (``"bh2"``). The corrector UniC refines ``x_i`` with the evaluation ``D(x_i)`` that the next
    predictor needs anyway, so it costs **no extra denoiser call**; it raises the convergence order
    to ``p + 1`` (the paper's Theorem 3.3). The returned final sample is the last predictor output
    (the corrector needs an evaluation there), as in the reference code and diffusers'
    ``UniPCMultistepScheduler``.

    Lower orders are used while history builds up. With ``lower_order_final`` the predictor
    order on step ``i`` is at most ``steps - i`` (diffusers' rule): more stable at few steps, but
    on a run that stops at ``sigma > 0`` the uncorrected first-order last step then adds an
    ``O(h^2)`` term; the asymptotic order below holds with ``lower_order_final=False``. The step that ends at
    ``sigma = 0`` is the first-order limit ``x = D`` (diffusers' bh1 returns NaN there).

    Stages: 1 denoiser call per step. Deterministic order: ``order + 1`` with the corrector,
    ``order`` without.

    Raises:
        ValueError: order not in {1, 2, 3}, unknown ``variant``.
    """

    predictor_order: int = 2
    variant: Literal["bh1", "bh2"] = "bh2"
    corrector: bool = True
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        if self.predictor_order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {self.predictor_order!r}")
        if self.variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {self.variant!r}")

    @property
    def order(self) -> int:
        return self.predictor_order + (1 if self.corrector else 0)

    @property
    def stochastic(self) -> bool:
        return False

    def init(self, x: Tensor, grid: Grid) -> UniPCState:
        return UniPCState()

    def nfe(self, grid: Grid) -> int:
        return grid.steps

    def _correct(self, x: Tensor, denoised: Tensor, grid: Grid, i: int, state: UniPCState) -> Tensor:
        """UniC: recompute the step ``i-1 -> i`` with the new evaluation ``denoised = D(x_i)``."""
        order = state.order
        lambda_prev, lambda_ = state.lambda_[0], grid.lambda_list[i]
        m0 = state.denoised[0]
        h = lambda_ - lambda_prev
        rks = [(state.lambda_[k] - lambda_prev) / h for k in range(1, order)] + [1.0]
        h_phi_1, b_h, rows, b = _coefficients(h, rks, order, self.variant)
        rhos = [0.5] if order == 1 else solve_small(rows, b)
        alpha, sigma, sigma_prev = grid.alpha_list[i], grid.sigma_list[i], grid.sigma_list[i - 1]
        x_c = (sigma / sigma_prev) * state.x_base - (alpha * h_phi_1) * m0
        for k in range(1, order):
            x_c = x_c - (alpha * b_h * rhos[k - 1] / rks[k - 1]) * (state.denoised[k] - m0)
        return x_c - (alpha * b_h * rhos[-1]) * (denoised - m0)

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: UniPCState, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, UniPCState]:
        denoised = call_denoise(denoise, x, grid.t_list[i])
        # Corrector (UniC), reusing this evaluation.
        if self.corrector and state.x_base is not None:
            x = self._correct(x, denoised, grid, i, state)
        lambda_ = grid.lambda_list[i]
        history_d = (denoised,) + state.denoised[: self.predictor_order - 1]
        history_l = (lambda_,) + state.lambda_[: self.predictor_order - 1]
        order = min(self.predictor_order, len(history_d))
        if self.lower_order_final:
            order = min(order, grid.steps - i)
        new_state = UniPCState(history_d, history_l, x, order)
        alpha_next, sigma_next = grid.alpha_list[i + 1], grid.sigma_list[i + 1]
        if sigma_next == 0.0:
            return alpha_next * denoised, new_state._replace(order=1)
        # Predictor (UniP-p).
        h = grid.lambda_list[i + 1] - lambda_
        rks = [(history_l[k] - lambda_) / h for k in range(1, order)] + [1.0]
        h_phi_1, b_h, rows, b = _coefficients(h, rks, order, self.variant)
        x_next = (sigma_next / grid.sigma_list[i]) * x - (alpha_next * h_phi_1) * denoised
        if order >= 2:
            rhos = [0.5] if order == 2 else solve_small([r[:-1] for r in rows[:-1]], b[:-1])
            for k in range(1, order):
                x_next = x_next - (alpha_next * b_h * rhos[k - 1] / rks[k - 1]) * (history_d[k] - denoised)
        return x_next, new_state
