"""FID/NFE sweep engine: a grid of solvers x step schedules x steps (x guidance) on one model.

Cells are scored with a metric of the testbed (:data:`diffsample.testbed.METRICS`, e.g.
``mnist-fd``) that fits the model (``LoadedModel.metrics``), or not at all (``"none"``).

Each finished cell is appended as one JSON line to ``results.jsonl`` (flushed and fsynced), so an
interrupted sweep resumes where it stopped: cells already in the file are skipped, a cell cut off
mid-way is simply run again; none is lost or done twice. A cell is keyed by every parameter that
changes its result (:func:`cell_key`, the metric included); a line that is not a row (a torn
line, ``[]``, ``{"a": 1}``) is skipped with a warning. ``results.md`` and ``fd_vs_nfe.png``
(:func:`write_summaries`) cover every row in the folder, kept apart by metric and number of
samples, and are replaced atomically (:func:`diffsample.run.publish.atomic_write`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffsample.run.generate import build_guided, build_sampler, generate
from diffsample.run.models import LoadedModel
from diffsample.run.publish import atomic_write
from diffsample.testbed import DEFAULT_METRIC
from diffsample.testbed import METRICS as TESTBED_METRICS

NO_METRIC = "none"
METRICS = (*TESTBED_METRICS, NO_METRIC)
"""Valid ``metric`` values: the testbed's metrics and ``"none"``."""
RESULTS, TABLE, PLOT = "results.jsonl", "results.md", "fd_vs_nfe.png"
SUMMARIES = (TABLE, PLOT)


def row_metric(row: dict[str, Any]) -> str:
    """The metric a row was scored with: its ``metric`` field, or (rows written before that field
    existed) the testbed metric whose headline score it holds, else ``"none"``."""
    if isinstance(row.get("metric"), str):
        return row["metric"]
    return next((name for name, m in TESTBED_METRICS.items() if m.headline in row), NO_METRIC)


def headline(metric: str) -> str:
    """The value tables and plots show for ``metric``: its headline score, or wall time for ``"none"``."""
    return TESTBED_METRICS[metric].headline if metric in TESTBED_METRICS else "wall_time_s"


def cell_key(row: dict[str, Any]) -> tuple:
    """What identifies a cell, i.e. every parameter that changes its result: model, solver,
    schedule, steps, guidance, CFG scale, N, seed and metric."""
    return (row["model"], row["solver"], row["schedule"], int(row["steps"]), tuple(row["guidance"]),
            row.get("cfg_scale"), int(row["num_samples"]), int(row["seed"]), row_metric(row))


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
    metric = row_metric(obj)
    return metric in METRICS and _is_number(obj.get(headline(metric)))


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


def _score(metric: str, samples, classes) -> dict[str, float]:
    if metric == NO_METRIC:
        return {}
    return TESTBED_METRICS[metric].score(samples, classes)


