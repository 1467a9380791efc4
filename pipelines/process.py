"""The process and the step grid of a diffusers pipeline, read from its scheduler.

Shared by both front-ends over diffusers (docs/design.md#one-attached-pipeline-call): the native loops
(:mod:`diffsample.pipelines`) and the scheduler shim (:mod:`diffsample.pipelines.scheduler_shim`).

* :func:`process_from_config` -- the forward process ``x = alpha x0 + sigma eps`` and the network's
  prediction type from a scheduler config: rectified flow (``FlowMatch*`` schedulers,
  ``use_flow_sigmas`` or ``prediction_type="flow_prediction"``; ``t`` = flow sigma in [0, 1]) or
  discrete VP (``alphas_cumprod`` from the betas; ``t`` = diffusers timestep in [0, N - 1]).
* :func:`grid_from_scheduler` -- the grid a diffusers scheduler would step on (its own spacing,
  shift, ``mu``, custom ``sigmas``/``timesteps``), together with the timesteps it hands the network.
* :func:`grid_from_schedule` -- the grid of one of our step schedules, with matching timesteps.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffsample.solvers.solver import Grid, NoiseSchedule
from diffsample.solvers.noise_schedules import DiscreteVP, RectifiedFlow

PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample",
                    "flow_prediction": "flow"}
"""diffusers ``prediction_type`` -> the name :class:`~diffsample.samplers.denoisers.ModelDenoiser` uses."""

FLOW_T_MAX = 1.0 - 1e-6
"""Largest flow time on a grid read from a scheduler (see :func:`grid_from_scheduler`)."""

UNSUPPORTED_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "CMStochasticIterativeScheduler",
                          "ScoreSdeVeScheduler", "KarrasVeScheduler")


@dataclass(frozen=True, eq=False)
class Process:
    """The forward process of a pipeline's network, in the units its scheduler uses.

    Attributes:
        noise_schedule: :class:`DiscreteVP` (``t`` = diffusers timestep) or :class:`RectifiedFlow`
            (``t`` = flow sigma).
        prediction_type: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow"`` (velocity
            ``eps - x0``).
        num_train_timesteps: the scheduler's ``num_train_timesteps`` (flow timesteps are ``t * N``).
    """

    noise_schedule: NoiseSchedule
    prediction_type: str
    num_train_timesteps: int

    @property
    def flow(self) -> bool:
        return isinstance(self.noise_schedule, RectifiedFlow)

    def timestep(self, t: Tensor) -> Tensor:
        """Scheduler timestep of schedule time ``t``: ``t`` (VP) or ``t * num_train_timesteps`` (flow)."""
        return t * self.num_train_timesteps if self.flow else t

    def t_from_timestep(self, timestep: Tensor) -> Tensor:
        """Inverse of :meth:`timestep` (float64)."""
        ts = torch.as_tensor(timestep, dtype=torch.float64)
        return ts / self.num_train_timesteps if self.flow else ts


def is_flow_config(config: Mapping[str, Any], class_name: str | None) -> bool:
    """Whether a scheduler config describes a rectified-flow model."""
    return ("FlowMatch" in (class_name or "") or bool(config.get("use_flow_sigmas", False))
            or config.get("prediction_type") == "flow_prediction")


def process_from_config(config: Mapping[str, Any], class_name: str | None = None) -> Process:
    """The :class:`Process` of a diffusers scheduler config (``scheduler.config``).

    Args:
        config: the scheduler config (``prediction_type``, betas or ``trained_betas``,
            ``num_train_timesteps``, ``use_flow_sigmas``).
        class_name: the scheduler's class name (``FlowMatch*`` means rectified flow).

    Raises:
        ValueError: a prediction type we do not know (the message names it and the valid ones), an
            EDM / consistency / VE scheduler, or a beta schedule :class:`DiscreteVP` refuses.
    """
    if class_name in UNSUPPORTED_SCHEDULERS:
        raise ValueError(f"scheduler {class_name!r} (EDM / consistency / VE parameterisation) is not supported; "
                         "supported: discrete-VP schedulers (DDPM, DDIM, DPM-Solver, UniPC, Euler, ...) and FlowMatch*")
    n = int(config.get("num_train_timesteps", 1000) or 1000)
    if is_flow_config(config, class_name):
        ptype = config.get("prediction_type", "flow_prediction")
        if ptype not in ("flow_prediction", None) and "FlowMatch" not in (class_name or ""):
            raise ValueError(f"prediction_type {ptype!r} with flow sigmas is not supported; valid: flow_prediction")
        return Process(RectifiedFlow(t_min=1.0 / n, t_max=1.0, t_max_finite=1.0 - 1.0 / n), "flow", n)
    ptype = config.get("prediction_type", "epsilon")
    if ptype not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {ptype!r} in the scheduler config; valid: {', '.join(PREDICTION_TYPES)}")
    if config.get("variance_type") in ("learned", "learned_range"):
        # DDPMScheduler keeps these; the network output then has 2C channels (DiT, DeepFloyd IF).
        raise ValueError(f"variance_type {config['variance_type']!r} (2C-channel network output) is not supported; "
                         "valid: fixed_small, fixed_large or unset")
    return Process(DiscreteVP.from_config(config), PREDICTION_TYPES[ptype], n)


def process_from_scheduler(scheduler: Any) -> Process:
    """:func:`process_from_config` of a scheduler instance (our shim reports its base scheduler)."""
    class_name = getattr(scheduler, "base_scheduler_name", None) or type(scheduler).__name__
    return process_from_config(scheduler.config, class_name)


@dataclass(frozen=True, eq=False)
class PipelineGrid:
    """Where a run evaluates the network, and what the pipeline hands it there.

    Attributes:
        t: ``(N,)`` float64 evaluation times in noise-schedule time, noisiest first.
        t_final: the end point (``sigma > 0``) or ``None`` to denoise to ``sigma = 0``.
        timesteps: ``(N,)`` the scheduler timesteps the pipeline passes to the network (dtype as
            the scheduler made them: int64 for integer grids).
    """

    t: Tensor
    t_final: float | None
    timesteps: Tensor

    @property
    def steps(self) -> int:
        return self.t.numel()

    def grid(self, noise_schedule: NoiseSchedule) -> Grid:
        """The solver grid (``steps`` intervals)."""
        if self.t_final is None:
            return Grid.from_t(noise_schedule, self.t, final_zero=True)
        return Grid.from_t(noise_schedule, torch.cat([self.t, self.t.new_tensor([self.t_final])]))

    def step_schedule(self) -> tuple[Callable[[NoiseSchedule, int], Tensor], str]:
        """``(fixed step schedule, final)`` for a :class:`~diffsample.samplers.sampler.Sampler`."""
        from diffsample.solvers.step_schedules import fixed

        if self.t_final is None:
            return fixed(self.t.tolist()), "zero"
        return fixed(self.t.tolist() + [self.t_final]), "last"


def _accepted(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def grid_from_scheduler(scheduler: Any, process: Process, num_inference_steps: int | None = None,
                        sigmas: Any = None, timesteps: Any = None, mu: float | None = None,
                        copy_scheduler: bool = True) -> PipelineGrid:
    """The grid the diffusers ``scheduler`` would use, read after calling its ``set_timesteps``.

    The scheduler is deep-copied first (``copy_scheduler``), so stateful side effects (DPM-Solver
    writes ``config.flow_shift = exp(mu)``) stay on the copy. Flow grids are read from its
    ``sigmas`` (flow sigma = ``t``); VP grids from its ``timesteps`` (the network's own time).
    A final point with ``sigma > 0`` (``final_sigmas_type="sigma_min"``; ``TCDScheduler``, whose last
    step ends at timestep 0) is kept. A VP scheduler
    whose ``sigmas`` are not those of its ``timesteps`` (``use_karras_sigmas``, exponential, beta,
    lu-lambda grids: diffusers rounds the timesteps it hands the network) gives the grid of its
    ``sigmas``, with its ``timesteps`` kept for the network.

    Raises:
        ValueError: the caller passed ``sigmas`` / ``timesteps`` / ``mu`` that the scheduler's
            ``set_timesteps`` does not accept, or the grid is empty.
    """
    sched = copy.deepcopy(scheduler) if copy_scheduler else scheduler
    kwargs: dict[str, Any] = {}
    for name, value in (("sigmas", sigmas), ("timesteps", timesteps), ("mu", mu)):
        if value is None:
            continue
        if not _accepted(sched.set_timesteps, name):
            raise ValueError(f"the pipeline passed {name}=... but {type(sched).__name__}.set_timesteps does not accept "
                             f"{name!r}; pass schedule=... to use one of diffsample's step schedules instead")
        kwargs[name] = value
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    sched.set_timesteps(**kwargs)
    ts = torch.as_tensor(sched.timesteps).cpu()
    n = ts.numel()
    if n == 0:
        raise ValueError("the scheduler produced no timesteps")
    sched_sigmas = getattr(sched, "sigmas", None)
    if process.flow:
        if sched_sigmas is not None and len(sched_sigmas) >= n:
            s = torch.as_tensor(sched_sigmas).cpu().to(torch.float64)
            t, last = s[:n], (float(s[n]) if len(s) > n else 0.0)
        else:
            t, last = process.t_from_timestep(ts), 0.0
        # t = 1 exactly (alpha = 0, lambda = -inf) makes exponential-integrator coefficients such as
        # eta * h = 0 * inf undefined; start 1e-6 below (the network still gets the scheduler's timestep).
        t = t.clamp(max=FLOW_T_MAX)
        return PipelineGrid(t, None if last == 0.0 else last, ts)
    t = ts.to(torch.float64)
    ns = process.noise_schedule
    if sched_sigmas is not None and len(sched_sigmas) == n + 1:
        # Karras / exponential / beta / lu-lambda grids step on their sigmas and hand the network the
        # rounded timesteps: the grid is where the scheduler's own update evaluates (its sigmas).
        s = torch.as_tensor(sched_sigmas).cpu().to(torch.float64)[:n]
        if not torch.allclose(ns.sigma_ve(t), s, rtol=1e-4, atol=0.0):
            t = ns.t_from_sigma_ve(s).clamp(ns.t_min, ns.t_max)
    t_final = None
    if sched_sigmas is not None and len(sched_sigmas) > n and float(sched_sigmas[n]) > 0:
        t_final = float(process.noise_schedule.t_from_sigma_ve(torch.tensor([float(sched_sigmas[n])], dtype=torch.float64)))
        t_final = max(t_final, process.noise_schedule.t_min)
        if t_final >= float(t[-1]):
            t_final = None
    if type(sched).__name__ == "TCDScheduler" and float(t[-1]) > ns.t_min:
        t_final = ns.t_min  # TCD's last step ends at timestep 0 (alpha^2 = 1 - beta_0), not at sigma = 0
    return PipelineGrid(t, t_final, ts)


def grid_from_schedule(step_schedule: Callable[[NoiseSchedule, int], Tensor], process: Process,
                       steps: int) -> PipelineGrid:
    """The grid of one of our step schedules (denoising to ``sigma = 0``); VP timesteps that are
    all integers are handed to the network as int64, like diffusers' own."""
    t = step_schedule(process.noise_schedule, steps).to(torch.float64)
    if process.flow:
        t = t.clamp(max=FLOW_T_MAX)  # as in grid_from_scheduler: no grid point at alpha = 0
    ts = process.timestep(t)
    if not process.flow and torch.equal(ts, ts.round()):
        ts = ts.to(torch.int64)
    else:
        ts = ts.to(torch.float32)
    return PipelineGrid(t, None, ts)
