"""Recursive retraining with truncated sampling: closed forms and per-generation stop schedules.

Setting (Khelifa, Turner & Venkataramanan, *Recursively Trained Diffusion Models: Limiting Collapse
Distribution and Spectral Characterization*, arXiv 2606.13796; docs/methods/truncation.md). The
forward process is the Ornstein-Uhlenbeck (VP) process ``dX = -X/2 dtau + dW``; ``U_tau`` pushes a
law forward by OU time ``tau``. A sampler with a perfect score that stops at ``t0 > 0`` and returns
``x_t0`` outputs ``U_t0`` of its training law. Generation ``i`` trains on
``q_i = alpha p_data + (1 - alpha) p_i`` (``alpha``: fraction of fresh data, ``p_0 = p_data``) and
samples ``p_{i+1} = U_{t0_i}(q_i)``.

Probabilists' Hermite polynomials diagonalise the OU semigroup: ``E[He_n(X_tau)] = e^{-n tau/2}
E[He_n(X_0)]`` for any 1-D projection of unit norm. Per degree ``n`` the recursion is therefore
scalar,

    ``a_n^{(i+1)} = e^{-n t0_i / 2} (alpha a_n* + (1 - alpha) a_n^{(i)})``,

and with a constant ``t0`` it converges to ``A_n a_n*`` (:func:`attenuation`); the law itself
converges geometrically in W2 at rate :func:`contraction_rate`. Annealing ``t0_i -> 0``
(:class:`TruncationSchedule`) removes the compounded low-pass bias.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from diffsample.solvers.solver import NoiseSchedule
from diffsample.solvers.stop_time import StopTime, sigma_ve_to

SCHEDULE_KINDS = ("power", "geometric", "constant")


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha (fraction of fresh data) must be in (0, 1], got {alpha!r}")
    return alpha


def ou_attenuation(n, tau):
    """``e^{-n tau / 2}``: the factor by which OU time ``tau`` multiplies the degree-``n`` Hermite
    moment of any unit-norm projection (Mehler; arXiv 2606.13796). Broadcasts numpy arrays."""
    return np.exp(-np.asarray(n, dtype=float) * np.asarray(tau, dtype=float) / 2)


def attenuation(n, t0: float, alpha: float):
    """Limit attenuation of Hermite degree ``n`` under recursive retraining at a constant stop
    ``t0`` (OU time) with fresh-data fraction ``alpha`` (arXiv 2606.13796):

    ``A_n = alpha e^{-n t0/2} / (1 - (1 - alpha) e^{-n t0/2})``; ``a_n(p_inf) = A_n a_n(p_data)``.

    ``A_0 = 1``; ``A_n ~ alpha e^{-n t0/2}`` for large ``n`` (a low-pass filter). ``n`` broadcasts.

    Raises:
        ValueError: ``alpha`` outside (0, 1] or ``t0 < 0``.
    """
    alpha = _check_alpha(alpha)
    if not t0 >= 0:
        raise ValueError(f"t0 must be >= 0, got {t0!r}")
    e = ou_attenuation(n, t0)
    return alpha * e / (1 - (1 - alpha) * e)


def contraction_rate(t0: float, alpha: float) -> float:
    """W2 contraction per generation ``kappa = sqrt(1 - alpha) e^{-t0/2}`` (arXiv 2606.13796):
    ``W2(p_{i+1}, p_inf) <= kappa W2(p_i, p_inf)``.

    Raises:
        ValueError: ``alpha`` outside (0, 1] or ``t0 < 0``.
    """
    alpha = _check_alpha(alpha)
    if not t0 >= 0:
        raise ValueError(f"t0 must be >= 0, got {t0!r}")
    return math.sqrt(1 - alpha) * math.exp(-t0 / 2)


@dataclass(frozen=True)
class TruncationSchedule:
    """The stop time ``t0_i`` (OU time) of generation ``i = 0, 1, ...`` of a retraining loop.

    * ``kind="power"``: ``t0_i = t0 / (1 + i)^beta`` (annealed truncation of arXiv 2606.13796;
      ``beta = 0`` is a constant stop);
    * ``kind="geometric"``: ``t0_i = start (end / start)^(i / (generations - 1))`` for
      ``i < generations``, ``end`` afterwards;
    * ``kind="constant"``: ``t0_i = t0``.

    Args:
        kind: one of :data:`SCHEDULE_KINDS`.
        t0: stop of generation 0 (``power``, ``constant``), > 0.
        beta: annealing exponent of ``power`` (>= 0).
        start, end: first and last stop of ``geometric`` (``start >= end > 0``).
        generations: number of generations over which ``geometric`` goes from ``start`` to ``end``.

    Raises:
        ValueError: unknown kind, missing or invalid fields, ``beta < 0`` (one line naming the field).
    """

    kind: str = "power"
    t0: float | None = None
    beta: float = 1.0
    start: float | None = None
    end: float | None = None
    generations: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SCHEDULE_KINDS)}; got {self.kind!r}")
        if self.kind in ("power", "constant"):
            if self.t0 is None or not math.isfinite(self.t0) or not self.t0 > 0:
                raise ValueError(f"t0 must be a finite number > 0 for kind {self.kind!r}, got {self.t0!r}")
            if not (math.isfinite(self.beta) and self.beta >= 0):
                raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        else:
            for name in ("start", "end"):
                v = getattr(self, name)
                if v is None or not math.isfinite(v) or not v > 0:
                    raise ValueError(f"{name} must be a finite number > 0 for kind 'geometric', got {v!r}")
            if not self.start >= self.end:
                raise ValueError(f"start must be >= end, got start={self.start!r}, end={self.end!r}")
            g = self.generations
            if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
                raise ValueError(f"generations must be an integer >= 1 for kind 'geometric', got {g!r}")

    def t0_at(self, i: int) -> float:
        """Stop time (OU time) of generation ``i >= 0``.

        Raises:
            ValueError: ``i`` is not an integer >= 0.
        """
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"generation must be an integer >= 0, got {i!r}")
        if self.kind == "constant":
            return float(self.t0)
        if self.kind == "power":
            return float(self.t0) / (1 + int(i)) ** float(self.beta)
        if i >= self.generations - 1:
            return float(self.end)
        return float(self.start) * (self.end / self.start) ** (i / (self.generations - 1))

    def stop(self, i: int, noise_schedule: NoiseSchedule | None = None) -> StopTime:
        """``StopTime(t0_i, "ou_time")`` for generation ``i``; with ``noise_schedule``, warns
        (:class:`UserWarning`) when ``t0_i`` lies below the model's smallest trained noise level
        (``t_min``), where the model has no score (:meth:`check`)."""
        t0 = self.t0_at(i)
        if noise_schedule is not None:
            self.check(i, noise_schedule)
        return StopTime(t0, "ou_time")

    def check(self, i: int, noise_schedule: NoiseSchedule) -> bool:
        """Whether ``t0_i`` is at or above ``noise_schedule``'s smallest noise level; warns when not."""
        import torch

        t0 = self.t0_at(i)
        s_min = float(noise_schedule.sigma_ve(torch.tensor(noise_schedule.t_min, dtype=torch.float64)))
        tau_min = sigma_ve_to(s_min, "ou_time")
        if t0 < tau_min * (1 - 1e-9):
            warnings.warn(f"truncation t0_{i} = {t0:.4g} (OU time) is below the model's smallest trained noise "
                          f"level (OU time {tau_min:.4g} at t_min = {noise_schedule.t_min:g}); the model has no "
                          "score there", UserWarning, stacklevel=3)
            return False
        return True

    def predicted_attenuation(self, i: int, n, alpha: float):
        """Predicted ratio ``a_n(p_{i+1}) / a_n(p_data)`` of generation ``i``'s samples (ideal score),
        from the Hermite recursion ``a^{(k+1)} = e^{-n t0_k/2} (alpha a* + (1 - alpha) a^{(k)})``,
        ``a^{(0)} = a*`` (arXiv 2606.13796). ``n`` broadcasts (int or array of degrees).

        Raises:
            ValueError: ``alpha`` outside (0, 1], ``i`` not an integer >= 0.
        """
        return predicted_attenuation(i, n, alpha, self)


def predicted_attenuation(i: int, n, alpha: float, schedule: TruncationSchedule):
    """Ratio ``a_n(p_{i+1}) / a_n(p_data)`` after generations ``0..i`` of ``schedule`` with fresh-data
    fraction ``alpha`` (see :meth:`TruncationSchedule.predicted_attenuation`); array over ``n``."""
    alpha = _check_alpha(alpha)
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
        raise ValueError(f"generation must be an integer >= 0, got {i!r}")
    n = np.asarray(n, dtype=float)
    r = np.ones_like(n)
    for k in range(int(i) + 1):
        r = ou_attenuation(n, schedule.t0_at(k)) * (alpha + (1 - alpha) * r)
    return r
