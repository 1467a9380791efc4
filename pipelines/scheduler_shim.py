"""``DiffSampleScheduler``: a diffusers scheduler that drives diffsample's solvers ("they drive").

Set it as ``pipe.scheduler`` (or use :func:`diffsample.attach`) and any pipeline whose loop calls
``scheduler.step`` runs our solver numerics (docs/design.md#one-attached-pipeline-call). The shim holds the only
diffusers-style bookkeeping: the step index, the solver state, and an fp32 master copy of the
sample. ``step(model_output, timestep, sample)`` converts the pipeline's prediction to ``denoised``
and calls ``Solver.step`` with a ``denoise`` closure that returns it; solvers that need another
evaluation (multi-stage, Stein probes, gradient guidance) get a re-evaluation through the captured
network calls (:mod:`diffsample.pipelines.capture`, installed by :func:`~diffsample.pipelines.attach.attach`).

Contract with pipelines: ``order = 1``, ``init_noise_sigma = 1``,
``scale_model_input`` is the identity (we work in the pipeline's own x_t space, so DDPMPipeline,
which never calls it, stays correct), ``set_timesteps(num_inference_steps, device, sigmas,
timesteps, mu)``, ``add_noise`` (VP) / ``scale_noise`` (flow), ``set_begin_index``; ``step`` returns
``prev_sample`` and ``pred_original_sample`` (= ``denoised``), cast to ``model_output.dtype``.

Step grid: by default the grid the replaced ("base") scheduler would use with the same
``set_timesteps`` arguments, and the same network timesteps; ``schedule="karras"`` etc. uses one of
our step schedules instead (the pipeline's ``sigmas`` / ``mu`` are then ignored).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from diffsample.solvers import SOLVERS, STEP_SCHEDULES, SteinDiff
from diffsample.core.accounting import add_model_evals, count_model_evals
from diffsample.guidance.composition import compose, sets_cfg_scale
from diffsample.guidance.term import Cond
from diffsample.guidance.loop_hooks import collect_hooks
from diffsample.samplers.sampler import renoise
from diffsample.solvers.transition import use_transition
from diffsample.solvers.solver import Grid, Solver
from diffsample.solvers.noise_schedules import DiscreteVP
from diffsample.solvers.step_schedules import fixed
from diffsample.solvers.stop_time import StopTime, stop_grid

from diffsample.pipelines.capture import NATIVE_LOOP_HINT, DenoiserCapture, Replay, ReplayError
from diffsample.samplers.denoisers import ModelDenoiser
from diffsample.pipelines.process import (PREDICTION_TYPES, PipelineGrid, Process, grid_from_schedule,
                                          grid_from_scheduler, is_flow_config, process_from_config)

OWN_KEYS = ("solver", "schedule", "base_scheduler", "seed")
DEFAULT_BASE = "DDPMScheduler"
KNOWN_BASES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
               "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
               "LMSDiscreteScheduler", "HeunDiscreteScheduler", "DEISMultistepScheduler", "KDPM2DiscreteScheduler",
               "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def infer_base_scheduler(config: dict) -> str | None:
    """The diffusers scheduler whose ``__init__`` arguments best match the keys of ``config`` (an
    in-memory scheduler's config carries no ``_class_name``): the one taking most of the keys, then
    the one with fewest keys it does not take, then the one with fewest arguments the config lacks
    (a config that went through ``X.from_config(other_config)`` keeps ``other``'s keys too).
    ``None`` when no known scheduler takes any key."""
    keys = {k for k in config if not k.startswith("_") and k not in OWN_KEYS}
    best, best_score = None, None
    for name in KNOWN_BASES:
        params = _init_params(name)
        if params is None:
            continue
        score = (-len(keys & params), len(keys - params), len(params - keys))
        if best_score is None or score < best_score:
            best, best_score = name, score
    return best if best_score is not None and best_score[0] < 0 else None


# ---- diffusers scheduler flags accepted by from_config ---------------------------------------------
SIGMA_FLAGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential",
               "use_beta_sigmas": "beta", "use_lu_lambdas": "lambda_uniform"}
"""diffusers grid flags -> the step schedule they select (built by the diffusers scheduler itself)."""
GRID_FLAGS = (*SIGMA_FLAGS, "timestep_spacing", "final_sigmas_type", "flow_shift", "shift")
SOLVER_FLAGS = ("algorithm_type", "solver_order", "solver_type")
DIFFUSERS_FLAGS = (*GRID_FLAGS, *SOLVER_FLAGS, "prediction_type")
"""The diffusers keywords ``DiffSampleScheduler.from_config`` maps; any other keyword is refused."""
GRID_SOURCES = {False: "DPMSolverMultistepScheduler", True: "FlowMatchEulerDiscreteScheduler"}
"""The scheduler whose grid a flag selects when the config's own scheduler has no such flag
(discrete VP, rectified flow): the one users pass the flag to (``DPMSolverMultistepScheduler.
from_config(config, use_karras_sigmas=True)``)."""
SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS = ("zero", "sigma_min")
ALGORITHMS = {"dpmsolver++": "", "sde-dpmsolver++": "_sde"}
SOLVER_TYPES = ("midpoint", "heun")


def _init_params(name: str | None) -> set[str] | None:
    """``__init__`` arguments of the diffusers scheduler class ``name`` (``None``: no such class)."""
    import diffusers

    cls = getattr(diffusers, name or DEFAULT_BASE, None)
    if cls is None or not isinstance(cls, type):
        return None
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


def _choice(key: str, value: Any, valid: Sequence[Any]) -> Any:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not supported; valid: {', '.join(map(str, valid))}")
    return value


def _flag_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}")
    return value


def grid_flags(config: Mapping[str, Any], flags: Mapping[str, Any], base: str | None) -> tuple[dict[str, Any], str | None]:
    """Config updates and grid-source scheduler for diffusers grid flags (``use_karras_sigmas``, ...).

    Args:
        config: the scheduler config the shim is built from (flags already in it count too).
        flags: keywords given to ``from_config`` (names in :data:`DIFFUSERS_FLAGS`).
        base: the config's scheduler class name (``None``: DDPMScheduler).

    Returns:
        ``(updates, source)``: config entries to set, and the diffusers scheduler that builds the
        grid -- ``base`` when it takes every flag in use, else :data:`GRID_SOURCES` of the process.

    Raises:
        ValueError: a bad flag value, two sigma flags at once, ``flow_shift`` / ``shift`` on a
            discrete-VP config, or a flag no scheduler of the process takes (one line each).
    """
    updates: dict[str, Any] = {}
    if "prediction_type" in flags:
        updates["prediction_type"] = _choice("prediction_type", flags["prediction_type"], tuple(PREDICTION_TYPES))
    for key in SIGMA_FLAGS:
        if key in flags:
            updates[key] = _flag_bool(key, flags[key])
    if "timestep_spacing" in flags:
        updates["timestep_spacing"] = _choice("timestep_spacing", flags["timestep_spacing"], SPACINGS)
    if "final_sigmas_type" in flags:
        updates["final_sigmas_type"] = _choice("final_sigmas_type", flags["final_sigmas_type"], FINAL_SIGMAS)
    merged = {**config, **updates}
    flow = is_flow_config(merged, base)
    shifts = {k: flags[k] for k in ("flow_shift", "shift") if k in flags}
    if shifts:
        values = {float(v) for v in shifts.values()}
        if not flow:
            raise ValueError(f"{next(iter(shifts))}={next(iter(shifts.values()))!r} applies to rectified-flow models; "
                             f"this config is a discrete-VP process ({base or DEFAULT_BASE})")
        if len(values) > 1 or not min(values) > 0:
            raise ValueError(f"flow_shift / shift must be one value > 0, got {shifts}")
    active = [k for k in SIGMA_FLAGS if merged.get(k) is True]
    if len(active) > 1:
        raise ValueError(f"{' and '.join(active)} are all set; choose one of {', '.join(SIGMA_FLAGS)}")
    needed = set(active)
    needed |= {k for k in ("timestep_spacing", "final_sigmas_type") if k in flags}
    if merged.get("final_sigmas_type") == "sigma_min":
        needed.add("final_sigmas_type")

    def takes(name: str | None) -> bool:
        params = _init_params(name) or set()
        return needed <= params and (not shifts or bool({"shift", "flow_shift"} & params))

    source = base if takes(base) else GRID_SOURCES[flow]
    if not takes(source):
        params = _init_params(source) or set()
        missing = sorted(needed - params) + ([] if not shifts or {"shift", "flow_shift"} & params else ["shift"])
        valid = [k for k in GRID_FLAGS if k in params or (k in ("shift", "flow_shift") and {"shift", "flow_shift"} & params)]
        raise ValueError(f"{', '.join(missing)} does not apply to {'rectified-flow' if flow else 'discrete-VP'} "
                         f"schedulers ({source}); grid flags valid here: {', '.join(valid)}")
    if shifts:
        params = _init_params(source) or set()
        updates["shift" if "shift" in params else "flow_shift"] = values.pop()
    return updates, source


def solver_from_flags(algorithm_type: str = "dpmsolver++", solver_order: int = 2, solver_type: str = "midpoint") -> str:
    """The ``SOLVERS`` spec of diffusers' DPMSolverMultistepScheduler settings:
    ``dpmsolver++`` / ``sde-dpmsolver++`` -> ``dpmpp_2m`` / ``dpmpp_2m_sde``; ``solver_order`` 3 ->
    ``dpmpp_3m`` (our Taylor-correct third-order form; ``third_order=reference`` is diffusers'),
    1 -> ``order=1`` (DDIM / its SDE form); ``solver_type="heun"`` -> ``solver_type=heun``.

    Raises:
        ValueError: an algorithm type other than the two above (noise-prediction DPM-Solver), an
            order outside 1-3, or a solver type other than midpoint / heun.
    """
    suffix = ALGORITHMS[_choice("algorithm_type", algorithm_type, tuple(ALGORITHMS))]
    order = _choice("solver_order", solver_order, (1, 2, 3))
    _choice("solver_type", solver_type, SOLVER_TYPES)
    options = (["order=1"] if order == 1 else []) + (["solver_type=heun"] if solver_type == "heun" else [])
    name = f"dpmpp_{3 if order == 3 else 2}m{suffix}"
    return name + (":" + ",".join(options) if options else "")


def _solver_flags(flags: Mapping[str, Any]) -> str:
    return solver_from_flags(flags.get("algorithm_type", "dpmsolver++"), flags.get("solver_order", 2),
                             flags.get("solver_type", "midpoint"))


@dataclass
class DiffSampleSchedulerOutput(BaseOutput):
    """Output of :meth:`DiffSampleScheduler.step`.

    Attributes:
        prev_sample: the sample at the next grid point, shape of ``sample``.
        pred_original_sample: ``denoised`` at the current point (the data prediction).
    """

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class DiffSampleScheduler(SchedulerMixin, ConfigMixin):
    """A ``SchedulerMixin`` / ``ConfigMixin`` shim over a diffsample solver.

    Build it from a pipeline's scheduler config, keeping every key the pipeline reads::

        pipe.scheduler = DiffSampleScheduler.from_config(pipe.scheduler.config, solver="unipc_bh2")

    Args:
        solver: a ``SOLVERS`` spec (``"dpmpp_2m"``, ``"unipc_bh2:predictor_order=3"``).
        schedule: a ``STEP_SCHEDULES`` spec, or ``None`` for the base scheduler's own grid.
        base_scheduler: class name of the diffusers scheduler whose config this is (set from the
            config's ``_class_name`` by ``from_config``); it decides the process (``FlowMatch*``
            = rectified flow) and, with ``schedule=None``, the grid.
        seed: seed of the noise stochastic solvers draw when the pipeline passes no generator.

    All other config keys (betas, ``prediction_type``, ``shift``, ``use_dynamic_shifting``, ...)
    are kept as they were, so ``save_pretrained`` / ``from_pretrained`` round-trip and pipelines
    that read ``scheduler.config`` keep working.

    Raises:
        ValueError: (at ``set_timesteps``) an unknown prediction type (named in the message), an
            unknown solver / schedule name, or a solver that needs re-evaluation without captured
            network calls (use :func:`diffsample.attach` or the native loop).
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(self, solver: str = "dpmpp_2m", schedule: str | None = None, base_scheduler: str | None = None,
                 seed: int = 0) -> None:
        SOLVERS.create(solver)  # validates the spec (lists valid names on error)
        if schedule is not None:
            STEP_SCHEDULES.create(schedule)
        self.init_noise_sigma = 1.0
        self.timesteps: Tensor | None = None
        self.sigmas: Tensor | None = None
        self.num_inference_steps: int | None = None
        self.grid: Grid | None = None
        self.pipeline_grid: PipelineGrid | None = None
        # Set by attach(): solver / schedule objects, guidance terms, hooks and the replaced scheduler.
        self._solver_obj: Solver | None = None
        self._schedule_obj: Any = None
        self._guidance: tuple = ()
        self._capture: DenoiserCapture | None = None
        self._grid_source: Any = None
        self._original: Any = None
        self._process: Process | None = None
        self._convert: ModelDenoiser | None = None
        self._current_output: Tensor | None = None
        self._input_rows = 0
        self._stop: StopTime | None = None  # attach(stop=...): the grid is cut there
        self._stop_return = "noisy"
        self._reset()

    # ---- config ---------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """The shim for a diffusers scheduler config, with diffusers' own flags mapped.

        ``DiffSampleScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m", use_karras_sigmas=True)``
        steps on the grid ``DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)``
        would use (same sigmas, same network timesteps). Keywords besides our own (``solver``,
        ``schedule``, ``base_scheduler``, ``seed``):

        * grid: ``use_karras_sigmas`` (Karras), ``use_exponential_sigmas``, ``use_beta_sigmas``,
          ``use_lu_lambdas`` (uniform in lambda), ``timestep_spacing`` (linspace / leading /
          trailing), ``final_sigmas_type`` (``"zero"`` / ``"sigma_min"``), ``flow_shift`` / ``shift``
          (rectified flow). The grid is built by the config's scheduler when it takes the flag,
          else by DPMSolverMultistepScheduler (VP) / FlowMatchEulerDiscreteScheduler (flow);
          ``base_scheduler`` then names that one. The same flags inside ``config`` apply too.
          (One difference: with ``final_sigmas_type="sigma_min"`` on a grid whose last point is
          already ``sigma_min``, e.g. Euler's trailing grid ending at t = 0, diffusers' last step
          has zero length; ours denoises to sigma = 0.)
        * solver: ``algorithm_type`` (``dpmsolver++`` / ``sde-dpmsolver++``), ``solver_order``
          (1-3), ``solver_type`` (midpoint / heun) -> ``dpmpp_2m`` / ``dpmpp_3m`` / ``..._sde`` (see
          :func:`solver_from_flags`); a DPMSolverMultistepScheduler config without ``solver=``
          gets the solver its own settings name.
        * ``prediction_type``: the network's parameterisation (epsilon, v_prediction, sample,
          flow_prediction).

        Raises:
            ValueError: any other keyword (one line naming it and the accepted ones), a bad flag
                value, flags that contradict ``solver=``, or a flag the process has no grid for.
        """
        model = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        shim = model[0] if isinstance(model, tuple) else model
        if any(k in kwargs for k in GRID_FLAGS):
            try:
                shim._base()  # the grid source accepts the flags (scipy for beta sigmas, ...)
            except (ImportError, TypeError, ValueError) as exc:
                raise ValueError(f"{shim.base_scheduler_name} cannot build the requested grid: "
                                 f"{str(exc).splitlines()[0]}") from None
        return model

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Keep foreign keys (the base scheduler's config) as hidden config without warnings, record
        the base scheduler's class name from ``_class_name``, and map diffusers flags (see
        :meth:`from_config`)."""
        accepted = (*OWN_KEYS, *DIFFUSERS_FLAGS)
        for key in kwargs:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                raise ValueError(f"unknown keyword {key!r} for DiffSampleScheduler.from_config"
                                 f"{f' (did you mean {close[0]!r}?)' if close else ''}; accepted: {', '.join(accepted)}")
        flags = {k: kwargs.pop(k) for k in DIFFUSERS_FLAGS if k in kwargs}
        config_dict = dict(config_dict)
        name = config_dict.get("_class_name")
        base = kwargs.get("base_scheduler") or config_dict.get("base_scheduler")
        if not base:
            base = name if isinstance(name, str) and name != cls.__name__ else infer_base_scheduler(config_dict)
        solver_flags = {k: flags[k] for k in SOLVER_FLAGS if k in flags}
        if solver_flags:
            derived = _solver_flags(solver_flags)
            given = kwargs.get("solver")
            if given is not None and str(given) != derived:
                raise ValueError(f"solver={given!r} and {', '.join(f'{k}={v!r}' for k, v in solver_flags.items())} "
                                 f"(= {derived!r}) disagree; give one of them")
            kwargs["solver"] = derived
        elif kwargs.get("solver") is None and config_dict.get("solver") is None and base == "DPMSolverMultistepScheduler":
            try:
                kwargs["solver"] = _solver_flags({k: config_dict[k] for k in SOLVER_FLAGS if k in config_dict})
            except ValueError as exc:
                raise ValueError(f"{exc} (read from the DPMSolverMultistepScheduler config); pass solver=... "
                                 "to choose a diffsample solver") from None
        updates, source = grid_flags(config_dict, flags, base)
        defaults = config_dict.get("_use_default_values")
        defaults = [k for k in defaults if k not in updates] if isinstance(defaults, list) else []
        if source != base:
            # As SourceScheduler.from_config(config) does: the replaced scheduler's defaults
            # (DDIM's "leading" spacing) are not carried over to the grid source.
            for key in defaults:
                config_dict.pop(key, None)
        config_dict.update(updates)
        if "_use_default_values" in config_dict:
            config_dict["_use_default_values"] = defaults
        kwargs["base_scheduler"] = source
        own = {k: v for k, v in config_dict.items() if k in OWN_KEYS or k.startswith("_")}
        foreign = {k: v for k, v in config_dict.items() if k not in own}
        init_dict, unused, hidden = super().extract_init_dict(own, **kwargs)
        hidden.update(foreign)
        return init_dict, unused, hidden

    @property
    def base_scheduler_name(self) -> str:
        return self.config.get("base_scheduler") or DEFAULT_BASE

    @property
    def process(self) -> Process:
        """The process (noise schedule + prediction type) read from the config."""
        if self._process is None:
            self._process = process_from_config(self.config, self.base_scheduler_name)
        return self._process

    @property
    def solver(self) -> Solver:
        if self._solver_obj is None:
            self._solver_obj = SOLVERS.create(self.config.solver)
        return self._solver_obj

    @property
    def alphas_cumprod(self) -> Tensor | None:
        """VP only: ``alpha(t)^2`` at the training timesteps (float32, as diffusers')."""
        ns = self.process.noise_schedule
        return ns.alphas_cumprod.to(torch.float32) if isinstance(ns, DiscreteVP) else None

    def _base(self) -> Any:
        """A diffusers scheduler of the base class, to read the grid from."""
        if self._grid_source is not None:
            return self._grid_source
        import diffusers

        cls = getattr(diffusers, self.base_scheduler_name, None)
        if cls is None:
            raise ValueError(f"base scheduler {self.base_scheduler_name!r} is not a diffusers scheduler; "
                             "pass schedule=... (a diffsample step schedule)")
        keys = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        self._grid_source = cls(**{k: v for k, v in self.config.items() if k in keys})
        return self._grid_source

    # ---- the diffusers scheduler surface ---------------------------------------------------------
    def _reset(self) -> None:
        self._chain: tuple | None = None  # (step denoiser, guided chain, its hooks, branches?) of the run
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._state: Any = None
        self._x_master: Tensor | None = None
        self._returned: Tensor | None = None
        self._generator: torch.Generator | None = None
        self.nfe = 0
        self._rows = 0.0
        self._batch: int | None = None
        if self._capture is not None:
            self._capture.clear()

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """Identity: the network sees the sample in the pipeline's own (VP / flow) coordinates.

        Pipelines that call it pass the network's own input (SD, SDXL, PixArt: ``cat([latents] * 2)``
        under CFG), so its rows are counted: :meth:`report` uses them when no hooks are installed."""
        self._input_rows += int(sample.shape[0]) if sample.ndim else 1
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: Sequence[float] | None = None, timesteps: Sequence[float] | None = None,
                      mu: float | None = None, **kwargs: Any) -> None:
        """Build the grid of a run and reset all per-run state (solver history, counters, captures).

        Args:
            num_inference_steps: grid intervals (``len(timesteps)``).
            sigmas, timesteps, mu: as the base scheduler takes them (custom grids; FLUX passes
                ``sigmas`` and ``mu``); ignored when ``schedule`` is one of ours.

        Raises:
            ValueError: neither ``num_inference_steps`` nor custom ``sigmas`` / ``timesteps``; the
                pipeline passed an argument the base scheduler does not take.
        """
        process = self.process
        schedule = self._schedule_obj
        if schedule is None and self.config.schedule is not None:
            schedule = STEP_SCHEDULES.create(self.config.schedule)
        if schedule is not None:
            refuse_model_times(schedule)
            steps = num_inference_steps or len(timesteps if timesteps is not None else sigmas or ())
            if not steps:
                raise ValueError("set_timesteps needs num_inference_steps (>= 1)")
            pg = grid_from_schedule(schedule, process, steps)
        else:
            if num_inference_steps is None and sigmas is None and timesteps is None:
                raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
            pg = grid_from_scheduler(self._base(), process, num_inference_steps, sigmas=sigmas,
                                     timesteps=timesteps, mu=mu)
        if self._stop is not None:  # truncated sampling: the pipeline's grid is cut at the stop
            cut = stop_grid(process.noise_schedule, fixed(pg.t.tolist()), pg.steps, self._stop)
            k = cut.steps if not cut.final_zero else pg.steps
            pg = PipelineGrid(t=pg.t[:k], t_final=None if cut.final_zero else cut.t_list[-1],
                              timesteps=pg.timesteps[:k])
        self.pipeline_grid = pg
        self.grid = pg.grid(process.noise_schedule)
        self.num_inference_steps = pg.steps
        self.timesteps = pg.timesteps.to(device) if device is not None else pg.timesteps
        if process.flow:
            self.sigmas = self.grid.sigma.to(torch.float32)
        else:
            self.sigmas = (self.grid.sigma / self.grid.alpha).to(torch.float32)
        # One converter per run (model_output -> denoised), its alpha / sigma cache seeded with the grid's
        # values, so step() does no schedule lookups.
        self._convert = ModelDenoiser(lambda _x, _t: self._current_output, process.noise_schedule,
                                      process.prediction_type)
        self._convert.remember_coefficients(self.grid)
        self._reset()
        self._input_rows = 0  # rows the pipeline passed through scale_model_input this run

    def _index_for(self, timestep: Any) -> int:
        if self._step_index is not None:
            return self._step_index
        if self._begin_index is not None:
            return self._begin_index
        tv = float(torch.as_tensor(timestep).reshape(-1)[0])
        matches = (self.timesteps.cpu().to(torch.float64) - tv).abs() <= 1e-6 * max(1.0, abs(tv))
        idx = matches.nonzero()
        return int(idx[0]) if idx.numel() else 0

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``alpha(t) x0 + sigma(t) noise`` at scheduler timesteps ``timesteps`` (scalar or ``(B,)``)."""
        t = self.process.t_from_timestep(torch.as_tensor(timesteps).cpu()).reshape(-1)
        t = t.expand(original_samples.shape[0]) if t.numel() == 1 else t
        ns = self.process.noise_schedule
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = ns.alpha(t).reshape(shape).to(original_samples)
        sigma = ns.sigma(t).reshape(shape).to(original_samples)
        return alpha * original_samples + sigma * noise.to(original_samples)

    def scale_noise(self, sample: Tensor, timestep: Any, noise: Tensor | None = None) -> Tensor:
        """Flow: ``(1 - t) sample + t noise`` (FlowMatchEulerDiscreteScheduler.scale_noise)."""
        return self.add_noise(sample, noise, timestep)

    def __len__(self) -> int:
        return self.process.num_train_timesteps

    # ---- accounting -------------------------------------------------------------------------------
    def report(self) -> dict[str, float | None]:
        """Counts of the current run, as the native loop and ``generate`` define them.

        * ``nfe``: denoiser (solver-level) calls.
        * ``model_evals``: network forward passes per sample in forward-equivalents -- CFG's
          batched ``2 B`` rows count 2 per sample, a backward pass 2; the pipeline's own calls plus
          replays. Under :func:`diffsample.attach` it is read from the forward hooks on the network.

        A scheduler set with ``pipe.scheduler = shim`` (no hooks) does not see the network: it sees
        ``B`` rows in ``step`` whether or not the pipeline ran ``2 B`` for CFG. It then counts the
        rows the pipeline passed through :meth:`scale_model_input` (SD, SDXL, PixArt pass the
        network's input there, so this equals attach's count), and reports ``model_evals = None``
        (unknown) for pipelines that never call it (SD3, FLUX, DDPM); use ``attach`` there.
        """
        b = self._batch or 1
        if self._capture is not None:
            model_evals: float | None = self._rows / b
        elif self._input_rows:
            model_evals = self._input_rows / b  # without hooks no solver re-evaluation is possible
        else:
            model_evals = None
        return {"nfe": self.nfe, "model_evals": model_evals}

    # ---- binding to a pipeline (diffsample.attach) ----------------------------------------------------
    def bind(self, *, solver: Solver, schedule: Any, guidance: Sequence[Any], grid_source: Any,
             capture: DenoiserCapture | None, original: Any, stop: StopTime | None = None,
             stop_return: str = "noisy") -> None:
        """Bind the shim to a pipeline (what :func:`diffsample.attach` does): the solver and step
        schedule objects, the guidance terms applied to the pipeline's prediction inside ``step``, the
        scheduler whose grid ``schedule=None`` reproduces, the network-call capture for re-evaluation,
        the scheduler to restore on :meth:`unbind`, and a stop (truncated sampling: the grid is cut
        there and the last step returns ``x_stop``, or ``x_stop / alpha`` / the VP-coordinates state
        for ``stop_return`` ``rescaled`` / ``ou``)."""
        self._solver_obj, self._schedule_obj, self._guidance = solver, schedule, tuple(guidance)
        self._stop, self._stop_return = stop, stop_return
        self._chain = None
        self._grid_source, self._capture, self._original = grid_source, capture, original

    @property
    def bound(self) -> bool:
        """Whether the shim is bound to a pipeline by :meth:`bind`."""
        return self._original is not None

    def unbind(self) -> Any:
        """Remove the capture hooks and return the scheduler :meth:`bind` was given."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        original, self._original = self._original, None
        return original

    @property
    def needs_replay(self) -> bool:
        """Whether the solver / guidance evaluates the model anywhere but at the step's own point."""
        return needs_replay(self.solver, self._guidance, self.process)

    # ---- the step ---------------------------------------------------------------------------------
    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True, **kwargs: Any) -> DiffSampleSchedulerOutput | tuple[Tensor, Tensor]:
        """Advance ``sample`` (the pipeline's latents, ``(B, *dims)``) by one grid step.

        ``model_output`` is the pipeline's (guided) prediction in the network's parameterisation
        (eps, v, x0 or flow velocity); it becomes ``denoised`` at the current grid point.

        Raises:
            ValueError: ``set_timesteps`` was not called, or the run is over.
            ReplayError: the solver needs another evaluation but the calls cannot be replayed.
        """
        if self.grid is None:
            raise ValueError("call set_timesteps before step")
        i = self._index_for(timestep)
        if i >= self.grid.steps:
            raise ValueError(f"step {i} is past the end of the {self.grid.steps}-step grid; call set_timesteps again")
        work = torch.promote_types(sample.dtype, torch.float32)
        if self._returned is not None and (sample is self._returned or (
                sample.shape == self._returned.shape and torch.equal(sample, self._returned))):
            x = self._x_master
        else:
            x = sample.detach().to(work)
            self._state = None  # latents changed outside the solver (first step, or a callback): restart history
        if self._state is None:
            self._state = self.solver.init(x, self.grid)
        self._batch = x.shape[0]
        grid, process, t_i = self.grid, self.process, self.grid.t_list[i]
        capture = self._capture
        captured_rows = capture.rows() if capture is not None else x.shape[0]

        self._current_output = model_output
        t_vec = torch.full((x.shape[0],), t_i, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                           device=x.device)
        with count_model_evals():  # the pipeline's own pass is counted from the hooks
            denoised = self._convert(x, t_vec)
        self._current_output = None
        if self._chain is None:
            # One chain per run, so stateful terms (APG momentum, CFG-Zero* zero-init) see the whole run.
            # The composition contract: the pipeline's loop did CFG and the terms wrap its guided prediction;
            # a CFG-family term replaces that CFG and works on the two branches of the captured calls.
            step_denoiser = _StepDenoiser(self)
            branches = any(sets_cfg_scale(term) for term in self._guidance)
            guided = compose(_BranchDenoiser(step_denoiser) if branches else step_denoiser, self._guidance)
            self._chain = (step_denoiser, guided, collect_hooks(guided), branches)
        step_denoiser, guided, hooks, branches = self._chain
        step_denoiser.bind(x, t_i, denoised, model_output, sample, timestep)
        cond = branch_cond(x.shape[0], x.device) if branches else None

        def denoise(x_in: Tensor, t: Tensor) -> Tensor:
            self.nfe += 1
            return guided(x_in, t, cond)

        noise_fn = None
        if self.solver.stochastic:
            noise_fn = self._noise_fn(x, generator)
        with count_model_evals() as rows, use_transition(hooks.transition):
            x_next, new_state = self.solver.step(denoise, x, grid, i, self._state, noise_fn)
            for _ in range(sum(r(grid, i) for r in hooks.recurrences)):
                # Time travel (FreeDoM): back to grid point i with fresh noise, then redo the step.
                x_back = renoise(x_next, grid, i, noise_fn or self._noise_fn(x, generator))
                x_next, new_state = self.solver.step(denoise, x_back, grid, i, self._state, noise_fn)
        self._state = new_state
        self._rows += rows[0] + captured_rows
        if capture is not None:
            capture.clear()
        self._x_master = x_next.detach()
        if self._stop is not None and i + 1 == grid.steps and not grid.final_zero and self._stop_return != "noisy":
            scale = grid.alpha_list[-1] if self._stop_return == "rescaled" else math.hypot(grid.alpha_list[-1],
                                                                                            grid.sigma_list[-1])
            x_next = x_next / scale
        prev = x_next.detach().to(model_output.dtype)
        self._returned = prev
        self._step_index = i + 1
        pred = denoised.to(model_output.dtype)
        if not return_dict:
            return prev, pred
        return DiffSampleSchedulerOutput(prev_sample=prev, pred_original_sample=pred)

    def _noise_fn(self, x: Tensor, generator: torch.Generator | None):
        if generator is None:
            if self._generator is None:
                self._generator = torch.Generator("cpu").manual_seed(int(self.config.seed))
            generator = self._generator
        gen = generator[0] if isinstance(generator, (list, tuple)) else generator

        def noise_fn(sigma: float, sigma_next: float) -> Tensor:
            return torch.randn(x.shape, generator=gen, device=gen.device, dtype=torch.float32).to(x)

        return noise_fn


