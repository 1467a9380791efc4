"""``diffsample optimize-schedule``: tune a step schedule for one model and solver, write it as JSON.

Everything is checked before any model evaluation (steps, method, solver, the output path); the
file is written at once (:func:`diffsample.run.publish.atomic_write`), so a failed or interrupted
run leaves ``--out`` as it was. Use the file with ``--schedule FILE.json`` (``generate``,
``sweep``) or ``schedule="file:path=FILE.json"`` in Python.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from diffsample.cli.options import FiniteFloat, fail, registry_spec

METHOD_CHOICES = ("gits", "ld3")


def _check_out_file(out: Path, overwrite: bool) -> None:
    """Exit 2 when ``--out`` is a folder, lies under a file or a missing folder, cannot be written, or
    exists without ``--overwrite``."""
    shown = str(out)
    if out.is_dir():
        fail(f"--out {shown!r} is a directory; give a file name such as schedule.json")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        fail(f"--out {shown!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        fail(f"--out {shown!r}: folder {str(parent)!r} is not writable")
    if os.path.lexists(out) and not overwrite:
        fail(f"--out {shown!r} exists; pass --overwrite to replace it")
    if os.path.lexists(out) and not out.is_file():
        fail(f"--out {shown!r} exists and is not a regular file")


@click.command("optimize-schedule")
@click.option("--model", default="mnist", show_default=True, metavar="NAME|FOLDER",
              help="A bundled model or a diffusers model / pipeline folder.")
@click.option("--solver", default="dpmpp_2m", show_default=True, callback=registry_spec("solvers"),
              help="Deterministic solver spec the schedule is tuned for.")
@click.option("--steps", type=int, required=True, help="Steps N (= model evaluations of single-stage solvers).")
@click.option("--method", default="ld3", show_default=True,
              help="gits (dynamic programming over the teacher's fine grid) or ld3 (continuous fit of the N-1 free "
                   "times to the teacher's endpoints, started from the better of GITS and the best built-in).")
@click.option("--num-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Calibration noises.")
@click.option("--seed", type=click.IntRange(min=0), default=10**12, show_default=True,
              help="First calibration seed (keep calibration apart from the evaluation seeds 0, 1, ...).")
@click.option("--fine-steps", type=click.IntRange(min=2), default=48, show_default=True,
              help="Points of the teacher's fine grid (GITS chooses among them).")
@click.option("--teacher-substeps", type=click.IntRange(min=1), default=4, show_default=True,
              help="DPM-Solver++(3M) teacher steps per fine interval.")
@click.option("--max-evals", type=click.IntRange(min=1), default=None,
              help="LD3 objective evaluations (default 40 x steps).")
@click.option("--ld3-samples", type=click.IntRange(min=1), default=None,
              help="Calibration noises LD3 fits on (default: all).")
@click.option("--pool", type=click.IntRange(min=2), default=None,
              help="Draw this many noises (> --num-samples) and calibrate on a stratified set of --num-samples: the "
                   "half the built-in schedules get most wrong plus a weighted uniform draw (for errors that a few "
                   "noises dominate).")
@click.option("--fixed-start", is_flag=True,
              help="LD3: keep the first time at t_max (default: LD3 may start lower, as leading / ddim_uniform do).")
@click.option("--decoupled", is_flag=True,
              help="LD3: also fit a model-evaluation time per grid point (LD3's decoupled times; the model is "
                   "asked at t' when the solver steps at t). Not usable through attach.")
@click.option("--decoupled-evals", type=click.IntRange(min=1), default=None,
              help="Objective evaluations of the decoupled fit (default 80 x steps).")
@click.option("--cfg-scale", type=FiniteFloat(min=0), default=None, help="CFG scale of the trajectories.")
@click.option("--prompt", default="a photo", show_default=True, help="Calibration prompt (text-to-image pipelines).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The schedule file (JSON) to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
def optimize_cmd(model, solver, steps, method, num_samples, seed, fine_steps, teacher_substeps, max_evals, ld3_samples,
                 pool, fixed_start, decoupled, decoupled_evals, cfg_scale, prompt, out, overwrite, quiet):
    """Tune the N evaluation times of a solver for one model (GITS or LD3) and write them as JSON.

    \b
    Example:
      diffsample optimize-schedule --model mnist --solver dpmpp_2m --steps 5 --out opt5.json
      diffsample generate --solver dpmpp_2m --steps 5 --schedule opt5.json
    """
    if steps < 1:
        fail(f"--steps must be an integer >= 1, got {steps}")
    if method not in METHOD_CHOICES:
        fail(f"unknown --method {method!r}; valid: {', '.join(METHOD_CHOICES)}")
    if fine_steps < steps:
        fail(f"--fine-steps ({fine_steps}) must be >= --steps ({steps})")
    if decoupled and method != "ld3":
        fail(f"--decoupled needs --method ld3 (decoupled model times are fitted by LD3), got --method {method}")
    if decoupled_evals is not None and not decoupled:
        fail("--decoupled-evals needs --decoupled")
    if pool is not None and pool <= num_samples:
        fail(f"--pool ({pool}) must be larger than --num-samples ({num_samples})")
    if pool is not None and num_samples < 2:
        fail(f"--pool needs --num-samples >= 2, got {num_samples}")
    if pool is not None and ld3_samples is not None and ld3_samples < num_samples:
        fail(f"--ld3-samples ({ld3_samples}) cannot be combined with --pool (a stratified set is fitted whole)")
    from diffsample.solvers import SOLVERS

    if getattr(SOLVERS.create(solver), "stochastic", False):
        fail(f"--solver {solver!r} is stochastic; a schedule is tuned for a deterministic solver (e.g. dpmpp_2m, "
             "unipc_bh2, euler, heun)")
    _check_out_file(out, overwrite)
    from diffsample.run.optimize import optimize_schedule, summary
    from diffsample.run.publish import atomic_write

    command = "diffsample " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["optimize-schedule"] \
        else (f"diffsample optimize-schedule --model {shlex.quote(str(model))} --solver {shlex.quote(solver)} "
              f"--steps {steps} --method {method} --num-samples {num_samples} --seed {seed} --out {shlex.quote(str(out))}"
              + (f" --pool {pool}" if pool is not None else "") + (" --decoupled" if decoupled else ""))
    schedule = optimize_schedule(model, solver=solver, steps=steps, method=method, num_samples=num_samples, seed=seed,
                                 fine_steps=fine_steps, teacher_substeps=teacher_substeps, max_evals=max_evals,
                                 ld3_samples=ld3_samples, cfg_scale=cfg_scale, prompt=prompt, progress=not quiet,
                                 command=command, free_start=not fixed_start, pool=pool, decoupled=decoupled,
                                 decoupled_evals=decoupled_evals)
    import json

    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(schedule.to_dict(), indent=2) + "\n"))
    if not quiet:
        click.echo(summary(schedule))
        click.echo(f"wrote {out} (use: --schedule {out})")
