"""What a diffusers pipeline offers guidance terms, and the CFG scale the native loop applies.

One place for both front-ends: :func:`pipeline_resources` (the :class:`~diffsample.guidance.term.Resources`
a pipeline's terms are built with) and :func:`native_cfg_scale` (the native loop's CFG below the
terms). Under :func:`~diffsample.pipelines.attach.attach` a CFG-family term works on the two batch
chunks of the pipeline's own CFG calls (the scheduler shim's branch denoiser).

Nesting order on every path: ``model -> CFG (the pipeline's cfg_scale, or one CFG-family term) ->
the other guidance terms, in the order given``. A CFG-family term (``cfg``, ``cfg_rescale``,
``apg``, ``cfg_zero_star``, ``cfgpp``) *replaces* the pipeline's CFG: the default ``cfg_scale`` is
not applied under it, and an explicit ``cfg_scale`` with it is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffsample.core.spec import Spec
from diffsample.guidance import GUIDANCE, Resources
from diffsample.guidance.composition import calls_model_branches, sets_cfg_scale
from diffsample.guidance.term import Guidance
from diffsample.pipelines.pipeline_denoiser import adapter_class



def is_conditional(pipe_or_denoiser: Any) -> bool:
    """Whether a pipeline (or its native-loop adapter) has a negative / unconditional branch: the
    text-to-image families (the negative or empty prompt), not ``DDPMPipeline``. A pipeline
    without a native-loop adapter counts as conditional when it has ``encode_prompt``."""
    if hasattr(pipe_or_denoiser, "text_conditioned") and hasattr(pipe_or_denoiser, "pipe"):
        return bool(pipe_or_denoiser.text_conditioned)
    adapter = adapter_class(pipe_or_denoiser)
    if adapter is not None:
        return bool(adapter.text_conditioned)
    return callable(getattr(pipe_or_denoiser, "encode_prompt", None))


def pipeline_resources(pipe_or_denoiser: Any) -> Resources:
    """The resources guidance terms get on a pipeline: ``conditional`` as :func:`is_conditional`
    (so the CFG family can be built for text-to-image pipelines); no classifiers, no decoder."""
    return Resources(conditional=is_conditional(pipe_or_denoiser))


def label(term: Any) -> str:
    """How a guidance entry is named in messages: the spec as given, or the term's class name."""
    return str(term) if isinstance(term, (str, Spec)) else type(term).__name__


def build_terms(pipe_or_denoiser: Any, guidance: Sequence[Any], sampler: Any = None) -> tuple[list[Guidance], list[str]]:
    """``(terms, labels)``: registry specs built with :func:`pipeline_resources` (terms whose factory
    takes ``sampler``, CFG++, get ``sampler``); term objects are kept as given.

    Raises:
        ValueError: unknown guidance name, bad options, or a term the pipeline cannot support.
    """
    resources = None
    terms: list[Guidance] = []
    for g in guidance:
        if isinstance(g, (str, Spec)):
            resources = resources or pipeline_resources(pipe_or_denoiser)
            extra = {"sampler": sampler} if sampler is not None and GUIDANCE.accepts(g, "sampler") else {}
            terms.append(GUIDANCE.create(g, resources=resources, **extra))
        else:
            terms.append(g)
    return terms, [label(g) for g in guidance]


def cfg_family(terms: Sequence[Guidance], labels: Sequence[str]) -> list[str]:
    """Labels of the CFG-family terms (those that set the CFG scale themselves)."""
    return [name for term, name in zip(terms, labels) if sets_cfg_scale(term)]


def native_cfg_scale(terms: Sequence[Guidance], labels: Sequence[str], cfg_scale: float | None,
                     default_cfg_scale: float | None) -> float | None:
    """The CFG scale the native loop applies below ``terms`` (``None``: no CFG wrapper).

    ``cfg_scale=None`` means the pipeline's default, which is dropped under a CFG-family term.
    As in the pipelines, CFG is applied only for a scale > 1.

    Raises:
        ValueError: an explicit ``cfg_scale`` with a CFG-family term; a term that evaluates the
            model's branches itself (classifier, Jeffrey) above the pipeline's default CFG.
    """
    family = cfg_family(terms, labels)
    if family and cfg_scale is not None:
        name = family[0].split(":")[0]
        raise ValueError(f"--cfg-scale and guidance {family[0]!r} both set the CFG scale; give the scale as "
                         f"{name}:scale={cfg_scale:g} and drop --cfg-scale (cfg_scale=...)")
    if family:
        return None
    scale = default_cfg_scale if cfg_scale is None else cfg_scale
    if scale is None or not scale > 1.0:
        return None
    branching = [name for term, name in zip(terms, labels) if calls_model_branches(term)]
    if branching and cfg_scale is None:
        raise ValueError(f"guidance {branching[0]!r} evaluates the model's conditional/unconditional branches itself "
                         f"and cannot wrap the pipeline's default CFG (scale {scale:g}); pass cfg_scale=1 "
                         "(--cfg-scale 1) to turn CFG off, or use a CFG-family term (e.g. cfg:scale=...)")
    return float(scale)