class _StepDenoiser:
    """The denoiser of the current pipeline step: the pipeline's prediction at its own point, a replay
    of its captured network calls anywhere else (or with gradients). One per run, rebound every step."""

    def __init__(self, shim: DiffSampleScheduler) -> None:
        self.shim = shim
        self.noise_schedule = shim.process.noise_schedule
        self.generation = 0  # counts bind() calls, so per-step caches elsewhere know when to refresh

    def bind(self, x: Tensor, t_i: float, denoised: Tensor, model_output: Tensor, sample: Tensor,
             timestep: Any) -> None:
        """Point the denoiser at a new pipeline step."""
        self.x, self.t_i, self.denoised = x, t_i, denoised
        self.model_output, self.sample, self.timestep = model_output, sample, timestep
        self._replay: ModelDenoiser | None = None
        self._replay_calls: Replay | None = None
        self.generation += 1

    def _at_own_point(self, x: Tensor, t: Tensor) -> bool:
        if x is not self.x or (torch.is_grad_enabled() and x.requires_grad):
            return False
        # call_denoise passes t in float32 for float32 samples: compare at that precision.
        return bool(((t.to(torch.float64) - self.t_i).abs() <= 1e-6 * max(1.0, abs(self.t_i))).all()) \
            if t.numel() else False

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if self._at_own_point(x, t):
            return self.denoised
        if self._replay is None:
            self._replay = self._build_replay()
        return self._replay(x, t)

    def replay(self) -> Replay:
        """The replay of this step's captured network calls (built once).

        Raises:
            ReplayError: no captured calls (the shim was not attached), or calls that cannot be replayed.
        """
        if self._replay_calls is None:
            shim = self.shim
            if shim._capture is None:
                raise ReplayError(f"solver {type(shim.solver).__name__} (or a guidance term) needs to re-evaluate "
                                  "the network, but this scheduler has no captured network calls (set it with "
                                  "diffsample.attach(pipe, ...) rather than pipe.scheduler = ...); " + NATIVE_LOOP_HINT)
            tau = float(torch.as_tensor(self.timestep).reshape(-1)[0])
            self._replay_calls = Replay(shim._capture, self.sample, self.model_output, tau)
        return self._replay_calls

    def _build_replay(self) -> ModelDenoiser:
        shim = self.shim
        replay = self.replay()
        process = shim.process
        network_dtype = next(iter(shim._capture.modules.values())).dtype \
            if hasattr(next(iter(shim._capture.modules.values())), "dtype") else None
        return ModelDenoiser(replay, process.noise_schedule, process.prediction_type,
                             time_fn=process.timestep, model_dtype=network_dtype)


