"""Guidance terms: denoiser -> denoiser transforms (see :mod:`.base`).

Registry: :data:`GUIDANCE`. Each factory takes ``resources`` (:class:`~.base.Resources`, what the
model offers: classifiers, decoder) plus the options of the spec ``name:key=value,...``:
``GUIDANCE.create("cfg:scale=2", resources=Resources(conditional=True))``.
"""

from .base import Cond, Denoiser, Guidance, Resources
from .cfg import CFG
from .identity import NoGuidance
from diffsample.solvers.registry import Registry


def _cfg(resources: Resources, scale: float = 2.0) -> CFG:
    if not resources.conditional:
        raise ValueError("guidance 'cfg' needs a conditional model (one with a null / negative condition)")
    return CFG(scale=scale)


GUIDANCE: Registry[Guidance] = Registry("guidance")
GUIDANCE.add("none", lambda resources: NoGuidance(), "no guidance: the (conditional) model as is")
GUIDANCE.add("cfg", _cfg, "classifier-free guidance, scale=2 (Ho & Salimans 2022, arXiv 2207.12598)")

__all__ = ["CFG", "GUIDANCE", "Cond", "Denoiser", "Guidance", "NoGuidance", "Resources"]
