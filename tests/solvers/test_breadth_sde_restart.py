"""Restart sampling (arXiv 2306.14878, Algorithm 1 with several restart intervals) against the algorithm
written out here in VE coordinates from the paper and the authors' segment convention (their code is
CC BY-NC-SA, so it was read, not copied): EDM Heun steps, segments ``[N_restart, K, t_min, t_max]``
with ``t_min`` snapped to the nearest grid sigma, ``N_restart`` Karras sigmas per restart, forward
jumps; fed the same noise on the exact GMM. Without restarts it is Heun (order 2)."""

from __future__ import annotations

import math

import pytest
import torch
from test_breadth_sde import measured_order

from diffsample.samplers import Sampler, prior_scale
from diffsample.solvers import SOLVERS, VE, Heun, Karras, LinearVP
from diffsample.solvers.restart import DEFAULT_SEGMENTS, Restart
from diffsample.testbed.gmm import GaussianMixture

GMM = GaussianMixture.random(dim=4, components=3, seed=6)
SCHEDULES = {"VE": VE(), "VP": LinearVP()}


def _draws(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    return lambda *_: torch.randn(shape, dtype=torch.float64, generator=gen)


def reference_restart(ns, sigmas, x, segments, s_noise, draw):
    """Restart sampling on VE sigmas ``sigmas`` (trailing 0), written out: Heun (EDM Alg. 1, Euler on
    the step to 0) down the main grid; each segment [N, K, t_min, t_max] restarts at the grid index
    whose sigma is nearest t_min (absolute distance, over the sigmas > 0; of several segments at one
    index the last counts); on landing there, K times:
    x += s_noise sqrt(t_max^2 - s_min^2) z, then Heun over the N Karras (rho = 7) sigmas t_max -> s_min.
    Returns the sample and the number of denoiser calls."""
    calls = [0]

    def den(y, s):
        calls[0] += 1
        t = ns.t_from_sigma_ve(torch.full((y.shape[0],), float(s), dtype=torch.float64))
        a = ns.alpha(t)
        return GMM.denoised(a[:, None] * y, a, ns.sigma(t))

    def heun(y, s, s_next):
        d = (y - den(y, s)) / s
        y_next = y + (s_next - s) * d
        if s_next == 0:
            return y_next
        return y + (s_next - s) * 0.5 * (d + (y_next - den(y_next, s_next)) / s_next)

    at = {}  # a later segment returning to the same point replaces an earlier one (the authors' code)
    for seg in segments:
        at[min((k for k in range(len(sigmas)) if sigmas[k] > 0), key=lambda k: abs(sigmas[k] - seg[2]))] = seg
    for i in range(len(sigmas) - 1):
        x = heun(x, sigmas[i], sigmas[i + 1])
        if i + 1 in at:
            n_restart, restarts, _, s_max = at[i + 1]
            s_min = sigmas[i + 1]
            sub = [(s_max ** (1 / 7) + j / (n_restart - 1) * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
                   for j in range(n_restart)]
            sub[-1] = s_min
            for _ in range(restarts):
                x = x + s_noise * math.sqrt(s_max**2 - s_min**2) * draw()
                for j in range(n_restart - 1):
                    x = heun(x, sub[j], sub[j + 1])
    return x, calls[0]


# an ImageNet-64 configuration of the authors' sweep (5 intervals, EDM sigmas), one interval asking
# for sigma = 0 (it returns to the last positive sigma), two intervals returning to the same point (the
# second runs)
CASES = {"defaults": (None, 1.0),
         "imagenet": ([[3, 1, 19.35, 40.79], [4, 1, 1.09, 1.92], [4, 4, 0.59, 1.09], [4, 1, 0.30, 0.59],
                       [4, 4, 0.06, 0.30]], 1.003),
         "near_zero": ("[5,2,0.0,0.4]", 0.9),
         "same_point": ([[3, 1, 0.3, 0.8], [2, 2, 0.3, 1.5]], 1.0)}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", list(CASES))
def test_restart_matches_the_algorithm_written_out(schedule, case):
    ns, steps = SCHEDULES[schedule], 10
    segments, s_noise = CASES[case]
    solver = Restart(s_noise=s_noise) if segments is None else Restart(segments=segments, s_noise=s_noise)
    noise = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ours = Sampler(solver, Karras(), steps)(GMM.denoiser(ns), noise, noise_fn=_draws(3, noise.shape))
    grid = ours.grid
    sigmas = [s / a for s, a in zip(grid.sigma_list, grid.alpha_list)]
    ref, calls = reference_restart(ns, sigmas, noise * prior_scale(grid) / grid.alpha_list[0], solver.segments,
                                   s_noise, _draws(3, noise.shape))
    assert ours.nfe == ours.model_evals == calls
    assert calls > 2 * steps - 1  # the restarts ran
    rel = float((ours.x - ref).norm() / ref.norm())
    assert rel < 1e-9, f"relative difference {rel:.2e}"


def test_default_segments_and_their_cost():
    assert Restart().segments == DEFAULT_SEGMENTS == ((3, 2, 0.06, 0.30), (3, 1, 0.30, 0.59))
    grid = Sampler(Restart(), Karras(), 10).grid(VE())
    points = Restart().restart_points(grid)
    assert sorted(k for k, _ in points.values()) == [1, 2]
    # Heun (2 calls a step, 1 on the step to 0) + K x (N_restart - 1) Heun steps per segment
    assert Restart().nfe(grid) == 2 * 10 - 1 + 2 * 2 * 2 + 1 * 2 * 2


def test_every_spelling_of_the_segments_gives_the_same_solver():
    want = Restart(segments=[[3, 2, 0.06, 0.3], [4, 1, 0.3, 0.59]])
    for spelling in ("[3,2,0.06,0.30],[4,1,0.30,0.59]", '{"0": [3, 2, 0.06, 0.30], "1": [4, 1, 0.30, 0.59]}',
                     ((3, 2, 0.06, 0.3), (4, 1, 0.3, 0.59))):
        assert Restart(segments=spelling) == want
    assert SOLVERS.create("restart:segments=[[3,2,0.06,0.30],[4,1,0.30,0.59]]") == want
    assert Restart(segments="3,2,0.06,0.3").segments == ((3, 2, 0.06, 0.3),)


def test_without_restarts_it_is_heun_of_order_2():
    noise = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    den = GMM.denoiser(LinearVP())
    b = Sampler(Heun(), Karras(), 9)(den, noise).x
    for solver in (Restart(segments=[]), Restart(segments=[[3, 0, 0.1, 1.0]]), Restart(s_noise=0.0)):
        assert not solver.stochastic
        assert torch.equal(Sampler(solver, Karras(), 9)(den, noise).x, b)
    slope, errors = measured_order(Restart(segments=[]), LinearVP())
    assert abs(slope - 2) < 0.25, f"slope {slope:.2f}, errors {errors}"


def test_a_segment_that_cannot_restart_is_skipped():
    grid = Sampler(Restart(), Karras(), 10).grid(VE())
    # t_min snaps to the first point; t_max below the point it snaps to (the grid has no point near 0.5)
    assert Restart(segments=[[3, 1, 79.0, 80.0]]).restart_points(grid) == {}
    assert Restart(segments=[[3, 1, 79.0, 80.0]]).nfe(grid) == Heun().nfe(grid)


@pytest.mark.parametrize("bad", ["[1,2,0.1,0.3]", "[3,2,0.5,0.3]", "[3,-1,0.1,0.3]", "[3,2.5,0.1,0.3]",
                                 "[3,2,0.1]", "[3,2,-0.1,0.3]", "[3,2,0.1,inf]", "abc", 5])
def test_bad_segments_are_refused_in_one_line(bad):
    with pytest.raises(ValueError, match=r"\[N_restart, K, t_min, t_max\]") as err:
        Restart(segments=bad)
    assert "\n" not in str(err.value) and "got" in str(err.value)
    with pytest.raises(ValueError, match="s_noise"):
        Restart(s_noise=-1.0)
