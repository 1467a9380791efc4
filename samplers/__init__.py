"""Orchestration: the sampling loop, per-sample seeds and model adapters."""

from diffsample.samplers.denoisers import ModelDenoiser, from_eps, from_v, from_velocity, from_x0
from diffsample.samplers.sampler import NonFiniteError, SampleResult, Sampler, StepInfo, prior_scale
from diffsample.samplers.seeds import SeededNoiseFn, seeded_chain, seeded_noise, seeded_run

__all__ = [
    "ModelDenoiser", "NonFiniteError", "SampleResult", "Sampler", "SeededNoiseFn", "StepInfo",
    "from_eps", "from_v", "from_velocity", "from_x0", "prior_scale", "seeded_chain", "seeded_noise", "seeded_run",
]
