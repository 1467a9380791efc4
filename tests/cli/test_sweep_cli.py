"""``diffsample sweep`` on a pipeline folder with prompts, and bad input that writes nothing."""

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

from diffsample.cli.main import main  # noqa: E402
from diffsample.testbed import tiny_pipelines as tp  # noqa: E402


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tp.build("sd").save_pretrained(folder, safe_serialization=True)
    return folder


def test_pipeline_sweep_over_a_prompt_list(sd_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n# a comment\n\na blue car\n")
    out = tmp_path / "s"
    result = run("sweep", "--model", sd_folder, "--prompts-file", prompts, "--prompt", "a cat", "--solver", "ddim",
                 "--steps", "2,3", "--num-samples", "2", "--batch-size", "2", "--metric", "none", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in rows] == [2, 3] and [r["nfe"] for r in rows] == [2, 3]
    assert all(r["prompts"] == ["a cat", "a red fox", "a blue car"] for r in rows)
    from PIL import Image

    with Image.open(out / rows[0]["image"]) as im:  # the first 8 of 2 seeds x 3 prompts = 6 images, 16 px each
        assert im.size == (6 * 16 * 3, 16 * 3)
    assert "wall_time_s (N=2)" in (out / "results.md").read_text() and (out / "report.html").is_file()


@pytest.mark.parametrize("args, fragment", [
    (["--metric", "clip-score"], "--clip-weights"),
    (["--metric", "clip-score", "--clip-weights", "/nonexistent/clip"], "/nonexistent/clip"),
    (["--metric", "fid"], "give --fid-weights PATH"),
    ([], "give --prompt"),
])
def test_bad_pipeline_sweeps_write_nothing(sd_folder, tmp_path, args, fragment):
    prompt = ["--prompt", "a red fox"] if args else []
    result = run("sweep", "--model", sd_folder, *prompt, "--steps", "2", "--num-samples", "2", *args,
                 "--out", tmp_path / "s", "-q")
    assert result.exit_code == 2, result.output
    assert fragment in result.output and not (tmp_path / "s").exists()


def test_prompt_for_the_mnist_model_is_refused(tmp_path):
    result = run("sweep", "--prompt", "a cat", "--steps", "2", "--num-samples", "2", "--out", tmp_path / "s", "-q")
    assert result.exit_code == 2 and "need a text-to-image pipeline" in result.output
    assert not (tmp_path / "s").exists()
