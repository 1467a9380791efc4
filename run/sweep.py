"""FID/NFE sweep engine: a grid of solvers x step schedules x steps (x guidance) on one model.

Cells are scored with a metric (:mod:`diffsample.run.sweep_metrics`: a testbed metric such as
``mnist-fd`` on the model it fits, ``reward:SPEC``, ``clip-score`` with local CLIP weights, or
``none``). A pipeline folder is swept over a list of prompts: every prompt gets the same seeds
``seed .. seed + num_samples - 1``, so a cell holds ``num_samples x len(prompts)`` images.

Each finished cell is appended as one JSON line to ``results.jsonl`` (flushed and fsynced), so an
interrupted sweep resumes where it stopped: cells already in the file are skipped, a cell cut off
mid-way is simply run again; none is lost or done twice. A cell is keyed by every parameter that
changes its result (:func:`cell_key`: model, solver, schedule with its options, steps, guidance,
CFG scale, prompts, N, seed, metric, and the batch size for batch-coupled methods), so a re-run
with another N or metric adds cells and never relabels old ones. Every argument is checked before
anything is written: bad input leaves no file and no folder. A line that is not a row (a torn
line, ``[]``, ``{"a": 1}``) is skipped with a warning.

Beside ``results.jsonl``, :func:`write_summaries` rewrites (each atomically) ``results.md``
(tables per metric and N, best configuration per NFE), ``fd_vs_nfe.png``, ``xy_grid.png`` (rows
configuration, columns NFE, the same seeds in every tile, from ``cells/<cell_id>.png``) and
``report.html`` (all of it with the images embedded; opens without a server).

Scale-out: run under ``torchrun --nproc_per_node=K -m diffsample.cli.main sweep ...`` (or any
launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``, e.g. ``accelerate launch``) and each
cell's batches (``batch_size`` seeds each, as one process cuts them) are dealt to the ranks
round-robin (EDM's ``seeds.tensor_split(num_batches)[rank::world]``); every sample has its own
seeded generator, so a batch gives the same samples on any rank. Rank 0 gathers the samples
(``gather_object``; gloo on CPU), scores them in seed order and writes the same row one process
would: same samples bit for bit (``samples_sha256``), same metric.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffsample.run.generate import build_guided, build_sampler, default_classes, generate
from diffsample.run.models import LoadedModel, PipelineModel
from diffsample.run.publish import atomic_write
from diffsample.run.sweep_metrics import (METRICS, NO_METRIC, build_metric, headline, known_metric,
                                          row_metric)
from diffsample.run.sweep_report import best_table, markdown_table, plot, report_html, xy_grid
from diffsample.testbed import DEFAULT_METRIC

__all__ = ["METRICS", "NO_METRIC", "RESULTS", "TABLE", "PLOT", "GRID", "REPORT", "CELLS", "SUMMARIES", "cell_key",
           "cell_id", "headline", "is_row", "markdown_table", "read_results", "row_metric", "run_sweep",
           "write_summaries", "SweepInterrupted"]

RESULTS, TABLE, PLOT, GRID, REPORT, CELLS = "results.jsonl", "results.md", "fd_vs_nfe.png", "xy_grid.png", \
    "report.html", "cells"
SUMMARIES = (TABLE, PLOT, GRID, REPORT)
GRID_IMAGES = 8
"""Images per cell kept for the X/Y grid and the report (the first seeds; the same in every cell)."""


class SweepInterrupted(Exception):
    """Raised by the CLI path when a sweep stops early (Ctrl-C); finished cells are kept."""


def cell_key(row: dict[str, Any]) -> tuple:
    """What identifies a cell, i.e. every parameter that changes its result: model, solver,
    schedule, steps, guidance, CFG scale, prompts, N, seed, metric, and the batch size when the
    method couples a batch (``row["batch_coupled"]``; otherwise a seed gives the same sample in any
    batch and the batch size is not part of the key)."""
    return (row["model"], row["solver"], row["schedule"], int(row["steps"]), tuple(row["guidance"]),
            row.get("cfg_scale"), tuple(row.get("prompts") or ()), int(row["num_samples"]), int(row["seed"]),
            row_metric(row), int(row["batch_size"]) if row.get("batch_coupled") and row.get("batch_size") else None)


def cell_id(row: dict[str, Any]) -> str:
    """A short stable name of the cell (12 hex digits of a SHA-1 of :func:`cell_key`), used for
    its image ``cells/<cell_id>.png`` and in ``report.html``."""
    return hashlib.sha1(json.dumps(cell_key(row), default=str).encode()).hexdigest()[:12]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_row(obj: Any) -> bool:
    """Whether a parsed JSON line is a sweep row: the key fields with their types and the value
    its metric's table shows."""
    if not isinstance(obj, dict):
        return False
    if not all(isinstance(obj.get(k), str) for k in ("model", "solver", "schedule")):
        return False
    if not all(_is_int(obj.get(k)) for k in ("steps", "num_samples", "seed", "nfe")):
        return False
    if not isinstance(obj.get("guidance"), list) or not all(isinstance(g, str) for g in obj["guidance"]):
        return False
    if obj.get("cfg_scale") is not None and not _is_number(obj["cfg_scale"]):
        return False
    prompts = obj.get("prompts")
    if prompts is not None and (not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts)):
        return False
    metric = row_metric(obj)
    return known_metric(metric) and _is_number(obj.get(headline(metric)))


