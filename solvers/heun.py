"""Heun's method (EDM), second order."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise


@dataclass(frozen=True)
class Heun:
    r"""Heun's 2nd-order method on the probability-flow ODE in VE coordinates (EDM Algorithm 1,
    Karras et al. 2022, arXiv 2206.00364), without churn.

    With ``y = x / alpha``, ``s = sigma / alpha`` and ``d(y, s) = (y - D) / s``:
    ``y' = y_i + (s_{i+1} - s_i) d_i``, then ``y_{i+1} = y_i + (s_{i+1} - s_i) (d_i + d(y', s_{i+1})) / 2``.
    The step to ``s = 0`` is a plain Euler step (EDM). A step that starts at ``alpha = 0`` (pure
    noise, the rectified-flow point ``t = 1``) has ``s = inf``: the trapezoid has no limit there, so
    that step is the Euler step's limit, the DDIM update ``x' = (sigma_{i+1} / sigma_i) x_i +
    alpha_{i+1} D_i`` (one step of local error O(h^2), so the global order stays 2). Stages: 2
    denoiser calls per step, 1 on a step that ends at ``sigma = 0`` or starts at ``alpha = 0``.
    Order 2. Deterministic.

    ``space="flow"`` runs the same rule in rectified-flow coordinates, ``y = x / (alpha + sigma)``,
    ``s = sigma / (alpha + sigma)`` (the ODE keeps the form ``dy/ds = (y - D) / s``; on a
    rectified-flow model these are its own ``x`` and ``t``): how ComfyUI and diffusers'
    FlowMatchHeunDiscreteScheduler run Heun on flow models. The trapezoid weights the second
    denoised estimate by ``(r - 1) / 2``, ``r = s_i / s_{i+1}``; ``s`` in flow space is bounded by 1,
    so csflow's first step on the bundled model (VE sigma 157 -> 13, flow s 0.994 -> 0.93) gets
    weight 0.03 there against 5.5 in VE space, an extrapolation. Raises ``ValueError`` for another space.
    """

    space: str = "ve"

    def __post_init__(self) -> None:
        if self.space not in ("ve", "flow"):
            raise ValueError(f"space must be ve or flow, got {self.space!r}")

    @property
    def order(self) -> int:
        return 2

    @property
    def stochastic(self) -> bool:
        return False

    def init(self, x: Tensor, grid: Grid) -> None:
        return None

    def nfe(self, grid: Grid) -> int:
        starts_at_pure_noise = self.space == "ve" and grid.alpha_list[0] == 0.0
        euler_steps = (1 if grid.final_zero else 0) + (1 if starts_at_pure_noise else 0)
        return 2 * grid.steps - min(euler_steps, grid.steps)

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: None, noise_fn: NoiseFn | None = None
    ) -> tuple[Tensor, None]:
        alpha, alpha_next = grid.alpha_list[i], grid.alpha_list[i + 1]
        if self.space == "flow":
            return self._flow_step(denoise, x, grid, i), None
        if alpha == 0.0:
            # s = inf: the Euler step's limit (DDIM); x carries no signal, only sigma-scaled noise.
            denoised = call_denoise(denoise, x, grid.t_list[i])
            return (grid.sigma_list[i + 1] / grid.sigma_list[i]) * x + alpha_next * denoised, None
        s, s_next = grid.sigma_list[i] / alpha, grid.sigma_list[i + 1] / alpha_next
        y = x / alpha
        # Euler predictor.
        d = (y - call_denoise(denoise, x, grid.t_list[i])) / s
        y_next = y + (s_next - s) * d
        if s_next == 0:
            return alpha_next * y_next, None
        # Trapezoidal corrector with the slope at the predicted point.
        d_next = (y_next - call_denoise(denoise, alpha_next * y_next, grid.t_list[i + 1])) / s_next
        return alpha_next * (y + (s_next - s) * 0.5 * (d + d_next)), None

    def _flow_step(self, denoise: Denoise, x: Tensor, grid: Grid, i: int) -> Tensor:
        """One step with ``y = x / (alpha + sigma)``, ``s = sigma / (alpha + sigma)``."""
        scale = grid.alpha_list[i] + grid.sigma_list[i]
        scale_next = grid.alpha_list[i + 1] + grid.sigma_list[i + 1]
        s, s_next = grid.sigma_list[i] / scale, grid.sigma_list[i + 1] / scale_next
        y = x / scale
        d = (y - call_denoise(denoise, x, grid.t_list[i])) / s
        y_next = y + (s_next - s) * d
        if s_next == 0:
            return scale_next * y_next
        d_next = (y_next - call_denoise(denoise, scale_next * y_next, grid.t_list[i + 1])) / s_next
        return scale_next * (y + (s_next - s) * 0.5 * (d + d_next))
