"""SA-Solver: stochastic Adams predictor-corrector in data prediction (arXiv 2309.05019)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise
from diffsample.solvers.substep import from_pure_noise
from diffsample.solvers.transition import sample_kernel


class SAState(NamedTuple):
    """What SA-Solver carries between steps.

    ``denoised`` / ``lambda_``: past data predictions and their half log-SNRs, newest first;
    ``start``: the (corrected) state the last predictor started from (``None``: no corrector on the
    next step); ``noise``: the noise part the last predictor added (``x_pred - mean``, reused by
    the corrector); ``tau`` and ``corrector_order``: the last predictor's ``tau`` and the order of
    the corrector that follows it.
    """

    denoised: tuple[Tensor, ...] = ()
    lambda_: tuple[float, ...] = ()
    start: Tensor | None = None
    noise: Tensor | float = 0.0
    tau: float = 0.0
    corrector_order: int = 0


def exp_moments(c: float, h: float, k_max: int) -> list[float]:
    """``I_k = int_{-h}^{0} e^{c u} u^k du`` for ``k = 0 .. k_max`` (``c > 0``, ``h > 0``): the power
    series when ``c h <= 1`` (no cancellation at small steps), else the integration-by-parts
    recurrence ``I_k = -(-h)^k e^{-c h} / c - (k / c) I_{k-1}``."""
    ch = c * h
    if ch <= 1.0:
        out = []
        for k in range(k_max + 1):
            total, coef = 0.0, 1.0  # coef = c^n / n!
            for n in range(40):
                m = n + k + 1
                total -= coef * (-h) ** m / m
                coef *= c / (n + 1)
            out.append(total)
        return out
    out = [-math.expm1(-ch) / c]
    for k in range(1, k_max + 1):
        out.append(-((-h) ** k) * math.exp(-ch) / c - (k / c) * out[-1])
    return out


def lagrange_basis(nodes: list[float]) -> list[list[float]]:
    """Ascending polynomial coefficients of the Lagrange basis polynomials ``L_j`` over ``nodes``."""
    basis = []
    for j, uj in enumerate(nodes):
        poly = [1.0]
        for m, um in enumerate(nodes):
            if m != j:
                scale = 1.0 / (uj - um)
                nxt = [0.0] * (len(poly) + 1)
                for k, a in enumerate(poly):  # poly * scale * (u - um)
                    nxt[k + 1] += scale * a
                    nxt[k] -= scale * um * a
                poly = nxt
        basis.append(poly)
    return basis


def sa_weights(lambdas: list[float], lambda_end: float, h: float, tau: float) -> list[float]:
    """Weights ``w_j`` (without the factor ``alpha_end``) of the data predictions at ``lambdas`` in
    ``(1 + tau^2) int_{lambda_end - h}^{lambda_end} e^{(1 + tau^2)(lambda - lambda_end)} P(lambda) dlambda``,
    ``P`` the Lagrange interpolant (arXiv 2309.05019 eq. 14 / Algorithm 1, in shifted coordinates)."""
    c = 1.0 + tau * tau
    nodes = [lam - lambda_end for lam in lambdas]
    moments = exp_moments(c, h, len(nodes) - 1)
    return [c * sum(a * moments[k] for k, a in enumerate(poly)) for poly in lagrange_basis(nodes)]


@dataclass(frozen=True)
class SASolver:
    r"""SA-Solver (Xue et al. 2023, arXiv 2309.05019, Algorithm 1; diffusers ``SASolverScheduler``,
    ``algorithm_type="data_prediction"``): a stochastic Adams-Bashforth predictor and Adams-Moulton
    corrector for the SDE family with noise ``tau``.

    With ``h = lambda_{i+1} - lambda_i``, ``c = 1 + tau^2`` and ``D_j`` the data predictions:

    ``x_{i+1} = e^{-tau^2 h} (sigma_{i+1} / sigma_i) x^c_i + alpha_{i+1} sum_j w_j D_j``
    ``          + sigma_{i+1} sqrt(1 - e^{-2 tau^2 h}) z``

    where ``w_j = c int_{-h}^0 e^{c u} L_j(u) du`` integrates the Lagrange basis over the last
    ``predictor_order`` points (:func:`sa_weights`). The corrector replaces the start of step ``i``
    by ``x^c_i``: the same formula over ``[lambda_{i-1}, lambda_i]`` with ``corrector_order`` points
    including the new ``D_i = D(x_i)`` and the *same* noise the predictor drew (stored, not drawn
    again: one draw per step, through :func:`~diffsample.solvers.transition.sample_kernel`). The
    model is evaluated at the predicted ``x_i`` (the corrector costs no call). Like the official code
    and diffusers, order-2 predictor and corrector steps add the ``O(h^3)`` UniPC-like term
    (``order2_term=False``: the plain Lagrange weights, as ComfyUI's ``sa_solver`` without
    ``simple_order_2``; the term grows like ``h^2`` and extrapolates on large log-SNR steps).

    ``tau`` is the noise of a step when its start has VE sigma in ``tau_sigma_range`` (all steps for
    ``None``), else 0; diffusers' default window ``200 <= t <= 800`` is a VE sigma range of the
    model's process. ``lower_order_final``: diffusers' rule (predictor order ``<= L``,
    corrector ``<= L + 1``, ``L`` the steps left up to the last positive sigma: ``steps - i``, one less
    when the grid ends at ``sigma = 0``, whose step ``x = D`` is not an Adams step; diffusers' grids
    end at sigma_min); the first steps warm up from order 1. The step to
    ``sigma = 0`` is ``x = D`` (deterministic).

    * ``tau = 0``: deterministic Adams predictor-corrector (data prediction), order
      ``min(corrector_order, predictor_order + 1)`` (the corrector sets it; measured on Gaussian data).
    * ``tau = 1``: the reverse SDE; weakly first order.

    Stages: 1 denoiser call per step. ``pece=True`` (ComfyUI's ``sa_solver_pece``) evaluates the
    corrected state again and the predictor uses that evaluation: 2 calls on every corrected step.
    Cross-checked against diffusers with the same noise (tests/solvers/test_breadth_sde_sa.py).

    Raises:
        ValueError: orders outside 1-4, ``tau < 0``, a bad ``tau_sigma_range``.
    """

    predictor_order: int = 2
    corrector_order: int = 2
    tau: float = 1.0
    tau_sigma_range: tuple[float, float] | list[float] | str | None = None
    lower_order_final: bool = True
    pece: bool = False
    order2_term: bool = True

    def __post_init__(self) -> None:
        for name in ("predictor_order", "corrector_order"):
            v = getattr(self, name)
            if isinstance(v, bool) or v not in (1, 2, 3, 4):
                raise ValueError(f"{name} must be 1, 2, 3 or 4, got {v!r}")
        if not self.tau >= 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")
        if self.tau_sigma_range is not None:
            rng = self.tau_sigma_range
            bad = ValueError(f"tau_sigma_range must be [low, high] VE sigmas with 0 <= low <= high, got {rng!r}")
            try:  # a spec gives the bracketed list as the string "low,high"
                pair = tuple(float(v) for v in (rng.strip("[]() ").split(",") if isinstance(rng, str) else rng))
            except (TypeError, ValueError):
                raise bad from None
            if len(pair) != 2 or not 0 <= pair[0] <= pair[1]:
                raise bad
            object.__setattr__(self, "tau_sigma_range", pair)

    @property
    def order(self) -> int:
        return min(self.corrector_order, self.predictor_order + 1)

    @property
    def stochastic(self) -> bool:
        return self.tau > 0

    def init(self, x: Tensor, grid: Grid) -> SAState:
        return SAState()

    def nfe(self, grid: Grid) -> int:
        if not self.pece:
            return grid.steps
        return grid.steps + sum(1 for i in range(1, grid.steps) if grid.alpha_list[i - 1] > 0)

    def tau_at(self, grid: Grid, i: int) -> float:
        """``tau`` of step ``i`` (0 outside ``tau_sigma_range``)."""
        if self.tau_sigma_range is None or grid.alpha_list[i] == 0.0:
            return self.tau if self.tau_sigma_range is None else 0.0
        s = grid.sigma_list[i] / grid.alpha_list[i]
        lo, hi = self.tau_sigma_range
        return self.tau if lo <= s <= hi else 0.0

    def _update(self, x: Tensor, grid: Grid, i_from: int, i_to: int, denoised: tuple[Tensor, ...],
                lambdas: tuple[float, ...], order: int, tau: float, corrector: bool) -> Tensor:
        """Deterministic part of the update from point ``i_from`` to ``i_to`` (predictor or corrector)."""
        lam_s, lam_t = grid.lambda_list[i_from], grid.lambda_list[i_to]
        alpha_t, sigma_t, sigma_s = grid.alpha_list[i_to], grid.sigma_list[i_to], grid.sigma_list[i_from]
        h = lam_t - lam_s
        w = sa_weights(list(lambdas[:order]), lam_t, h, tau)
        if order == 2 and self.order2_term:
            c = 1.0 + tau * tau
            core = c * h + math.expm1(-c * h)  # c h - 1 + e^{-c h}
            if corrector:
                extra = c * (h / 2.0 - core / (c * c * h))
            else:
                extra = c * (h * h / 2.0 - core / (c * c)) / (lambdas[0] - lambdas[1])
            w[0] += extra
            w[1] -= extra
        out = (math.exp(-tau * tau * h) * sigma_t / sigma_s) * x
        for wj, d in zip(w, denoised):
            out = out + (alpha_t * wj) * d
        return out

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: SAState, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, SAState]:
        denoised = call_denoise(denoise, x, grid.t_list[i])
        keep = max(self.predictor_order, self.corrector_order - 1)
        if state.start is not None:
            # Corrector: redo the last step with D(x_i) as a new node and the predictor's noise.
            x = self._update(state.start, grid, i - 1, i, (denoised,) + state.denoised, (grid.lambda_list[i],) +
                             state.lambda_, state.corrector_order, state.tau, corrector=True) + state.noise
            if self.pece:  # evaluate the corrected state; the predictor uses that evaluation
                denoised = call_denoise(denoise, x, grid.t_list[i])
        hist_d, hist_l = (denoised,) + state.denoised[: keep - 1], (grid.lambda_list[i],) + state.lambda_[: keep - 1]
        alpha_next, sigma_next = grid.alpha_list[i + 1], grid.sigma_list[i + 1]
        if sigma_next == 0.0:
            return alpha_next * denoised, SAState(hist_d, hist_l)
        tau = self.tau_at(grid, i)
        if grid.alpha_list[i] == 0.0:  # rectified flow at t = 1: h is infinite, the first-order limit
            x_next = from_pure_noise(self, x, denoised, grid, i, 1.0 if tau > 0 else 0.0, noise_fn)
            return x_next, SAState(hist_d, hist_l)
        warm = min(i, keep)
        p, c = self.predictor_order, self.corrector_order
        if self.lower_order_final:
            # steps left that use the update: the step to sigma = 0 is x = D, not an Adams step (diffusers'
            # grids end at sigma_min; counting x = D gave order 2 on the large step before it)
            left = grid.steps - i - (1 if grid.final_zero else 0)
            p, c = min(p, left), min(c, left + 1)
        p, c = min(p, warm + 1), min(c, warm + 2)
        mean = self._update(x, grid, i, i + 1, hist_d, hist_l, p, tau, corrector=False)
        h = grid.lambda_list[i + 1] - grid.lambda_list[i]
        std = sigma_next * math.sqrt(-math.expm1(-2.0 * tau * tau * h)) if tau > 0 else 0.0
        x_next = sample_kernel(noise_fn, self, mean, std, grid, i) if std > 0 else mean
        return x_next, SAState(hist_d, hist_l, x, x_next - mean if std > 0 else 0.0, tau, c)