def read_results(out_dir: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows in ``out_dir/results.jsonl``. A torn last line (a crash mid-write) is ignored
    silently; any other line that is not a row (:func:`is_row`) is skipped and reported once
    through ``warn`` (default: :func:`warnings.warn`)."""
    path = Path(out_dir) / RESULTS
    rows, skipped = [], []
    if not path.is_file():
        return rows
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            if number < len(lines):
                skipped.append(number)
            continue
        if is_row(obj):
            rows.append(obj)
        else:
            skipped.append(number)
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        message = f"{path}: skipped {len(skipped)} line(s) that are not sweep rows (line {shown})"
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    return rows


def _dist() -> tuple[int, int]:
    """(rank, world size) of an initialised ``torch.distributed`` group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj: Any) -> Any:
    """``obj`` of rank 0 on every rank (identity in one process)."""
    rank, world = _dist()
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _strip(images) -> Any:
    """The first :data:`GRID_IMAGES` images side by side as a PIL image, upscaled (nearest) to at
    least 48 px high."""
    import numpy as np
    from PIL import Image

    x = images[:GRID_IMAGES].clamp(0, 1).mul(255).round().to("cpu").byte().numpy()  # (k, C, H, W)
    k, c, h, w = x.shape
    strip = np.concatenate(list(x.transpose(0, 2, 3, 1)), axis=1)  # (H, k*W, C)
    im = Image.fromarray(strip[..., 0] if c == 1 else strip[..., :3])
    scale = max(1, math.ceil(48 / h))
    return im.resize((k * w * scale, h * scale), Image.NEAREST)


