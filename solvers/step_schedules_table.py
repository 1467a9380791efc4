"""ComfyUI's timestep-table step schedules: ``simple``, ``normal``, ``sgm_uniform``,
``ddim_uniform``, ``beta`` and SD-Turbo.

ComfyUI builds these from the model's table of training noise levels, ``model_sampling.sigmas``
(index 0 = least noisy). Here the table is the noise schedule's own time at :func:`timestep_table`:

* :class:`~diffsample.solvers.noise_schedules.DiscreteVP`: the diffusers timesteps ``0 .. N-1``
  (the same table ComfyUI uses for SD 1.x / 2.x / SDXL);
* continuous processes: ``N = 1000`` times uniform in ``t`` over ``[t_min, t_max]`` (on
  rectified flow ``t = 0.001, 0.002, ..., 1``, ComfyUI's table for flow models; on VE, uniform in
  sigma, where ComfyUI's EDM models use a log-sigma table).

Each schedule returns the ``n`` times of ComfyUI's ``n``-step list without its terminal 0, which
the sampler appends (``final="zero"``). Float64, shape ``(n,)``, noisiest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffsample.solvers.noise_schedules import DiscreteVP
from diffsample.solvers.solver import NoiseSchedule
from diffsample.solvers.step_schedules import TimeUniform, check_steps

CONTINUOUS_TABLE = 1000


def timestep_table(ns: NoiseSchedule) -> Tensor:
    """The model's table of training times, least noisy first, shape ``(N,)``, float64 (module
    docstring)."""
    if isinstance(ns, DiscreteVP):
        return torch.arange(ns.num_train_timesteps, dtype=torch.float64)
    return torch.linspace(ns.t_min, ns.t_max, CONTINUOUS_TABLE, dtype=torch.float64)


def _index(table: Tensor, idx: list[int] | np.ndarray) -> Tensor:
    return table[torch.as_tensor(np.asarray(idx, dtype=np.int64))].clone()


@dataclass(frozen=True)
class Simple:
    """ComfyUI ``simple``: the table entries ``N - 1 - floor(k N / n)``, ``k = 0..n-1`` (every
    ``N / n``-th training timestep from the noisiest)."""

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        table = timestep_table(ns)
        size = table.numel()
        if n > size:
            raise ValueError(f"simple: at most {size} points on this noise schedule, asked for {n}")
        stride = size / n
        return _index(table, [size - 1 - int(k * stride) for k in range(n)])


@dataclass(frozen=True)
class Normal:
    """ComfyUI ``normal`` (``sgm=False``): ``n`` times uniform from the noisiest to the cleanest
    table time, both included (A1111 ``uniform``; k-diffusion ``DiscreteSchedule.get_sigmas``);
    ``sgm_uniform`` (``sgm=True``): ``linspace(t_max, t_min, n + 1)[:-1]`` (Stability's sgm
    ``Discretization``). Fractional timesteps are allowed (log-sigma interpolation)."""

    sgm: bool = False

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        table = timestep_table(ns)
        start, end = float(table[-1]), float(table[0])
        if self.sgm:
            return torch.linspace(start, end, n + 1, dtype=torch.float64)[:-1]
        return torch.linspace(start, end, n, dtype=torch.float64) if n > 1 else torch.tensor([start], dtype=torch.float64)


@dataclass(frozen=True)
class DDIMUniform:
    """ComfyUI ``ddim_uniform``: table entries ``1 + k * (N // n)``, ``k = 0..n-1``, noisiest first
    (= diffusers DDIM ``leading`` spacing with ``steps_offset=1``). Where ``N // n`` does not divide
    ``N - 1`` evenly ComfyUI's list can hold ``n + 1`` entries; this returns the ``n`` it defines for
    ``k < n``. On continuous processes the table is ``t_max (k + 1) / N`` (ComfyUI's flow table).

    Raises:
        ValueError: ``n >= N`` (no room for ``n`` distinct table entries above index 0).
    """

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        table = timestep_table(ns)
        size = table.numel()
        if n >= size:
            raise ValueError(f"ddim_uniform: at most {size - 1} points on this noise schedule, asked for {n}")
        stride = max(size // n, 1)
        idx = torch.tensor([1 + k * stride for k in range(n)][::-1], dtype=torch.float64)
        if isinstance(ns, DiscreteVP):
            return idx
        # ComfyUI's flow table t = t_max (k + 1) / N, which does not move with t_min (so a stop's
        # truncated schedule keeps the first point); an entry below t_min is refused by the grid.
        return ns.t_max * (idx + 1) / size


@dataclass(frozen=True)
class Beta:
    """Beta schedule (Lee et al. 2024, arXiv 2407.12173; ComfyUI ``beta``): table positions at the
    Beta(``alpha``, ``beta``) quantiles ``ppf(1 - k/n)``, ``k = 0..n-1``, times ``N - 1``, rounded to
    whole timesteps. ``alpha = beta = 0.6`` (ComfyUI's default) puts steps near both ends.

    ComfyUI drops repeated timesteps (and so runs fewer steps); here, when rounding would repeat a
    timestep, the unrounded positions are used so the grid keeps ``n`` points.

    Raises:
        ValueError: ``alpha <= 0`` or ``beta <= 0``.
    """

    alpha: float = 0.6
    beta: float = 0.6

    def __post_init__(self) -> None:
        if not (self.alpha > 0 and self.beta > 0):
            raise ValueError(f"alpha and beta must be > 0, got alpha={self.alpha}, beta={self.beta}")

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        from scipy import stats

        n = check_steps(n)
        table = timestep_table(ns)
        last = table.numel() - 1
        q = 1 - np.linspace(0, 1, n, endpoint=False)
        pos = stats.beta.ppf(q, self.alpha, self.beta) * last
        rounded = np.rint(pos)
        if n == 1 or (np.diff(rounded) < 0).all():
            return _index(table, rounded.astype(np.int64))
        grid = torch.as_tensor(pos, dtype=torch.float64)
        # Fractional table positions: interpolate the table linearly (on DiscreteVP it is the identity).
        lo = grid.floor().clamp(0, last - 1).long()
        frac = grid - lo
        return table[lo] + frac * (table[lo + 1] - table[lo])


@dataclass(frozen=True)
class SDTurbo:
    """ComfyUI ``SDTurboScheduler``: the distilled student's timesteps ``999, 899, ..., 99`` (one
    every ``N / 10`` training steps from the noisiest), the first ``n`` of them (Sauer et al.,
    arXiv 2311.17042). ComfyUI stops at 10; for ``n > 10`` this is the ``trailing`` spacing of ``n``
    steps (on :class:`DiscreteVP` the two agree at ``n = 10``)."""

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        if n > 10:
            return TimeUniform("trailing")(ns, n)
        table = timestep_table(ns)
        size = table.numel()
        return _index(table, [size - 1 - int(math.floor(k * size / 10)) for k in range(n)])
