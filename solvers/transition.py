"""The explicit Gaussian reverse kernel of every stochastic step, and the hook that may replace its draw.

Every stochastic step of the core solvers is "mean + std * noise" (docs/methods/stochastic_steps.md):

``x_next = mean + std * z``,  ``z ~ N(0, I)`` drawn by the run's ``noise_fn``,

with ``mean`` and the scalar ``std`` computed by the solver (ancestral Euler / DDPM: ``mean`` =
the DDIM move to ``sigma_down``, ``std = alpha_next * sigma_up``; DPM-Solver++ SDE:
``std = sigma_next * sqrt(1 - e^{-2 eta h})``). Solvers call :func:`sample_kernel` instead of
adding noise themselves, so methods that change the *transition* -- NoiseTilt (tilted noise),
SVDD (search over candidate draws) -- plug in here for every stochastic solver without subclassing
one (docs/design.md#guidance-term).

A :class:`Transition` is installed for a run with :func:`use_transition` (the sampler does this
when a guidance term provides one); without one, :func:`sample_kernel` is exactly
``mean + std * noise_fn(sigma, sigma_next)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from diffsample.solvers.numerics import ancestral_split
from diffsample.solvers.solver import Grid, NoiseFn, require_noise


class Transition(Protocol):
    """Replaces the draw of the reverse kernel ``N(mean, std^2 I)`` of grid step ``i``.

    Args (of ``__call__``):
        mean: kernel mean ``(B, *dims)`` (native space, the solver's deterministic part).
        std: kernel standard deviation (native units, > 0).
        grid: the run's grid; the step goes from point ``i`` to ``i + 1``.
        i: step index.
        draw: ``() -> z``, a fresh standard-normal ``(B, *dims)`` draw from the run's ``noise_fn``
            (each call advances it; the first call gives the draw the plain kernel would use).

    Returns:
        ``x_next`` of shape ``(B, *dims)``.
    """

    def __call__(self, mean: Tensor, std: float, grid: Grid, i: int, draw: Callable[[], Tensor]) -> Tensor: ...


_ACTIVE: ContextVar[Transition | None] = ContextVar("diffsample_transition", default=None)


@contextmanager
def use_transition(transition: Transition | None) -> Iterator[None]:
    """Install ``transition`` for the stochastic steps run inside the block (``None``: plain kernel)."""
    token = _ACTIVE.set(transition)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def sample_kernel(noise_fn: NoiseFn | None, solver: object, mean: Tensor, std: float, grid: Grid, i: int) -> Tensor:
    """Sample ``x_next ~ N(mean, std^2 I)`` for step ``i`` through the active :class:`Transition`.

    Raises:
        ValueError: ``noise_fn`` is ``None`` (a stochastic solver needs one).
    """
    fn = require_noise(noise_fn, solver)
    sigma, sigma_next = grid.sigma_list[i], grid.sigma_list[i + 1]
    transition = _ACTIVE.get()
    if transition is None:
        return mean + std * fn(sigma, sigma_next)
    return transition(mean, std, grid, i, lambda: fn(sigma, sigma_next))


@dataclass(frozen=True)
class AncestralEta:
    """The ``eta`` option of a solver whose only noise is the ancestral draw (:func:`ancestral_noise`
    with ``(s_down, s_up) = ancestral_split(s_i, s_{i+1}, eta)``): ``eta = 0`` is deterministic,
    ``eta = 1`` the DDPM posterior's noise level. Euler, DPM2 and RES multistep inherit it.

    Raises:
        ValueError: ``eta < 0``.
    """

    eta: float = 0.0

    def __post_init__(self) -> None:
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0


@dataclass(frozen=True)
class AncestralEtaNoise(AncestralEta):
    """:class:`AncestralEta` (default ``eta = 1``) with k-diffusion's ``s_noise``, the factor on every
    ancestral draw (``s_noise = 0``: the split without its noise). Stochastic when both are ``> 0``.
    DPM-Solver++(2S) ancestral and DPM-Solver++ SDE inherit it.

    Raises:
        ValueError: ``eta < 0`` or ``s_noise < 0``.
    """

    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.s_noise >= 0:
            raise ValueError(f"s_noise must be >= 0, got {self.s_noise}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0 and self.s_noise > 0


def ancestral_split_at(grid: Grid, i: int, eta: float) -> tuple[float, float, float]:
    """``(s_i, s_down, s_up)`` of grid step ``i``: the VE sigma ``s_i = sigma_i / alpha_i`` (``inf`` at
    ``alpha_i = 0``) and :func:`~diffsample.solvers.numerics.ancestral_split` of ``(s_i, s_{i+1}, eta)``."""
    s = grid.sigma_list[i] / grid.alpha_list[i] if grid.alpha_list[i] > 0 else math.inf
    return (s, *ancestral_split(s, grid.sigma_list[i + 1] / grid.alpha_list[i + 1], eta))


def ancestral_noise(noise_fn: NoiseFn | None, solver: object, mean: Tensor, s_up: float, grid: Grid, i: int,
                    s_noise: float = 1.0) -> Tensor:
    """The fresh noise of an ancestral step: ``mean + alpha_{i+1} s_up s_noise z`` through
    :func:`sample_kernel`, or ``mean`` itself when ``s_up s_noise = 0`` (no draw).

    Raises:
        ValueError: ``noise_fn`` is ``None`` and a draw is needed.
    """
    if s_up * s_noise > 0:
        return sample_kernel(noise_fn, solver, mean, grid.alpha_list[i + 1] * s_up * s_noise, grid, i)
    return mean
