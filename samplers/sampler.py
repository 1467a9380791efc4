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

from diffsample.guidance.loop_hooks import RunHooks, collect_hooks
from diffsample.guidance.term import Cond, Denoiser
from diffsample.core.accounting import add_event, count_events, count_model_evals
from diffsample.solvers.model_time import ModelTimeMap, model_time_map
from diffsample.solvers.solver import Grid, NoiseFn, NoiseSchedule, Solver, call_denoise
from diffsample.solvers.stop_time import StopTime, check_stop_return, stop_grid
from diffsample.solvers.step_schedules import check_steps
from diffsample.solvers.transition import use_transition

from diffsample.samplers.twisted_smc import twisted_smc

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
        x: final samples ``(B, *dims)`` in native space (at ``sigma = 0`` when ``final="zero"``; with
            a ``stop``, what ``stop_return`` names).
        nfe: denoiser calls (the solver-level count papers report).
        model_evals: network passes per sample in forward-equivalents (CFG doubles; a backward pass
            counts 2; docs/design.md#nfe-and-model_evals).
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
        solver: a :class:`~diffsample.solvers.solver.Solver`.
        step_schedule: ``(noise_schedule, n) -> t`` (see :mod:`diffsample.solvers.step_schedules`).
            A schedule with decoupled model times (``t_model``: an LD3 schedule fitted with
            ``decoupled=True``) has the model evaluated at ``t_model[i]`` when the solver asks at
            grid point ``i`` (:mod:`diffsample.solvers.model_time`).
        steps: number of grid intervals (>= 1); equals ``nfe`` for single-stage solvers.
        final: ``"zero"`` -- evaluate at ``steps`` schedule points and denoise to ``sigma = 0`` on
            the last step (diffusers ``final_sigmas_type="zero"``, k-diffusion's trailing 0);
            ``"last"`` -- take ``steps + 1`` schedule points and stop at the last (``sigma > 0``).
        allow_nonfinite: keep going when the model returns NaN/inf instead of raising.
        progress: show a tqdm progress bar.
        stop: end the run at this noise level (:class:`~diffsample.solvers.stop_time.StopTime`;
            truncated sampling, arXiv 2606.13796) instead of ``final``: the step schedule is
            evaluated between ``t_max`` and the stop, whose time is the grid's last point
            (:func:`~diffsample.solvers.stop_time.stop_grid`). ``None``: no truncation.
        stop_return: with a ``stop``, what the run returns: ``"noisy"`` the state ``x_stop`` (the
            paper's semantics; its law is the OU push ``U_t0`` of the model's law on a VP process),
            ``"denoised"`` ``D(x_stop)`` (one extra model evaluation, counted in ``nfe`` and
            ``model_evals``), ``"rescaled"`` ``x_stop / alpha_stop``, ``"ou"``
            ``x_stop / sqrt(alpha_stop^2 + sigma_stop^2)`` (= ``noisy`` on VP).

    Raises:
        ValueError: ``steps < 1`` or not an integer, unknown ``final`` or ``stop_return``, a
            ``stop`` that is not a StopTime, a schedule that cannot produce the requested points.
    """

    solver: Solver
    step_schedule: StepSchedule
    steps: int
    final: Literal["zero", "last"] = "zero"
    allow_nonfinite: bool = False
    progress: bool = False
    stop: StopTime | None = None
    stop_return: str = "noisy"

    def __post_init__(self) -> None:
        if self.stop is not None and not isinstance(self.stop, StopTime):
            raise ValueError(f"stop must be a StopTime or None, got {self.stop!r}")
        check_stop_return(self.stop_return)
        try:
            check_steps(self.steps)
        except ValueError:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}") from None
        if self.final not in ("zero", "last"):
            raise ValueError(f"final must be 'zero' or 'last', got {self.final!r}")
        if not isinstance(self.solver, Solver):
            raise ValueError(f"solver must implement the Solver protocol, got {self.solver!r}")

    def grid(self, noise_schedule: NoiseSchedule) -> Grid:
        """The discretisation of one run under ``noise_schedule``."""
        if self.stop is not None:
            return stop_grid(noise_schedule, self.step_schedule, self.steps, self.stop)
        if self.final == "zero":
            return Grid.from_t(noise_schedule, self.step_schedule(noise_schedule, self.steps), final_zero=True)
        return Grid.from_t(noise_schedule, self.step_schedule(noise_schedule, self.steps + 1))

    def __call__(self, denoiser: Denoiser, noise: Tensor, cond: Cond | None = None, *,
                 noise_fn: NoiseFn | None = None,
                 callback: Callable[[StepInfo], None] | None = None,
                 chain_noise: Callable[[int], tuple[Tensor, NoiseFn | None]] | None = None,
                 hooks: RunHooks | None = None) -> SampleResult:
        """Sample from standard-normal ``noise`` of shape ``(B, *dims)``.

        The loop state is kept in at least float32 (fp16/bf16 noise is upcast; the denoiser casts
        to its model dtype). Stochastic solvers draw from ``noise_fn`` (default: ``torch.randn_like``
        on the global generator; use :class:`~diffsample.samplers.seeds.SeededNoiseFn` for
        per-sample seeds).

        Guidance terms in the ``denoiser`` chain declare what they need from the loop
        (:class:`~diffsample.guidance.loop_hooks.LoopHooks`); ``hooks`` is what the run honours
        (default: :func:`~diffsample.guidance.loop_hooks.collect_hooks` of ``denoiser``). A
        ``transition`` replaces the draw of every stochastic step (NoiseTilt, SVDD); a
        ``recurrence(grid, i)`` redoes step ``i`` that many times after re-noising (FreeDoM time
        travel); ``chains`` / ``score`` run that many independent chains and keep the best
        (best-of-N; chain ``k >= 1`` starts from ``chain_noise(k) = (noise, noise_fn)``, default
        fresh ``torch.randn`` draws); a ``twist`` (Jeffrey guidance with ``particles > 1``) runs
        twisted SMC over that many particles per sample (:func:`~diffsample.samplers.twisted_smc.twisted_smc`;
        particle ``k >= 1`` likewise from ``chain_noise(k)``). ``nfe`` (denoiser calls) and
        ``model_evals`` (network passes per sample) are totals over all of it.

        The loop runs under ``torch.no_grad()``; a term that needs gradients (reward guidance,
        Stein probes) opens ``torch.enable_grad()`` itself.

        Raises:
            NonFiniteError: the denoiser returned NaN/inf (unless ``allow_nonfinite``).
            ValueError: ``noise`` that is not a real floating-point ``(B, *dims)`` tensor (complex
                or integer noise is refused); a noise-changing term (NoiseTilt, SVDD, twisted SMC) with a deterministic
                solver, more than one transition / best-of-N / twisted term in the chain, or twisted
                SMC combined with another loop hook.
        """
        if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 1 or noise.shape[0] < 1:
            what = f"{noise.dtype} tensor of shape {tuple(noise.shape)}" if isinstance(noise, Tensor) else repr(noise)
            raise ValueError(f"noise must be a real floating-point tensor of shape (B, *dims) with B >= 1, got a {what}")
        hooks = collect_hooks(denoiser) if hooks is None else hooks
        hooks.check(self.solver)
        grid = self.grid(denoiser.noise_schedule)
        model_times = model_time_map(self.step_schedule, grid)
        work_dtype = torch.promote_types(noise.dtype, torch.float32)
        best = hooks.best_of
        nfe, best_x, best_r = 0, None, None
        start = time.perf_counter()
        with count_model_evals() as rows, count_events() as events:
            if hooks.twist is not None:
                x, calls = self._run_smc(denoiser, grid, noise.to(work_dtype), cond, noise_fn, chain_noise, callback,
                                         hooks.twist, model_times)
                return SampleResult(x=x, nfe=calls, model_evals=rows[0] / noise.shape[0], grid=grid,
                                    wall_time_s=time.perf_counter() - start, events=dict(events))
            for k in range(best.chains if best is not None else 1):
                if k == 0:
                    noise_k, noise_fn_k = noise, noise_fn
                elif chain_noise is not None:
                    noise_k, noise_fn_k = chain_noise(k)
                else:
                    noise_k, noise_fn_k = torch.randn_like(noise), None
                x, calls = self._run(denoiser, grid, noise_k.to(work_dtype), cond, noise_fn_k, callback, hooks,
                                     model_times)
                nfe += calls
                if best is None:
                    best_x = x
                    continue
                with torch.no_grad():
                    r = best.score(x, cond)
                add_event("reward_evals", x.shape[0])
                if best_x is None:
                    best_x, best_r = x, r
                else:
                    better = r > best_r
                    best_x = torch.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x, best_x)
                    best_r = torch.where(better, r, best_r)
        return SampleResult(x=best_x, nfe=nfe, model_evals=rows[0] / noise.shape[0], grid=grid,
                            wall_time_s=time.perf_counter() - start, events=dict(events))

    def _checked(self, denoiser: Denoiser, step: list[int],
                 model_times: ModelTimeMap | None = None) -> tuple[Callable[..., Tensor], list[int]]:
        """``(denoise(x, t, cond), calls)``: ``denoiser`` with call counting and the non-finite check
        (``step[0]`` names the step in the error), evaluated at ``model_times(t)`` where the step
        schedule decouples the model's times from the grid's (LD3; :mod:`diffsample.solvers.model_time`)."""
        calls = [0]

        def denoise(x_in: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
            calls[0] += 1
            out = denoiser(x_in, t if model_times is None else model_times(t), cond)
            if not self.allow_nonfinite and not bool(torch.isfinite(out).all()):
                raise NonFiniteError(
                    f"model output is not finite at step {step[0]} (t={float(t[0]):.6g}, "
                    f"sigma={float(denoiser.noise_schedule.sigma(t[:1].double())):.6g}); "
                    "pass allow_nonfinite=True to continue"
                )
            return out

        return denoise, calls

    def _run_smc(self, denoiser: Denoiser, grid: Grid, noise: Tensor, cond: Cond | None, noise_fn: NoiseFn | None,
                 chain_noise, callback: Callable[[StepInfo], None] | None, twisted,
                 model_times: ModelTimeMap | None = None) -> tuple[Tensor, int]:
        """Twisted SMC (:func:`~diffsample.samplers.twisted_smc.twisted_smc`): ``(B outputs, denoiser calls)``."""
        step = [0]
        denoise, calls = self._checked(denoiser, step, model_times)

        def on_step(i: int, x: Tensor) -> None:
            step[0] = i + 1
            if callback is not None:
                callback(StepInfo(i, x, grid))

        with torch.no_grad():
            x = twisted_smc(self.solver, grid, denoise, twisted, noise, cond, noise_fn, chain_noise,
                            prior_scale(grid), on_step)
            x = self._finish(x, grid, lambda x_in, t: denoise(x_in, t, cond))
        return x, calls[0]

    def _finish(self, x: Tensor, grid: Grid, denoise: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """The output of a run stopped at the grid's last point, as ``stop_return`` asks."""
        if self.stop is None or grid.final_zero or self.stop_return == "noisy":
            return x
        alpha, sigma = grid.alpha_list[-1], grid.sigma_list[-1]
        if self.stop_return == "rescaled":
            return x / alpha
        if self.stop_return == "ou":
            return x / math.hypot(alpha, sigma)
        return call_denoise(denoise, x, grid.t_list[-1])

    def _run(self, denoiser: Denoiser, grid: Grid, noise: Tensor, cond: Cond | None, noise_fn: NoiseFn | None,
             callback: Callable[[StepInfo], None] | None, hooks: RunHooks,
             model_times: ModelTimeMap | None = None) -> tuple[Tensor, int]:
        """One chain: ``(final x, denoiser calls)``."""
        x = noise * prior_scale(grid)
        if noise_fn is None:
            noise_fn = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
        current = [0]
        checked, calls = self._checked(denoiser, current, model_times)

        def denoise(x_in: Tensor, t: Tensor) -> Tensor:
            return checked(x_in, t, cond)

        recurrences = hooks.recurrences
        # No autograd graph by default; guidance terms and Stein probes that need gradients open
        # ``torch.enable_grad()`` locally.
        with torch.no_grad(), use_transition(hooks.transition):
            state = self.solver.init(x, grid)
            for i in tqdm(range(grid.steps), disable=not self.progress, leave=False, desc="sampling"):
                current[0] = i
                x_next, new_state = self.solver.step(denoise, x, grid, i, state, noise_fn)
                for _ in range(sum(r(grid, i) for r in recurrences)):
                    # Time travel: back to grid point i with fresh noise, then redo the step.
                    x_back = renoise(x_next, grid, i, noise_fn)
                    x_next, new_state = self.solver.step(denoise, x_back, grid, i, state, noise_fn)
                x, state = x_next, new_state
                if callback is not None:
                    callback(StepInfo(i, x, grid))
            current[0] = grid.steps
            x = self._finish(x, grid, denoise)
        return x, calls[0]


def renoise(x_next: Tensor, grid: Grid, i: int, noise_fn: NoiseFn) -> Tensor:
    """Forward-diffuse a state at grid point ``i + 1`` back to point ``i``:
    ``x_i = (alpha_i / alpha_{i+1}) x_{i+1} + sqrt(sigma_i^2 - (alpha_i sigma_{i+1} / alpha_{i+1})^2) z``."""
    ratio = grid.alpha_list[i] / grid.alpha_list[i + 1]
    std = math.sqrt(max(grid.sigma_list[i] ** 2 - (ratio * grid.sigma_list[i + 1]) ** 2, 0.0))
    return ratio * x_next + std * noise_fn(grid.sigma_list[i + 1], grid.sigma_list[i])

