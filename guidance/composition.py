"""How guidance composes with a model: one nesting order on every path, refused combinations.

The contract (every path -- ``generate`` / the CLI, the native pipeline loops, ``attach``):

``model -> CFG (a cfg_scale, or one CFG-family term) -> the other guidance terms, in the order given``

* A CFG-family term (``cfg``, ``cfg_rescale``, ``apg``, ``cfgpp``, ``cfg_zero_star``; class
  attribute ``sets_cfg_scale``) sets the CFG scale itself, so it is refused together with an explicit
  ``cfg_scale`` and with another CFG-family term.
* A term that evaluates the model's conditional / unconditional branches itself (class attribute
  ``calls_model_branches``: the CFG family, classifier and Jeffrey guidance, any term restricted to a
  sigma window) must sit directly on the model: it is refused above a ``cfg_scale`` or above another
  such term (the branches it asks for would reach a CFG wrapper that needs both).

Everything else (reward guidance, best-of-N, ...) wraps whatever is below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffsample.guidance.cfg import CFG
from diffsample.guidance.term import Denoiser, Guidance


def sets_cfg_scale(term: Guidance) -> bool:
    """Whether ``term`` is of the CFG family (it sets the CFG scale itself)."""
    return bool(getattr(term, "sets_cfg_scale", False))


def calls_model_branches(term: Guidance) -> bool:
    """Whether ``term`` evaluates the model's branches itself (must sit directly on the model)."""
    return bool(getattr(term, "calls_model_branches", False))


def check_composition(terms: Sequence[Guidance], cfg_scale: float | None = None,
                      labels: Sequence[str] | None = None) -> None:
    """Refuse, before any sampling, a nesting the contract above cannot honour.

    Args:
        terms: guidance terms in the order they wrap (first = innermost).
        cfg_scale: an explicit classifier-free guidance scale applied below the terms, or ``None``.
        labels: how the user named each term (for messages); default: the class names.

    Raises:
        ValueError: one line naming the offending term and what to do instead.
    """
    names = list(labels) if labels is not None else [type(t).__name__ for t in terms]
    family = [name for term, name in zip(terms, names) if sets_cfg_scale(term)]
    if family and cfg_scale is not None:
        raise ValueError(f"--cfg-scale and guidance {family[0]!r} both set the CFG scale; give the scale in the "
                         f"term (e.g. {family[0].split(':')[0]}:scale={cfg_scale:g}) and drop --cfg-scale")
    if len(family) > 1:
        raise ValueError(f"at most one CFG-family guidance term per run, got: {', '.join(family)}")
    below_cfg = cfg_scale is not None
    for k, (term, name) in enumerate(zip(terms, names)):
        if calls_model_branches(term) and (below_cfg or any(calls_model_branches(t) for t in terms[:k])):
            under = "--cfg-scale" if below_cfg else repr(next(n for t, n in zip(terms[:k], names) if calls_model_branches(t)))
            raise ValueError(f"guidance {name!r} evaluates the model's conditional/unconditional branches itself, so "
                             f"it must sit directly on the model and cannot wrap {under}; give it alone (or first, "
                             "with reward guidance after it)")


def compose(denoiser: Denoiser, terms: Sequence[Guidance] = (), cfg_scale: float | None = None,
            labels: Sequence[str] | None = None) -> Any:
    """``denoiser`` wrapped in the contract's order: CFG at ``cfg_scale`` (if given), then ``terms``.

    Raises:
        ValueError: as :func:`check_composition`.
    """
    check_composition(terms, cfg_scale, labels)
    guided: Any = denoiser
    if cfg_scale is not None:
        guided = CFG(cfg_scale)(guided)
    for term in terms:
        guided = term(guided)
    return guided