def _sha256(samples) -> str:
    import torch

    return hashlib.sha256(samples.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _run_cell(model, *, prompts: Sequence[str | None], num_samples: int, seed: int, batch_size: int,
              labels, **sampling) -> tuple[Any, Any, dict[str, Any], float]:
    """Samples, images, the first run record and the wall time of one cell, on every rank; the
    full tensors (seed order, prompt by prompt) only on rank 0 (``None`` elsewhere)."""
    import torch

    rank, world = _dist()
    units = [(k, lo, min(lo + batch_size, num_samples)) for k in range(len(prompts))
             for lo in range(0, num_samples, batch_size)]
    mine = list(range(len(units)))[rank::world] if world > 1 else None
    outputs, record, wall = {}, None, 0.0
    if mine is None:  # one process: one generate() per prompt, batches cut the same way
        for k, prompt in enumerate(prompts):
            extra = {"prompt": prompt} if prompt is not None else {"classes": labels}
            result = generate(model, seed=seed, num_samples=num_samples, batch_size=batch_size, **extra, **sampling)
            outputs[k] = (result.samples, result.images)
            record = record or result.record
            wall += result.record["wall_time_s"]
        samples = torch.cat([outputs[k][0] for k in range(len(prompts))])
        images = torch.cat([outputs[k][1] for k in range(len(prompts))])
        return samples, images, record, wall
    import torch.distributed as dist

    for u in mine:
        k, lo, hi = units[u]
        prompt = prompts[k]
        extra = {"prompt": prompt} if prompt is not None else {"classes": None if labels is None else labels[lo:hi]}
        result = generate(model, seed=seed + lo, num_samples=hi - lo, batch_size=batch_size, **extra, **sampling)
        outputs[u] = (result.samples, result.images)
        record = record or result.record
        wall += result.record["wall_time_s"]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object((outputs, record, wall), gathered, dst=0)
    if rank != 0:
        return None, None, record, wall
    merged: dict[int, Any] = {}
    for part, _, _ in gathered:
        merged.update(part)
    samples = torch.cat([merged[u][0] for u in range(len(units))])
    images = torch.cat([merged[u][1] for u in range(len(units))])
    wall = max(w for _, _, w in gathered)  # the ranks run side by side
    return samples, images, gathered[0][1], wall


KILL_RANK_ENV = "DIFFSAMPLE_TEST_KILL_RANK"
"""Test-only hook, ``RANK:CELLS``: that rank of a distributed sweep SIGKILLs itself before running
its cell number ``CELLS + 1``, once ``results.jsonl`` holds ``CELLS`` rows (so the test knows which
cells were finished). Not meant for users."""


def _kill_point(rank: int, ran: int, path: Path) -> None:
    spec = os.environ.get(KILL_RANK_ENV)
    if not spec or spec.split(":")[0] != str(rank) or ran != int(spec.split(":")[1]) or ran == 0:
        return
    import signal
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= ran:
            break
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def run_sweep(model: LoadedModel | PipelineModel, out_dir: str | os.PathLike, *, solvers: Sequence[str],
              schedules: Sequence[str], steps: Sequence[int], guidance: Sequence[Sequence[str]] = ((),),
              cfg_scale: float | None = None, num_samples: int = 1000, seed: int = 0, batch_size: int = 250,
              metric: str = DEFAULT_METRIC, prompts: Sequence[str] | None = None, clip_weights: str | None = None,
              fid_weights: str | None = None, fid_reference: str | None = None,
              log: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every cell not yet in ``out_dir/results.jsonl``; return all rows of this grid (on
    rank 0 of a distributed run; the other ranks return ``[]``).

    ``metric``: see :mod:`diffsample.run.sweep_metrics` (``mnist-fd``, ``none``, ``reward:SPEC``,
    ``clip-score`` with ``clip_weights``, ``fid`` with ``fid_weights`` and ``fid_reference``).
    ``prompts``: the prompt list of a pipeline folder (each prompt gets seeds
    ``seed .. seed + num_samples - 1``); refused for other models. ``warn`` receives the line
    about skipped lines of ``results.jsonl`` (:func:`read_results`).

    Raises:
        ValueError: unknown solver / schedule / guidance / metric, a metric that does not fit the
            model, a pipeline without prompts, prompts for a model that takes none, or bad counts —
            all checked before anything is written (no folder, no file).
    """
    is_pipeline = isinstance(model, PipelineModel)
    if prompts is not None:
        prompts = [str(p) for p in prompts]
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty texts")
    if is_pipeline and not prompts:
        raise ValueError(f"model {model.name!r} is a text-to-image pipeline; give --prompt TEXT (repeatable) or "
                         "--prompts-file FILE (one prompt a line)")
    if not is_pipeline and prompts:
        raise ValueError(f"--prompt / --prompts-file need a text-to-image pipeline folder; model {model.name!r} "
                         "is not one")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    scorer = build_metric(metric, model, clip_weights=clip_weights, fid_weights=fid_weights,
                          fid_reference=fid_reference)
    cells = list(itertools.product(solvers, schedules, steps, [tuple(g) for g in guidance]))
    for solver, schedule, n, terms in cells:  # validate everything first
        sampler = build_sampler(solver, schedule, n)
        if not is_pipeline:
            build_guided(model, terms, cfg_scale, sampler)
    labels = None if is_pipeline else default_classes(model, num_samples, None)
    rank, world = _dist()
    out_dir = Path(out_dir)
    path = out_dir / RESULTS
    done: dict[tuple, dict[str, Any]] = {}
    if rank == 0:
        done = {cell_key(r): r for r in read_results(out_dir, warn)}
    done = _broadcast(done)
    rows, ran = [], 0
    for solver, schedule, n, terms in cells:
        key_row = {"model": model.name, "solver": solver, "schedule": str(schedule), "steps": n,
                   "guidance": list(terms), "cfg_scale": cfg_scale, "num_samples": num_samples, "seed": seed,
                   "metric": metric, "batch_size": batch_size}
        if prompts:
            key_row["prompts"] = list(prompts)
        found = done.get(cell_key(key_row)) or done.get(cell_key({**key_row, "batch_coupled": True}))
        if found is not None:
            rows.append(found)
            continue
        _kill_point(rank, ran, path)
        ran += 1
        samples, images, rec, wall = _run_cell(
            model, prompts=prompts or [None], num_samples=num_samples, seed=seed, batch_size=batch_size, labels=labels,
            solver=solver, schedule=schedule, steps=n, guidance=terms, cfg_scale=cfg_scale)
        if rank != 0:
            continue
        classes = None if labels is None else labels.tolist()
        per_sample_prompts = [p for p in prompts for _ in range(num_samples)] if prompts else None
        scores = scorer.score(samples, images, classes, per_sample_prompts)
        row = {**key_row, "batch_coupled": bool(rec.get("batch_coupled")), "nfe": rec["nfe"],
               "model_evals": rec["model_evals"], "wall_time_s": round(wall, 4), **scores,
               "samples_sha256": _sha256(samples), "world_size": world, "versions": rec["versions"],
               "date": rec["date"]}
        if rec.get("solver") != solver:
            row["solver_ran"] = rec.get("solver")
        row["cell_id"] = cell_id(row)
        row["image"] = f"{CELLS}/{row['cell_id']}.png"
        (out_dir / CELLS).mkdir(parents=True, exist_ok=True)  # the first write of the sweep
        strip = _strip(images)
        atomic_write(out_dir / row["image"], lambda tmp: strip.save(tmp, format="png"))
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a") as fh:  # a crash left a torn last line: start the next row on a fresh line
                fh.write("\n")
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        done[cell_key(row)] = row
        rows.append(row)
        log(f"{solver:>14s} {str(schedule):>14s} steps={n:<4d} nfe={row['nfe']:<4d} "
            + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    return rows if rank == 0 else []


RESUME_LINE = "Stopped early: the rows above are the finished cells. Re-run the same command to resume."


def write_summaries(out_dir: str | os.PathLike, *, interrupted: bool = False) -> None:
    """Rewrite ``results.md``, ``fd_vs_nfe.png``, ``xy_grid.png`` and ``report.html`` over every
    row of ``out_dir/results.jsonl``, each replaced atomically (a kill leaves the old file or the
    new one). ``interrupted``: the sweep stopped before its last cell; ``results.md`` and the
    report say so and that re-running the same command resumes."""
    out_dir = Path(out_dir)
    every = read_results(out_dir, warn=lambda message: None)
    note = RESUME_LINE if interrupted else None
    table = markdown_table(every) + best_table(every) + (f"\n**{note}**\n" if note else "")
    atomic_write(out_dir / TABLE, lambda tmp: tmp.write_text(table))
    atomic_write(out_dir / PLOT, lambda tmp: plot(every, tmp))
    atomic_write(out_dir / GRID, lambda tmp: xy_grid(every, out_dir, tmp))
    text = report_html(every, out_dir, note=note)
    atomic_write(out_dir / REPORT, lambda tmp: tmp.write_text(text))
