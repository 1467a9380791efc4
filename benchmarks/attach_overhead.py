"""Per-step overhead of the diffsample scheduler shim vs diffusers' own DPMSolverMultistepScheduler.

Times ``scheduler.step(model_output, t, sample)`` alone (no network), same process, same config (the
tiny SD pipeline's scaled-linear betas), 20-step runs, for the tiny pipelines' latent size and an SD
512 px latent. Both schedulers run DPM-Solver++(2M) on the same timesteps. Writes
``benchmarks/results/attach_overhead.{json,md}``.

    OMP_NUM_THREADS=1 python3 benchmarks/attach_overhead.py
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import diffusers
import torch

from diffsample.pipelines.scheduler_shim import DiffSampleScheduler
from diffsample.testbed import tiny_pipelines as tp

STEPS, REPEATS = 20, 30
SHAPES = {"tiny (2, 4, 8, 8)": (2, 4, 8, 8), "SD-512 (1, 4, 64, 64)": (1, 4, 64, 64)}
COMMAND = "OMP_NUM_THREADS=1 python3 benchmarks/attach_overhead.py"


def time_run(scheduler, shape) -> float:
    """Median seconds per ``step`` over ``REPEATS`` runs of ``STEPS`` steps."""
    gen = torch.Generator().manual_seed(0)
    sample0 = torch.randn(shape, generator=gen)
    output = torch.randn(shape, generator=gen)
    per_step = []
    for _ in range(REPEATS):
        scheduler.set_timesteps(STEPS)
        x = sample0
        start = time.perf_counter()
        for t in scheduler.timesteps:
            x = scheduler.step(output, t, x, return_dict=False)[0]
        per_step.append((time.perf_counter() - start) / STEPS)
    return statistics.median(per_step)


def main() -> None:
    torch.set_num_threads(1)
    config = diffusers.DPMSolverMultistepScheduler(**{k: v for k, v in tp.SD_SCHEDULER.items()
                                                      if k not in ("clip_sample", "set_alpha_to_one")}).config
    rows = []
    for label, shape in SHAPES.items():
        ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
        shim = DiffSampleScheduler.from_config(config, solver="dpmpp_2m")
        time_run(ref, shape), time_run(shim, shape)  # warm-up
        t_ref, t_shim = time_run(ref, shape), time_run(shim, shape)
        rows.append({"latents": label, "diffusers_dpmpp_2m_us": round(t_ref * 1e6, 1),
                     "diffsample_shim_us": round(t_shim * 1e6, 1), "ratio": round(t_shim / t_ref, 3)})
    record = {"command": COMMAND, "steps": STEPS, "repeats": REPEATS, "threads": 1, "rows": rows,
              "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
              "machine": platform.machine()}
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "attach_overhead.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Scheduler-shim overhead per step (CPU, 1 thread)", "",
             f"Command: `{COMMAND}` (torch {torch.__version__}, diffusers {diffusers.__version__}).",
             f"Median time of one `scheduler.step` (no network) over {REPEATS} runs of {STEPS} steps, DPM-Solver++(2M), "
             "same config and timesteps, same process.", "",
             "| latents | diffusers DPMSolverMultistepScheduler (us) | diffsample shim (us) | shim / diffusers |",
             "|---|---|---|---|"]
    lines += [f"| {r['latents']} | {r['diffusers_dpmpp_2m_us']} | {r['diffsample_shim_us']} | {r['ratio']} |" for r in rows]
    (out / "attach_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
