"""The distilled students on the command line: selectable by name, their own sampler when none is
given, `list models`, and bad input (steps off the student's grid, a missing or non-safetensors
weight file) ending in one line, exit code 2 and nothing written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from diffsample.cli.main import main
from diffsample.testbed import BUNDLED_INFO
from diffsample.testbed.mnist import students


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_list_models_names_each_bundled_model_with_its_default_sampler():
    result = run("list", "models")
    assert result.exit_code == 0, result.output
    for name, info in BUNDLED_INFO.items():
        unit = "step" if info.steps == 1 else "steps"
        assert f"  {name:<18s} {info.solver} / {info.schedule} / {info.steps} {unit}; " in result.output
    assert "mnist-pd-4         ddim / trailing / 4 steps" in result.output
    assert "mnist-mfd-1        ddim / trailing / 1 step;" in result.output
    assert "mnist              dpmpp_2m / trailing / 20 steps" in result.output
    one = run("list", "mnist-decoupled-2")
    assert one.exit_code == 0 and "CFG: off by default" in one.output
    assert "models:" in run("list").output


def test_generate_student_without_steps_uses_its_own_sampler(tmp_path):
    out = tmp_path / "o"
    result = run("generate", "--model", "mnist-pd-4", "--num-samples", "4", "-q", "--out", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert (record["model"], record["solver"], record["schedule"], record["steps"]) == ("mnist-pd-4", "ddim",
                                                                                       "trailing", 4)
    assert record["nfe"] == 4 and record["model_evals"] == 4
    cfg = run("generate", "--model", "mnist-decoupled-2", "--num-samples", "2", "--cfg-scale", "1.5", "-q", "--out",
              str(tmp_path / "c"))
    assert cfg.exit_code == 0, cfg.output
    record = json.loads((tmp_path / "c" / "run.json").read_text())
    assert record["steps"] == 2 and record["model_evals"] == 4  # CFG: two rows per call


def test_teacher_defaults_are_unchanged(tmp_path):
    result = run("generate", "--num-samples", "1", "-q", "--out", str(tmp_path / "t"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "t" / "run.json").read_text())
    assert (record["solver"], record["schedule"], record["steps"]) == ("dpmpp_2m", "trailing", 20)


@pytest.mark.parametrize("args, message", [
    (["--steps", "3"], "model 'mnist-pd-4' is a 4-step student distilled at t = [999, 749, 499, 249]; this run's "
                       "grid asks for t = [666.0, 332.0], which its grid cannot give; valid: --schedule trailing "
                       "with --steps 1 or 2 or 4"),
    (["--steps", "4", "--schedule", "leading"], "which its grid cannot give"),
])
def test_steps_off_the_students_grid_exit_2_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "o"
    result = run("generate", "--model", "mnist-pd-4", "--num-samples", "2", "-q", "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("content, why", [(None, "is missing"),
                                          (b"\x00" * 64, "is not a readable safetensors file")])
def test_missing_or_bad_student_weights_exit_2_and_write_nothing(tmp_path, monkeypatch, content, why):
    monkeypatch.setattr(students, "STUDENT_DIR", tmp_path / "weights")
    (tmp_path / "weights").mkdir()
    if content is not None:
        (tmp_path / "weights" / "mnist-mfd-1.safetensors").write_bytes(content)
    out = tmp_path / "o"
    result = run("generate", "--model", "mnist-mfd-1", "--num-samples", "2", "-q", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"bundled model 'mnist-mfd-1': student weights" in result.output and why in result.output
    assert result.output.count("\n") == 1
    assert not out.exists()
