"""``diffsample.optimize_schedule``: a step schedule tuned for one model and one solver.

The model-facing layer over :mod:`diffsample.samplers.schedule_optimizer`: it resolves the model
(a bundled name, a diffusers model or pipeline folder, a loaded model, a diffusers pipeline object,
or the exact Gaussian mixture's denoiser), draws the calibration noises with per-sample seeds
``seed, seed + 1, ...`` (default :data:`CALIBRATION_SEED`, far from the evaluation seeds ``0, 1,
...`` that ``generate`` and ``sweep`` use by default), computes the teacher trajectories (the
exact probability-flow ODE for the Gaussian mixture, else DPM-Solver++(3M) with ``teacher_substeps``
steps per fine interval), scores every built-in schedule, runs the method and returns an
:class:`~diffsample.solvers.schedule_file.OptimizedSchedule` (save it with ``.save(path)``; load it
with ``file:path=...`` or ``--schedule FILE.json``). Method: docs/methods/optimized_schedules.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor

from diffsample.core.spec import Spec
from diffsample.guidance.composition import compose
from diffsample.solvers import SOLVERS, STEP_SCHEDULES
from diffsample.solvers.schedule_file import METHODS, OptimizedSchedule, schedule_from_times
from diffsample.solvers.step_schedules import check_steps
from diffsample.samplers import schedule_optimizer as so
from diffsample.samplers.seeds import seeded_run
from diffsample.testbed.gmm import GMMDenoiser

from diffsample.run.record import versions

CALIBRATION_SEED = 10**12
"""First calibration seed: far from the evaluation seeds (``0 ..``) of ``generate`` and ``sweep``."""
BUILTIN_SCHEDULES = ("trailing", "leading", "linspace", "karras", "exponential", "polyexponential:rho=2", "csflow",
                     "ddim_uniform", "beta", "kl_optimal", "align_your_steps", "flow_shift")
"""Built-in schedules scored on the same calibration noises (those a noise schedule cannot use are skipped)."""
TEACHER_SOLVER = "dpmpp_3m"


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_method(method: Any) -> str:
    """``method`` when it is one of :data:`~diffsample.solvers.schedule_file.METHODS`.

    Raises:
        ValueError: naming the value and the valid methods.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return method


def gmm_id(denoiser: GMMDenoiser) -> str:
    """A stable id of an exact Gaussian-mixture model: dimension, components and a content hash."""
    g = denoiser.gmm
    h = hashlib.sha256()
    for tensor in (g.means, g.stds, g.weights):
        h.update(tensor.double().contiguous().numpy().tobytes())
    return f"gmm:dim={g.dim},components={g.means.shape[0]},sha256={h.hexdigest()[:12]}"


class _Target:
    """What the optimiser needs of a model: ``denoise(x, t)`` with conditioning bound, the noise
    schedule, the calibration noises, an id, and the exact teacher where there is one."""

    def __init__(self, model_id: str, denoise: Callable[[Tensor, Tensor], Tensor], noise_schedule: Any,
                 noise: Tensor, exact: GMMDenoiser | None = None, bundled: str | None = None,
                 denoise_for: Callable[[Tensor], Callable[[Tensor, Tensor], Tensor]] | None = None) -> None:
        self.model_id, self.denoise, self.noise_schedule, self.noise = model_id, denoise, noise_schedule, noise
        self.exact, self.bundled, self.denoise_for = exact, bundled, denoise_for

    def subset(self, index: Tensor) -> "_Target":
        """The same model on the calibration noises ``noise[index]`` (with their own conditioning,
        e.g. class labels, where the denoiser is conditioned per sample)."""
        denoise = self.denoise if self.denoise_for is None else self.denoise_for(index)
        return _Target(self.model_id, denoise, self.noise_schedule, self.noise[index], self.exact, self.bundled,
                       None if self.denoise_for is None else (lambda sub: self.denoise_for(index[sub])))


