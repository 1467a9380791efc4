"""What a run returns and records: images, raw samples and the JSON-serialisable run record."""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class GenerateResult:
    """Images and the run record of :func:`~diffsample.run.generate.generate`.

    Attributes:
        images: ``(N, C, H, W)`` float32 in [0, 1] on the CPU.
        samples: ``(N, C, H, W)`` raw final samples (model space, CPU).
        record: JSON-serialisable run record: parameters, seeds, classes, ``nfe``, ``model_evals``,
            wall time and package versions; plus what the terms' preparation steps reported, e.g.
            with Jeffrey guidance ``model_marginal`` (one dict, or a list for several Jeffrey
            terms: ``probs``, ``n``, ``source`` = ``"estimated"`` / ``"cache"`` / ``"given"``,
            ``cache_key``, ``cache_path``, ``model_evals`` spent on the estimate, which the run's
            ``model_evals`` does not include; see
            :class:`~diffsample.guidance.jeffrey.model_marginal.ModelMarginal`).
    """

    images: Tensor
    samples: Tensor
    record: dict[str, Any]


def versions() -> dict[str, str]:
    """Versions of the packages that determine the numbers."""
    import diffusers

    return {"diffsample": importlib.metadata.version("diffsample"), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}
