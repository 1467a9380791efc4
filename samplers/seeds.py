"""Per-sample seeded noise: the same seed gives the same noise whatever the batch size.

Each sample ``j`` owns CPU generators, one per *stream*: stream 0 draws the initial noise, stream 1
the stochastic solvers' per-step noise, and chain ``k >= 1`` (best-of-N chains, twisted-SMC
particles) has its own pair, so switching solvers or batch sizes never changes a sample's initial
noise (EDM's ``StackedRandomGenerator``; diffusers' "Reproducibility" guide recommends CPU
generators).

Seeds are integers ``0 .. 2**63 - 1``. Every ``(seed, stream, chain)`` maps to its own numpy
``SeedSequence`` and from it to a 64-bit torch seed: for ``seed < 2**32`` (and ``chain < 2**32``)
the entropy is ``[seed, stream]`` (chain 0) or ``[seed, stream, chain]``, the derivation of earlier
releases, so their images are unchanged; larger seeds use ``SeedSequence(entropy=seed,
spawn_key=(stream, chain))``, whose assembled entropy (seed padded to the 4-word pool, then the
spawn key) is longer than any of the former and so never coincides with them (a seed ``>= 2**32``
spread over two 32-bit words, then ``stream`` as a third word, used to collide with a smaller seed's
other stream: seed ``2**32``'s initial noise was seed 0's per-step noise).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

INITIAL, SOLVER_NOISE = 0, 1
SEED_MAX = 2**63 - 1
"""Largest seed (seeds are ``0 .. SEED_MAX``, a signed 64-bit integer)."""
_LEGACY = 2**32  # seeds and chains below this keep the derivation of earlier releases


def stream_seed(seed: int, stream: int, chain: int = 0) -> int:
    """The 64-bit torch seed of ``(seed, stream, chain)``: distinct for distinct triples (see the
    module docstring; ``stream`` 0 = initial noise, 1 = per-step noise; ``chain`` 0 = the plain run).

    Raises:
        ValueError: ``seed`` outside ``0 .. 2**63 - 1`` or not an int; ``stream`` / ``chain``
            outside ``0 .. 2**32 - 1``.
    """
    seed = check_seed(seed)
    for name, value in (("stream", stream), ("chain", chain)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _LEGACY:
            raise ValueError(f"{name} must be an integer in 0..{_LEGACY - 1}, got {value!r}")
    if seed < _LEGACY and chain < _LEGACY:
        ss = np.random.SeedSequence([seed, stream] + ([chain] if chain else []))
    else:
        ss = np.random.SeedSequence(entropy=seed, spawn_key=(stream, chain))
    state = ss.generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _generator(seed: int, stream: int, chain: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(stream_seed(seed, stream, chain))


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` if it is an int (numpy integers accepted; not a bool, float or string) in
    ``0 .. 2**63 - 1``.

    Raises:
        ValueError: otherwise, naming ``name`` and the valid range.
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= SEED_MAX:
        raise ValueError(f"{name} must be an integer in 0..2**63-1, got {seed!r}")
    return int(seed)


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    listed = None if isinstance(seeds, (str, bytes)) else list(seeds) if isinstance(seeds, Iterable) else None
    if not listed:
        raise ValueError(f"seeds must be a non-empty list of integers in 0..2**63-1, got {seeds!r}")
    return [check_seed(s, "every entry of seeds") for s in listed]


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
