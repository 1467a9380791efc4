"""Seeded noise streams (samplers/seeds.py): seeds are 0..2**63-1; every (seed, stream, chain) has
its own generator; seeds below 2**32 keep the derivation of earlier releases (their images do not
change); seeds at and above 2**32 no longer reuse a smaller seed's noise."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from diffsample.samplers.seeds import SEED_MAX, SeededNoiseFn, check_seed, seeded_chain, seeded_noise, stream_seed

SHAPE = (4, 4)


def legacy_generator(seed: int, stream: int, chain: int = 0) -> torch.Generator:
    """The derivation of earlier releases, written out independently: numpy SeedSequence over
    ``[seed, stream]`` (+ ``[chain]`` for chains >= 1), two uint32 words -> one 64-bit torch seed."""
    words = np.random.SeedSequence([seed, stream] + ([chain] if chain else [])).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) * 2**32 + int(words[1]))


def streams(seed: int) -> dict[str, torch.Tensor]:
    """Initial and first per-step draw of the plain run and of chains 1 and 2."""
    out = {}
    for chain in (0, 1, 2):
        noise, noise_fn = seeded_chain([seed], SHAPE, chain=chain)
        out[f"chain{chain}-initial"] = noise[0]
        out[f"chain{chain}-step"] = noise_fn(1.0, 0.5)[0]
    return out


def test_no_two_streams_of_seeds_0_2_32_and_2_63_minus_1_coincide():
    draws = {(seed, name): x for seed in (0, 2**32, SEED_MAX) for name, x in streams(seed).items()}
    assert len(draws) == 18
    for (a, xa), (b, xb) in itertools.combinations(draws.items(), 2):
        assert not torch.equal(xa, xb), (a, b)
    seeds = {stream_seed(s, stream, chain) for s in (0, 1, 2**32, 2**32 + 1, 2**64 // 4, SEED_MAX)
             for stream in (0, 1) for chain in (0, 1, 2, 7)}
    assert len(seeds) == 6 * 2 * 4


def test_the_former_collisions_are_gone():
    # formerly: seed 2**32's initial noise was seed 0's per-step noise
    assert not torch.equal(seeded_noise([2**32], SHAPE)[0], SeededNoiseFn([0], SHAPE)(1.0, 0.5)[0])
    legacy = torch.randn(SHAPE, generator=legacy_generator(0, 1))
    assert torch.equal(SeededNoiseFn([0], SHAPE)(1.0, 0.5)[0], legacy)
    assert torch.equal(torch.randn(SHAPE, generator=legacy_generator(2**32, 0)), legacy)  # the old collision


@pytest.mark.parametrize("seed", [0, 1, 5, 12345, 10**9 + 7, 2**32 - 1])
def test_ordinary_seeds_keep_their_noise(seed):
    for chain in (0, 1, 3):
        noise, noise_fn = seeded_chain([seed], SHAPE, chain=chain)
        assert torch.equal(noise[0], torch.randn(SHAPE, generator=legacy_generator(seed, 0, chain)))
        step = legacy_generator(seed, 1, chain)
        for _ in range(2):
            assert torch.equal(noise_fn(1.0, 0.5)[0], torch.randn(SHAPE, generator=step))


def test_large_seeds_are_independent_of_the_batch():
    seeds = [2**32, SEED_MAX - 1, 7, SEED_MAX]
    batch, fn = seeded_noise(seeds, SHAPE), SeededNoiseFn(seeds, SHAPE)
    steps = fn(1.0, 0.5)
    for k, s in enumerate(seeds):
        assert torch.equal(batch[k], seeded_noise([s], SHAPE)[0])
        assert torch.equal(steps[k], SeededNoiseFn([s], SHAPE)(1.0, 0.5)[0])


@pytest.mark.parametrize("bad", [-1, 2**63, 2**64, True, 1.0, "3", None, np.float64(2.0)])
def test_seed_validation(bad):
    with pytest.raises(ValueError) as exc:
        check_seed(bad)
    assert "0..2**63-1" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="seeds"):
        seeded_noise([0, bad], SHAPE)


def test_seed_bounds_and_numpy_integers_accepted():
    assert check_seed(SEED_MAX) == SEED_MAX and check_seed(np.int64(3)) == 3
    assert seeded_noise(range(2), SHAPE).shape == (2, *SHAPE)
    for bad in ([], "01", None):
        with pytest.raises(ValueError, match="non-empty list"):
            seeded_noise(bad, SHAPE)
    for stream, chain in ((-1, 0), (0, -1), (0, 2**32), (0, True)):
        with pytest.raises(ValueError, match="0..4294967295"):
            stream_seed(0, stream, chain)
