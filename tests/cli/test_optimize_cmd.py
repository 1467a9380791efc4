"""``diffsample optimize-schedule`` and ``--schedule FILE.json``: the file it writes, the summary line,
and one-line refusals with exit code 2 and nothing written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from diffsample.cli.main import main

SMALL = ["--num-samples", "4", "--fine-steps", "6", "--teacher-substeps", "1", "-q"]


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def schedule_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("opt") / "s.json"
    result = CliRunner().invoke(main, ["optimize-schedule", "--model", "mnist", "--solver", "dpmpp_2m", "--steps", "3",
                                       "--method", "gits", *SMALL[:-1], "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_writes_a_loadable_file_and_one_summary_line(schedule_file):
    out, output = schedule_file
    data = json.loads(out.read_text())
    assert data["model"] == "mnist" and data["solver"] == "dpmpp_2m" and data["steps"] == 3
    assert data["method"] == "gits" and len(data["t"]) == 3 and data["t"][0] == 999.0
    assert data["command"].startswith("diffsample optimize-schedule")
    assert "gits dpmpp_2m steps=3: endpoint RMSE vs teacher best built-in" in output


def test_generate_and_sweep_take_the_file(schedule_file, tmp_path):
    out, _ = schedule_file
    gen = tmp_path / "g"
    result = run("generate", "--solver", "dpmpp_2m", "--steps", "3", "--schedule", str(out), "--num-samples", "2",
                 "--out", str(gen), "-q")
    assert result.exit_code == 0, result.output
    record = json.loads((gen / "run.json").read_text())
    assert record["schedule"] == f"file:path={out}" and record["nfe"] == 3
    sw = tmp_path / "sw"
    result = run("sweep", "--solver", "dpmpp_2m", "--schedule", str(out), "--steps", "3", "--num-samples", "2",
                 "--metric", "none", "--out", str(sw), "-q")
    assert result.exit_code == 0, result.output
    row = json.loads((sw / "results.jsonl").read_text().splitlines()[0])
    assert row["schedule"] == f"file:path={out}" and row["nfe"] == 3


def test_a_file_for_another_solver_warns_and_names_the_mismatch(schedule_file, tmp_path):
    out, _ = schedule_file
    result = run("generate", "--solver", "unipc_bh2", "--steps", "3", "--schedule", str(out), "--num-samples", "2",
                 "--out", str(tmp_path / "g"), "-q")
    assert result.exit_code == 0, result.output
    assert "optimised for solver 'dpmpp_2m', used with 'unipc_bh2'" in result.output


@pytest.mark.parametrize("args, match", [
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--steps", "3", "--method", "ays"], "unknown --method 'ays'; valid: gits, ld3"),
    (["--steps", "3", "--solver", "euler_ancestral"], "stochastic"),
    (["--steps", "3", "--solver", "nope"], "unknown solver 'nope'"),
    (["--steps", "3", "--pool", "4"], "--pool (4) must be larger than --num-samples"),
    (["--steps", "3", "--method", "gits", "--decoupled"], "--decoupled needs --method ld3"),
    (["--steps", "3", "--decoupled-evals", "5"], "--decoupled-evals needs --decoupled"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, match):
    out = tmp_path / "s.json"
    result = run("optimize-schedule", *args, *SMALL, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert match in result.output and not out.exists()


def test_existing_out_needs_overwrite_and_is_kept(tmp_path):
    out = tmp_path / "s.json"
    out.write_text("keep")
    result = run("optimize-schedule", "--steps", "2", *SMALL, "--out", str(out))
    assert result.exit_code == 2 and "--overwrite" in result.output and out.read_text() == "keep"


@pytest.mark.parametrize("content, match", [
    ("{", "not valid JSON"),
    ('{"format": "diffsample.step_schedule", "model": "mnist", "solver": "dpmpp_2m", "method": "gits", '
     '"objective": 1, "t": [999, 500, 800]}', "not strictly decreasing"),
])
def test_malformed_schedule_file_exits_2(tmp_path, content, match):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    gen = tmp_path / "g"
    result = run("generate", "--steps", "3", "--schedule", str(bad), "--out", str(gen))
    assert result.exit_code == 2 and match in result.output and not gen.exists()


def test_fixed_start_keeps_t_max(tmp_path):
    out = tmp_path / "f.json"
    result = run("optimize-schedule", "--model", "mnist", "--solver", "dpmpp_2m", "--steps", "2", "--method", "ld3",
                 "--max-evals", "6", "--fixed-start", *SMALL, "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["t"][0] == 999.0 and data["ld3_free_start"] is False


def test_the_mismatch_line_is_printed_once(schedule_file, tmp_path):
    # A real process (pytest records warnings instead of printing them, which hid the duplicate:
    # the Python warning on stderr and the CLI's note line both printed it).
    import subprocess
    import sys

    out, _ = schedule_file
    proc = subprocess.run([sys.executable, "-c", "from diffsample.cli.main import main; main()", "generate",
                           "--solver", "unipc_bh2", "--steps", "3", "--schedule", str(out), "--num-samples", "1",
                           "--out", str(tmp_path / "g"), "-q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = "optimised for solver 'dpmpp_2m', used with 'unipc_bh2'"
    assert (proc.stdout + proc.stderr).count(line) == 1, proc.stdout + proc.stderr


def test_generate_takes_steps_and_solver_from_the_file_when_not_given(schedule_file, tmp_path):
    out, _ = schedule_file  # made for dpmpp_2m, 3 steps; the model's defaults are 20 steps
    gen = tmp_path / "g"
    result = run("generate", "--schedule", str(out), "--num-samples", "2", "--out", str(gen), "-q")
    assert result.exit_code == 0, result.output
    record = json.loads((gen / "run.json").read_text())
    assert record["steps"] == 3 and record["nfe"] == 3 and record["solver"] == "dpmpp_2m"
    assert "optimised for" not in result.output  # no mismatch: the file's own solver was used
    # A step count given on the command line still wins, and is refused in one line when it does not fit.
    result = run("generate", "--schedule", str(out), "--steps", "5", "--num-samples", "2", "--out",
                 str(tmp_path / "h"), "-q")
    assert result.exit_code == 2 and "run with steps=3" in result.output and not (tmp_path / "h").exists()


def test_decoupled_writes_model_times_that_generate_uses(tmp_path):
    out = tmp_path / "d.json"
    result = run("optimize-schedule", "--model", "mnist", "--solver", "dpmpp_2m", "--steps", "3", "--method", "ld3",
                 "--max-evals", "4", "--decoupled", "--decoupled-evals", "8", "--fixed-start", *SMALL[:-1],
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "ld3 (decoupled model times) dpmpp_2m steps=3" in result.output
    data = json.loads(out.read_text())
    assert data["version"] == 2 and len(data["t_model"]) == 3 and data["t_model"][0] == data["t"][0] == 999.0
    assert "--decoupled" in data["command"] and data["ld3_decoupled_evals"] >= 8
    gen = tmp_path / "g"
    result = run("generate", "--schedule", str(out), "--num-samples", "2", "--out", str(gen), "-q")
    assert result.exit_code == 0, result.output
