"""``diffsample generate --model PIPELINE_FOLDER --prompt ...`` on a tiny SD pipeline saved offline."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from diffsample.cli.main import main  # noqa: E402
from diffsample.testbed import tiny_pipelines as tp  # noqa: E402


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tp.build("sd").save_pretrained(folder, safe_serialization=True)
    return folder


def _generate(folder, out, *extra):
    return CliRunner().invoke(main, ["generate", "--model", str(folder), "--prompt", "a red fox", "--steps", "3",
                                     "--num-samples", "2", "--out", str(out), "-q", *extra])


def test_generate_from_a_pipeline_folder(sd_folder, tmp_path):
    result = _generate(sd_folder, tmp_path / "a", "--cfg-scale", "4", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["prompt"] == "a red fox" and record["pipeline"] == "StableDiffusionPipeline"
    assert record["nfe"] == 3 and record["model_evals"] == 6  # CFG doubles
    assert len(list((tmp_path / "a").glob("sample_*.png"))) == 2
    # same seeds, other batch size: same images
    again = _generate(sd_folder, tmp_path / "b", "--cfg-scale", "4", "--batch-size", "2")
    assert again.exit_code == 0, again.output
    from PIL import Image
    import numpy as np

    for name in ("sample_00000_seed0.png", "sample_00001_seed1.png"):
        a = np.asarray(Image.open(tmp_path / "a" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1


def test_pipeline_folder_needs_a_prompt(sd_folder, tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", str(sd_folder), "--steps", "2", "--out",
                                       str(tmp_path / "c"), "-q"])
    assert result.exit_code == 2 and "give --prompt" in result.output
    assert not (tmp_path / "c").exists()


def test_python_generate_with_prompt(sd_folder):
    from diffsample import generate

    result = generate(str(sd_folder), prompt="a red fox", steps=2, num_samples=1, solver="unipc_bh2")
    assert result.images.shape == (1, 3, 16, 16) and torch.isfinite(result.images).all()
    assert result.record["nfe"] == 2
