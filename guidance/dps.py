"""DPS-style reward guidance (Chung et al., arXiv 2209.14687) and FreeDoM (Yu et al., arXiv
2303.09833): the reward gradient through the Tweedie estimate shifts the kernel mean."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from diffsample.solvers.solver import Grid

from diffsample.guidance._common import GuidedDenoiser, alpha_sigma, row_norm
from diffsample.guidance.loop_hooks import LoopHooks
from diffsample.guidance.term import Cond, Denoiser
from diffsample.guidance.reward_grad import check_grad_wrt, reward_grad
from diffsample.guidance.rewards import Reward, as_reward


@dataclass(frozen=True)
class DPS:
    """Reward guidance through the denoiser (DPS / "gradient guidance"), as a denoiser wrapper:

    ``score -> score + scale * g``,  ``g = grad_{x_t} r(decode(D(x_t)))``,

    i.e. ``denoised + scale * sigma^2 / alpha * g`` (``score = (alpha D - x) / sigma^2``). For a
    DDPM step this is the mean shift ``x_s = x'_s + zeta_t g`` of the reward form of DPS
    (docs/methods/reward_baselines.md#dps) with ``zeta_t = scale * beta_t / sqrt(alpha_t)``;
    ``scale = 1 / beta`` is the naive match to the tilted target ``p0 exp(r / beta)``.
    ``normalize=True`` divides ``g`` by ``||g|| / sqrt(N)`` per sample (the norm-normalised step
    of the DPS paper's ``zeta_t = zeta' / ||y - A(x0)||`` rule, in reward form). Works with every
    solver. Cost per call: 1 NFE, one backward pass through the denoiser (2 model evaluations),
    one reward forward / backward.

    Raises:
        ValueError: ``scale < 0`` or non-finite, unknown ``grad_wrt``.
    """

    reward: Reward | Callable[..., Tensor]
    scale: float = 1.0
    normalize: bool = False
    grad_wrt: str = "x_t"
    decode: Callable[[Tensor], Tensor] | None = None
    name: str = field(default="dps", repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.scale < math.inf:
            raise ValueError(f"{self.name}: scale must be a finite number >= 0, got {self.scale}")
        check_grad_wrt(self.grad_wrt, self.name)
        object.__setattr__(self, "reward", as_reward(self.reward))

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        return DPSDenoiser(denoiser, self)


class DPSDenoiser(GuidedDenoiser):
    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        term = self.term
        if term.scale == 0.0:
            return self.inner(x, t, cond)
        out = reward_grad(self.inner, x, t, cond, term.reward, term.decode, term.grad_wrt)
        a, s = alpha_sigma(self.noise_schedule, t, x)
        g = out.grad
        if term.normalize:
            g = g * (math.sqrt(g[0].numel()) / row_norm(g).clamp_min(1e-30))
        return out.denoised + term.scale * (s**2 / a) * g


@dataclass(frozen=True)
class FreeDoM(DPS):
    """FreeDoM (Yu et al., arXiv 2303.09833): the DPS-form reward gradient plus *time travel*:
    on the steps in ``window`` (fractions of the run, ``(start, stop)``), each step is redone
    ``repeats`` times after re-noising its result back to the step's start,
    ``x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t sigma_s / alpha_s)^2) z``
    (docs/methods/reward_baselines.md#freedom). The sampler runs the repeats; they cost ``1 + repeats``
    NFE on those steps. The official code's gradient-norm rule for the step size is not
    reproduced: ``scale`` is constant (``normalize=True`` for a norm-normalised step).

    Raises:
        ValueError: as :class:`DPS`; ``repeats < 0``; a window outside ``0 <= start <= stop <= 1``.
    """

    repeats: int = 2
    window: tuple[float, float] = (0.3, 0.7)
    name: str = field(default="freedom", repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 0:
            raise ValueError(f"freedom: repeats must be an integer >= 0, got {self.repeats!r}")
        lo, hi = self.window
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"freedom: window must satisfy 0 <= start <= stop <= 1, got {self.window}")

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        return FreeDoMDenoiser(denoiser, self)


class FreeDoMDenoiser(DPSDenoiser):
    def loop_hooks(self) -> LoopHooks:
        """FreeDoM's time travel: the loop redoes steps inside the window."""
        return LoopHooks(recurrence=self.recurrence)

    def recurrence(self, grid: Grid, i: int) -> int:
        """Time-travel repeats of step ``i`` (0 on the step to sigma = 0)."""
        lo, hi = self.term.window
        if grid.sigma_list[i + 1] == 0.0 or not lo <= i / grid.steps < hi:
            return 0
        return self.term.repeats