def run_sweep(model: LoadedModel, out_dir: str | os.PathLike, *, solvers: Sequence[str], schedules: Sequence[str],
              steps: Sequence[int], guidance: Sequence[Sequence[str]] = ((),), cfg_scale: float | None = None,
              num_samples: int = 1000, seed: int = 0, batch_size: int = 250, metric: str = DEFAULT_METRIC,
              log: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every cell not yet in ``out_dir/results.jsonl``; return all rows of this grid.

    ``metric``: a name in :data:`METRICS` that fits ``model`` (``model.metrics``), or ``"none"``.
    ``warn`` receives the line about skipped lines of ``results.jsonl`` (:func:`read_results`).

    Raises:
        ValueError: unknown solver / schedule / guidance / metric, a metric that does not fit the
            model, or bad counts — all checked before the first cell runs.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if metric != NO_METRIC and metric not in model.metrics:
        raise ValueError(f"metric {metric!r} needs {TESTBED_METRICS[metric].needs}; use --metric none for other "
                         "models (Inception FID weights cannot be downloaded here)")
    cells = list(itertools.product(solvers, schedules, steps, [tuple(g) for g in guidance]))
    for solver, schedule, n, terms in cells:  # validate everything first
        build_guided(model, terms, cfg_scale, build_sampler(solver, schedule, n))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {cell_key(r): r for r in read_results(out_dir, warn)}
    rows = []
    path = out_dir / RESULTS
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with open(path, "a") as fh:  # a crash left a torn last line: start the next row on a fresh line
            fh.write("\n")
    with open(path, "a") as fh:
        for solver, schedule, n, terms in cells:
            key_row = {"model": model.name, "solver": solver, "schedule": str(schedule), "steps": n,
                       "guidance": list(terms), "cfg_scale": cfg_scale, "num_samples": num_samples, "seed": seed,
                       "metric": metric}
            if cell_key(key_row) in done:
                rows.append(done[cell_key(key_row)])
                continue
            result = generate(model, solver=solver, schedule=schedule, steps=n, guidance=terms, cfg_scale=cfg_scale,
                              seed=seed, num_samples=num_samples, batch_size=batch_size)
            rec = result.record
            scores = _score(metric, result.samples, rec["classes"])
            row = {**key_row, "nfe": rec["nfe"], "model_evals": rec["model_evals"],
                   "wall_time_s": rec["wall_time_s"], **scores, "versions": rec["versions"], "date": rec["date"]}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            done[cell_key(row)] = row
            rows.append(row)
            log(f"{solver:>14s} {str(schedule):>14s} steps={n:<4d} nfe={row['nfe']:<4d} "
                + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    return rows


def _label(row: dict[str, Any], vary: set[str]) -> str:
    label = f"{row['solver']} / {row['schedule']}" + (f" / {'+'.join(row['guidance'])}" if row["guidance"] else "")
    if row.get("cfg_scale") is not None:
        label += f" / cfg={row['cfg_scale']:g}"
    if "seed" in vary:
        label += f" / seed={row['seed']}"
    if "model" in vary:
        label += f" / {row['model']}"
    return label


def _sections(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[str, list[dict[str, Any]]]]:
    """Rows grouped by (metric, N), then by line label (rows differing in seed or model are labelled
    apart); insertion ordered."""
    sections: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        sections.setdefault((row_metric(r), int(r["num_samples"])), []).append(r)
    grouped = {}
    for key, members in sections.items():
        vary = {k for k in ("seed", "model") if len({r[k] for r in members}) > 1}
        lines: dict[str, list[dict[str, Any]]] = {}
        for r in members:
            lines.setdefault(_label(r, vary), []).append(r)
        grouped[key] = lines
    return grouped


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One table per (metric, N): rows = solver / schedule / guidance (and CFG scale, seed or model
    where they differ), columns = NFE; cells = the metric's headline score (e.g. MNIST-FD), or wall
    time without a metric. Rows with another metric or another N never share a table."""
    tables = []
    for (metric, n_samples), lines in _sections(rows).items():
        value = headline(metric)
        nfes = sorted({r["nfe"] for members in lines.values() for r in members})
        out = [f"| {value} (N={n_samples}) | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
               "|---|" + "---|" * len(nfes)]
        for label, members in lines.items():
            vals = {r["nfe"]: r[value] for r in members}
            out.append(f"| {label} | " + " | ".join(f"{vals[n]:.2f}" if n in vals else "" for n in nfes) + " |")
        tables.append("\n".join(out) + "\n")
    if not tables:
        return "| (no rows) |\n|---|\n"
    return "\n".join(tables)


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """The metric's headline score (or wall time) vs NFE, log-log: one panel per metric, one line
    per configuration and N (rows with another metric or N are never on the same line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = _sections(rows)
    metrics = list(dict.fromkeys(metric for metric, _ in sections)) or [NO_METRIC]
    several_n = {m: len({n for mm, n in sections if mm == m}) > 1 for m in metrics}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        value = headline(metric)
        for (m, n_samples), lines in sections.items():
            if m != metric:
                continue
            for label, members in lines.items():
                pts = sorted((r["nfe"], r[value]) for r in members)
                name = label + (f" (N={n_samples})" if several_n[metric] else "")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(value.replace("_", "-"))
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_summaries(out_dir: str | os.PathLike) -> None:
    """Rewrite ``results.md`` and ``fd_vs_nfe.png`` over every row of ``out_dir/results.jsonl``,
    each replaced atomically (a kill leaves the old file or the new one)."""
    out_dir = Path(out_dir)
    every = read_results(out_dir, warn=lambda message: None)
    atomic_write(out_dir / TABLE, lambda tmp: tmp.write_text(markdown_table(every)))
    atomic_write(out_dir / PLOT, lambda tmp: plot(every, tmp))
