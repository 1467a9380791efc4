"""``generate`` for diffusers pipeline folders (SD, SDXL, SD3, FLUX, PixArt, ...): per-sample seeded
noise, the native loop, decoded images and a run record (the CLI's ``--model FOLDER --prompt``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from diffsample.core.spec import Spec
from diffsample.run.record import GenerateResult, versions
from diffsample.samplers.seeds import seeded_run
from diffsample.solvers.stop_time import stop_record

from diffsample.pipelines.native_loop import sample_pipeline


def generate_from_pipeline(model: Any, *, prompt: str | None, negative_prompt: str | None = None,
                           solver: str = "dpmpp_2m", schedule: str | None = None, steps: int = 20,
                           guidance: Sequence[str] = (), cfg_scale: float | None = None, seed: int = 0,
                           num_samples: int = 4, batch_size: int = 4, final: str = "zero", dtype: str = "fp32",
                           height: int | None = None, width: int | None = None, stop: Any = None,
                           stop_return: str = "noisy") -> Any:
    """Sample ``num_samples`` images of ``prompt`` from a loaded pipeline model
    (:class:`~diffsample.run.models.PipelineModel`), seeds ``seed, seed + 1, ...`` (the same
    seed gives the same image whatever ``batch_size``).

    Raises:
        ValueError: a text-to-image pipeline without ``prompt``, a prompt for an unconditional
            pipeline, ``final="last"`` (pipelines denoise to zero), or bad solver / schedule /
            guidance names.

    ``stop`` (a :class:`~diffsample.solvers.stop_time.StopTime`) cuts the pipeline's grid there and
    decodes the latent ``stop_return`` names (``record["stop"]``; docs/methods/truncation.md).
    """
    den = model.denoiser
    if den.text_conditioned and prompt is None:
        raise ValueError(f"model {model.name!r} is a text-to-image pipeline; give --prompt")
    if not den.text_conditioned and prompt is not None:
        raise ValueError(f"--prompt needs a text-to-image pipeline; model {model.name!r} is not one")
    if final != "zero":
        raise ValueError("pipeline models denoise to sigma = 0; final must be 'zero'")
    shape = den.noise_shape(height, width)
    seeds = list(range(seed, seed + num_samples))
    images, latents, nfe, model_evals, applied_cfg, ran, notes = [], [], 0, 0.0, None, str(solver), []
    start = time.perf_counter()
    for lo in range(0, num_samples, batch_size):
        batch_seeds = seeds[lo:lo + batch_size]
        run = seeded_run(batch_seeds, shape, device=den.device)
        prompts = [prompt] * len(batch_seeds) if prompt is not None else None
        negatives = [negative_prompt] * len(batch_seeds) if negative_prompt is not None else None
        out = sample_pipeline(den.pipe, prompts, negatives, solver=solver, schedule=schedule, steps=steps,
                              cfg_scale=cfg_scale, guidance=guidance, num_images_per_prompt=1 if prompts else len(batch_seeds),
                              height=height, width=width, denoiser=den, stop=stop, stop_return=stop_return, **run)
        images.append(out.images)
        latents.append(out.latents.float().cpu())
        nfe, model_evals, applied_cfg = out.result.nfe, out.result.model_evals, out.cfg_scale
        ran = out.solver or ran
    if isinstance(solver, str) and ran != str(Spec.parse(solver)):
        notes.append(f"guidance acts on the noise of stochastic steps: solver {str(solver)!r} runs as its "
                     f"stochastic variant {ran!r}")
    record = {
        "model": model.name, "pipeline": type(den.pipe).__name__, "prompt": prompt, "negative_prompt": negative_prompt,
        "solver": ran, "solver_requested": str(solver), "schedule": str(schedule) if schedule is not None else "pipeline", "steps": steps, "final": final,
        "guidance": [str(g) for g in guidance], "cfg_scale": applied_cfg,  # None: no CFG, or a CFG-family term
        "seeds": seeds, "classes": None, "nfe": nfe, "model_evals": model_evals,
        "wall_time_s": round(time.perf_counter() - start, 4), "device": str(den.device), "dtype": dtype,
        "num_samples": num_samples, "batch_size": batch_size, "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "notes": notes,
        "stop": stop_record(stop, stop_return, den.noise_schedule),
    }
    return GenerateResult(images=torch.cat(images), samples=torch.cat(latents), record=record)
