"""Adapters from network parameterisations to the one model contract, ``denoised``.

With ``x = alpha x0 + sigma eps`` (DPM-Solver ``model_wrapper`` notation, arXiv 2206.00927):

* ``"epsilon"``: ``denoised = (x - sigma eps) / alpha``;
* ``"v_prediction"`` (``v = alpha eps - sigma x0``, Salimans & Ho 2022, arXiv 2202.00512):
  ``denoised = (alpha x - sigma v) / (alpha^2 + sigma^2)``;
* ``"sample"`` (x0-prediction): ``denoised = output``;
* ``"flow"`` (velocity ``u = eps - x0`` of ``x = (1 - t) x0 + t eps``, arXiv 2209.03003):
  ``denoised = x - t u``; only with :class:`RectifiedFlow`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from diffsample.guidance.term import Cond
from diffsample.solvers.numerics import alpha_sigma
from diffsample.core.accounting import add_model_evals
from diffsample.solvers.solver import Grid, NoiseSchedule
from diffsample.solvers.noise_schedules import RectifiedFlow

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

ModelFn = Callable[..., Tensor]
"""``(x, model_time, **cond_kwargs) -> raw network output`` shaped like ``x``."""


class ModelDenoiser:
    """Turn a network into a ``Denoiser`` (``(x, t, cond) -> denoised``).

    Args:
        model_fn: ``(x, model_time, **kwargs) -> output`` (``x`` cast to ``model_dtype``).
        noise_schedule: the process the network was trained on.
        prediction_type: one of ``"epsilon"``, ``"v_prediction"``, ``"sample"``, ``"flow"``.
        time_fn: maps schedule time ``t`` of shape ``(B,)`` to the network's time input
            (identity for diffusers' discrete timesteps; e.g. ``t * 1000`` for SD3).
        model_dtype: dtype the network runs in (output is cast back to the input's dtype).

    Each call records one model evaluation per row passed (``model_evals``).

    Raises:
        ValueError: unknown ``prediction_type``; ``"flow"`` with a non-flow schedule; at call
            time, a network output that is not a real floating-point tensor of exactly ``x``'s
            shape (a ``()`` or ``(1, *dims)`` output is not broadcast over the batch).
    """

    def __init__(self, model_fn: ModelFn, noise_schedule: NoiseSchedule, prediction_type: str = "epsilon",
                 time_fn: Callable[[Tensor], Tensor] | None = None, model_dtype: torch.dtype | None = None) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        if prediction_type == "flow" and not isinstance(noise_schedule, RectifiedFlow):
            raise ValueError("prediction_type 'flow' needs a RectifiedFlow noise schedule")
        self.model_fn = model_fn
        self.noise_schedule = noise_schedule
        self.prediction_type = prediction_type
        self.time_fn = time_fn or (lambda t: t)
        self.model_dtype = model_dtype
        self._coefficients: dict[float, tuple[float, float]] = {}

    def remember_coefficients(self, grid: Grid) -> None:
        """Seed the per-time ``alpha, sigma`` cache with a grid's values at every evaluation time
        (as float32 and float64 keys), so calls on that grid do no schedule lookups."""
        for i in range(grid.steps):
            for dtype in (torch.float32, torch.float64):
                self._coefficients[float(torch.tensor(grid.t_list[i], dtype=dtype))] = (grid.alpha_list[i],
                                                                                        grid.sigma_list[i])

    def _alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``alpha(t), sigma(t)`` broadcastable to ``like``: Python floats, cached per time, when the
        whole batch shares one ``t`` (the sampler's case, which keeps the per-step overhead low)."""
        if torch.equal(t, t[:1].expand_as(t)):
            key = float(t[0])
            if key not in self._coefficients:
                if len(self._coefficients) > 4096:
                    self._coefficients.clear()
                t64 = torch.tensor([key], dtype=torch.float64)
                self._coefficients[key] = (float(self.noise_schedule.alpha(t64)), float(self.noise_schedule.sigma(t64)))
            return self._coefficients[key]
        return alpha_sigma(self.noise_schedule, t, like)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        kwargs: Mapping[str, Any] = cond.positive if cond is not None else {}
        x_in = x if self.model_dtype is None else x.to(self.model_dtype)
        add_model_evals(x.shape[0])
        raw = self.model_fn(x_in, self.time_fn(t), **kwargs)
        if not isinstance(raw, Tensor) or raw.shape != x.shape:
            got = tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__
            raise ValueError(f"model output has shape {got}, expected x's shape {tuple(x.shape)} "
                             f"({self.prediction_type} prediction; no broadcasting over the batch)")
        if not (raw.is_floating_point()):
            raise ValueError(f"model output has dtype {raw.dtype}, expected a real floating-point tensor")
        out = raw.to(x.dtype)
        alpha, sigma = self._alpha_sigma(t, x)
        if self.prediction_type == "epsilon":
            return (x - sigma * out) / alpha
        if self.prediction_type == "v_prediction":
            return (alpha * x - sigma * out) / (alpha**2 + sigma**2)
        if self.prediction_type == "sample":
            return out
        return x - sigma * out


def from_eps(model_fn: ModelFn, noise_schedule: NoiseSchedule, **kw: Any) -> ModelDenoiser:
    """Adapter for an eps-prediction network."""
    return ModelDenoiser(model_fn, noise_schedule, "epsilon", **kw)


def from_v(model_fn: ModelFn, noise_schedule: NoiseSchedule, **kw: Any) -> ModelDenoiser:
    """Adapter for a v-prediction network."""
    return ModelDenoiser(model_fn, noise_schedule, "v_prediction", **kw)


def from_x0(model_fn: ModelFn, noise_schedule: NoiseSchedule, **kw: Any) -> ModelDenoiser:
    """Adapter for a data-prediction (x0) network."""
    return ModelDenoiser(model_fn, noise_schedule, "sample", **kw)


def from_velocity(model_fn: ModelFn, noise_schedule: RectifiedFlow, **kw: Any) -> ModelDenoiser:
    """Adapter for a rectified-flow velocity network."""
    return ModelDenoiser(model_fn, noise_schedule, "flow", **kw)
