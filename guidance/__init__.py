"""Guidance terms: denoiser -> denoiser transforms (see :mod:`.base`)."""

from .base import Cond, Denoiser, Guidance
from .cfg import CFG

__all__ = ["CFG", "Cond", "Denoiser", "Guidance"]