def branch_cond(batch: int, device: Any) -> Cond:
    """The condition a CFG-family term under :func:`~diffsample.attach` passes down: ``branch`` 1 on
    the positive (conditional) side, 0 on the negative (unconditional) side, one value per row."""
    return Cond({"branch": torch.ones(batch, device=device)}, {"branch": torch.zeros(batch, device=device)})


class _BranchDenoiser:
    """The two branches of one CFG pipeline step, for a CFG-family term under attach.

    A row whose ``cond.positive["branch"]`` is 1 gets the conditional network output, 0 the
    unconditional one, as ``denoised``. The branches are the batch chunks of the pipeline's own
    (doubled-batch) network calls, told apart by the weights the pipeline combined them with (the
    conditional one carries ``guidance_scale``). At the step's own point the captured outputs serve;
    elsewhere one replay of the captured calls gives both.

    Raises:
        ReplayError: the pipeline ran without CFG (one branch only: pass ``guidance_scale > 1`` to the
            pipeline, or use the native loop), or the two branches cannot be told apart.
    """

    def __init__(self, step: _StepDenoiser) -> None:
        self.step, self.noise_schedule = step, step.noise_schedule
        process = step.shim.process
        self._raw: Tensor | None = None
        self._convert = ModelDenoiser(lambda _x, _t: self._raw, process.noise_schedule, process.prediction_type)
        self._timestep = process.timestep
        self._generation = -1

    def _refresh(self) -> None:
        """Read the current step's branches (once per step)."""
        if self._generation == self.step.generation:
            return
        replay = self.step.replay()
        if len(replay.chunks) != 2:
            raise ReplayError(f"a CFG-family guidance term under attach needs both branches of the pipeline's CFG, "
                              f"but its network call carried {len(replay.chunks)} batch chunk(s): call the pipeline "
                              "with guidance_scale > 1, or " + NATIVE_LOOP_HINT)
        mean = replay.weights.mean(0)
        if abs(float(mean[0] - mean[1])) < 1e-3:
            raise ReplayError("cannot tell the pipeline's conditional branch from its unconditional one (equal CFG "
                              "weights); " + NATIVE_LOOP_HINT)
        cond_j = int(mean.argmax())
        self.replay, self.order = replay, (1 - cond_j, cond_j)
        self._generation = self.step.generation

    def _pair(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(unconditional, conditional)`` network outputs at ``x`` (one pipeline batch)."""
        own = not (torch.is_grad_enabled() and x.requires_grad) and torch.equal(x, self.step.x) and bool(
            ((t.to(torch.float64) - self.step.t_i).abs() <= 1e-6 * max(1.0, abs(self.step.t_i))).all())
        outs = self.replay.chunks if own else self.replay.chunk_outputs(x, self._timestep(t))
        if not own:
            add_model_evals(x.shape[0])  # chunk_outputs leaves one batch of rows to the caller
        return outs[self.order[0]], outs[self.order[1]]

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        if cond is None or "branch" not in cond.positive:
            raise ReplayError("the pipeline's branches are reached through a CFG-family term's condition")
        self._refresh()
        b = self.step.x.shape[0]
        branch = torch.as_tensor(cond.positive["branch"]).reshape(-1)
        out, seen = [], []  # call_both sends the same x twice (both branches): evaluate it once
        for r in range(x.shape[0] // b):
            rows = slice(r * b, (r + 1) * b)
            xr, tr = x[rows], t[rows]
            found = next((pair for xk, tk, *pair in seen if not xr.requires_grad and torch.equal(xk, xr)
                          and torch.equal(tk, tr)), None)
            if found is None:
                found = list(self._pair(xr, tr))
                seen.append((xr, tr, *found))
            uncond, condl = found
            pick = branch[rows].to(device=xr.device).reshape((-1,) + (1,) * (x.ndim - 1)) > 0.5
            with count_model_evals():  # the network rows were counted where they ran
                self._raw = torch.where(pick, condl, uncond)
                out.append(self._convert(xr, tr))
            self._raw = None
        return torch.cat(out) if len(out) > 1 else out[0]


def refuse_model_times(schedule: Any) -> None:
    """Refuse a step schedule with decoupled model times (an LD3 schedule fitted with ``decoupled``):
    a pipeline's own loop hands the network the scheduler's timesteps, so the shim cannot move them.

    Raises:
        ValueError: naming the schedule and the ways to run it.
    """
    if getattr(schedule, "t_model", None):
        raise ValueError(f"schedule {schedule} evaluates the model at decoupled times (LD3 --decoupled), which a "
                         "pipeline's own loop cannot do; " + NATIVE_LOOP_HINT + ", or fit the schedule without "
                         "--decoupled")


def needs_replay(solver: Solver, guidance: Sequence[Any], process: Process) -> bool:
    """Whether ``solver`` with ``guidance`` evaluates the denoiser anywhere but once per step at
    the grid point (multi-stage solvers, Stein probes, any guidance term)."""
    if guidance or isinstance(solver, SteinDiff):
        return True
    ns = process.noise_schedule
    probe = Grid.from_t(ns, torch.linspace(ns.t_max_finite if process.flow else ns.t_max, ns.t_min * 2 + 1e-3, 3,
                                           dtype=torch.float64), final_zero=True)
    return solver.nfe(probe) != probe.steps
