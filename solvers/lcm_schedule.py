"""The step schedule of consistency-distilled students (LCM, TCD): ``n`` points taken from the
``original_inference_steps``-point distillation grid, evenly spaced in index."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffsample.solvers.noise_schedules import DiscreteVP
from diffsample.solvers.solver import NoiseSchedule
from diffsample.solvers.step_schedules import check_steps


@dataclass(frozen=True)
class LCMSchedule:
    """The timesteps of diffusers' ``LCMScheduler.set_timesteps`` / ``TCDScheduler.set_timesteps``
    (arXiv 2310.04378 section 4.2, "skipping-step"), for any number of points ``n``.

    On a :class:`~diffsample.solvers.noise_schedules.DiscreteVP` schedule of ``N`` training timesteps,
    with ``m = original_inference_steps`` and ``k = N // m``, the distillation grid is
    ``[m k - 1, (m - 1) k - 1, ..., k - 1]`` (``[999, 979, ..., 19]`` for ``N = 1000``, ``m = 50``) and
    the schedule takes its points at indices ``floor(linspace(0, m, n, endpoint=False))``: 4 points
    give ``[999, 759, 499, 259]``. On a continuous schedule the distillation grid is
    ``t_min + (t_max - t_min) j / m`` for ``j = m, ..., 1``, indexed the same way.

    Returns ``n`` float64 times, noisiest first (shape ``(n,)``).

    Raises:
        ValueError: ``original_inference_steps`` not an integer >= 1 or above ``N``; ``n`` outside
            ``[1, original_inference_steps]`` (the grid is a subset of the distillation grid).
    """

    original_inference_steps: int = 50

    def __post_init__(self) -> None:
        m = self.original_inference_steps
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"original_inference_steps must be an integer >= 1, got {m!r}")

    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        n = check_steps(n)
        m = int(self.original_inference_steps)
        if n > m:
            raise ValueError(f"the lcm schedule cannot give {n} points: it takes them from the "
                             f"{m}-point distillation grid; valid: 1 to {m} (original_inference_steps={m})")
        if isinstance(ns, DiscreteVP):
            big_n = ns.num_train_timesteps
            if m > big_n:
                raise ValueError(f"original_inference_steps={m} exceeds the {big_n} training timesteps; valid: 1 to {big_n}")
            origin = (np.arange(1, m + 1) * (big_n // m) - 1)[::-1].astype(np.float64)
        else:
            gap = np.arange(0, m, dtype=np.float64)  # m - j, so that j = m gives t_max exactly
            origin = ns.t_max - (ns.t_max - ns.t_min) * gap / m
        index = np.floor(np.linspace(0, m, num=n, endpoint=False)).astype(np.int64)
        return torch.tensor(origin[index].copy(), dtype=torch.float64)
