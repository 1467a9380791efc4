"""The run's side of a guidance term's preparation step (:class:`~diffsample.guidance.term.Preparable`).

Before sampling, :func:`prepare_terms` calls ``prepare(context)`` on every term that has one
(inside a guidance window too) and applies the term it returns instead. The
:class:`~diffsample.guidance.term.PrepareContext` it builds offers the term unguided sampling with
the run's sampler on the chain below the term, seeded noise, the model's conditioning and
identity (name, weight files, dtype), the sampler as strings, the batch size, the progress flag
and a sink for run-record entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from diffsample.guidance.cfg import CFG
from diffsample.guidance.interval import windowed_term, with_windowed_term
from diffsample.guidance.term import Cond, Denoiser, Guidance, Preparable, PrepareContext, UnguidedSamples
from diffsample.run.models import LoadedModel
from diffsample.samplers.sampler import Sampler
from diffsample.samplers.seeds import seeded_noise, seeded_run


def sampler_fields(sampler: Sampler) -> dict[str, Any]:
    """The sampler as strings and numbers (``solver`` and ``step_schedule`` reprs, ``steps``,
    ``final``): what a prepared term may put in a cache key."""
    return {"solver": repr(sampler.solver), "step_schedule": repr(sampler.step_schedule), "steps": sampler.steps,
            "final": sampler.final}


def prepare_context(model: LoadedModel, sampler: Sampler, *, denoiser: Denoiser | None = None,
                    below: Sequence[str] = (), batch_size: int = 64, progress: bool = False,
                    report: Callable[[Mapping[str, Any]], None] | None = None) -> PrepareContext:
    """The :class:`~diffsample.guidance.term.PrepareContext` of one term of a run on ``model``
    with ``sampler``.

    Args:
        model: the loaded model (conditioning, sample shape, device, name, weight files, dtype).
        sampler: the run's sampler; unguided samples use it without its progress bar.
        denoiser: the chain below the term (default ``model.denoiser``), named by ``below``.
        below: the specs of the terms inside ``denoiser``.
        batch_size: samples per sampler call (per-sample noise: results do not depend on it).
        progress: show a progress bar over the batches of unguided samples.
        report: sink for run-record entries (default: dropped).
    """
    quiet = replace(sampler, progress=False)

    def sample_unguided(inner: Denoiser, seeds: Sequence[int], cond_fn: Callable[[int], Cond | None]) -> UnguidedSamples:
        seeds = list(seeds)
        xs, evals, nfe = [], 0.0, 0
        for lo in tqdm(range(0, len(seeds), batch_size), disable=not progress, leave=False, desc="preparing guidance"):
            batch = seeds[lo:lo + batch_size]
            result = quiet(inner, cond=cond_fn(len(batch)), **seeded_run(batch, model.sample_shape, model.device))
            xs.append(result.x)
            evals += result.model_evals * len(batch)
            nfe = result.nfe
        return UnguidedSamples(torch.cat(xs), evals, nfe)

    def noise(seeds: Sequence[int]):
        return seeded_noise(list(seeds), model.sample_shape, device=model.device)

    return PrepareContext(
        denoiser=model.denoiser if denoiser is None else denoiser, below=tuple(str(b) for b in below),
        sample_unguided=sample_unguided, noise=noise, model_cond=model.cond, num_classes=model.num_classes,
        model=model.name, weight_files=tuple(model.weight_files), dtype=str(model.dtype).removeprefix("torch."),
        sampler=sampler_fields(sampler), batch_size=batch_size, progress=progress,
        report=report if report is not None else (lambda entries: None))


def prepare_terms(terms: Sequence[Guidance], specs: Sequence[str], model: LoadedModel, sampler: Sampler, *,
                  cfg_scale: float | None = None, batch_size: int = 64,
                  progress: bool = False) -> tuple[list[Guidance], dict[str, Any]]:
    """Call ``prepare`` on every term in ``terms`` that has one (through guidance windows), each
    with the chain below it: ``model.denoiser``, CFG at ``cfg_scale`` (if given), then the terms
    before it, prepared (the run's nesting order).

    Args:
        terms: guidance terms in the order they wrap (first = innermost).
        specs: how the user named each term (``below`` in the context).
        model, sampler, batch_size, progress: as :func:`prepare_context`.
        cfg_scale: the run's classifier-free guidance scale, or ``None``.

    Returns:
        ``(terms, record)``: the terms to sample with (unprepared ones unchanged) and the entries
        the terms reported, keyed by record field (one value, or a list when several terms
        reported the same field).

    Raises:
        ValueError: whatever a term's ``prepare`` refuses.
    """
    reported: dict[str, list[Any]] = {}

    def report(entries: Mapping[str, Any]) -> None:
        for key, value in entries.items():
            reported.setdefault(key, []).append(value)

    out: list[Guidance] = []
    denoiser = model.denoiser if cfg_scale is None else CFG(cfg_scale)(model.denoiser)
    for i, term in enumerate(terms):
        inner = windowed_term(term)
        if isinstance(inner, Preparable):
            context = prepare_context(model, sampler, denoiser=denoiser, below=specs[:i], batch_size=batch_size,
                                      progress=progress, report=report)
            term = with_windowed_term(term, inner.prepare(context))
        out.append(term)
        denoiser = term(denoiser)
    return out, {key: values[0] if len(values) == 1 else values for key, values in reported.items()}
