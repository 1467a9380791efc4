"""What a sweep folder shows: the markdown table, the best configuration per NFE, the metric-vs-NFE
plot, the X/Y image grid and the self-contained ``report.html``.

Rows are grouped into *sections* by (metric, N): rows scored with another metric or another
number of samples never share a table, a plot line or a best-per-NFE line. Inside a section a
line (a table row) is one configuration: solver / schedule / guidance, plus CFG scale, prompts,
seed, model and batch size where they differ (batch size only matters for batch-coupled methods).
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffsample.run.sweep_metrics import NO_METRIC, headline, lower_is_better, row_metric

Row = dict[str, Any]


def label(row: Row, vary: set[str] = frozenset()) -> str:
    """The configuration a row belongs to, e.g. ``dpmpp_2m / karras / noisetilt / cfg=3``."""
    text = f"{row['solver']} / {row['schedule']}" + (f" / {'+'.join(row['guidance'])}" if row["guidance"] else "")
    if row.get("cfg_scale") is not None:
        text += f" / cfg={row['cfg_scale']:g}"
    if "prompts" in vary and row.get("prompts"):
        text += f" / {len(row['prompts'])} prompt(s): {row['prompts'][0][:24]}"
    for key in ("seed", "model", "batch_size"):
        if key in vary:
            text += f" / {key}={row.get(key)}"
    return text


def sections(rows: Sequence[Row]) -> dict[tuple[str, int], dict[str, list[Row]]]:
    """Rows grouped by (metric, N), then by configuration label; insertion ordered."""
    by_key: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        by_key.setdefault((row_metric(r), int(r["num_samples"])), []).append(r)
    grouped = {}
    for key, members in by_key.items():
        vary = {k for k in ("seed", "model") if len({r[k] for r in members}) > 1}
        if len({tuple(r.get("prompts") or ()) for r in members}) > 1:
            vary.add("prompts")
        if any(r.get("batch_coupled") for r in members) and len({r.get("batch_size") for r in members}) > 1:
            vary.add("batch_size")
        lines: dict[str, list[Row]] = {}
        for r in members:
            lines.setdefault(label(r, vary), []).append(r)
        grouped[key] = lines
    return grouped


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def markdown_table(rows: Sequence[Row]) -> str:
    """One table per (metric, N): rows = configurations, columns = NFE; cells = the metric's
    headline value (e.g. MNIST-FD), or wall time without a metric."""
    tables = []
    for (metric, n_samples), lines in sections(rows).items():
        value = headline(metric)
        nfes = sorted({r["nfe"] for members in lines.values() for r in members})
        out = [f"| {value} (N={n_samples}) | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
               "|---|" + "---|" * len(nfes)]
        for name, members in lines.items():
            vals = {r["nfe"]: r[value] for r in members}
            out.append(f"| {name} | " + " | ".join(_fmt(vals[n]) if n in vals else "" for n in nfes) + " |")
        tables.append("\n".join(out) + "\n")
    if not tables:
        return "| (no rows) |\n|---|\n"
    return "\n".join(tables)


def best_per_nfe(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """For every (metric, N) section and NFE, the configuration with the best headline value
    (lowest distance or wall time, highest reward or CLIP score): dicts with ``metric``, ``n``,
    ``nfe``, ``label``, ``value``, ``class_accuracy`` (or ``None``), ``wall_time_s``."""
    best = []
    for (metric, n_samples), lines in sections(rows).items():
        if metric == NO_METRIC:  # nothing scored: wall time alone does not rank configurations
            continue
        value, sign = headline(metric), (1 if lower_is_better(metric) else -1)
        by_nfe: dict[int, tuple[str, Row]] = {}
        for name, members in lines.items():
            for r in members:
                held = by_nfe.get(r["nfe"])
                if held is None or sign * r[value] < sign * held[1][value]:
                    by_nfe[r["nfe"]] = (name, r)
        for nfe in sorted(by_nfe):
            name, r = by_nfe[nfe]
            best.append({"metric": metric, "n": n_samples, "nfe": nfe, "label": name, "value": r[value],
                         "class_accuracy": r.get("class_accuracy"), "wall_time_s": r.get("wall_time_s")})
    return best


def best_table(rows: Sequence[Row]) -> str:
    """``best_per_nfe`` as markdown: one table per (metric, N) with class accuracy and wall time."""
    out, current = [], None
    for b in best_per_nfe(rows):
        if (b["metric"], b["n"]) != current:
            current = (b["metric"], b["n"])
            out += ["", f"Best configuration per NFE ({headline(b['metric'])}, N={b['n']}, "
                        f"{'lower' if lower_is_better(b['metric']) else 'higher'} is better):", "",
                    f"| NFE | configuration | {headline(b['metric'])} | class_accuracy | wall_time_s |",
                    "|---|---|---|---|---|"]
        out.append(f"| {b['nfe']} | {b['label']} | {_fmt(b['value'])} | {_fmt(b['class_accuracy'])} | "
                   f"{_fmt(b['wall_time_s'])} |")
    return "\n".join(out) + ("\n" if out else "")


def plot(rows: Sequence[Row], path: str | os.PathLike) -> None:
    """The metric's headline value vs NFE, log-log: one panel per metric, one line per
    configuration and N (rows with another metric or N are never on the same line)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone

    grouped = sections(rows)
    metrics = list(dict.fromkeys(metric for metric, _ in grouped)) or [NO_METRIC]
    several_n = {m: len({n for mm, n in grouped if mm == m}) > 1 for m in metrics}
    fig = Figure(figsize=(6 * len(metrics), 4.5))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        value = headline(metric)
        for (m, n_samples), lines in grouped.items():
            if m != metric:
                continue
            for name, members in lines.items():
                pts = sorted((r["nfe"], r[value]) for r in members)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=name + (f" (N={n_samples})" if several_n[metric] else ""))
        ax.set_xscale("log")
        if lower_is_better(metric) and all(r[value] > 0 for lines in grouped.values() for ms in lines.values()
                                           for r in ms if row_metric(r) == metric):
            ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(value.replace("_", "-"))
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")