def _is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "scheduler") and any(getattr(obj, n, None) is not None for n in ("unet", "transformer"))


def _resolve(model: Any, num_samples: int, seed: int, device: str, prompt: str | None,
             cfg_scale: float | None) -> _Target:
    from diffsample.run.models import LoadedModel, PipelineModel, load_model

    seeds = list(range(seed, seed + num_samples))
    if isinstance(model, GMMDenoiser):
        noise = seeded_run(seeds, (model.gmm.dim,))["noise"].double()
        return _Target(gmm_id(model), lambda x, t: model(x, t), model.noise_schedule, noise, exact=model)
    if model is None or isinstance(model, (str, os.PathLike)):
        model = load_model(model, device=device)
    if isinstance(model, LoadedModel):
        labels = None if model.num_classes is None else torch.arange(num_samples) % model.num_classes
        loaded = model
        guided = compose(model.denoiser, (), cfg_scale)
        noise = seeded_run(seeds, model.sample_shape, model.device)["noise"]
        from diffsample.testbed import BUNDLED_MODELS

        def denoise_for(index: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
            chosen = None if labels is None else (labels if index is None else labels[index])
            return _batched(guided, lambda b: loaded.cond(None if chosen is None else chosen[:b]))

        return _Target(model.name, denoise_for(None), model.denoiser.noise_schedule, noise,
                       bundled=model.name if model.name in BUNDLED_MODELS else None,
                       denoise_for=None if labels is None else denoise_for)
    name = None
    if isinstance(model, PipelineModel):
        name, den = model.name, model.denoiser
    elif _is_pipeline(model):
        from diffsample.pipelines import PipelineDenoiser

        den = PipelineDenoiser.from_pipeline(model)
        name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    elif callable(model) and hasattr(model, "noise_schedule") and hasattr(model, "sample_shape"):
        noise = seeded_run(seeds, tuple(model.sample_shape))["noise"]
        return _Target(type(model).__name__, lambda x, t: model(x, t, None), model.noise_schedule, noise)
    else:
        raise ValueError(f"cannot optimise a schedule for {type(model).__name__}: expected a model name or folder, "
                         "a LoadedModel, a diffusers pipeline or a GaussianMixture denoiser (gmm.denoiser(ns))")
    text = den.text_conditioned
    scale = cfg_scale if cfg_scale is not None else (getattr(den, "default_cfg_scale", None) if text else None)
    guided = compose(den, (), scale)
    noise = seeded_run(seeds, den.noise_shape(), den.device)["noise"].to(den.model_dtype or torch.float32)
    den.prepare_noise(num_samples, torch.Generator().manual_seed(0))  # per-size state (FLUX ids)
    return _Target(name, _batched(guided, lambda b: den.encode(prompt, None, num_images_per_prompt=b) if text else None),
                   den.noise_schedule, noise.float())


def _batched(guided: Any, cond_for: Callable[[int], Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """``denoise(x, t)`` with the conditioning of the first ``x.shape[0]`` calibration samples
    (built once per batch size: LD3 may fit on a subset)."""
    conds: dict[int, Any] = {}

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        if b not in conds:
            conds[b] = cond_for(b)
        return guided(x, t, conds[b])

    return denoise


def _exact_start(ns: Any, noise: Tensor, t0: float) -> Tensor:
    """The mixture's initial state at ``t0``: the standard-normal ``noise`` times the prior scale
    ``sqrt(alpha^2 + sigma^2)`` (float64)."""
    t = torch.tensor([t0], dtype=torch.float64)
    return noise.double() * math.hypot(float(ns.alpha(t)), float(ns.sigma(t)))


def exact_teacher(den: GMMDenoiser, noise: Tensor, t_fine: Tensor, tol: float = 1e-9) -> so.Teacher:
    """Teacher trajectories of the exact Gaussian mixture: its probability-flow ODE solved by scipy
    (DOP853, ``rtol = atol = tol``) from ``t_max`` through every fine time, then to ``sigma = 0``
    (integrated to ``sigma / alpha = 1e-7`` and denoised exactly: ``GaussianMixture.reference_ode``)."""
    start = time.process_time()
    ns, gmm = den.noise_schedule, den.gmm
    t_fine = torch.as_tensor(t_fine, dtype=torch.float64)
    x = _exact_start(ns, noise, float(t_fine[0]))
    states = [x]
    for a, b in zip(t_fine[:-1].tolist(), t_fine[1:].tolist()):
        x = gmm.reference_ode(x, ns, a, b, rtol=tol, atol=tol)
        states.append(x)
    states.append(gmm.reference_ode(states[0], ns, float(t_fine[0]), None, rtol=tol, atol=tol))
    tt = t_fine.to(torch.float64)
    denoised = torch.stack([den(s, torch.full((s.shape[0],), float(t), dtype=torch.float64))
                            for s, t in zip(states[:-1], tt)])
    t_all = torch.cat([tt, torch.tensor([float(ns.t_zero)], dtype=torch.float64)])
    return so.Teacher(t=t_all, x=torch.stack(states), denoised=denoised, noise=noise.double(), noise_schedule=ns,
                      seconds=time.process_time() - start)


def _teacher(target: _Target, fine_steps: int, teacher_substeps: int, progress: bool) -> so.Teacher:
    t_fine = so.fine_grid(target.noise_schedule, fine_steps)
    if target.exact is not None:
        return exact_teacher(target.exact, target.noise, t_fine)
    return so.solver_teacher(target.denoise, target.noise_schedule, target.noise, t_fine,
                             SOLVERS.create(TEACHER_SOLVER), teacher_substeps, progress=progress)


_POOL: dict[tuple, Tensor] = {}


def _pool_endpoints(target: _Target, fine_steps: int, teacher_substeps: int, progress: bool) -> Tensor:
    """The teacher's endpoints only (no trajectories) on every noise of ``target``."""
    ns = target.noise_schedule
    if target.exact is not None:
        x = _exact_start(ns, target.noise, float(ns.t_max))
        return target.exact.gmm.reference_ode(x, ns, float(ns.t_max), None, rtol=1e-9, atol=1e-9)
    t_sub = so.substep_times(so.fine_grid(ns, fine_steps), teacher_substeps)
    return so.run_solver(SOLVERS.create(TEACHER_SOLVER), target.denoise, ns, target.noise, t_sub)


def stratified_teacher(target: _Target, solver: Any, steps: int, num_samples: int, builtins: dict[str, Any],
                       fine_steps: int, teacher_substeps: int, progress: bool, seed: int,
                       cache_key: Any = None) -> tuple[so.Teacher, Tensor, dict, Tensor]:
    """Teacher trajectories on a stratified calibration set of ``num_samples`` out of the noises of
    ``target`` (the pool; :func:`~diffsample.samplers.schedule_optimizer.stratify`): the probes are
    the built-in schedules at ``steps`` steps with ``solver``, scored against the teacher's endpoints
    on the whole pool (kept for the next call with the same model, seed, pool and ``cache_key``, e.g.
    the CFG scale and prompt). Returns the weighted teacher, the chosen pool indices, a record of
    the pool and the teacher's endpoints on the whole pool."""
    ns = target.noise_schedule
    k = (target.model_id, seed, int(target.noise.shape[0]), fine_steps, teacher_substeps, cache_key)
    if k not in _POOL:  # one pool kept: several solvers or step counts on one model reuse its endpoints
        _POOL.clear()
        _POOL[k] = _pool_endpoints(target, fine_steps, teacher_substeps, progress)
    endpoints = _POOL[k]
    probes = {spec: so.sample_errors(solver, target.denoise, ns, target.noise, endpoints, t)
              for spec, t in so.builtin_grids(builtins, ns, steps).items()}
    if not probes:
        raise ValueError("no built-in schedule gives a grid for this model's noise schedule; cannot stratify a pool")
    index, weights = so.stratify(torch.stack(list(probes.values())), num_samples,
                                 torch.Generator().manual_seed(seed % 2**63))
    sub = target.subset(index)
    teacher = dataclasses.replace(_teacher(sub, fine_steps, teacher_substeps, progress), weights=weights)
    pool_size = int(target.noise.shape[0])
    record = {"pool": pool_size, "stratum_top": int((weights == 1).sum()), "stratum_random": int((weights != 1).sum()),
              "probes": list(probes)}
    return teacher, index, record, endpoints


def calibration_teacher(model: Any = None, *, num_samples: int = 256, seed: int = CALIBRATION_SEED,
                        fine_steps: int = 48, teacher_substeps: int = 4, cfg_scale: float | None = None,
                        prompt: str | None = "a photo", device: str = "cpu", progress: bool = False) -> so.Teacher:
    """The teacher trajectories :func:`optimize_schedule` would compute (arguments as there), to
    pass as its ``teacher=`` when tuning several solvers or step counts for one model."""
    num_samples = _check_int("num_samples", num_samples, 1)
    seed = _check_int("seed", seed, 0)
    target = _resolve(model, num_samples, seed, device, prompt, cfg_scale)
    return _teacher(target, _check_int("fine_steps", fine_steps, 2), _check_int("teacher_substeps", teacher_substeps, 1),
                    progress)


def builtin_schedules(noise_schedule: Any, bundled: str | None = None,
                      specs: Sequence[str] = BUILTIN_SCHEDULES) -> dict[str, Any]:
    """The built-in step schedules compared against (csflow with the bundled model's spectrum where
    there is one; flow_shift only for flows)."""
    from diffsample.solvers.noise_schedules import RectifiedFlow
    from diffsample.solvers.spectrum import bundled_spectra

    out = {}
    for spec in specs:
        name = Spec.parse(spec).name
        if name == "flow_shift" and not isinstance(noise_schedule, RectifiedFlow):
            continue
        if name == "csflow" and bundled is not None and bundled in bundled_spectra():
            spec = f"csflow:spectrum={bundled}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[spec] = STEP_SCHEDULES.create(spec)
        except ValueError:
            continue
    return out


def optimize_schedule(model: Any = None, *, solver: str = "dpmpp_2m", steps: int = 5, method: str = "gits",
                      num_samples: int = 256, seed: int = CALIBRATION_SEED, fine_steps: int = 48,
                      teacher_substeps: int = 4, max_evals: int | None = None, ld3_samples: int | None = None,
                      cfg_scale: float | None = None, prompt: str | None = "a photo", device: str = "cpu",
                      progress: bool = False, command: str | None = None,
                      teacher: so.Teacher | None = None, free_start: bool = True,
                      pool: int | None = None, decoupled: bool = False,
                      decoupled_evals: int | None = None) -> OptimizedSchedule:
    """Tune the ``steps`` evaluation times of ``solver`` for ``model`` (GITS or LD3; module docstring).

    Args:
        model: ``None`` / ``"mnist"`` (bundled), a diffusers model or pipeline folder, a
            ``LoadedModel`` / ``PipelineModel``, a diffusers pipeline, or ``gmm.denoiser(ns)`` of a
            :class:`~diffsample.testbed.gmm.GaussianMixture` (exact teacher).
        solver: a deterministic ``SOLVERS`` spec.
        steps: evaluation times ``N >= 1`` (the run's ``steps``; the last step goes to ``sigma = 0``).
        method: ``"gits"`` (dynamic programming over the fine grid, arXiv 2405.11326) or ``"ld3"``
            (Nelder-Mead on the endpoint error, LD3-style, arXiv 2405.15506; started from the best of
            the GITS grid and the built-in schedules on the fitting noises).
        num_samples: calibration noises ``B`` (seeds ``seed .. seed + B - 1``).
        seed: first calibration seed (keep the calibration and evaluation seeds apart).
        fine_steps: ``M``, points of the teacher's fine grid (GITS chooses among them; ``M >= steps``).
        teacher_substeps: DPM-Solver++(3M) teacher steps per fine interval (not used for the mixture).
        max_evals: LD3 objective evaluations (default ``40 * steps``); each is one solver run of
            ``steps`` model evaluations on the calibration noises.
        ld3_samples: calibration noises LD3 fits on (default: all ``num_samples``).
        cfg_scale: CFG scale of the trajectories (class-conditional or text models); ``None``: off
            for class-conditional models, the pipeline's default for text-to-image pipelines.
        prompt: text of a text-to-image pipeline's calibration trajectories.
        progress: tqdm progress bars.
        command: recorded in the file (default: the call).
        teacher: precomputed teacher trajectories for this model and calibration noises (reused
            across solvers and step counts).
        free_start: LD3 only: the first time ``t_0`` is free too (``<= t_max``, where the noise is
            then drawn, as ``leading`` and ``ddim_uniform`` do); ``False``: ``t_0 = t_max``. The
            objective is always against the teacher started at ``t_max``.
        pool: draw ``pool > num_samples`` noises (seeds ``seed .. seed + pool - 1``), compute the
            teacher's endpoints on all of them and calibrate on a stratified set of ``num_samples``:
            the half that the built-in schedules (at ``steps`` steps, this solver) get most wrong
            plus a uniform draw from the rest, weighted so that the objective estimates the whole
            pool's mean square without bias (:func:`~diffsample.samplers.schedule_optimizer.stratify`).
            For models whose error a few noises dominate (on the 64-D Gaussian mixture, the one in
            a thousand that a grid sends to another component). Costs the teacher's endpoints and
            one run per built-in schedule on the pool. ``None``: ``num_samples`` plain noises.
        decoupled: LD3 only: after the grid, fit it again together with a model-evaluation time per
            grid point (LD3's decoupled times, as its official code does; the model is evaluated at
            ``t_model[i]`` when the solver asks at ``t[i]``, each within half the grid's smallest
            log-sigma gap; :func:`~diffsample.samplers.schedule_optimizer.ld3_decoupled`). The
            schedule then carries ``t_model`` (file version 2); ``attach`` refuses such a schedule.
            With ``pool``, both fits are scored on the pool's ``pool - num_samples`` noises outside
            the fitted set and the decoupled one is kept only if it is not worse there
            (``extra["decoupled_kept"]``, ``extra["pool_rest_rmse"]``; that rest holds none of the
            hardest noises, so this guards typical noises, not the rare hard ones).
        decoupled_evals: objective evaluations of that joint fit (default ``80 * steps``).

    Returns:
        an :class:`~diffsample.solvers.schedule_file.OptimizedSchedule` with the objective (endpoint
        RMSE against the teacher on the calibration noises) of the result and of every built-in
        schedule, CPU seconds (``extra["cpu_seconds"]``, teacher included) and wall seconds.

    Raises:
        ValueError: ``steps < 1``, an unknown method or solver, a stochastic solver, bad counts, a
            model that cannot be loaded, ``decoupled`` with ``method="gits"``; all before any model
            evaluation.
    """
    try:
        steps = check_steps(steps)
    except ValueError:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}") from None
    method = check_method(method)
    num_samples = _check_int("num_samples", num_samples, 1)
    seed = _check_int("seed", seed, 0)
    fine_steps = _check_int("fine_steps", fine_steps, 2)
    teacher_substeps = _check_int("teacher_substeps", teacher_substeps, 1)
    if fine_steps < steps:
        raise ValueError(f"fine_steps ({fine_steps}) must be >= steps ({steps})")
    if max_evals is not None:
        max_evals = _check_int("max_evals", max_evals, 1)
    if not isinstance(decoupled, bool):
        raise ValueError(f"decoupled must be True or False, got {decoupled!r}")
    if decoupled and method != "ld3":
        raise ValueError(f"decoupled model times are fitted by method 'ld3', not {method!r}")
    if decoupled_evals is not None:
        decoupled_evals = _check_int("decoupled_evals", decoupled_evals, 1)
    if ld3_samples is not None:
        ld3_samples = _check_int("ld3_samples", ld3_samples, 1)
    if pool is not None:
        pool = _check_int("pool", pool, num_samples + 1)
        if num_samples < 2:
            raise ValueError(f"a stratified pool needs num_samples >= 2, got {num_samples}")
        if teacher is not None:
            raise ValueError("pass either teacher= (precomputed) or pool= (stratified calibration), not both")
        if ld3_samples is not None and ld3_samples < num_samples:
            raise ValueError(f"ld3_samples ({ld3_samples}) cannot be combined with pool= (a stratified set is "
                             "fitted whole); leave ld3_samples unset")
    solver_spec = str(Spec.parse(solver))
    solver_obj = so.check_deterministic(SOLVERS.create(solver_spec))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    target = _resolve(model, pool if pool is not None else num_samples, seed, device, prompt, cfg_scale)
    ns = target.noise_schedule
    builtins = builtin_schedules(ns, target.bundled)
    pool_record: dict[str, Any] = {}
    held_out = None
    if pool is not None:
        teacher, index, pool_record, endpoints = stratified_teacher(target, solver_obj, steps, num_samples, builtins,
                                                                    fine_steps, teacher_substeps, progress, seed,
                                                                    (cfg_scale, prompt, device))
        if decoupled:  # the pool's noises outside the fitted set, to check the decoupled fit on
            rest = torch.ones(pool, dtype=torch.bool)
            rest[index] = False
            held_out = (target.subset(rest.nonzero().flatten()), endpoints[rest])
        target = target.subset(index)
    if teacher is None:
        teacher = _teacher(target, fine_steps, teacher_substeps, progress)
    elif teacher.noise.shape != target.noise.shape:
        raise ValueError(f"teacher has noises of shape {tuple(teacher.noise.shape)}, expected "
                         f"{tuple(target.noise.shape)}")
    denoise = target.denoise
    builtin = so.builtin_objectives(solver_obj, denoise, teacher, builtins, steps)
    t_gits, local = so.gits_schedule(solver_obj, teacher, steps, denoise, progress=progress,
                                     costs=_local_costs(solver_obj, solver_spec, teacher, denoise, progress))
    record: dict[str, Any] = {"gits_local_cost": local}
    t_model = None
    if method == "gits":
        t_opt = t_gits
    else:
        # Start from the best of the GITS grid and the built-in grids (those starting at t_max only
        # when t_0 is fixed).
        if not isinstance(free_start, bool):
            raise TypeError(f"free_start must be True or False, got {free_start!r}")
        starts = {"gits (dynamic program)": t_gits}
        for spec, t in so.builtin_grids(builtins, ns, steps).items():
            if (free_start or so.starts_at_t_max(ns, t)) and math.isfinite(builtin[spec]):
                starts[spec] = t
        fit = teacher if ld3_samples is None or ld3_samples >= num_samples else _subset(teacher, ld3_samples)
        scores = {k: so.endpoint_rmse(solver_obj, denoise, fit, t) for k, t in starts.items()}
        init = min(scores, key=scores.get)
        t_opt, _, evals = so.ld3_schedule(solver_obj, denoise, fit, steps, starts[init], max_evals, progress=progress,
                                          free_start=free_start)
        record.update(ld3_init=init, ld3_evals=evals, ld3_samples=fit.noise.shape[0], ld3_free_start=free_start)
        if decoupled:
            record["ld3_objective_coupled"] = so.endpoint_rmse(solver_obj, denoise, teacher, t_opt)
            t_dec, t_model, _, evals = so.ld3_decoupled(solver_obj, denoise, fit, steps, t_opt, decoupled_evals,
                                                        free_start=free_start, progress=progress)
            record.update(ld3_decoupled_evals=evals)
            if held_out is not None:
                # The pool's noises outside the fitted set: keep the decoupled fit only if it is better there too.
                rest_target, rest_end = held_out
                errs = {name: so.rms(so.run_solver(solver_obj, rest_target.denoise, ns, rest_target.noise, t, tm),
                                     rest_end)
                        for name, (t, tm) in (("coupled", (t_opt, None)), ("decoupled", (t_dec, t_model)))}
                record.update(pool_rest_rmse=errs, pool_rest_samples=int(rest_end.shape[0]))
                if errs["decoupled"] > errs["coupled"]:
                    t_dec, t_model = t_opt, None
                    record["decoupled_kept"] = False
                else:
                    record["decoupled_kept"] = True
            t_opt = t_dec
    objective = so.endpoint_rmse(solver_obj, denoise, teacher, t_opt, t_model)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if command is None:
        command = (f"diffsample.optimize_schedule({target.model_id!r}, solver={solver_spec!r}, steps={steps}, "
                   f"method={method!r}, num_samples={num_samples}, seed={seed}"
                   + (f", pool={pool}" if pool is not None else "") + (", decoupled=True" if decoupled else "") + ")")
    extra = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
             "cpu_seconds": round(cpu, 3), "wall_seconds": round(wall, 3),
             "teacher": {"kind": "exact ODE (scipy DOP853)" if target.exact is not None else
                         f"{TEACHER_SOLVER}, {teacher_substeps} steps per fine interval",
                         "fine_steps": teacher.points - 1, "model_evals": teacher.model_evals,
                         "cpu_seconds": round(teacher.seconds, 3)}, **record}
    return schedule_from_times(t_opt.tolist(), ns, model=target.model_id, solver=solver_spec, method=method,
                               objective=objective, objective_builtin=builtin,
                               calibration={"num_samples": num_samples, "seed": seed, **pool_record}, command=command,
                               extra=extra, t_model=None if t_model is None else tuple(t_model.tolist()))


_COSTS: dict[tuple[int, str], tuple[Any, Any]] = {}


def _local_costs(solver: Any, spec: str, teacher: so.Teacher, denoise: Any, progress: bool) -> tuple[Any, Any]:
    """:func:`~diffsample.samplers.schedule_optimizer.local_costs`, kept for the last teacher object
    (several step counts or methods on one teacher need them once per solver)."""
    k = (id(teacher), spec)
    if k not in _COSTS:
        if any(key[0] != id(teacher) for key in _COSTS):
            _COSTS.clear()
        _COSTS[k] = so.local_costs(solver, teacher, denoise, progress)
    return _COSTS[k]


def _subset(teacher: so.Teacher, n: int) -> so.Teacher:
    return so.Teacher(t=teacher.t, x=teacher.x[:, :n], denoised=teacher.denoised[:, :n], noise=teacher.noise[:n],
                      noise_schedule=teacher.noise_schedule, model_evals=teacher.model_evals, seconds=teacher.seconds,
                      weights=None if teacher.weights is None else teacher.weights[:n])


def summary(schedule: OptimizedSchedule) -> str:
    """One line: the objective before (best built-in) and after, and the time it took."""
    best = schedule.best_builtin
    cpu = schedule.extra.get("cpu_seconds")
    before = f"best built-in {best[0]} {best[1]:.4g} -> " if best else ""
    ratio = f" ({schedule.objective / best[1]:.2f}x)" if best and best[1] > 0 else ""
    kind = f"{schedule.method} (decoupled model times)" if schedule.t_model is not None else schedule.method
    return (f"{kind} {schedule.solver} steps={schedule.steps}: endpoint RMSE vs teacher {before}"
            f"{schedule.objective:.4g}{ratio}" + (f"; {cpu:.1f} CPU-s" if cpu is not None else ""))
