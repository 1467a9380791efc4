"""Bad input and failures through the command line: one line on stderr, exit 2 (a user's mistake)
or exit 1 (an internal error; the traceback only with --debug), nothing written; --out checked
before sampling; --overwrite replaces a run as a whole; sweep summaries survive errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from diffsample.cli.main import main
from diffsample.run import publish

SMALL = ["--steps", "2", "--num-samples", "2", "-q"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_user_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    err = lines(result.stderr)
    assert len(err) == 1 and err[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("args, fragments", [
    (["--cfg-scale", "1e30", "--class", "3"], ["not finite at step", "sigma="]),
    (["--guidance", "cfg:scale=1e30"], ["not finite at step", "sigma="]),
    (["--cfg-scale", "inf"], ["--cfg-scale", "not a finite number"]),
    (["--cfg-scale", "1e309"], ["--cfg-scale", "not a finite number"]),
    (["--cfg-scale", "nan"], ["--cfg-scale"]),
    (["--guidance", "cfg:scale=1e309"], []),  # refused as an option value, or non-finite at step 0
    (["--device", "nonsense"], ["--device", "'nonsense'", "valid: cpu"]),
    (["--device", "meta"], ["--device", "'meta'", "valid: cpu"]),
    (["--device", "cuda:99"], ["--device", "valid: cpu"]),
    (["--negative-prompt", "blurry"], ["--negative-prompt needs a text-to-image pipeline", "'mnist'"]),
])
def test_user_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path, args, fragments):
    result = run("generate", *SMALL, "--out", tmp_path / "o", *args)
    assert_user_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_lists_the_valid_devices(tmp_path):
    result = run("generate", *SMALL, "--device", "cuda", "--out", tmp_path / "o")
    assert_user_error(result, "no CUDA device", "valid: cpu")
    assert list(tmp_path.iterdir()) == []


def test_too_many_steps_is_refused_in_a_short_line(tmp_path):
    result = run("generate", *SMALL, "--steps", "100000", "--out", tmp_path / "o")
    line = assert_user_error(result, "grid")
    assert len(line) < 400 and "more" in line
    assert list(tmp_path.iterdir()) == []


def test_class_on_a_text_pipeline_is_refused(tmp_path):
    from diffsample.testbed import tiny_pipelines as tp

    folder = tmp_path / "sd"
    tp.build("sd").save_pretrained(folder, safe_serialization=True)
    result = run("generate", *SMALL, "--model", folder, "--prompt", "a fox", "--class", "3", "--out", tmp_path / "o")
    assert_user_error(result, "--class needs a class-conditional model", "--prompt")
    assert not (tmp_path / "o").exists()


def test_unexpected_error_is_exit_1_one_line_and_traceback_only_with_debug(tmp_path, monkeypatch):
    import diffsample.run.generate as gen

    def broken(*args, **kwargs):
        raise KeyError("internal bookkeeping")

    monkeypatch.setattr(gen, "generate", broken)
    result = run("generate", *SMALL, "--out", tmp_path / "o")
    assert result.exit_code == 1, result.output
    err = lines(result.stderr)
    assert len(err) == 1 and "internal error (KeyError" in err[0] and "--debug" in err[0]
    assert "Traceback" not in result.output
    debug = run("--debug", "generate", *SMALL, "--out", tmp_path / "o")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "KeyError" in debug.stderr
    assert not (tmp_path / "o").exists()


def test_bare_command_prints_the_help_and_help_and_version_exit_0():
    bare = run()
    assert bare.exit_code == 2 and "Usage:" in bare.output and "Commands:" in bare.output
    assert run("--help").exit_code == 0 and run("--version").exit_code == 0
    assert run("sweep", "--help").exit_code == 0


def test_project_error_types_and_usage_errors_are_user_mistakes():
    from diffsample.cli.errors import is_user_error, one_line
    from diffsample.samplers.sampler import NonFiniteError
    from diffsample.solvers.stein import NotDifferentiableError

    assert is_user_error(NonFiniteError("x")) and is_user_error(NotDifferentiableError("x"))
    assert is_user_error(ValueError("x")) and not is_user_error(KeyError("x")) and not is_user_error(OSError("x"))
    assert one_line("a\n  b\tc") == "a b c" and len(one_line("x" * 10_000)) <= 600


# --- --out checks before sampling -------------------------------------------------------------

def test_generate_out_under_a_file_is_refused_before_sampling(tmp_path, monkeypatch):
    import diffsample.run.generate as gen

    calls = []
    monkeypatch.setattr(gen, "generate", lambda *a, **k: calls.append(1))
    exe = tmp_path / "exe"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    result = run("generate", *SMALL, "--out", exe / "sub")
    assert_user_error(result, "--out", f"{str(exe)!r} is a file")
    assert calls == [] and exe.read_text() == "#!/bin/sh\n"


def test_sweep_out_under_a_file_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = run("sweep", "--steps", "2", "--num-samples", "4", "--out", afile / "sub", "-q")
    assert_user_error(result, "--out", "is a file")
    assert afile.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["generate", "sweep"])
def test_read_only_parent_is_refused(tmp_path, command):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        extra = SMALL if command == "generate" else ["--steps", "2", "--num-samples", "4", "-q"]
        result = run(command, *extra, "--out", ro / "sub")
        assert_user_error(result, "--out", "cannot be written")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("name", ["grid.png", "run.json", "sample_00000_seed0.png"])
def test_overwrite_refuses_a_folder_under_an_output_name(tmp_path, name):
    out = tmp_path / "o"
    (out / name).mkdir(parents=True)
    (out / name / "inner.txt").write_text("mine")
    before = snapshot(tmp_path)
    result = run("generate", *SMALL, "--out", out, "--overwrite")
    assert_user_error(result, "--out", repr(name), "not a regular file")
    assert snapshot(tmp_path) == before


def test_sweep_refuses_a_folder_named_results_md(tmp_path):
    out = tmp_path / "s"
    (out / "results.md").mkdir(parents=True)
    result = run("sweep", "--steps", "2", "--num-samples", "4", "--out", out, "-q")
    assert_user_error(result, "'results.md'", "not a regular file")
    assert sorted(p.name for p in out.iterdir()) == ["results.md"]


# --- atomic publish ---------------------------------------------------------------------------

def test_overwrite_replaces_the_whole_old_run_and_keeps_other_files(tmp_path):
    out = tmp_path / "o"
    assert run("generate", "--steps", "2", "--num-samples", "4", "-q", "--out", out).exit_code == 0
    (out / "keep.txt").write_text("precious")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("more")
    old_record = json.loads((out / "run.json").read_text())
    result = run("generate", *SMALL, "--seed", "10", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "keep.txt", "notes", "run.json", "sample_00000_seed10.png", "sample_00001_seed11.png"]
    assert (out / "keep.txt").read_text() == "precious" and (out / "notes" / "a.txt").read_text() == "more"
    record = json.loads((out / "run.json").read_text())
    assert record["seeds"] == [10, 11] and old_record["seeds"] == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no staging or aside folder left


@pytest.mark.parametrize("no_exchange", [False, True])
def test_publish_swaps_a_whole_folder(tmp_path, monkeypatch, no_exchange):
    if no_exchange:
        monkeypatch.setenv(publish.NO_EXCHANGE_ENV, "1")
    out = tmp_path / "o"
    out.mkdir()
    for name, text in (("run.json", "old"), ("grid.png", "old"), ("sample_00007_seed7.png", "old"), ("mine.txt", "x")):
        (out / name).write_text(text)
    staging = publish.make_staging(out)
    assert staging.parent == tmp_path and staging.name.startswith(".o.diffsample-staging-")
    (staging / "run.json").write_text("new")
    (staging / "grid.png").write_text("new")
    publish.publish(staging, out)
    assert snapshot(out) == {"run.json": b"new", "grid.png": b"new", "mine.txt": b"x"}
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_publish_into_a_new_folder_is_one_rename(tmp_path):
    out = tmp_path / "a" / "b"
    staging = publish.make_staging(out)
    (staging / "run.json").write_text("new")
    publish.publish(staging, out)
    assert snapshot(tmp_path / "a") == {"b/run.json": b"new"}
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0o700


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_a_killed_run_is_cleaned_on_the_next_start(tmp_path):
    out = tmp_path / "o"
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".o.diffsample-staging-{dead}-0badc0de"
    stale.mkdir()
    (stale / "sample_00000_seed0.png").write_bytes(b"half")
    busy = tmp_path / f".o.diffsample-staging-{alive}-0123abcd"  # a run still going: left alone
    busy.mkdir()
    result = run("generate", *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    assert "removed .o.diffsample-staging-" in result.stderr and "killed" in result.stderr
    assert not stale.exists() and busy.exists()
    assert sorted(p.name for p in out.iterdir())[:2] == ["grid.png", "run.json"]


def test_an_interrupted_two_rename_swap_is_restored(tmp_path):
    out = tmp_path / "o"
    aside = tmp_path / f".o.diffsample-old-{_dead_pid()}-00c0ffee"
    aside.mkdir()
    (aside / "run.json").write_text("old")
    notes = publish.recover(out)
    assert len(notes) == 1 and "restored" in notes[0]
    assert snapshot(tmp_path) == {"o/run.json": b"old"}
    # once --out exists again, an aside folder is the replaced run: removed
    aside.mkdir()
    (aside / "run.json").write_text("older")
    publish.recover(out)
    assert snapshot(tmp_path) == {"o/run.json": b"old"}


# --- sweeps -----------------------------------------------------------------------------------

SWEEP = ["sweep", "--solver", "euler", "--steps", "2", "--num-samples", "8", "--batch-size", "8", "-q"]


def test_sweep_skips_lines_that_are_not_rows_and_keeps_metrics_apart(tmp_path):
    out = tmp_path / "s"
    assert run(*SWEEP, "--out", out).exit_code == 0
    legacy = json.loads((out / "results.jsonl").read_text())
    del legacy["metric"]  # rows written before the field existed: the metric is read from the scores
    (out / "results.jsonl").write_text(json.dumps(legacy) + '\n[]\n{"a": 1}\n{"model": "mnist"}\n')
    result = run(*SWEEP, "--metric", "none", "--out", out)
    assert result.exit_code == 0, result.output
    assert "skipped 3 line(s)" in result.stderr and "line 2, 3, 4" in result.stderr
    result = run(*SWEEP, "--steps", "2,3", "--out", out)  # the folder now mixes metrics: still fine
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if isinstance(r, dict) and "nfe" in r]
    assert sorted((r.get("metric", "legacy"), r["steps"]) for r in rows) == [("legacy", 2), ("mnist-fd", 3), ("none", 2)]
    # the legacy mnist-fd cell (steps 2) was resumed, not rerun
    table = (out / "results.md").read_text()
    assert "| mnist_fd (N=8) | NFE 2 | NFE 3 |" in table and "| wall_time_s (N=8) | NFE 2 |" in table


def test_sweep_keeps_cells_of_another_n_in_their_own_table():
    from diffsample.run.sweep import markdown_table

    base = {"model": "mnist", "solver": "euler", "schedule": "karras", "guidance": [], "cfg_scale": None,
            "seed": 0, "metric": "mnist-fd"}
    rows = [{**base, "steps": 2, "nfe": 2, "num_samples": 8, "mnist_fd": 100.0},
            {**base, "steps": 2, "nfe": 2, "num_samples": 1000, "mnist_fd": 10.0},
            {**base, "steps": 2, "nfe": 2, "num_samples": 8, "metric": "none", "wall_time_s": 0.5}]
    table = markdown_table(rows)
    assert table.count("| euler / karras |") == 3
    assert "| mnist_fd (N=8) | NFE 2 |\n|---|---|\n| euler / karras | 100.00 |" in table
    assert "| mnist_fd (N=1000) | NFE 2 |\n|---|---|\n| euler / karras | 10.00 |" in table
    assert "| wall_time_s (N=8) | NFE 2 |\n|---|---|\n| euler / karras | 0.50 |" in table


def test_sweep_writes_results_md_when_a_cell_fails(tmp_path):
    out = tmp_path / "s"
    result = run(*SWEEP, "--guidance", "none", "--guidance", "cfg:scale=1e30", "--out", out)
    assert_user_error(result, "not finite at step", "sigma=")
    assert len((out / "results.jsonl").read_text().splitlines()) == 1  # the finished cell is kept
    assert "| euler / karras |" in (out / "results.md").read_text() and (out / "fd_vs_nfe.png").stat().st_size
    assert sorted(p.name for p in out.iterdir()) == ["cells", "fd_vs_nfe.png", "report.html", "results.jsonl", "results.md",
                                                    "xy_grid.png"]


def test_non_finite_reward_gradient_names_step_and_sigma():
    """A reward whose value is finite but whose gradient is NaN (sqrt at 0) is refused at the first
    stochastic step, naming it and its sigma (not only the whitening's row)."""
    from diffsample.guidance import GUIDANCE
    from diffsample.guidance.composition import compose
    from diffsample.run.generate import build_sampler
    from diffsample.run.models import load_model
    from diffsample.samplers.seeds import seeded_run

    model = load_model()
    reward = lambda x0: (x0.abs() * 0).sqrt().flatten(1).sum(1)  # noqa: E731
    guided = compose(model.denoiser, [GUIDANCE.create("noisetilt", reward=reward, resources=model.resources)])
    sampler = build_sampler("euler_ancestral", "karras", 3)
    with pytest.raises(ValueError, match=r"reward gradient is not finite at step 0 \(sigma=0\.99998\) for samples \[0, 1\]"):
        sampler(guided, cond=model.cond(torch.tensor([1, 2])), **seeded_run([0, 1], model.sample_shape))
