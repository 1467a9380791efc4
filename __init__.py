"""diffsample: inference-time sampling and guidance for diffusion models.

Layers, each importing only the ones before it (``docs/design.md``; ``tests/test_architecture.py``
checks it):

* :mod:`diffsample.core` -- name registries and model-evaluation accounting;
* :mod:`diffsample.solvers` -- noise schedules, step schedules and solver steps (pure numerics);
* :mod:`diffsample.guidance` -- guidance terms (denoiser -> denoiser transforms) and rewards;
* :mod:`diffsample.samplers` -- the sampling loop, its hooks, seeds, model adapters;
* :mod:`diffsample.testbed` -- the exact Gaussian mixture, the bundled MNIST model, tiny pipelines;
* :mod:`diffsample.pipelines` -- diffusers adapters: ``attach`` / the scheduler shim, native loops;
* :mod:`diffsample.run` -- model loading, ``generate`` and ``sweep``;
* :mod:`diffsample.cli` -- the ``diffsample`` command.

The public API below is imported lazily, so ``import diffsample`` costs nothing.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "generate": "diffsample.run.generate",
    "GenerateResult": "diffsample.run.generate",
    "load_model": "diffsample.run.models",
    "optimize_schedule": "diffsample.run.optimize",
    "OptimizedSchedule": "diffsample.solvers.schedule_file",
    "attach": "diffsample.pipelines.attach",
    "detach": "diffsample.pipelines.attach",
    "sample_pipeline": "diffsample.pipelines.native_loop",
    "DiffSampleScheduler": "diffsample.pipelines.scheduler_shim",
    "Sampler": "diffsample.samplers.sampler",
    "SampleResult": "diffsample.samplers.sampler",
    "SOLVERS": "diffsample.solvers",
    "STEP_SCHEDULES": "diffsample.solvers",
    "GUIDANCE": "diffsample.guidance",
    "REWARDS": "diffsample.guidance",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    """Lazy top-level API (``DiffSampleScheduler`` also lets ``DiffusionPipeline.from_pretrained``
    resolve a saved shim)."""
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'diffsample' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
