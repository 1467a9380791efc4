"""A step schedule optimised for one model and one solver, kept as a JSON file.

``diffsample optimize-schedule`` (:func:`diffsample.run.optimize.optimize_schedule`) writes it; the
step-schedule registry reads it back as ``file:path=FILE.json`` (``--schedule FILE.json`` on the
command line). The object is an ordinary step schedule, ``(noise_schedule, n) -> t``, so it goes
wherever one goes: ``schedule=`` of ``generate``, ``sweep``, ``attach`` and ``sample_pipeline`` (one
with decoupled model times, ``t_model``, everywhere but ``attach``, which refuses it: a pipeline's
own loop hands the network the scheduler's timesteps).

File format (one JSON object, ``format = "diffsample.step_schedule"``, ``version = 1``; 2 when it
carries ``t_model``):

* ``t`` -- the ``steps`` evaluation times, noisiest first, strictly decreasing, in the model's own
  time unit (a diffusers timestep for discrete-VP models, ``t`` in [0, 1] for flows); the run ends
  with a step to ``sigma = 0`` (``final = "zero"``), so ``steps = len(t)``;
* ``sigma_ve`` -- ``sigma / alpha`` at each time (a check that the file meets the noise schedule it
  was made for; ``null`` where infinite, as at a flow's ``t = 1``);
* ``t_model`` (optional, version 2) -- LD3's decoupled model-evaluation times: the model is evaluated
  at ``t_model[i]`` when the solver asks at ``t[i]`` (:mod:`diffsample.solvers.model_time`); same
  length and unit as ``t``; absent (or ``null``) for an ordinary schedule;
* ``model``, ``solver``, ``steps``, ``method``, ``objective`` (endpoint RMSE against the teacher on
  the calibration noises), ``objective_builtin`` (the same for every built-in schedule),
  ``calibration`` (number of noises, first seed), ``noise_schedule`` (its repr), ``command``
  (what made it), ``date``, ``versions``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffsample.solvers.solver import NoiseSchedule
from diffsample.solvers.step_schedules import check_steps

FORMAT, VERSION = "diffsample.step_schedule", 1
VERSION_DECOUPLED = 2
"""The version written when the file carries ``t_model`` (readers of version 1 would ignore it)."""
VERSIONS = (VERSION, VERSION_DECOUPLED)
METHODS = ("gits", "ld3")
"""Optimisation methods a schedule file may name."""
_MAX_BYTES = 1 << 20
_SIGMA_RTOL = 1e-4


class ScheduleMismatch(UserWarning):
    """A schedule file used with another model, solver or noise schedule than it was made for."""


@dataclass(frozen=True)
class OptimizedSchedule:
    """Evaluation times tuned for one model and solver (GITS or LD3; docs/methods/optimized_schedules.md).

    Attributes:
        t: ``steps`` evaluation times, noisiest first, strictly decreasing, in the model's time
            unit; the sampler appends ``sigma = 0``.
        model: the model's id (bundled name, folder, or a description of an in-memory model).
        solver: the solver spec it was tuned for (``"dpmpp_2m"``).
        method: ``"gits"`` or ``"ld3"``.
        objective: endpoint RMSE against the teacher on the calibration noises.
        objective_builtin: ``{schedule spec: endpoint RMSE}`` of the built-in schedules, same noises.
        sigma_ve: ``sigma / alpha`` at ``t`` (``None`` where infinite), for the noise-schedule check.
        noise_schedule: repr of the noise schedule it was made under.
        calibration: ``{"num_samples": B, "seed": first seed, ...}``.
        command: the command (or call) that made it.
        path: the file it was read from or saved to (``None``: in memory only).
        extra: everything else the file holds (date, versions, timings).
        t_model: ``None``, or ``steps`` model-evaluation times, one per ``t`` (LD3's decoupled times,
            arXiv 2405.15506: the solver steps on ``t``, the model is asked at ``t_model``).
    """

    t: tuple[float, ...]
    model: str
    solver: str
    method: str
    objective: float
    objective_builtin: dict[str, float] = field(default_factory=dict)
    sigma_ve: tuple[float | None, ...] = ()
    noise_schedule: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    t_model: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        t = tuple(self.t)
        if not t or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in t):
            raise ValueError(f"schedule times must be a non-empty list of finite numbers, got {list(self.t)!r}")
        if any(b >= a for a, b in zip(t, t[1:])):
            raise ValueError(f"schedule times must be strictly decreasing (noisiest first), got {list(t)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown schedule method {self.method!r}; valid: {', '.join(METHODS)}")
        object.__setattr__(self, "t", tuple(float(v) for v in t))
        if self.t_model is not None:
            tm = tuple(self.t_model)
            if len(tm) != len(t) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v) for v in tm):
                raise ValueError(f"model times must be {len(t)} finite numbers, one per schedule time, got {list(tm)!r}")
            if self.method != "ld3":
                raise ValueError(f"decoupled model times come from method 'ld3', not {self.method!r}")
            object.__setattr__(self, "t_model", tuple(float(v) for v in tm))

    @property
    def steps(self) -> int:
        """Number of grid intervals (= evaluation times; the last step goes to ``sigma = 0``)."""
        return len(self.t)

    @property
    def best_builtin(self) -> tuple[str, float] | None:
        """``(spec, objective)`` of the best built-in schedule on the same noises, or ``None``."""
        finite = [(k, v) for k, v in self.objective_builtin.items() if v is not None and math.isfinite(v)]
        return min(finite, key=lambda kv: kv[1]) if finite else None

    def __str__(self) -> str:
        if self.path is not None:
            return f"file:path={self.path}"
        kind = "ld3, decoupled" if self.t_model is not None else self.method
        return f"optimized({kind}, {self.solver}, steps={self.steps}, model={self.model})"

    # ---- the step-schedule contract ----------------------------------------------------------------
    def __call__(self, ns: NoiseSchedule, n: int) -> Tensor:
        """The evaluation times for ``n`` points (``n`` must be ``steps``: the run denoises to zero).

        Raises:
            ValueError: ``n`` other than ``steps`` (a run with another step count, or ``final="last"``,
                which needs ``steps + 1`` points); times outside the noise schedule's range.
        """
        n = check_steps(n)
        if n != self.steps:
            extra = (" (final='last' asks for steps + 1 points; optimised schedules end at sigma = 0, use "
                     "final='zero')") if n == self.steps + 1 else ""
            raise ValueError(f"schedule {self} has {self.steps} steps, cannot produce {n} points{extra}; "
                             f"run with steps={self.steps} or optimise for {n}")
        t = torch.tensor(self.t, dtype=torch.float64)
        lo, hi = ns.t_min, ns.t_max
        tol = 1e-9 * max(1.0, abs(hi))
        outside = (t < lo - tol).any() or (t > hi + tol).any()
        if self.t_model is not None:
            tm = torch.tensor(self.t_model, dtype=torch.float64)
            outside = outside or bool((tm < lo - tol).any() or (tm > hi + tol).any())
        if outside:
            raise ValueError(f"schedule {self} has times {list(self.t)} (model times {self.t_model}) outside the "
                             "noise schedule's range "
                             f"[{lo}, {hi}]; it was made for {self.noise_schedule or 'another noise schedule'}")
        for line in self.noise_schedule_mismatch(ns):
            warnings.warn(line, ScheduleMismatch, stacklevel=2)
        return t.clamp(lo, hi)

    # ---- checks ------------------------------------------------------------------------------------
    def noise_schedule_mismatch(self, ns: NoiseSchedule) -> list[str]:
        """One line when ``ns`` gives other noise levels at ``t`` than the file records, else ``[]``."""
        if not self.sigma_ve:
            return []
        now = ns.sigma_ve(torch.tensor(self.t, dtype=torch.float64)).tolist()
        for k, (a, b) in enumerate(zip(self.sigma_ve, now)):
            if a is None and not math.isfinite(b):
                continue
            if a is None or not math.isfinite(b) or abs(a - b) > _SIGMA_RTOL * max(abs(a), 1e-12):
                return [f"schedule {self} was made for noise schedule {self.noise_schedule}: at t={self.t[k]:g} "
                        f"its sigma/alpha is {a}, this model's is {b:.6g}"]
        return []

    def mismatch(self, model: str | None = None, solver: str | None = None) -> list[str]:
        """Lines naming what differs from what the schedule was tuned for (model id, solver spec);
        ``[]`` when both match or are not given. The schedule still works; it is only tuned for
        another model or solver."""
        lines = []
        if model is not None and str(model) != self.model:
            lines.append(f"schedule {self} was optimised for model {self.model!r}, used with {str(model)!r}")
        if solver is not None and str(solver) != self.solver:
            lines.append(f"schedule {self} was optimised for solver {self.solver!r}, used with {str(solver)!r}")
        return lines

    # ---- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the file (module docstring)."""
        decoupled = {} if self.t_model is None else {"t_model": list(self.t_model)}
        return {"format": FORMAT, "version": VERSION if self.t_model is None else VERSION_DECOUPLED,
                "model": self.model, "solver": self.solver,
                "steps": self.steps, "final": "zero", "method": self.method, "objective": self.objective,
                "objective_builtin": dict(self.objective_builtin), "t": list(self.t), **decoupled,
                "sigma_ve": list(self.sigma_ve), "noise_schedule": self.noise_schedule,
                "calibration": dict(self.calibration), "command": self.command, **self.extra}

    def save(self, path: str | os.PathLike) -> "OptimizedSchedule":
        """Write the JSON file at once (a hidden temporary file next to it, then ``os.replace``);
        returns the schedule with ``path`` set."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return replace(self, path=str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "schedule file") -> "OptimizedSchedule":
        """Check and build from a parsed JSON object.

        Raises:
            ValueError: one line naming what is wrong (not an object, wrong format, a missing or
                mistyped field, ``steps`` not ``len(t)``, times not strictly decreasing).
        """
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a diffsample step schedule (format {data.get('format')!r}, "
                             f"expected {FORMAT!r})")
        version = data.get("version", VERSION)
        if version not in VERSIONS or isinstance(version, bool):
            raise ValueError(f"{where}: unknown version {version!r}; this diffsample reads versions "
                             f"{', '.join(map(str, VERSIONS))}")
        for key, kind in (("model", str), ("solver", str), ("method", str), ("t", list)):
            if not isinstance(data.get(key), kind):
                raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}, got {data.get(key)!r}")
        t = data["t"]
        if not t or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in t):
            raise ValueError(f"{where}: field 't' must be a non-empty list of finite numbers, got {t!r}")
        if any(b >= a for a, b in zip(t, t[1:])):
            raise ValueError(f"{where}: times 't' are not strictly decreasing (noisiest first): {t}")
        steps = data.get("steps", len(t))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps != len(t):
            raise ValueError(f"{where}: 'steps' is {steps!r} but 't' has {len(t)} times")
        if data.get("final", "zero") != "zero":
            raise ValueError(f"{where}: final must be 'zero', got {data.get('final')!r}")
        objective = data.get("objective")
        if isinstance(objective, bool) or not isinstance(objective, (int, float)):
            raise ValueError(f"{where}: field 'objective' must be a number, got {objective!r}")
        sigma_ve = data.get("sigma_ve", [])
        if not isinstance(sigma_ve, list) or (sigma_ve and len(sigma_ve) != len(t)) or not all(
                s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)) for s in sigma_ve):
            raise ValueError(f"{where}: 'sigma_ve' must list one number (or null) per time, got {sigma_ve!r}")
        t_model = data.get("t_model")
        if t_model is not None and (not isinstance(t_model, list) or len(t_model) != len(t) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in t_model)):
            raise ValueError(f"{where}: 't_model' must list one finite number per time ({len(t)}), got {t_model!r}")
        builtin = data.get("objective_builtin", {})
        if not isinstance(builtin, dict):
            raise ValueError(f"{where}: 'objective_builtin' must be an object, got {builtin!r}")
        known = {"format", "version", "model", "solver", "steps", "final", "method", "objective",
                 "objective_builtin", "t", "t_model", "sigma_ve", "noise_schedule", "calibration", "command"}
        try:
            return cls(t=tuple(t), model=data["model"], solver=data["solver"], method=data["method"],
                       objective=float(objective), objective_builtin=dict(builtin), sigma_ve=tuple(sigma_ve),
                       noise_schedule=str(data.get("noise_schedule", "")),
                       calibration=dict(data.get("calibration") or {}), command=str(data.get("command", "")),
                       extra={k: v for k, v in data.items() if k not in known},
                       t_model=None if t_model is None else tuple(t_model))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


def load_schedule(path: str) -> OptimizedSchedule:
    """Read a schedule file (``file:path=FILE.json``; module docstring for the format).

    Args:
        path: the JSON file ``diffsample optimize-schedule`` wrote.

    Raises:
        ValueError: a missing, unreadable, oversized or malformed file, or one whose times are not
            strictly decreasing (one line naming the file and the problem).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"schedule file path must be a file name, got {path!r}")
    where = f"schedule file {str(path)!r}"
    try:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{where} does not exist or is not a regular file")
        if p.stat().st_size > _MAX_BYTES:
            raise ValueError(f"{where} is larger than {_MAX_BYTES} bytes")
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"{where} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    schedule = OptimizedSchedule.from_dict(data, where)
    return replace(schedule, path=str(path))


def schedule_from_times(t: Sequence[float], ns: NoiseSchedule, **fields: Any) -> OptimizedSchedule:
    """An :class:`OptimizedSchedule` at times ``t`` with ``sigma_ve`` and ``noise_schedule`` filled
    in from ``ns`` (``fields``: the other attributes)."""
    sigma = ns.sigma_ve(torch.as_tensor(list(t), dtype=torch.float64)).tolist()
    return OptimizedSchedule(t=tuple(float(v) for v in t), sigma_ve=tuple(s if math.isfinite(s) else None for s in sigma),
                             noise_schedule=repr(ns), **fields)
