"""FID/NFE sweep engine: a grid of solvers x step schedules x steps (x guidance) on one model.

Cells are scored with a metric of the testbed (:data:`diffsample.testbed.METRICS`, e.g.
``mnist-fd``) that fits the model (``LoadedModel.metrics``), or not at all (``"none"``).

Each finished cell is appended as one JSON line to ``results.jsonl`` (flushed and fsynced), so an
interrupted sweep resumes where it stopped: cells already in the file are skipped, a cell cut off
mid-way is simply run again; none is lost or done twice.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffsample.run.generate import build_guided, build_sampler, generate
from diffsample.run.models import LoadedModel
from diffsample.testbed import DEFAULT_METRIC
from diffsample.testbed import METRICS as TESTBED_METRICS

NO_METRIC = "none"
METRICS = (*TESTBED_METRICS, NO_METRIC)
"""Valid ``metric`` values: the testbed's metrics and ``"none"``."""
RESULTS = "results.jsonl"


def cell_key(row: dict[str, Any]) -> tuple:
    """What identifies a cell: model, solver, schedule, steps, guidance, N, seed."""
    return (row["model"], row["solver"], row["schedule"], int(row["steps"]), tuple(row["guidance"]),
            row.get("cfg_scale"), int(row["num_samples"]), int(row["seed"]))


def read_results(out_dir: Path) -> list[dict[str, Any]]:
    """Rows already in ``out_dir/results.jsonl`` (a torn last line from a crash is ignored)."""
    path = Path(out_dir) / RESULTS
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _score(metric: str, samples, classes) -> dict[str, float]:
    if metric == NO_METRIC:
        return {}
    return TESTBED_METRICS[metric].score(samples, classes)


def _headline(rows: Sequence[dict[str, Any]]) -> str:
    """The value tables and plots show: the headline score of the metric in the rows, else wall time."""
    return next((m.headline for m in TESTBED_METRICS.values() if rows and m.headline in rows[0]), "wall_time_s")


def run_sweep(model: LoadedModel, out_dir: str | os.PathLike, *, solvers: Sequence[str], schedules: Sequence[str],
              steps: Sequence[int], guidance: Sequence[Sequence[str]] = ((),), cfg_scale: float | None = None,
              num_samples: int = 1000, seed: int = 0, batch_size: int = 250, metric: str = DEFAULT_METRIC,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every cell not yet in ``out_dir/results.jsonl``; return all rows of this grid.

    ``metric``: a name in :data:`METRICS` that fits ``model`` (``model.metrics``), or ``"none"``.

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
    done = {cell_key(r): r for r in read_results(out_dir)}
    rows = []
    path = out_dir / RESULTS
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with open(path, "a") as fh:  # a crash left a torn last line: start the next row on a fresh line
            fh.write("\n")
    with open(path, "a") as fh:
        for solver, schedule, n, terms in cells:
            key_row = {"model": model.name, "solver": solver, "schedule": schedule, "steps": n,
                       "guidance": list(terms), "cfg_scale": cfg_scale, "num_samples": num_samples, "seed": seed}
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
            log(f"{solver:>14s} {schedule:>14s} steps={n:<4d} nfe={row['nfe']:<4d} "
                + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows = solver / schedule / guidance, columns = NFE; cells = the metric's headline score
    (e.g. MNIST-FD), or wall time without a metric."""
    value = _headline(rows)
    nfes = sorted({r["nfe"] for r in rows})
    groups: dict[str, dict[int, float]] = {}
    for r in rows:
        label = f"{r['solver']} / {r['schedule']}" + (f" / {'+'.join(r['guidance'])}" if r["guidance"] else "")
        groups.setdefault(label, {})[r["nfe"]] = r[value]
    lines = [f"| {value} (N={rows[0]['num_samples'] if rows else 0}) | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for label, vals in groups.items():
        lines.append(f"| {label} | " + " | ".join(f"{vals[n]:.2f}" if n in vals else "" for n in nfes) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """The metric's headline score (or wall time) vs NFE, log-log, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    value = _headline(rows)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    groups: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        label = f"{r['solver']} / {r['schedule']}" + (f" / {'+'.join(r['guidance'])}" if r["guidance"] else "")
        groups.setdefault(label, []).append((r["nfe"], r[value]))
    for label, pts in groups.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(value.replace("_", "-"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
