"""Stop times: end a run at a noise level ``sigma > 0`` instead of the clean end (truncated sampling).

A :class:`StopTime` names a noise level in one of several units; every unit is converted through the
parameterisation-invariant VE ratio ``s = sigma / alpha = exp(-lambda_)`` (the EDM sigma), so the
same stop means the same noise level on a VP, VE / EDM or rectified-flow process:

============  ================================================  ===============================
unit          value                                             ``s = sigma / alpha``
============  ================================================  ===============================
``ou_time``   Ornstein-Uhlenbeck time ``tau`` of the VP process  ``sqrt(exp(tau) - 1)``
              ``dX = -X/2 dtau + dW`` (``alpha = exp(-tau/2)``)
``logsnr``    full log-SNR ``log(alpha^2 / sigma^2) = 2 lambda_`` ``exp(-logsnr / 2)``
``lambda``    half log-SNR ``lambda_ = log(alpha / sigma)``      ``exp(-lambda_)``
``sigma``     EDM / k-diffusion sigma (alias ``sigma_edm``)     ``value``
``t_rf``      rectified-flow time (``alpha = 1 - t``, ``sigma = t``)  ``t / (1 - t)``
``native``    the noise schedule's own time (a diffusers         ``noise_schedule.sigma_ve(t)``
              timestep for a discrete VP model)
============  ================================================  ===============================

:func:`stop_grid` builds the discretisation of a truncated run: the step schedule is evaluated
between ``t_max`` and the stop time, and the grid's last point is the stop time exactly.

Source: truncated sampling and its recursive-training analysis, Khelifa, Turner & Venkataramanan,
*Recursively Trained Diffusion Models: Limiting Collapse Distribution and Spectral
Characterization* (arXiv 2606.13796); docs/methods/truncation.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from diffsample.solvers.solver import Grid, NoiseSchedule

STOP_UNITS = ("ou_time", "logsnr", "lambda", "sigma", "t_rf", "native")
"""Units of :class:`StopTime` (``sigma_edm`` is accepted as an alias of ``sigma``)."""

STOP_UNIT_ALIASES = {"sigma_edm": "sigma"}

STOP_RETURNS = ("noisy", "denoised", "rescaled", "ou")
"""What a truncated run returns: ``noisy`` the state ``x_stop`` (the paper's semantics),
``denoised`` ``D(x_stop)`` (one extra model evaluation), ``rescaled`` ``x_stop / alpha_stop``
(VE / EDM coordinates), ``ou`` ``x_stop / sqrt(alpha_stop^2 + sigma_stop^2)`` (VP coordinates; equal
to ``noisy`` on a VP process)."""

_SIGNED = ("logsnr", "lambda")  # units whose values may be negative


def check_stop_return(mode: str) -> str:
    """``mode`` when it is one of :data:`STOP_RETURNS`.

    Raises:
        ValueError: any other value (one line naming the option and the valid choices).
    """
    if mode not in STOP_RETURNS:
        raise ValueError(f"stop_return must be one of {', '.join(STOP_RETURNS)}; got {mode!r}")
    return mode


@dataclass(frozen=True)
class StopTime:
    """A noise level at which a run stops (arXiv 2606.13796: the reverse process is integrated from
    ``t_max`` down to the truncation time ``t0 > 0`` and returns ``x_t0``).

    Args:
        value: the stop in ``unit``; finite, and ``>= 0`` except for ``logsnr`` / ``lambda``
            (``t_rf`` also ``< 1``). ``0`` in ``ou_time``, ``sigma`` or ``t_rf`` is the clean end
            (``sigma = 0``): the run then denoises to zero as without a stop.
        unit: one of :data:`STOP_UNITS` (default ``ou_time``, the paper's time).

    Raises:
        ValueError: unknown unit, non-finite or negative value, ``t_rf >= 1`` (one line naming the
            option).
    """

    value: float
    unit: str = "ou_time"

    def __post_init__(self) -> None:
        unit = STOP_UNIT_ALIASES.get(self.unit, self.unit)
        if unit not in STOP_UNITS:
            raise ValueError(f"stop unit must be one of {', '.join(STOP_UNITS)}; got {self.unit!r}")
        try:
            if isinstance(self.value, bool):
                raise TypeError
            value = float(self.value)
        except (TypeError, ValueError):
            raise ValueError(f"stop must be a number, got {self.value!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"stop must be finite, got {self.value!r}")
        if unit not in _SIGNED and value < 0:
            raise ValueError(f"stop must be >= 0 in unit {unit!r}, got {value!r}")
        if unit == "t_rf" and value >= 1:
            raise ValueError(f"stop in unit 't_rf' must be < 1 (t = 1 is pure noise), got {value!r}")
        object.__setattr__(self, "unit", unit)
        object.__setattr__(self, "value", value)

    def sigma_ve(self, noise_schedule: NoiseSchedule | None = None) -> float:
        """The stop as the VE ratio ``s = sigma / alpha`` (``noise_schedule`` only for ``native``).

        Raises:
            ValueError: ``native`` without a noise schedule, or a native time outside its range.
        """
        return sigma_ve_from(self.value, self.unit, noise_schedule)

    def to(self, unit: str, noise_schedule: NoiseSchedule | None = None) -> float:
        """The same noise level in another unit of :data:`STOP_UNITS`."""
        return sigma_ve_to(self.sigma_ve(noise_schedule), unit, noise_schedule)

    def t(self, noise_schedule: NoiseSchedule) -> float:
        """The stop in ``noise_schedule``'s own time (``t_zero`` for the clean end)."""
        if self.unit == "native":
            return self.value
        s = self.sigma_ve(noise_schedule)
        if s == 0:
            return float(noise_schedule.t_zero)
        return float(noise_schedule.t_from_sigma_ve(torch.tensor(s, dtype=torch.float64)))

    def __str__(self) -> str:
        return f"{self.value:g} {self.unit}"


def stop_options(value: float | None, unit: str = "ou_time", mode: str = "noisy") -> tuple[StopTime | None, str]:
    """``(StopTime or None, return mode)`` from the user-facing options ``stop`` / ``stop_unit`` /
    ``stop_return`` (``generate()``, ``--stop`` / ``--stop-unit`` / ``--stop-return``); the unit and
    mode are checked even without a stop.

    Raises:
        ValueError: as :class:`StopTime` and :func:`check_stop_return` (one line naming the option).
    """
    if STOP_UNIT_ALIASES.get(unit, unit) not in STOP_UNITS:
        raise ValueError(f"stop_unit must be one of {', '.join(STOP_UNITS)}; got {unit!r}")
    check_stop_return(mode)
    return (None if value is None else StopTime(value, unit)), mode


def stop_record(stop: StopTime | None, mode: str, noise_schedule: NoiseSchedule) -> dict | None:
    """What a run record says about a stop: value, unit, return mode, and the stop as
    ``sigma / alpha``, OU time and native time of ``noise_schedule``; ``None`` without a stop."""
    if stop is None:
        return None
    s = stop.sigma_ve(noise_schedule)
    return {"value": stop.value, "unit": stop.unit, "return": mode, "sigma_ve": s,
            "ou_time": sigma_ve_to(s, "ou_time"), "native": sigma_ve_to(s, "native", noise_schedule)}


def sigma_ve_from(value: float, unit: str, noise_schedule: NoiseSchedule | None = None) -> float:
    """Convert ``value`` in ``unit`` (:data:`STOP_UNITS`) to ``s = sigma / alpha``.

    Raises:
        ValueError: unknown unit; ``native`` without a noise schedule or outside ``[t_zero, t_max]``.
    """
    unit = STOP_UNIT_ALIASES.get(unit, unit)
    v = float(value)
    if unit == "ou_time":
        return math.sqrt(math.expm1(v))
    if unit == "logsnr":
        return math.exp(-v / 2)
    if unit == "lambda":
        return math.exp(-v)
    if unit == "sigma":
        return v
    if unit == "t_rf":
        return v / (1.0 - v)
    if unit == "native":
        if noise_schedule is None:
            raise ValueError("stop unit 'native' needs the model's noise schedule")
        ns = noise_schedule
        if v == ns.t_zero and ns.t_zero < ns.t_min:
            return 0.0
        lo, hi = ns.t_min, ns.t_max
        if not lo - 1e-9 * max(1.0, abs(hi)) <= v <= hi + 1e-9 * max(1.0, abs(hi)):
            raise ValueError(f"stop {v!r} (native) is outside the schedule's time range [{lo}, {hi}] of {ns!r}")
        return float(ns.sigma_ve(torch.tensor(v, dtype=torch.float64)))
    raise ValueError(f"stop unit must be one of {', '.join(STOP_UNITS)}; got {unit!r}")


def sigma_ve_to(s: float, unit: str, noise_schedule: NoiseSchedule | None = None) -> float:
    """Convert ``s = sigma / alpha >= 0`` to ``unit`` (inverse of :func:`sigma_ve_from`).

    ``s = 0`` gives ``+inf`` in ``logsnr`` / ``lambda`` and ``t_zero`` in ``native``.

    Raises:
        ValueError: unknown unit; ``native`` without a noise schedule.
    """
    unit = STOP_UNIT_ALIASES.get(unit, unit)
    s = float(s)
    if unit == "ou_time":
        return math.log1p(s * s)
    if unit == "logsnr":
        return -2.0 * math.log(s) if s > 0 else math.inf
    if unit == "lambda":
        return -math.log(s) if s > 0 else math.inf
    if unit == "sigma":
        return s
    if unit == "t_rf":
        return s / (1.0 + s)
    if unit == "native":
        if noise_schedule is None:
            raise ValueError("stop unit 'native' needs the model's noise schedule")
        if s == 0:
            return float(noise_schedule.t_zero)
        return float(noise_schedule.t_from_sigma_ve(torch.tensor(s, dtype=torch.float64)))
    raise ValueError(f"stop unit must be one of {', '.join(STOP_UNITS)}; got {unit!r}")


def stop_grid(noise_schedule: NoiseSchedule, step_schedule, steps: int, stop: StopTime) -> Grid:
    """The grid of a run of ``steps`` intervals that ends exactly at ``stop``.

    ``step_schedule(truncated, steps + 1)`` is evaluated on a copy of ``noise_schedule`` whose
    ``t_min`` is the stop time, so the schedule spreads its points between ``t_max`` and the stop
    (Karras, exponential and time-uniform grids end there); the last point is then set to the stop
    time exactly. A schedule that ignores ``t_min`` (diffusers' integer timestep spacings on a
    discrete VP model) is mapped affinely in time so that its first point stays and its last point
    moves to the stop (the spacing's shape is kept). A fixed schedule (a pipeline's own grid) is cut
    at the stop: its points above the stop are kept, the stop is appended, and ``steps`` is ignored. A stop at ``s = 0`` gives the usual grid that denoises to zero (``steps`` schedule points
    plus ``sigma = 0``).

    Args:
        noise_schedule: the model's process.
        step_schedule: ``(noise_schedule, n) -> t`` (:mod:`diffsample.solvers.step_schedules`).
        steps: number of intervals (>= 1).
        stop: where to stop.

    Returns:
        A :class:`~diffsample.solvers.solver.Grid` with ``steps + 1`` points (a fixed schedule: its
        points above the stop, plus one), the last at ``stop``.

    Raises:
        ValueError: the stop is not below the first grid point, lies below the model's smallest
            noise level (``t_min``).
    """
    from diffsample.solvers.step_schedules import Fixed

    ns = noise_schedule
    s = stop.sigma_ve(ns)
    fixed_t = torch.tensor(step_schedule.t, dtype=torch.float64) if isinstance(step_schedule, Fixed) else None
    if s == 0:
        return Grid.from_t(ns, step_schedule(ns, steps), final_zero=True)
    first = float(step_schedule(ns, steps + 1)[0]) if fixed_t is None else float(fixed_t[0])
    s_first = float(ns.sigma_ve(torch.tensor(first, dtype=torch.float64)))  # inf where alpha = 0
    if not s < s_first:
        raise ValueError(f"stop {stop} (sigma/alpha = {s:.6g}) must lie below the first grid point "
                         f"(sigma/alpha = {s_first:.6g})")
    s_lo = float(ns.sigma_ve(torch.tensor(ns.t_min, dtype=torch.float64)))
    if s < s_lo * (1 - 1e-9):
        raise ValueError(f"stop {stop} (sigma/alpha = {s:.6g}) is below the model's smallest noise level "
                         f"(sigma/alpha = {s_lo:.6g} at t_min = {ns.t_min:g}); use a larger stop")
    t_stop = min(max(stop.t(ns), ns.t_min), ns.t_max)
    if fixed_t is not None:  # a given grid (a pipeline's own) is cut at the stop
        lam_stop = float(ns.lambda_(torch.tensor(t_stop, dtype=torch.float64)))
        t = torch.cat([fixed_t[ns.lambda_(fixed_t) < lam_stop - 1e-9], fixed_t.new_tensor([t_stop])])
    else:
        truncated = copy.copy(ns)
        truncated.t_min = t_stop
        t = step_schedule(truncated, steps + 1).clone()
        tol = 1e-9 * max(1.0, abs(ns.t_max))
        if (t < t_stop - tol).any():
            first, last = float(t[0]), float(t[-1])
            t = t_stop + (t - last) * (first - t_stop) / (first - last)
    t[-1] = t_stop
    return Grid.from_t(ns, t)
