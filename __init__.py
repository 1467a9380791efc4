"""diffsample: inference-time sampling and guidance for diffusion models.

Subpackages (dependencies run one way, ``solvers <- guidance <- samplers <- cli``):

* :mod:`diffsample.solvers` -- noise schedules, step schedules and solver steps (pure numerics);
* :mod:`diffsample.guidance` -- guidance terms (denoiser -> denoiser transforms);
* :mod:`diffsample.samplers` -- the sampling loop, seeds, model adapters;
* :mod:`diffsample.testbed` -- the exact Gaussian-mixture model and the bundled MNIST model;
* :mod:`diffsample.cli` -- the ``diffsample`` command.

This file stays free of eager imports (DESIGN.md section 6.1).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level API (keeps ``import diffsample`` free of heavy imports)."""
    if name == "generate":
        from diffsample.samplers.generate import generate

        return generate
    if name in ("attach", "detach"):
        from diffsample.samplers import attach as _attach

        return getattr(_attach, name)
    if name == "DiffSampleScheduler":  # also lets DiffusionPipeline.from_pretrained resolve a saved shim
        from diffsample.samplers.scheduler_shim import DiffSampleScheduler

        return DiffSampleScheduler
    raise AttributeError(f"module 'diffsample' has no attribute {name!r}")
