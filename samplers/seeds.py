"""Per-sample seeded noise: the same seed gives the same noise whatever the batch size.

Each sample ``j`` owns CPU generators seeded from ``(seed_j, stream)`` via numpy's
``SeedSequence``: stream 0 draws the initial noise, stream 1 the stochastic solvers' per-step noise,
so switching solvers or batch sizes never changes a sample's initial noise (EDM's
``StackedRandomGenerator``; diffusers' "Reproducibility" guide recommends CPU generators).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

INITIAL, SOLVER_NOISE = 0, 1


def _generator(seed: int, stream: int, chain: int = 0) -> torch.Generator:
    entropy = [int(seed), stream] + ([int(chain)] if chain else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds}")
    return seeds


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", chain: int = 0) -> Tensor:
    """Initial noise, one standard-normal draw of ``shape`` per seed: ``(len(seeds), *shape)``.
    ``chain = k >= 1`` gives chain ``k``'s independent draw for best-of-N (chain 0 is the plain run)."""
    seeds = _check_seeds(seeds)
    draws = [torch.randn(tuple(shape), generator=_generator(s, INITIAL, chain), dtype=torch.float32) for s in seeds]
    return torch.stack(draws).to(device=device, dtype=dtype)


class SeededNoiseFn:
    """A ``NoiseFn`` drawing each sample's per-step noise from its own generator (stream 1).

    Args:
        seeds: one seed per batch item.
        shape: per-sample shape (without the batch dimension).
        chain: best-of-N chain index (0: the plain run).
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", chain: int = 0) -> None:
        self.generators = [_generator(s, SOLVER_NOISE, chain) for s in _check_seeds(seeds)]
        self.shape, self.dtype, self.device = tuple(shape), dtype, device

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        draws = [torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(device=self.device, dtype=self.dtype)


def seeded_chain(seeds: Sequence[int], shape: Sequence[int], chain: int = 0,
                 device: torch.device | str = "cpu") -> tuple[Tensor, SeededNoiseFn]:
    """``(initial noise, per-step noise)`` of chain ``chain`` for ``seeds`` (chain 0 is the plain run)."""
    return seeded_noise(seeds, shape, device=device, chain=chain), SeededNoiseFn(seeds, shape, device=device, chain=chain)


def seeded_run(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Keyword arguments ``noise``, ``noise_fn`` and ``chain_noise`` of one
    :class:`~diffsample.samplers.sampler.Sampler` call with per-sample seeds ``seeds``: chain ``k``
    (best-of-N chains, twisted-SMC particles) draws from :func:`seeded_chain` ``(seeds, shape, k)``."""
    noise, noise_fn = seeded_chain(seeds, shape, device=device)
    return {"noise": noise, "noise_fn": noise_fn, "chain_noise": partial(seeded_chain, seeds, shape, device=device)}
