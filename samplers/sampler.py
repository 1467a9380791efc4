"""The sampling loop: noise (and conditioning) in, samples out, with exact NFE accounting."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffsample.guidance.base import Cond, Denoiser
from diffsample.solvers.accounting import count_events, count_model_evals
from diffsample.solvers.base import Grid, NoiseFn, NoiseSchedule, Solver
from diffsample.solvers.step_schedules import _check_n

StepSchedule = Callable[[NoiseSchedule, int], Tensor]


class NonFiniteError(FloatingPointError):
    """The model returned NaN or inf (e.g. fp16 overflow); names the step and the noise level."""


@dataclass(frozen=True)
class StepInfo:
    """Passed to the per-step callback after step ``i`` (``x`` is the sample at grid point ``i + 1``)."""

    i: int
    x: Tensor
    grid: Grid


@dataclass(frozen=True)
class SampleResult:
    """Output of a :class:`Sampler` run.

    Attributes:
        x: final samples ``(B, *dims)`` in native space (at ``sigma = 0`` when ``final="zero"``).
        nfe: denoiser calls (the solver-level count papers report).
        model_evals: network passes per sample in forward-equivalents (CFG doubles; a backward pass
            counts 2; DESIGN.md section 6.3).
        grid: the discretisation used.
        wall_time_s: wall-clock seconds of the loop.
        events: counts of named events during the run, e.g. ``{"stein_fallback": 1}`` when a
            SteinDiff step fell back to the plain candidate.
    """

    x: Tensor
    nfe: int
    model_evals: float
    grid: Grid
    wall_time_s: float
    events: dict[str, int] = field(default_factory=dict)


def prior_scale(grid: Grid) -> float:
    """Std of the initial state: ``sqrt(alpha_0^2 + sigma_0^2)``, the marginal std at ``t_0`` for
    unit-variance data. Exactly diffusers' ``init_noise_sigma = 1`` for VP and rectified flow;
    ``sigma_max`` to within ``1 / (2 sigma_max^2)`` relative for VE."""
    return math.hypot(grid.alpha_list[0], grid.sigma_list[0])


@dataclass(frozen=True)
class Sampler:
    """Run ``solver`` over the grid ``step_schedule`` gives for ``steps`` intervals.

    Args:
        solver: a :class:`~diffsample.solvers.base.Solver`.
        step_schedule: ``(noise_schedule, n) -> t`` (see :mod:`diffsample.solvers.step_schedules`).
        steps: number of grid intervals (>= 1); equals ``nfe`` for single-stage solvers.
        final: ``"zero"`` -- evaluate at ``steps`` schedule points and denoise to ``sigma = 0`` on
            the last step (diffusers ``final_sigmas_type="zero"``, k-diffusion's trailing 0);
            ``"last"`` -- take ``steps + 1`` schedule points and stop at the last (``sigma > 0``).
        allow_nonfinite: keep going when the model returns NaN/inf instead of raising.
        progress: show a tqdm progress bar.

    Raises:
        ValueError: ``steps < 1`` or not an integer, unknown ``final``, a schedule that cannot
            produce the requested points.
    """

    solver: Solver
    step_schedule: StepSchedule
    steps: int
    final: Literal["zero", "last"] = "zero"
    allow_nonfinite: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        try:
            _check_n(self.steps)
        except ValueError:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}") from None
        if self.final not in ("zero", "last"):
            raise ValueError(f"final must be 'zero' or 'last', got {self.final!r}")
        if not isinstance(self.solver, Solver):
            raise ValueError(f"solver must implement the Solver protocol, got {self.solver!r}")

    def grid(self, noise_schedule: NoiseSchedule) -> Grid:
        """The discretisation of one run under ``noise_schedule``."""
        if self.final == "zero":
            return Grid.from_t(noise_schedule, self.step_schedule(noise_schedule, self.steps), final_zero=True)
        return Grid.from_t(noise_schedule, self.step_schedule(noise_schedule, self.steps + 1))

    def __call__(self, denoiser: Denoiser, noise: Tensor, cond: Cond | None = None, *,
                 noise_fn: NoiseFn | None = None,
                 callback: Callable[[StepInfo], None] | None = None) -> SampleResult:
        """Sample from standard-normal ``noise`` of shape ``(B, *dims)``.

        The loop state is kept in at least float32 (fp16/bf16 noise is upcast; the denoiser casts
        to its model dtype). Stochastic solvers draw from ``noise_fn`` (default: ``torch.randn_like``
        on the global generator; use :class:`~diffsample.samplers.seeds.SeededNoiseFn` for
        per-sample seeds).

        The loop runs under ``torch.no_grad()``; a term that needs gradients (reward guidance,
        Stein probes) opens ``torch.enable_grad()`` itself.

        Raises:
            NonFiniteError: the denoiser returned NaN/inf (unless ``allow_nonfinite``).
        """
        grid = self.grid(denoiser.noise_schedule)
        work_dtype = torch.promote_types(noise.dtype, torch.float32)
        x = noise.to(work_dtype) * prior_scale(grid)
        if self.solver.stochastic and noise_fn is None:
            noise_fn = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
        nfe = 0
        current = 0

        def denoise(x_in: Tensor, t: Tensor) -> Tensor:
            nonlocal nfe
            nfe += 1
            out = denoiser(x_in, t, cond)
            if not self.allow_nonfinite and not bool(torch.isfinite(out).all()):
                raise NonFiniteError(
                    f"model output is not finite at step {current} (t={float(t[0]):.6g}, "
                    f"sigma={float(denoiser.noise_schedule.sigma(t[:1].double())):.6g}); "
                    "pass allow_nonfinite=True to continue"
                )
            return out

        start = time.perf_counter()
        # No autograd graph by default; guidance terms and Stein probes that need gradients open
        # ``torch.enable_grad()`` locally.
        with count_model_evals() as rows, count_events() as events, torch.no_grad():
            state = self.solver.init(x, grid)
            for i in tqdm(range(grid.steps), disable=not self.progress, leave=False, desc="sampling"):
                current = i
                x, state = self.solver.step(denoise, x, grid, i, state, noise_fn)
                if callback is not None:
                    callback(StepInfo(i, x, grid))
        return SampleResult(x=x, nfe=nfe, model_evals=rows[0] / x.shape[0], grid=grid,
                            wall_time_s=time.perf_counter() - start, events=dict(events))
