"""iPNDM and iPNDM_v: Adams-Bashforth steps on the noise prediction in VE sigma."""

from __future__ import annotations

from dataclasses import dataclass
from torch import Tensor

from diffsample.solvers._ve_multistep import MultistepSolver, SlopeHistory, multistep_step
from diffsample.solvers.solver import Denoise, Grid, NoiseFn

# Adams-Bashforth weights for a uniform step (newest slope first), orders 1-4.
_AB = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def variable_step_weights(order: int, h: list[float]) -> tuple[float, ...]:
    """iPNDM_v's weights (newest slope first) from the signed VE steps ``h = [h_n, h_{n-1}, ...]``
    (``h_n = s_{i+1} - s_i``), as zju-pi/diff-sampler ``ipndm_v_sampler`` computes them.

    Orders 2 and 3 are the variable-step Adams-Bashforth weights' leading terms; on a uniform grid
    they are AB2 and AB3. The order-4 weights are (57, -65, 43, -11) / 24 on a uniform grid (AB4:
    (55, -59, 37, -9) / 24) and do not sum to 1 off a geometric grid; both are reproduced as the
    reference computes them.
    """
    if order == 1:
        return (1.0,)
    h_n, h_n_1 = h[0], h[1]
    if order == 2:
        return ((2 + h_n / h_n_1) / 2, -(h_n / h_n_1) / 2)
    h_n_2 = h[2]
    temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if order == 3:
        return ((2 + h_n / h_n_1) / 2 + temp1, -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1, temp1 * h_n_1 / h_n_2)
    h_n_3 = h[3]
    temp2 = (((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2)))
             * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3)))
    r = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    return ((2 + h_n / h_n_1) / 2 + temp1 + temp2,
            -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + h_n_1 / h_n_2 + r) * temp2,
            temp1 * h_n_1 / h_n_2 + (h_n_1 / h_n_2 + r * (1 + h_n_2 / h_n_3)) * temp2,
            -temp2 * r * h_n_1 / h_n_2)


@dataclass(frozen=True)
class IPNDM(MultistepSolver):
    r"""Improved PNDM (iPNDM; Zhang & Chen 2022, arXiv 2204.13902 section 5 / appendix, "iPNDM"; the
    low-NFE benchmark of Zhou et al. 2023, arXiv 2311.18608) and its variable-step form iPNDM_v.

    In VE coordinates ``y = x / alpha``, ``s = sigma / alpha`` with slope ``d_i = (y_i - D_i) / s_i``
    (the noise prediction):

    ``y_{i+1} = y_i + (s_{i+1} - s_i) sum_{j < k} c_j d_{i-j}``,  ``k = min(max_order, i + 1)``

    * ``variable=False`` (iPNDM): ``c`` are the uniform-step Adams-Bashforth weights (1; 3/2, -1/2;
      (23, -16, 5)/12; (55, -59, 37, -9)/24) whatever the grid;
    * ``variable=True`` (iPNDM_v): weights from the step ratios (:func:`variable_step_weights`).

    Checked against zju-pi/diff-sampler ``ipndm_sampler`` / ``ipndm_v_sampler`` (Apache-2.0), which
    ComfyUI's ``sample_ipndm`` / ``sample_ipndm_v`` copy: same trajectories on the exact Gaussian
    mixture to 1e-9 (tests/solvers/test_breadth_crosscheck.py). As there, the step to ``sigma = 0``
    is ``x = D`` and a slope at ``s = inf`` (a rectified-flow grid starting at ``t = 1``) is not kept
    in the history.

    Order (measured on exact Gaussian data, tests/solvers/test_order.py): the fixed weights assume
    equal steps, so on a non-uniform grid (Karras, lambda-uniform) iPNDM is a second-order method
    (its step error is ``O(h^3)`` whenever the step size varies); it reaches order 4 only on a grid
    uniform in VE sigma. iPNDM_v is also second order on Karras grids (its 4th-order weights are
    inconsistent off a geometric grid). Their strength is the error constant at 5-10 steps, not
    the asymptotic order. The exact variable-step Adams-Bashforth in sigma is ``lms`` (order 4).
    On grids whose consecutive steps differ by large factors the fixed weights extrapolate far off
    (MNIST, 5-step ``csflow`` grid, first step 40x the second: FD 62 against 1.2 for iPNDM_v; see
    docs/methods/solvers_breadth.md); use ``variable=True``, ``deis`` or ``lms`` there.

    Stages: 1 denoiser call per step. Deterministic.

    Raises:
        ValueError: ``max_order`` not in 1-4.
    """

    max_order: int = 4
    variable: bool = False

    def __post_init__(self) -> None:
        if self.max_order not in (1, 2, 3, 4):
            raise ValueError(f"iPNDM max_order must be 1, 2, 3 or 4, got {self.max_order!r}")

    @property
    def order(self) -> int:
        return 1 if self.max_order == 1 else 2

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: SlopeHistory, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, SlopeHistory]:
        return multistep_step(denoise, x, grid, i, state, self.max_order, self._weights)

    def _weights(self, order: int, history: SlopeHistory, s: float, s_next: float) -> tuple[float, ...]:
        if self.variable:
            nodes = (s_next,) + history.s[:order]
            return variable_step_weights(order, [nodes[k] - nodes[k + 1] for k in range(order)])
        return _AB[order - 1]
