"""``attach(pipe, ...)`` / ``detach(pipe)``: run diffsample solvers inside any diffusers pipeline.

The "they drive" front-end (docs/design.md#one-attached-pipeline-call): the pipeline keeps its own loop (prompt
encoding, CFG batching, callbacks, decoding); :func:`attach` swaps ``pipe.scheduler`` for a
:class:`~diffsample.pipelines.scheduler_shim.DiffSampleScheduler` and hooks ``pipe.unet`` /
``pipe.transformer`` so solvers that need another evaluation inside ``step`` (multi-stage,
Stein probes, gradient guidance) can replay the pipeline's guided network calls.
:func:`detach` restores the original scheduler and removes the hooks.

Works for pipelines whose loop calls ``scheduler.step(model_output, t, latents)`` with the
latents it fed the network (SD 1.x/2.x, SDXL, SD3, FLUX, PixArt, DDPM, ...). Re-evaluation is
refused with a clear error (never silently wrong numbers) where the calls cannot be replayed
(inpainting-style channel concatenation, non-affine guiders); use the native loop
(:func:`diffsample.pipelines.sample_pipeline`) there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from diffsample.core.spec import Spec
from diffsample.guidance import GUIDANCE
from diffsample.guidance.composition import check_composition
from diffsample.guidance.loop_hooks import term_hooks
from diffsample.samplers.stochastic_variant import switch_for_noise_terms
from diffsample.solvers import SOLVERS, STEP_SCHEDULES
from diffsample.solvers.solver import Solver
from diffsample.solvers.stop_time import StopTime, check_stop_return

from diffsample.pipelines.capture import NATIVE_LOOP_HINT, DenoiserCapture
from diffsample.pipelines.resources import pipeline_resources
from diffsample.pipelines.scheduler_shim import DiffSampleScheduler, needs_replay, refuse_model_times

DENOISER_COMPONENTS = ("unet", "transformer", "transformer_2", "prior")


def find_denoisers(pipe: Any) -> dict[str, Any]:
    """The pipeline's denoising networks ``{name: module}`` (``unet``, ``transformer``, ...).

    Raises:
        ValueError: the pipeline has none of them (the message names what was expected).
    """
    found = {name: getattr(pipe, name) for name in DENOISER_COMPONENTS if getattr(pipe, name, None) is not None}
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no denoising network; attach expects a 'unet' or "
                         "'transformer' component")
    return found


def attach(pipe: Any, solver: str | Solver = "dpmpp_2m", schedule: str | Callable | None = None,
           guidance: Sequence[Any] = (), *, seed: int = 0, stop: StopTime | None = None,
           stop_return: str = "noisy") -> DiffSampleScheduler:
    """Make ``pipe`` sample with a diffsample solver; returns the installed scheduler shim.

    Args:
        pipe: a diffusers pipeline with a ``scheduler`` and a ``unet`` / ``transformer``.
        solver: a ``SOLVERS`` spec (``"dpmpp_2m"``, ``"unipc_bh2"``, ``"stein-dpm"``, ``"heun"``) or
            a solver object.
        schedule: ``None`` -- the grid the pipeline's own scheduler would use (same timesteps);
            a ``STEP_SCHEDULES`` spec (``"karras"``) or a step-schedule callable.
        guidance: guidance terms (objects, or registry specs) applied, in order, to the pipeline's
            CFG-guided prediction inside ``step`` (the composition contract: model -> CFG -> terms);
            each re-evaluates the network through the captured calls. Their loop hooks are honoured
            as in the native loop: a ``transition`` (NoiseTilt, SVDD) replaces the draw of every
            stochastic step, a ``recurrence`` (FreeDoM) redoes steps. A noise-acting term given a
            deterministic solver spec with a stochastic variant switches it to ``eta=1`` with a
            :class:`~diffsample.samplers.stochastic_variant.SolverSwitched` warning.
        seed: seed of the noise stochastic solvers draw when the pipeline passes no generator.
        stop, stop_return: truncated sampling (arXiv 2606.13796): the pipeline's grid is cut at
            ``stop`` (a :class:`~diffsample.solvers.stop_time.StopTime`) and its last step returns
            ``x_stop`` (``noisy``), ``x_stop / alpha`` (``rescaled``) or the VP-coordinates state
            (``ou``), which the pipeline then decodes. ``denoised`` needs a network call at the stop
            that the pipeline's loop does not make: use the native loop.

    ``pipe.scheduler.report()`` gives ``nfe`` and ``model_evals`` of the last run. The shim works
    in fp32 internally (an fp32 master copy of the latents) and returns ``model_output.dtype``.

    Raises:
        ValueError: no ``scheduler``, no ``unet`` / ``transformer``, already attached, an unknown
            solver / schedule / guidance name or prediction type; a term that runs several chains
            (best-of-N, twisted SMC: the pipeline's loop runs one; use the native loop); a
            noise-acting term with a deterministic solver that has no stochastic variant; a solver or
            guidance that re-evaluates the network while the network is not a hookable
            ``nn.Module`` (the message recommends the native loop). All before any sampling.
    """
    if stop is not None and not isinstance(stop, StopTime):
        raise ValueError(f"stop must be a StopTime or None, got {stop!r}")
    if check_stop_return(stop_return) == "denoised" and stop is not None:
        raise ValueError("stop_return='denoised' needs a network call at the stop, which the pipeline's loop does "
                         "not make; " + NATIVE_LOOP_HINT)
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise ValueError(f"{type(pipe).__name__} has no scheduler; attach expects a diffusers pipeline whose "
                         "denoising loop calls scheduler.step")
    if isinstance(scheduler, DiffSampleScheduler):
        raise ValueError("a diffsample scheduler is already attached; call diffsample.detach(pipe) first")
    denoisers = find_denoisers(pipe)
    terms = tuple(GUIDANCE.create(g, resources=pipeline_resources(pipe)) if isinstance(g, (str, Spec)) else g
                  for g in guidance)
    labels = [str(g) if isinstance(g, (str, Spec)) else type(g).__name__ for g in guidance]
    schedule_obj = STEP_SCHEDULES.create(schedule) if isinstance(schedule, (str, Spec)) else schedule
    refuse_model_times(schedule_obj)
    check_composition(terms, None, labels)
    hooks = term_hooks(terms, None)  # what the terms ask of the loop; nothing is evaluated
    several = [name for name in ("chains", "twist") if name in hooks.used()]
    if several:
        raise ValueError(f"guidance {', '.join(labels)} runs several chains per sample ({several[0]} hook), but a "
                         "pipeline's own loop runs one; " + NATIVE_LOOP_HINT)
    if isinstance(solver, (str, Spec)):
        spec = switch_for_noise_terms(solver, hooks)
        solver_obj = SOLVERS.create(str(spec))
    else:
        spec, solver_obj = None, solver
    shim = DiffSampleScheduler.from_config(scheduler.config, solver=str(spec) if spec is not None else "dpmpp_2m",
                                           schedule=str(schedule) if isinstance(schedule, (str, Spec)) else None,
                                           base_scheduler=type(scheduler).__name__, seed=seed)
    process = shim.process  # validates the prediction type / process now, not mid-run
    hooks.check(solver_obj)
    hookable = {name: m for name, m in denoisers.items() if isinstance(m, nn.Module)}
    if needs_replay(solver_obj, terms, process) and len(hookable) != len(denoisers):
        raise ValueError(f"{type(solver_obj).__name__}{' with guidance' if terms else ''} re-evaluates the network "
                         f"inside step, but the call arguments of {', '.join(sorted(set(denoisers) - set(hookable)))} "
                         "cannot be captured (not a torch nn.Module); " + NATIVE_LOOP_HINT)
    shim.bind(solver=solver_obj, schedule=schedule_obj, guidance=terms, grid_source=scheduler,
              capture=DenoiserCapture(hookable) if hookable else None, original=scheduler, stop=stop,
              stop_return=stop_return)
    pipe.scheduler = shim
    return shim


def detach(pipe: Any) -> Any:
    """Remove the hooks and restore (and return) the scheduler :func:`attach` replaced.

    Raises:
        ValueError: nothing is attached to ``pipe``.
    """
    shim = getattr(pipe, "scheduler", None)
    if not isinstance(shim, DiffSampleScheduler) or not shim.bound:
        raise ValueError(f"no diffsample scheduler is attached to this {type(pipe).__name__}")
    pipe.scheduler = shim.unbind()
    return pipe.scheduler