def xy_grid(rows: Sequence[Row], out_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """The X/Y image grid (as A1111's X/Y plot): one row per configuration (and N / metric where
    the folder mixes them), one column per NFE, each tile the cell's first images (the same seeds
    in every tile: ``image`` of the row, under ``out_dir``). Cells without an image are left blank."""
    from matplotlib.figure import Figure
    from PIL import Image

    out_dir = Path(out_dir)
    grouped = sections(rows)
    several = len(grouped) > 1
    lines = [((name + (f" (N={n}, {metric})" if several else "")), members)
             for (metric, n), by_label in grouped.items() for name, members in by_label.items()]
    nfes = sorted({r["nfe"] for _, members in lines for r in members})
    nrows, ncols = max(len(lines), 1), max(len(nfes), 1)
    fig = Figure(figsize=(3.2 * ncols + 2.2, 0.55 * nrows + 0.7))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, (name, members) in enumerate(lines):
        by_nfe = {r["nfe"]: r for r in members}
        for j, nfe in enumerate(nfes):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            r = by_nfe.get(nfe)
            if r is not None and r.get("image") and (out_dir / r["image"]).is_file():
                with Image.open(out_dir / r["image"]) as im:
                    ax.imshow(im.convert("RGB"))
            else:
                ax.text(0.5, 0.5, "-", ha="center", va="center", transform=ax.transAxes)
            if i == 0:
                ax.set_title(f"NFE {nfe}", fontsize=9)
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    if not lines:
        axes[0][0].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def report_html(rows: Sequence[Row], out_dir: str | os.PathLike, *, note: str | None = None) -> str:
    """A self-contained HTML report (every image embedded as a base64 ``data:`` URI, no script, no
    external file): the tables, the best configuration per NFE, ``fd_vs_nfe.png``, ``xy_grid.png``
    and every cell's image (``<figure data-cell="ID">``, ID = the row's ``cell_id``)."""
    out_dir = Path(out_dir)
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>diffsample sweep</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "figure{display:inline-block;margin:6px}figcaption{font-size:11px;max-width:360px}"
             "img{image-rendering:pixelated}</style></head><body>",
             f"<h1>diffsample sweep: {esc(str(out_dir.name))}</h1>"]
    if note:
        parts.append(f"<p><strong>{esc(note)}</strong></p>")
    for (metric, n_samples), lines in sections(rows).items():
        value = headline(metric)
        nfes = sorted({r["nfe"] for members in lines.values() for r in members})
        parts.append(f"<h2>{esc(value)} (metric {esc(metric)}, N={n_samples})</h2><table><tr><th>configuration</th>"
                     + "".join(f"<th>NFE {n}</th>" for n in nfes) + "</tr>")
        for name, members in lines.items():
            vals = {r["nfe"]: r[value] for r in members}
            parts.append(f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{_fmt(vals.get(n))}</td>" for n in nfes) + "</tr>")
        parts.append("</table>")
    best = best_per_nfe(rows)
    if best:
        parts.append("<h2>Best configuration per NFE</h2><table><tr><th>metric</th><th>N</th><th>NFE</th>"
                     "<th>configuration</th><th>value</th><th>class_accuracy</th><th>wall_time_s</th></tr>")
        for b in best:
            parts.append(f"<tr><td>{esc(b['metric'])}</td><td>{b['n']}</td><td>{b['nfe']}</td><td>{esc(b['label'])}</td>"
                         f"<td>{_fmt(b['value'])}</td><td>{_fmt(b['class_accuracy'])}</td>"
                         f"<td>{_fmt(b['wall_time_s'])}</td></tr>")
        parts.append("</table>")
    for title, name in (("Metric vs NFE", "fd_vs_nfe.png"), ("X/Y grid (rows: configuration, columns: NFE)",
                                                             "xy_grid.png")):
        if (out_dir / name).is_file():
            parts.append(f"<h2>{title}</h2><img alt='{name}' src='data:image/png;base64,{_b64(out_dir / name)}'>")
    parts.append("<h2>Cells</h2>")
    for (metric, n_samples), lines in sections(rows).items():
        for name, members in lines.items():
            for r in sorted(members, key=lambda r: r["nfe"]):
                image = out_dir / r["image"] if r.get("image") else None
                if image is None or not image.is_file():
                    continue
                parts.append(f"<figure data-cell='{esc(str(r.get('cell_id', '')))}'><img alt='{esc(r['image'])}' "
                             f"src='data:image/png;base64,{_b64(image)}' width='{min(360, 48 * 8)}'>"
                             f"<figcaption>{esc(name)}, NFE {r['nfe']}, N={n_samples}, "
                             f"{esc(headline(metric))}={_fmt(r[headline(metric)])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
