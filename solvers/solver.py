"""Core types of the solver layer: the process, the grid, the solver protocol.

Conventions (used everywhere in :mod:`diffsample`):

* The forward process is ``x_t = alpha(t) * x0 + sigma(t) * eps`` with ``eps ~ N(0, I)``; samples
  live in this *native* space (VP, VE/EDM or rectified-flow coordinates, whichever the model uses).
* ``lambda_ = log(alpha / sigma)`` is the **half** log-SNR (DPM-Solver's convention,
  arXiv 2206.00927 eq. 3.1); the full log-SNR ``2 * lambda_`` is called ``log_snr`` where needed.
* The VE-equivalent noise level is ``sigma / alpha = exp(-lambda_)`` (the EDM / k-diffusion sigma).
* ``denoised`` is the data prediction ``D(x, t) ~ E[x0 | x_t = x]``; every solver works with it.
* Grid index ``i`` runs from the noisiest point (0) to the cleanest (``steps``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

Denoise = Callable[[Tensor, Tensor], Tensor]
"""``(x, t) -> denoised``. Conditioning and guidance are already bound.

``x`` has shape ``(B, *dims)`` in native space, ``t`` has shape ``(B,)`` in the noise schedule's own
time unit; the result has the shape of ``x``.
"""

NoiseFn = Callable[[float, float], Tensor]
"""``(sigma, sigma_next) -> z``: a standard-normal tensor shaped like the state ``x`` (seeded per
sample or Brownian), consumed by stochastic solvers for the step ``sigma -> sigma_next``."""


class NoiseSchedule(ABC):
    """Forward process ``x_t = alpha(t) * x0 + sigma(t) * eps`` (DPM-Solver's ``NoiseScheduleVP``
    notation, arXiv 2206.00927 section 2).

    Subclasses give ``alpha`` and ``sigma`` as functions of their own time variable ``t`` (a
    diffusers timestep for discrete VP, a continuous time for the others) and the inverse
    ``t_from_lambda`` of the half log-SNR ``lambda_ = log(alpha / sigma)``, which is strictly
    decreasing in ``t`` on ``[t_min, t_max]``.

    Attributes:
        t_min: cleanest time at which the model may be evaluated (sigma > 0).
        t_max: noisiest time at which the model may be evaluated.
        t_zero: the time label of the clean end (sigma = 0); the grid's terminal point when a run
            denoises to zero. The model is never evaluated there.
    """

    t_min: float
    t_max: float
    t_zero: float = 0.0

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale ``alpha(t)``, same shape as ``t``."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale ``sigma(t)``, same shape as ``t``."""

    def lambda_(self, t: Tensor) -> Tensor:
        """Half log-SNR ``log(alpha / sigma)``, same shape as ``t``."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    @abstractmethod
    def t_from_lambda(self, lambda_: Tensor) -> Tensor:
        """Inverse of :meth:`lambda_` on ``[t_min, t_max]``."""

    def sigma_ve(self, t: Tensor) -> Tensor:
        """VE-equivalent noise level ``sigma / alpha = exp(-lambda_)`` (the EDM sigma)."""
        return torch.exp(-self.lambda_(t))

    def t_from_sigma_ve(self, sigma_ve: Tensor) -> Tensor:
        """Inverse of :meth:`sigma_ve`."""
        return self.t_from_lambda(-torch.log(sigma_ve))

    def sigma_ve_range(self) -> tuple[float, float]:
        """Finite ``(sigma_ve_min, sigma_ve_max)`` spanned by ``[t_min, t_max]``.

        Where ``t_max`` has ``alpha = 0`` (rectified flow at t = 1) the VE sigma is infinite; the
        range then stops at ``t_max_finite``.
        """
        ends = torch.tensor([self.t_min, self.t_max_finite], dtype=torch.float64)
        s = self.sigma_ve(ends)
        return float(s[0]), float(s[1])

    @property
    def t_max_finite(self) -> float:
        """Noisiest time with a finite ``lambda_`` (``t_max`` unless ``alpha(t_max) = 0``)."""
        return self.t_max


def _short(t: Tensor, edge: int = 4) -> str:
    """``t`` as a list for a message, its middle elided when it has more than ``2 * edge`` values."""
    values = t.tolist()
    if len(values) <= 2 * edge:
        return str(values)
    return f"[{', '.join(map(str, values[:edge]))}, ... ({len(values) - 2 * edge} more), {', '.join(map(str, values[-edge:]))}]"


@dataclass(frozen=True, eq=False)
class Grid:
    """A discretisation of one run, noisiest first, built once before the loop.

    Each tensor field has shape ``(steps + 1,)`` and dtype float64. When the run denoises to zero
    the last point has ``sigma = 0``, ``alpha = 1``, ``lambda_ = +inf`` and ``t = t_zero``.
    Python-float copies (``*_list``) serve the solvers' scalar arithmetic, which keeps the
    per-step overhead low.
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    lambda_: Tensor
    noise_schedule: NoiseSchedule
    t_list: tuple[float, ...] = field(init=False, repr=False)
    alpha_list: tuple[float, ...] = field(init=False, repr=False)
    sigma_list: tuple[float, ...] = field(init=False, repr=False)
    lambda_list: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("t", "alpha", "sigma", "lambda_"):
            object.__setattr__(self, f"{name.rstrip('_')}_list", tuple(getattr(self, name).tolist()))

    @classmethod
    def from_t(cls, noise_schedule: NoiseSchedule, t: Tensor, *, final_zero: bool = False) -> "Grid":
        """Build the grid at times ``t`` (shape ``(n,)``, strictly decreasing).

        With ``final_zero=True`` a terminal point at ``sigma = 0`` is appended, so the grid has
        ``n + 1`` points and ``n`` steps, the last of which denoises to zero.

        Raises:
            ValueError: if ``t`` is not 1-D, is empty (or has a single point without
                ``final_zero``), is not strictly decreasing in ``lambda_``, or leaves
                ``[t_min, t_max]``.
        """
        t = torch.as_tensor(t, dtype=torch.float64).flatten()
        if t.numel() == 0 or (t.numel() == 1 and not final_zero):
            raise ValueError(f"a grid needs at least 2 points, got {t.numel()}")
        if not torch.isfinite(t).all():
            raise ValueError(f"grid times must be finite, got {_short(t)}")
        lo, hi = noise_schedule.t_min, noise_schedule.t_max
        tol = 1e-9 * max(1.0, abs(hi))
        if (t < lo - tol).any() or (t > hi + tol).any():
            raise ValueError(f"grid times {_short(t)} leave the schedule's range [{lo}, {hi}]")
        alpha, sigma = noise_schedule.alpha(t), noise_schedule.sigma(t)
        lambda_ = noise_schedule.lambda_(t)
        if t.numel() > 1 and not (lambda_[1:] > lambda_[:-1]).all():
            raise ValueError(
                f"grid of {t.numel()} points is not strictly decreasing in noise level (repeated or reversed times): "
                f"{_short(t)}"
            )
        if final_zero:
            one = torch.ones(1, dtype=torch.float64)
            t = torch.cat([t, one * noise_schedule.t_zero])
            alpha = torch.cat([alpha, one])
            sigma = torch.cat([sigma, one * 0.0])
            lambda_ = torch.cat([lambda_, one * math.inf])
        return cls(t=t, alpha=alpha, sigma=sigma, lambda_=lambda_, noise_schedule=noise_schedule)

    def segment(self, i: int) -> "Grid":
        """The one-step grid ``[i, i + 1]`` of this grid (e.g. to ask a solver for its calls on step ``i``)."""
        sl = slice(i, i + 2)
        return Grid(t=self.t[sl], alpha=self.alpha[sl], sigma=self.sigma[sl], lambda_=self.lambda_[sl],
                    noise_schedule=self.noise_schedule)

    @property
    def steps(self) -> int:
        """Number of grid intervals."""
        return self.t.numel() - 1

    @property
    def final_zero(self) -> bool:
        """Whether the last point is the clean end ``sigma = 0``."""
        return self.sigma_list[-1] == 0.0


