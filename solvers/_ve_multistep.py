"""Linear multistep steps on the probability-flow ODE in VE coordinates (private to the solvers package).

With ``y = x / alpha`` and ``s = sigma / alpha`` (the EDM / k-diffusion sigma) the probability-flow
ODE is ``dy/ds = d(y, s)``, where ``d = (y - D) / s = (x - alpha D) / sigma`` is the model's noise
prediction ``eps``. iPNDM, DEIS, LMS and the gradient-estimation sampler all take steps

``y_{i+1} = y_i + sum_j c_j d_{i-j}``  (``sum_j c_j = s_{i+1} - s_i``)

and differ only in the weights ``c_j``. :func:`ve_step` writes that step in native coordinates as
``alpha_{i+1} (D_i + s_{i+1} d_i + sum_{j>=1} c_j (d_{i-j} - d_i))``, which needs no division by ``alpha``
(a rectified-flow grid may start at ``alpha = 0``, ``s = inf``, where ``y`` is infinite but ``d`` is not).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, NamedTuple, Sequence

import numpy as np
from torch import Tensor

from diffsample.solvers.solver import Denoise, Grid, call_denoise


class SlopeHistory(NamedTuple):
    """Past VE slopes ``d = eps`` and their VE sigmas, newest first."""

    d: tuple[Tensor, ...] = ()
    s: tuple[float, ...] = ()


def eps_of(x: Tensor, denoised: Tensor, alpha: float, sigma: float) -> Tensor:
    """The VE-ODE slope ``d = (x - alpha D) / sigma`` (= ``(y - D) / s``), shape of ``x``."""
    return (x - alpha * denoised) / sigma


def ve_step(denoised: Tensor, d: Tensor, alpha_next: float, s: float, s_next: float,
            coeffs: list[float] | tuple[float, ...] = (1.0,), ds_prev: list[Tensor] | tuple[Tensor, ...] = ()) -> Tensor:
    """The native-space sample ``alpha_next * y_next`` after the VE step
    ``y_next = y + (s_next - s) sum_j coeffs[j] d_{i-j}`` from the point ``(y, s)`` where ``d`` and
    ``D`` were evaluated; ``coeffs[0]`` weighs ``d``, ``coeffs[1:]`` the older slopes ``ds_prev``
    (newest first).

    Written as ``D + s_next d + (s_next - s) [sum_{j>=1} c_j (d_{i-j} - d) + (sum_j c_j - 1) d]``:
    exact for ``y = D + s d`` and finite at ``s = inf`` when only ``d`` is used (``coeffs = (1,)``)."""
    y = denoised + s_next * d
    if len(coeffs) == 1 and coeffs[0] == 1.0:
        return alpha_next * y
    h = s_next - s
    defect = sum(coeffs) - 1.0  # 0 for a consistent method (iPNDM_v's 4th-order weights are not, off a geometric grid)
    if defect != 0.0:
        y = y + (h * defect) * d
    for c, d_prev in zip(coeffs[1:], ds_prev):
        y = y + (h * c) * (d_prev - d)
    return alpha_next * y


class MultistepSolver:
    """The :class:`~diffsample.solvers.solver.Solver` members every VE multistep method here shares:
    deterministic, state = the :class:`SlopeHistory` (empty at the start), 1 denoiser call per step.
    Each method (a frozen dataclass) adds ``order`` and a ``step`` that calls :func:`multistep_step`
    with its weights."""

    @property
    def stochastic(self) -> bool:
        return False

    def init(self, x: Tensor, grid: Grid) -> SlopeHistory:
        return SlopeHistory()

    def nfe(self, grid: Grid) -> int:
        return grid.steps


def multistep_step(
    denoise: Denoise, x: Tensor, grid: Grid, i: int, state: SlopeHistory, max_order: int,
    weights: Callable[[int, SlopeHistory, float, float], Sequence[float]], *,
    final_is_denoised: bool = True, order_cap: int | None = None,
) -> tuple[Tensor, SlopeHistory]:
    """One step ``i -> i + 1`` of a VE linear multistep method (iPNDM, DEIS, LMS): evaluates ``D`` and
    ``d = eps`` at ``x`` (1 denoiser call), keeps the last ``max_order`` finite-``s`` slopes in the
    history (a slope at ``s = inf`` is dropped), and takes :func:`ve_step` with order
    ``k = min(max_order, len(history), order_cap)`` and the method's weights
    ``weights(k, history, s, s_next)`` (newest first, ``k`` of them; called only for ``k >= 2``).

    ``final_is_denoised``: the step to ``sigma = 0`` returns ``alpha_next * D`` (iPNDM, DEIS) instead
    of integrating to ``s = 0`` (LMS).

    Returns:
        ``(x_next, history)``, ``x_next`` of the shape of ``x``.
    """
    alpha, sigma = grid.alpha_list[i], grid.sigma_list[i]
    alpha_next, sigma_next = grid.alpha_list[i + 1], grid.sigma_list[i + 1]
    denoised = call_denoise(denoise, x, grid.t_list[i])
    d = eps_of(x, denoised, alpha, sigma)
    s = sigma / alpha if alpha > 0 else math.inf
    keep = max_order - 1
    history = SlopeHistory((d,) + state.d[:keep], (s,) + state.s[:keep]) if math.isfinite(s) else SlopeHistory()
    if final_is_denoised and sigma_next == 0.0:
        return alpha_next * denoised, history
    s_next = sigma_next / alpha_next
    order = min(max_order, len(history.d)) if history.d else 1
    if order_cap is not None:
        order = min(order, order_cap)
    if order == 1:
        return ve_step(denoised, d, alpha_next, s, s_next), history
    return ve_step(denoised, d, alpha_next, s, s_next, weights(order, history, s, s_next), history.d[1:order]), history


@lru_cache(maxsize=4)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def lagrange_integrals(nodes: list[float], a: float, b: float,
                       basis: str | Callable[[np.ndarray], np.ndarray] = "sigma") -> list[float]:
    """``int_a^b L_j(u(s)) ds`` for the Lagrange basis polynomials ``L_j`` through ``u(nodes)`` (``nodes``:
    VE sigmas, newest first), with the interpolation variable ``u = s`` (``basis="sigma"``),
    ``u = log s`` (``"log_sigma"``) or any smooth increasing ``u(s)`` given as a callable on arrays.

    Gauss-Legendre quadrature: with ``u = s`` the integrand is a polynomial of degree ``< len(nodes)``
    and 8 nodes integrate it exactly; otherwise the integral is taken over ``v = log s`` (integrand
    ``L_j(u(e^v)) e^v``, smooth) with 24 nodes (relative error below 1e-12 on the intervals of any
    grid here). ``b = 0`` is allowed with ``basis="sigma"`` only.

    Returns:
        ``len(nodes)`` weights, in the order of ``nodes``; they sum to ``b - a``.
    """
    k = len(nodes)
    if basis == "sigma":
        t, w = _gauss_legendre(8)
        u = 0.5 * (b - a) * t + 0.5 * (b + a)
        weight = 0.5 * (b - a) * w
        u_nodes = np.asarray(nodes, dtype=np.float64)
    else:
        u_of = np.log if basis == "log_sigma" else basis
        t, w = _gauss_legendre(24)
        lo, hi = math.log(a), math.log(b)
        v = 0.5 * (hi - lo) * t + 0.5 * (hi + lo)
        weight = 0.5 * (hi - lo) * w * np.exp(v)  # ds = e^v dv
        u, u_nodes = u_of(np.exp(v)), u_of(np.asarray(nodes, dtype=np.float64))
    out = []
    for j in range(k):
        poly = np.ones_like(u)
        for m in range(k):
            if m != j:
                poly = poly * (u - u_nodes[m]) / (u_nodes[j] - u_nodes[m])
        out.append(float(np.sum(weight * poly)))
    return out
