"""``diffsample.generate``: the main job as a Python function (the CLI is a thin layer over it)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor

from diffsample.core.spec import Spec
from diffsample.guidance import GUIDANCE
from diffsample.guidance.composition import compose
from diffsample.guidance.loop_hooks import collect_hooks
from diffsample.guidance.term import Denoiser, Guidance
from diffsample.solvers import SOLVERS, STEP_SCHEDULES
from diffsample.solvers.schedule_file import OptimizedSchedule, ScheduleMismatch
from diffsample.solvers.stop_time import StopTime, stop_options, stop_record

from diffsample.run.record import GenerateResult, versions
from diffsample.run.models import LoadedModel, PipelineModel, check_student_grid, load_model
from diffsample.run.prepare import prepare_terms
from diffsample.samplers.sampler import Sampler
from diffsample.samplers.stochastic_variant import SolverSwitched, solver_for
from diffsample.samplers.seeds import seeded_run
from diffsample.run.validate import (check_choice, check_classes, check_count, check_device, check_label, check_memory,
                                     check_scale, check_seed_range, check_spec, check_specs, check_text,
                                     result_bytes_per_sample, batch_coupled)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SOLVER, DEFAULT_SCHEDULE, DEFAULT_STEPS = "dpmpp_2m", "trailing", 20


def build_sampler(solver: str, schedule: str, steps: int, final: str = "zero", progress: bool = False,
                  stop: StopTime | None = None, stop_return: str = "noisy") -> Sampler:
    """A :class:`Sampler` from registry specs (``"dpmpp_2m"``, ``"karras:rho=5"``), optionally
    stopped at ``stop`` (truncated sampling, arXiv 2606.13796; docs/methods/truncation.md).

    Raises:
        ValueError: unknown names (the message lists the valid ones), bad options or ``steps < 1``.
    """
    step_schedule = STEP_SCHEDULES.create(schedule) if isinstance(schedule, (str, Spec)) else schedule
    return Sampler(SOLVERS.create(solver), step_schedule, steps, final=final, progress=progress,
                   stop=stop, stop_return=stop_return)


def file_schedule_defaults(schedule: "str | Spec | object", solver: "str | None",
                           steps: "int | None") -> "tuple[str | None, int | None]":
    """``(solver, steps)`` with the ones not given taken from an optimised schedule (``file:path=...``
    or an :class:`~diffsample.solvers.schedule_file.OptimizedSchedule`): its solver and step count.
    Any other schedule returns both unchanged; a bad spec is left for the normal checks to report."""
    if solver is not None and steps is not None:
        return solver, steps
    obj = schedule
    if isinstance(schedule, (str, Spec)):
        try:  # only a file schedule is built here (reading its JSON); others are left to build_sampler
            obj = STEP_SCHEDULES.create(schedule) if STEP_SCHEDULES.canonical(schedule) == "file" else None
        except (ValueError, TypeError):
            return solver, steps
    if not isinstance(obj, OptimizedSchedule):
        return solver, steps
    return (obj.solver if solver is None else solver), (obj.steps if steps is None else steps)


def schedule_for_model(schedule: "str | Spec", model: "str | LoadedModel | PipelineModel | None") -> "str | Spec":
    """``schedule`` with ``spectrum=NAME`` added when its step schedule takes a spectrum (``csflow``),
    none was given, and ``model`` is a bundled model with a bundled spectrum of the same name
    (``None`` / ``"mnist"`` -> ``spectrum=mnist``); otherwise ``schedule`` unchanged (csflow then
    falls back to its default spectrum and says so)."""
    from diffsample.core.spec import Spec
    from diffsample.solvers.spectrum import bundled_spectra
    from diffsample.testbed import BUNDLED_MODELS, DEFAULT_MODEL

    name = DEFAULT_MODEL if model is None else getattr(model, "name", model)
    if not isinstance(schedule, (str, Spec)):  # a step-schedule object (an optimised schedule)
        return schedule
    spec = Spec.parse(schedule)
    if (not isinstance(name, str) or name not in BUNDLED_MODELS or name not in bundled_spectra()
            or "spectrum" in spec.options or not STEP_SCHEDULES.accepts(spec, "spectrum")):
        return schedule
    return str(spec.with_options(spectrum=name))


def guidance_terms(model: LoadedModel, guidance: Sequence[str] = (), sampler: Sampler | None = None) -> list[Guidance]:
    """The guidance terms named in ``guidance``, built for ``model``'s resources. Terms whose
    factory takes ``sampler`` (CFG++, which needs the grid) receive ``sampler``.

    Raises:
        ValueError: unknown guidance name, bad options, or a term the model cannot support.
    """
    terms = []
    for spec in guidance:
        extra = {"sampler": sampler} if sampler is not None and GUIDANCE.accepts(spec, "sampler") else {}
        terms.append(GUIDANCE.create(spec, resources=model.resources, **extra))
    return terms


def apply_guidance(model: LoadedModel, terms: Sequence[Guidance], cfg_scale: float | None = None,
                   labels: Sequence[str] | None = None) -> Denoiser:
    """``model.denoiser`` wrapped in the composition contract's order: CFG at ``cfg_scale`` (if
    given), then ``terms`` in order (:func:`~diffsample.guidance.composition.compose`).

    Raises:
        ValueError: ``cfg_scale`` for an unconditional model; a nesting the contract refuses (e.g.
            ``cfg_scale`` with a CFG-family term), named with ``labels``.
    """
    if cfg_scale is not None and not model.resources.conditional:
        raise ValueError(f"--cfg-scale needs a conditional model; {model.name!r} is unconditional")
    return compose(model.denoiser, terms, cfg_scale, labels)


def build_guided(model: LoadedModel, guidance: Sequence[str] = (), cfg_scale: float | None = None,
                 sampler: Sampler | None = None) -> Denoiser:
    """Wrap ``model.denoiser`` with CFG at ``cfg_scale`` if given, then the guidance terms named in
    ``guidance`` (applied in order). Terms whose factory takes ``sampler`` (CFG++, which needs the
    grid) receive ``sampler``. Terms with a preparation step are left unprepared (:func:`generate`
    prepares them, e.g. Jeffrey guidance's model marginal).

    Raises:
        ValueError: unknown guidance name, bad options, or a term the model cannot support.
    """
    return apply_guidance(model, guidance_terms(model, guidance, sampler), cfg_scale, [str(g) for g in guidance])


def default_classes(model: LoadedModel, n: int, class_label: int | None) -> Tensor | None:
    """Class labels per sample: ``class_label`` for all, or ``0, 1, ..., 9, 0, ...`` by sample index
    (so a default grid shows every digit); ``None`` for unconditional models."""
    if model.num_classes is None:
        if class_label is not None:
            raise ValueError(f"--class needs a class-conditional model; {model.name!r} is unconditional")
        return None
    if class_label is not None:
        if not 0 <= class_label < model.num_classes:
            raise ValueError(f"class {class_label} is outside 0..{model.num_classes - 1}")
        return torch.full((n,), class_label, dtype=torch.long)
    return torch.arange(n) % model.num_classes


def model_defaults(model: "str | LoadedModel | PipelineModel | None") -> tuple[str, str, int]:
    """The ``(solver, schedule, steps)`` a run of ``model`` uses when the caller gives none: a bundled
    model's own (:data:`diffsample.testbed.BUNDLED_INFO`; a distilled student samples on its own
    grid), else ``DEFAULT_SOLVER, DEFAULT_SCHEDULE, DEFAULT_STEPS``."""
    from diffsample.testbed import BUNDLED_INFO, DEFAULT_MODEL

    name = DEFAULT_MODEL if model is None else getattr(model, "name", model)
    info = BUNDLED_INFO.get(name) if isinstance(name, str) else None
    if info is None:
        return DEFAULT_SOLVER, DEFAULT_SCHEDULE, DEFAULT_STEPS
    return info.solver, info.schedule, info.steps


def generate(model: str | LoadedModel | None = None, *, solver: str | None = None, schedule: str | None = None,
             steps: int | None = None, guidance: Sequence[str] = (), cfg_scale: float | None = None,
             class_label: int | None = None, classes: Sequence[int] | None = None, seed: int = 0,
             num_samples: int = 16, batch_size: int = 64, device: str = "cpu", dtype: str = "fp32",
             final: str = "zero", progress: bool = False, prompt: str | None = None,
             negative_prompt: str | None = None, stop: float | None = None, stop_unit: str = "ou_time",
             stop_return: str = "noisy") -> GenerateResult:
    """Sample ``num_samples`` images with per-sample seeds ``seed, seed + 1, ...``.

    The same seed gives the same sample whatever ``batch_size`` (noise is drawn per sample; up to
    batched floating-point arithmetic), except where the method couples a batch: SteinDiff solvers
    (batch statistics, probes by batch position), twisted SMC (``jeffrey:particles=K``, resampling
    draws shared by a batch) and SVDD with ``temperature > 0``; ``record["batch_coupled"]`` says
    which (:func:`~diffsample.run.validate.batch_coupled`). All arguments are validated before any
    sampling (:mod:`diffsample.run.validate`): seeds in ``0 .. 2**63 - 1``, integer class labels
    (bools and floats refused, not cast), a device this machine has, and ``num_samples`` whose
    samples and images fit in a quarter of the RAM.

    Before sampling, every guidance term with a preparation step
    (:class:`~diffsample.guidance.term.Preparable`) is prepared on the chain below it
    (:func:`~diffsample.run.prepare.prepare_terms`); what it reports goes into the record. Jeffrey
    guidance (``jeffrey:target=...``) prepares this way the model marginal ``p_theta(y)`` it
    divides by: without ``model_marginal=`` in the spec it is estimated from
    ``marginal_samples=N`` (default 1000) unguided samples with this run's solver, schedule,
    ``steps`` and ``final`` on the branch the term reweights (the null class of a conditional
    model), soft-labelled by the term's classifier (for ``variant=conditional``: the classifier's
    prior on pure noise, no sampling); per-sample seeds ``10**9, 10**9 + 1, ...`` whatever
    ``seed``; cached in ``marginal_cache=PATH`` (``none``: off; default
    ``$DIFFSAMPLE_CACHE_DIR/marginals.json``), keyed by model (name and weight fingerprint),
    dtype, sampler, terms below the Jeffrey term, Jeffrey variant / base / estimator,
    ``marginal_samples`` and seed; a cache hit samples nothing
    (:meth:`~diffsample.guidance.jeffrey.class_guidance.JeffreyGuidance.prepare`). Its model
    evaluations are recorded in ``record["model_marginal"]``, not in the run's ``model_evals``. A
    ``model_marginal=`` given in the spec is used as is.

    Args:
        model: ``None`` / ``"mnist"`` (bundled), a diffusers model folder, or a :class:`LoadedModel`.
        solver, schedule: registry specs (``diffsample list``), e.g. ``"unipc_bh2:predictor_order=3"``;
            ``None``: the model's default (:func:`model_defaults`; ``dpmpp_2m`` / ``trailing`` for the
            MNIST teacher and model folders, ``ddim`` / ``trailing`` for the distilled students).
            A guidance term that acts on the noise of stochastic steps (NoiseTilt, SVDD, twisted SMC)
            switches a deterministic solver to its stochastic variant (``eta=1``), warns once
            (:class:`SolverSwitched`) and records it: ``record["solver"]`` is the spec that ran,
            ``record["solver_requested"]`` the one given, ``record["notes"]`` the line.
        steps: grid intervals (>= 1); ``None``: the model's default (20; a student's own step count).
            A distilled student refuses a grid with a time it was not distilled for
            (:func:`~diffsample.run.models.check_student_grid`).
        guidance: guidance specs ``NAME[:key=value,...]`` applied in order.
        cfg_scale: classifier-free guidance scale (conditional models), or ``None``.
        class_label: one class for every sample; default: sample index mod ``num_classes``.
        classes: explicit per-sample classes (overrides ``class_label``).
        seed, num_samples, batch_size: seeds ``seed .. seed + num_samples - 1``, processed in
            batches of ``batch_size``.
        device, dtype: where the network runs; ``dtype`` in ``fp32``, ``fp16``, ``bf16``.
        final: ``"zero"`` (denoise to sigma = 0) or ``"last"``.
        prompt, negative_prompt: text for a text-to-image pipeline folder (SD, SDXL, SD3, FLUX,
            PixArt), sampled with the native loop (:mod:`diffsample.pipelines`).
        stop, stop_unit, stop_return: end every run at noise level ``stop`` in ``stop_unit``
            (``ou_time``, ``logsnr``, ``lambda``, ``sigma``, ``t_rf``, ``native``) and return
            ``stop_return`` (``noisy`` x_stop, ``denoised`` with one extra model evaluation,
            ``rescaled`` x_stop / alpha, ``ou``); truncated sampling, arXiv 2606.13796
            (:class:`~diffsample.solvers.stop_time.StopTime`). Recorded as ``record["stop"]``. A
            pipeline decodes the returned latent.

    Raises:
        ValueError: any bad argument (unknown names list the valid choices); an estimated model
            marginal that is zero on a class the Jeffrey target gives mass to.
    """
    # Typed once, before anything is loaded or drawn (diffsample.run.validate).
    num_samples, batch_size = check_count("num_samples", num_samples), check_count("batch_size", batch_size)
    own_solver, own_schedule, own_steps = model_defaults(model)
    if schedule is not None:  # an optimised schedule file brings its own step count and solver as defaults
        solver, steps = file_schedule_defaults(schedule, solver, steps)
    solver = own_solver if solver is None else solver
    schedule = own_schedule if schedule is None else schedule
    steps = own_steps if steps is None else steps
    seed = check_seed_range(seed, num_samples)
    check_choice("dtype", dtype, DTYPES)
    solver = check_spec("solver", solver)
    schedule = schedule if callable(schedule) and not isinstance(schedule, str) else check_spec("schedule", schedule)
    schedule = schedule_for_model(schedule, model)  # csflow without spectrum=: the bundled model's spectrum
    guidance = check_specs("guidance", guidance)
    cfg_scale = check_scale("cfg_scale", cfg_scale)
    stop, stop_return = stop_options(stop, stop_unit, stop_return)
    class_label, classes = check_label("class_label", class_label), check_classes(classes)
    prompt, negative_prompt = check_text("prompt", prompt), check_text("negative_prompt", negative_prompt)
    if not isinstance(model, (LoadedModel, PipelineModel)):
        check_device(device)
    sampler = build_sampler(solver, schedule, steps, final=final, progress=progress, stop=stop, stop_return=stop_return)
    loaded = model if isinstance(model, (LoadedModel, PipelineModel)) else load_model(model, device=device,
                                                                                        dtype=DTYPES[dtype])
    check_memory(num_samples, result_bytes_per_sample(loaded))
    if isinstance(loaded, PipelineModel):
        if class_label is not None or classes is not None:
            raise ValueError(f"--class / classes need a class-conditional model; {loaded.name!r} is a pipeline "
                             "conditioned on --prompt")
        from diffsample.run.pipeline_generate import generate_from_pipeline

        result = generate_from_pipeline(loaded, prompt=prompt, negative_prompt=negative_prompt, solver=solver,
                                        schedule=schedule, steps=steps, guidance=guidance, cfg_scale=cfg_scale,
                                        seed=seed, num_samples=num_samples, batch_size=batch_size, final=final,
                                        dtype=dtype, stop=stop, stop_return=stop_return)
        result.record.setdefault("batch_coupled", batch_coupled(SOLVERS.create(result.record["solver"])))
        return result
    for flag, text in (("--prompt", prompt), ("--negative-prompt", negative_prompt)):
        if text is not None:
            raise ValueError(f"{flag} needs a text-to-image pipeline; model {loaded.name!r} is not one")
    names = [str(g) for g in guidance]
    terms = guidance_terms(loaded, guidance, sampler)
    guided = apply_guidance(loaded, terms, cfg_scale, names)
    # Terms acting on the noise of stochastic steps switch a deterministic solver to its stochastic variant.
    solver_spec, note = solver_for(solver, collect_hooks(guided))
    notes = [] if note is None else [note]
    notes += [line for line in (getattr(sampler.step_schedule, "note", None),) if line]  # e.g. csflow's default spectrum
    mismatch = getattr(sampler.step_schedule, "mismatch", None)  # a tuned schedule used on another model / solver
    for line in mismatch(model=loaded.name, solver=solver) if mismatch is not None else ():
        warnings.warn(line, ScheduleMismatch, stacklevel=2)
        notes.append(line)
    if note is not None:
        warnings.warn(note, SolverSwitched, stacklevel=2)
        sampler = build_sampler(str(solver_spec), schedule, steps, final=final, progress=progress, stop=stop,
                                stop_return=stop_return)
        terms = guidance_terms(loaded, guidance, sampler)
        guided = apply_guidance(loaded, terms, cfg_scale, names)
    collect_hooks(guided).check(sampler.solver)  # hook combinations the loop cannot honour, before any sampling
    check_student_grid(loaded, sampler.grid(loaded.denoiser.noise_schedule))  # a stop outside the model's grid, or
    # a time a distilled student was not distilled for, fails here, before sampling
    if classes is not None:
        labels = torch.as_tensor(classes, dtype=torch.long)
        if labels.numel() != num_samples:
            raise ValueError(f"classes has {labels.numel()} entries for {num_samples} samples")
    else:
        labels = default_classes(loaded, num_samples, class_label)
    loaded.cond(labels)  # validates every label's range before any sampling
    prepared, reported = prepare_terms(terms, names, loaded, sampler, cfg_scale=cfg_scale, batch_size=batch_size,
                                       progress=progress)
    if any(new is not old for new, old in zip(prepared, terms)):
        terms, guided = prepared, apply_guidance(loaded, prepared, cfg_scale, names)
    seeds = list(range(seed, seed + num_samples))
    outputs, nfe, model_evals, events = [], 0, 0.0, {}
    start = time.perf_counter()
    for lo in range(0, num_samples, batch_size):
        batch_seeds = seeds[lo:lo + batch_size]
        cond = loaded.cond(labels[lo:lo + batch_size] if labels is not None else None)
        result = sampler(guided, cond=cond, **seeded_run(batch_seeds, loaded.sample_shape, loaded.device))
        outputs.append(result.x.float().cpu())
        nfe, model_evals = result.nfe, result.model_evals
        for key, count in result.events.items():
            events[key] = events.get(key, 0) + count
    samples = torch.cat(outputs)
    record = {
        "model": loaded.name, "solver": str(solver_spec), "solver_requested": str(solver), "schedule": str(schedule), "steps": steps, "final": final,
        "guidance": list(guidance), "cfg_scale": cfg_scale, "seeds": seeds,
        "classes": labels.tolist() if labels is not None else None,
        "nfe": nfe, "model_evals": model_evals, "events": events, "wall_time_s": round(time.perf_counter() - start, 4),
        "device": str(loaded.device), "dtype": dtype, "num_samples": num_samples, "batch_size": batch_size,
        "batch_coupled": batch_coupled(sampler.solver, terms, collect_hooks(guided)),
        "versions": versions(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "notes": notes,
        "stop": stop_record(stop, stop_return, loaded.denoiser.noise_schedule),
    }
    record.update(reported)  # e.g. "model_marginal" from Jeffrey guidance
    return GenerateResult(images=loaded.to_images(samples), samples=samples, record=record)