SolverState = Any
"""Whatever a solver threads from one step to the next (history of ``denoised``, last sample …);
returned by ``init`` / ``step`` and passed in again, never stored on the solver."""


@runtime_checkable
class Solver(Protocol):
    """One update rule ``x_i -> x_{i+1}`` on a :class:`Grid` (pure numerics, no models or seeds).

    Attributes:
        order: convergence order of the deterministic update (global error ``O(h**order)``).
        stochastic: whether :meth:`step` consumes ``noise_fn``.
        batch_coupled: optional (read as ``getattr(solver, "batch_coupled", False)``): ``True``
            when a sample's result depends on the other rows of its batch (SteinDiff's batch
            statistics and positional probes); a solver without it must treat every row alone,
            so that a seed gives the same sample whatever the batch size.
    """

    order: int
    stochastic: bool

    def init(self, x: Tensor, grid: Grid) -> SolverState: ...

    def step(
        self,
        denoise: Denoise,
        x: Tensor,
        grid: Grid,
        i: int,
        state: SolverState,
        noise_fn: NoiseFn | None = None,
    ) -> tuple[Tensor, SolverState]:
        """Advance ``x`` (shape ``(B, *dims)``, native space, at grid point ``i``) to point ``i + 1``.

        Denoiser calls: ``denoise(x_eval, t)`` with ``t`` of shape ``(B,)`` in the noise schedule's
        time; a single-stage solver calls it once, at ``(x, grid.t[i])``, before anything else (the
        scheduler shim relies on this to hand the pipeline's own prediction back); a multi-stage one
        (Heun) also at intermediate points; a corrector (SteinDiff) adds probe calls. A full run makes
        exactly :meth:`nfe` calls. ``denoise`` is never called at ``sigma = 0``.

        Noise: only a ``stochastic`` solver consumes ``noise_fn``, and only through
        :func:`~diffsample.solvers.transition.sample_kernel` (once per step whose kernel has
        ``std > 0``), so a guidance term's transition hook can replace the draw. A deterministic
        solver never calls ``noise_fn``. ``tests/solvers/test_protocol.py`` checks both over every
        registered solver.

        Returns:
            ``(x_next, state)``: the sample at point ``i + 1`` (shape of ``x``) and the state to
            pass to the next call.

        Raises:
            ValueError: a stochastic solver called without ``noise_fn``.
        """
        ...

    def nfe(self, grid: Grid) -> int:
        """Denoiser calls a full run over ``grid`` makes."""
        ...


def call_denoise(denoise: Denoise, x: Tensor, t: float) -> Tensor:
    """Evaluate ``denoise`` at the scalar schedule time ``t`` broadcast to the batch."""
    t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return denoise(x, torch.full((x.shape[0],), t, dtype=t_dtype, device=x.device))


def require_noise(noise_fn: NoiseFn | None, solver: object) -> NoiseFn:
    """Return ``noise_fn`` or raise a clear error for a stochastic solver called without one."""
    if noise_fn is None:
        raise ValueError(f"{type(solver).__name__} is stochastic and needs a noise_fn")
    return noise_fn


def tree_map(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """Apply ``fn`` to every tensor in a (nested) NamedTuple / tuple / list / dict solver state."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(tree_map(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    return tree
