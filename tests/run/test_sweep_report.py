"""Sweep folders: cells keyed by what changes the result (N, batch size of batch-coupled methods,
prompts), best configuration per NFE, the X/Y grid and a self-contained report.html that holds
every cell's image."""

import base64
import json
from html.parser import HTMLParser

import pytest
from PIL import Image

from diffsample.run import sweep
from diffsample.run.models import load_model
from diffsample.run.sweep_report import best_per_nfe, best_table, markdown_table

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mnist():
    return load_model("mnist")


def _sweep(model, out, **kw):
    args = dict(solvers=["euler", "dpmpp_2m"], schedules=["karras"], steps=[2, 3], num_samples=4, batch_size=4,
                log=lambda s: None)
    args.update(kw)
    rows = sweep.run_sweep(model, out, **args)
    sweep.write_summaries(out)
    return rows


class _Report(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.images, self._cell = {}, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self._cell = attrs.get("data-cell")
        if tag == "img":
            self.images.append(attrs["src"])
            if self._cell is not None:
                self.cells[self._cell] = attrs["src"]

    def handle_endtag(self, tag):
        if tag == "figure":
            self._cell = None


def test_report_html_holds_every_cell_image_and_is_self_contained(mnist, tmp_path):
    out = tmp_path / "s"
    rows = _sweep(mnist, out)
    assert len(rows) == 4
    parser = _Report()
    text = (out / "report.html").read_text()
    parser.feed(text)
    assert set(parser.cells) == {r["cell_id"] for r in rows}
    for src in parser.images:  # every image embedded: no file, no server needed
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    assert len(parser.images) == len(rows) + 2  # + fd_vs_nfe.png and xy_grid.png
    for r in rows:  # the cell image is the first seeds of that cell, 8 px... upscaled strip of 4 images
        with Image.open(out / r["image"]) as im:
            assert im.size == (4 * 16 * 3, 16 * 3)
        assert base64.b64decode(parser.cells[r["cell_id"]].split(",", 1)[1]) == (out / r["image"]).read_bytes()
    with Image.open(out / "xy_grid.png") as im:
        assert im.size[0] > im.size[1] > 0
    assert "<script" not in text and "http" not in text


def test_rerun_with_another_n_adds_cells_and_never_mislabels(mnist, tmp_path):
    out = tmp_path / "s"
    small = _sweep(mnist, out, solvers=["euler"], steps=[3], num_samples=4)
    large = _sweep(mnist, out, solvers=["euler"], steps=[3], num_samples=6)
    rows = sweep.read_results(out)
    assert len(rows) == 2 and {r["num_samples"] for r in rows} == {4, 6}
    assert small[0]["mnist_fd"] != large[0]["mnist_fd"]
    table = (out / "results.md").read_text()
    assert f"| mnist_fd (N=4) | NFE 3 |\n|---|---|\n| euler / karras | {small[0]['mnist_fd']:.2f} |" in table
    assert f"| mnist_fd (N=6) | NFE 3 |\n|---|---|\n| euler / karras | {large[0]['mnist_fd']:.2f} |" in table
    # the first 4 samples of N=6 are those of N=4 (per-sample seeds); the cells stay apart
    assert small[0]["cell_id"] != large[0]["cell_id"]
    again = _sweep(mnist, out, solvers=["euler"], steps=[3], num_samples=4)  # resumed, not rerun
    assert again == small and len(sweep.read_results(out)) == 2


def test_batch_size_is_part_of_the_key_only_for_batch_coupled_methods():
    base = {"model": "mnist", "solver": "euler", "schedule": "karras", "steps": 2, "guidance": [], "cfg_scale": None,
            "num_samples": 8, "seed": 0, "metric": "none"}
    assert sweep.cell_key({**base, "batch_size": 2}) == sweep.cell_key({**base, "batch_size": 8})
    coupled = {**base, "batch_coupled": True}
    assert sweep.cell_key({**coupled, "batch_size": 2}) != sweep.cell_key({**coupled, "batch_size": 8})
    assert sweep.cell_key({**base, "prompts": ["a"]}) != sweep.cell_key({**base, "prompts": ["b"]})


def test_best_configuration_per_nfe_with_accuracy_and_wall_time():
    base = {"model": "mnist", "schedule": "karras", "guidance": [], "cfg_scale": None, "seed": 0,
            "metric": "mnist-fd", "num_samples": 8}
    rows = [{**base, "solver": "euler", "steps": 2, "nfe": 2, "mnist_fd": 50.0, "class_accuracy": 0.5, "wall_time_s": 1.0},
            {**base, "solver": "heun", "steps": 1, "nfe": 2, "mnist_fd": 40.0, "class_accuracy": 0.7, "wall_time_s": 2.0},
            {**base, "solver": "euler", "steps": 4, "nfe": 4, "mnist_fd": 30.0, "class_accuracy": 0.8, "wall_time_s": 3.0},
            {**base, "solver": "euler", "steps": 4, "nfe": 4, "num_samples": 16, "mnist_fd": 1.0,
             "class_accuracy": 1.0, "wall_time_s": 9.0}]
    best = best_per_nfe(rows)
    assert [(b["n"], b["nfe"], b["label"], b["value"]) for b in best] == [
        (8, 2, "heun / karras", 40.0), (8, 4, "euler / karras", 30.0), (16, 4, "euler / karras", 1.0)]
    text = best_table(rows)
    assert "| NFE | configuration | mnist_fd | class_accuracy | wall_time_s |" in text
    assert "| 2 | heun / karras | 40.00 | 0.70 | 2.00 |" in text and "N=16" in text
    # rewards: higher is better
    reward = [{**r, "metric": "reward:ink", "reward_mean": r["mnist_fd"]} for r in rows[:2]]
    assert best_per_nfe(reward)[0]["label"] == "euler / karras"
    assert markdown_table(reward).startswith("| reward_mean (N=8) | NFE 2 |")


def test_reward_metric_and_bad_metrics_write_nothing(mnist, tmp_path):
    rows = _sweep(mnist, tmp_path / "r", solvers=["euler"], steps=[2], metric="reward:ink")
    assert 0 <= rows[0]["reward_mean"] <= 1 and rows[0]["metric"] == "reward:ink"
    for metric, message in [("fd", "unknown metric 'fd'; valid: mnist-fd, none, reward:SPEC, clip-score, fid"),
                            ("fid", "give --fid-weights PATH"),
                            ("reward:nope", "nope"), ("clip-score", "--clip-weights")]:
        with pytest.raises(ValueError, match=message):
            sweep.run_sweep(mnist, tmp_path / "bad", solvers=["euler"], schedules=["karras"], steps=[2], metric=metric)
    with pytest.raises(ValueError, match="need a text-to-image pipeline"):
        sweep.run_sweep(mnist, tmp_path / "bad", solvers=["euler"], schedules=["karras"], steps=[2], prompts=["a"])
    assert not (tmp_path / "bad").exists()


def test_interrupted_sweep_keeps_finished_cells_and_says_how_to_resume(mnist, tmp_path, monkeypatch):
    out = tmp_path / "s"
    real, calls = sweep.generate, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(sweep, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        _sweep(mnist, out, solvers=["euler"], steps=[2, 3])
    sweep.write_summaries(out, interrupted=True)
    assert len(sweep.read_results(out)) == 1
    assert sweep.RESUME_LINE in (out / "results.md").read_text()
    assert sweep.RESUME_LINE in (out / "report.html").read_text()
    monkeypatch.setattr(sweep, "generate", real)
    rows = _sweep(mnist, out, solvers=["euler"], steps=[2, 3])
    assert [r["steps"] for r in rows] == [2, 3] and len(sweep.read_results(out)) == 2
    assert sweep.RESUME_LINE not in (out / "results.md").read_text()
    assert json.loads((out / "results.jsonl").read_text().splitlines()[0]) == rows[0]
