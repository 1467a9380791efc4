"""Restart sampling: Heun ODE steps with forward-noise jumps back up noise intervals (arXiv 2306.14878)."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffsample.solvers.heun import Heun
from diffsample.solvers.solver import Denoise, Grid, NoiseFn, call_denoise
from diffsample.solvers.substep import from_pure_noise, sample_substep

_HEUN = Heun()

#: ComfyUI's restart-sampling nodes' default segments (EDM-scale VE sigmas; the first is the paper's
#: CIFAR-10 VP configuration, arXiv 2306.14878 Table 3): ``(N_restart, K, t_min, t_max)``.
DEFAULT_SEGMENTS: tuple[tuple[int, int, float, float], ...] = ((3, 2, 0.06, 0.30), (3, 1, 0.30, 0.59))

_FORM = "[N_restart, K, t_min, t_max] with integers N_restart >= 2, K >= 0 and VE sigmas 0 <= t_min < t_max"


def parse_segments(segments: object) -> tuple[tuple[int, int, float, float], ...]:
    """The restart segments as a tuple of ``(N_restart, K, t_min, t_max)``.

    Accepts a sequence of 4-sequences, one 4-sequence, the official code's ``restart_info`` dict
    (``{"0": [3, 2, 0.06, 0.30], ...}``, keys ignored) or the text of any of these (ComfyUI's
    ``"[3,2,0.06,0.30],[3,1,0.30,0.59]"``; a spec gives ``segments=[[..],[..]]`` as such text).

    Raises:
        ValueError: text that is not a literal, or a segment not of the form ``_FORM``.
    """
    value = segments
    if isinstance(value, str):
        text = value.strip()
        try:
            value = ast.literal_eval(f"[{text}]") if text[:1] != "{" else ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"segments must be a list of {_FORM}; got {segments!r}") from None
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"segments must be a list of {_FORM}; got {segments!r}")
    if len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        value = [value]  # one segment written flat
    out = []
    for seg in value:
        if not isinstance(seg, (list, tuple)) or len(seg) != 4:
            raise ValueError(f"each restart segment must be {_FORM}; got {seg!r}")
        n, k, t_min, t_max = seg
        ok = (all(isinstance(v, int) and not isinstance(v, bool) for v in (n, k)) and n >= 2 and k >= 0
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (t_min, t_max))
              and 0 <= t_min < t_max < math.inf)
        if not ok:
            raise ValueError(f"each restart segment must be {_FORM}; got {seg!r}")
        out.append((n, k, float(t_min), float(t_max)))
    return tuple(out)


@dataclass(frozen=True)
class Restart:
    r"""Restart sampling (Xu et al. 2023, arXiv 2306.14878, Algorithm 1 with several restart
    intervals, as in the authors' code and ComfyUI's restart-sampling nodes): the probability-flow
    ODE solved with Heun's method (EDM Algorithm 1) on the run's grid, and for each segment
    ``(N_restart, K, t_min, t_max)`` of ``segments``, on reaching the restart point ``s_min``,
    ``K`` times: a forward jump up to ``s_max = t_max`` followed by Heun over the ``N_restart``
    Karras (rho = 7) sigmas from ``s_max`` down to ``s_min`` (``N_restart - 1`` Heun steps).

    In VE coordinates (``x~ = x / alpha``, ``s = sigma / alpha``, the EDM / k-diffusion sigma) a jump
    is the forward process

    ``x~(s_max) = x~(s_min) + s_noise sqrt(s_max^2 - s_min^2) z``,

    i.e. ``x(t_max) = (alpha_max / alpha_min) x(t_min) + alpha_max s_noise sqrt(s_max^2 - s_min^2) z``,
    drawn through the transition hook with the jump's own times (from ``t_min`` up to ``t_max``,
    :func:`~diffsample.solvers.substep.sample_substep`), so NoiseTilt / SVDD act on the jumps.

    ``s_min`` is the grid point whose VE sigma is nearest ``t_min`` (absolute distance, as the
    peers), among the points with ``sigma > 0`` (the peers also consider a final ``sigma = 0``; the
    Karras sigmas of a restart down to 0 leave a noise schedule's range); the restarts run at the end
    of the step that lands there. A segment that lands on the
    first point, or whose ``s_max`` (``t_max`` capped at the process's largest VE sigma) is not above
    ``s_min``, is skipped; of segments landing on the same point only the last given runs (as in the
    authors' code; ComfyUI's nodes keep the first). Defaults:
    ``DEFAULT_SEGMENTS`` (ComfyUI's). The authors' code adds EDM churn inside the segments
    (``restart_gamma``); not here (``gamma = 0``, Algorithm 1).

    * ``segments=[]`` (or ``K = 0`` everywhere, or ``s_noise = 0``): plain Heun, order 2.
    * Cost: Heun's ``nfe`` plus ``K (2 (N_restart - 1))`` per active segment.

    Args:
        segments: see :func:`parse_segments` (a list, its text, or the authors' ``restart_info`` dict).
        s_noise: scale of the jump noise (>= 0).

    Raises:
        ValueError: a bad segment (naming it and the valid form), ``s_noise < 0``.
    """

    segments: tuple[tuple[int, int, float, float], ...] | list | str | dict = DEFAULT_SEGMENTS
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", parse_segments(self.segments))
        if isinstance(self.s_noise, bool) or not isinstance(self.s_noise, (int, float)) or not self.s_noise >= 0:
            raise ValueError(f"s_noise must be a number >= 0, got {self.s_noise!r}")

    @property
    def order(self) -> int:
        return 2

    @property
    def stochastic(self) -> bool:
        return self.s_noise > 0 and any(k > 0 for _, k, _, _ in self.segments)

    def init(self, x: Tensor, grid: Grid) -> dict[int, tuple[int, Grid]]:
        """The state: :meth:`restart_points` of the run's grid, built once."""
        return self.restart_points(grid)

    def restart_points(self, grid: Grid) -> dict[int, tuple[int, Grid]]:
        """Grid index -> the restart that runs on landing there: ``(K, Heun grid from s_max down to
        the point)``; empty when not stochastic."""
        if not self.stochastic:
            return {}
        s_ve = [math.inf if a == 0.0 else s / a for s, a in zip(grid.sigma_list, grid.alpha_list)]
        positive = [j for j in range(len(s_ve)) if s_ve[j] > 0]
        points: dict[int, tuple[int, Grid | None]] = {}
        for n_restart, k, t_min, t_max in self.segments:
            idx = min(positive, key=lambda j: abs(s_ve[j] - t_min))
            # a later segment at the same point replaces it (the authors' code)
            points[idx] = (k, None if k == 0 or idx == 0 else self._sub_grid(grid, idx, n_restart, t_max))
        return {idx: run for idx, run in points.items() if run[1] is not None}

    @staticmethod
    def _sub_grid(grid: Grid, idx: int, n_restart: int, t_max: float) -> Grid | None:
        """The Heun grid of one restart: ``n_restart`` Karras (rho 7) VE sigmas from ``t_max`` down to point ``idx``."""
        ns = grid.noise_schedule
        s_min = grid.sigma_list[idx] / grid.alpha_list[idx]
        s_max = min(t_max, ns.sigma_ve_range()[1])
        if not s_max > s_min:
            return None
        ramp = torch.linspace(0, 1, n_restart, dtype=torch.float64)
        rho = 7.0
        s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        t = ns.t_from_sigma_ve(s)
        t[-1] = grid.t_list[idx]
        return Grid.from_t(ns, t)

    def nfe(self, grid: Grid) -> int:
        return _HEUN.nfe(grid) + sum(k * _HEUN.nfe(sub) for k, sub in self.restart_points(grid).values())

    def step(
        self, denoise: Denoise, x: Tensor, grid: Grid, i: int, state: dict[int, tuple[int, Grid]],
        noise_fn: NoiseFn | None = None,
    ) -> tuple[Tensor, dict[int, tuple[int, Grid]]]:
        if grid.alpha_list[i] == 0.0:
            denoised = call_denoise(denoise, x, grid.t_list[i])
            x_next = from_pure_noise(self, x, denoised, grid, i, 0.0, None)
        else:
            x_next, _ = _HEUN.step(denoise, x, grid, i, None)
        run = state.get(i + 1)
        if run is not None:
            k, sub = run
            t_min, t_max = grid.t_list[i + 1], sub.t_list[0]
            s_min = grid.sigma_list[i + 1] / grid.alpha_list[i + 1]
            s_max = sub.sigma_list[0] / sub.alpha_list[0]
            lift = sub.alpha_list[0] / grid.alpha_list[i + 1]
            std = sub.alpha_list[0] * self.s_noise * math.sqrt(s_max**2 - s_min**2)
            for _ in range(k):
                x_next = sample_substep(noise_fn, self, lift * x_next, std, grid, i, t_min, t_max)
                for j in range(sub.steps):
                    x_next, _ = _HEUN.step(denoise, x_next, sub, j, None)
        return x_next, state
