"""LMS: k-diffusion's linear multistep sampler (variable-step Adams-Bashforth in VE sigma)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from diffsample.solvers._ve_multistep import MultistepSolver, SlopeHistory, lagrange_integrals, multistep_step
from diffsample.solvers.solver import Denoise, Grid, NoiseFn


@dataclass(frozen=True)
class LMS(MultistepSolver):
    r"""Linear multistep (k-diffusion ``sample_lms``, Crowson; the Adams-Bashforth family on the
    probability-flow ODE of Karras et al. 2022, arXiv 2206.00364, in VE sigma).

    With ``y = x / alpha``, ``s = sigma / alpha`` and slope ``d_i = (y_i - D_i) / s_i``:

    ``y_{i+1} = y_i + sum_{j < k} d_{i-j} int_{s_i}^{s_{i+1}} L_j(s) ds``,  ``k = min(order, i + 1)``

    with ``L_j`` the Lagrange basis polynomials through ``s_i, ..., s_{i-k+1}``: the variable-step
    Adams-Bashforth method of order ``k``. k-diffusion integrates the weights with
    ``scipy.integrate.quad``; here Gauss-Legendre quadrature gives them exactly. The last step is
    integrated to ``s = 0`` like every other (no special case, as in k-diffusion). The same update
    as ``deis:basis=rho`` (which instead steps to ``sigma = 0`` with ``x = D``).

    Checked against k-diffusion ``sample_lms`` (transcribed, MIT) on the exact Gaussian mixture to
    1e-9 (tests/solvers/test_breadth_crosscheck.py).

    Stages: 1 denoiser call per step. Deterministic order: ``order`` (tests/solvers/test_order.py).

    Raises:
        ValueError: ``order`` not in 1-4.
    """

    order: int = 4

    def __post_init__(self) -> None:
        if self.order not in (1, 2, 3, 4):
            raise ValueError(f"LMS order must be 1, 2, 3 or 4, got {self.order!r}")

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: SlopeHistory, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, SlopeHistory]:
        return multistep_step(denoise, x, grid, i, state, self.order, _weights, final_is_denoised=False)


def _weights(order: int, history: SlopeHistory, s: float, s_next: float) -> list[float]:
    return [c / (s_next - s) for c in lagrange_integrals(list(history.s[:order]), s, s_next, "sigma")]
