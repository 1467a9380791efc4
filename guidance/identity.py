"""The identity guidance term (``none``)."""

from __future__ import annotations

from dataclasses import dataclass

from diffsample.guidance.term import Denoiser


@dataclass(frozen=True)
class NoGuidance:
    """Returns the denoiser unchanged (registry name ``none``)."""

    def __call__(self, denoiser: Denoiser) -> Denoiser:
        return denoiser
