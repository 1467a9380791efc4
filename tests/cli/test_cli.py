"""CLI through click's CliRunner on the bundled MNIST model at small sizes."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffsample.cli.main import main

SMALL = ["--steps", "3", "--num-samples", "4", "-q"]


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_list_prints_every_registry_entry():
    from diffsample.guidance import GUIDANCE
    from diffsample.solvers import SOLVERS, STEP_SCHEDULES

    result = run("list")
    assert result.exit_code == 0
    for name in [*SOLVERS.names(), *STEP_SCHEDULES.names(), *GUIDANCE.names()]:
        assert f"  {name} " in result.output


def test_help_is_readable():
    result = run("generate", "--help")
    assert result.exit_code == 0 and "--solver" in result.output and "--overwrite" in result.output


def test_generate_writes_pngs_grid_and_record(tmp_path):
    out = tmp_path / "o"
    result = run("generate", *SMALL, "--out", str(out), "--solver", "unipc_bh2", "--seed", "7")
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["grid.png", "run.json", *(f"sample_{k:05d}_seed{7 + k}.png" for k in range(4))]
    record = json.loads((out / "run.json").read_text())
    assert record["nfe"] == 3 and record["model_evals"] == 3 and record["solver"] == "unipc_bh2"
    assert record["seeds"] == [7, 8, 9, 10] and record["classes"] == [0, 1, 2, 3]
    assert {"torch", "diffusers", "diffsample"} <= set(record["versions"])
    meta = json.loads(Image.open(out / "sample_00001_seed8.png").text["diffsample"])
    assert meta["solver"] == "unipc_bh2" and meta["seed"] == 8 and meta["class"] == 1 and meta["model"] == "mnist"
    assert "seed: 8" in Image.open(out / "sample_00001_seed8.png").text["parameters"]
    assert Image.open(out / "sample_00000_seed7.png").size == (16, 16)


def test_same_seed_gives_byte_identical_pngs(tmp_path):
    for name in "ab":
        assert run("generate", *SMALL, "--out", str(tmp_path / name)).exit_code == 0
    for k in range(4):
        f = f"sample_{k:05d}_seed{k}.png"
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_same_image_whatever_the_batch_size(tmp_path):
    assert run("generate", *SMALL, "--batch-size", "4", "--out", str(tmp_path / "b4")).exit_code == 0
    assert run("generate", *SMALL, "--batch-size", "1", "--out", str(tmp_path / "b1")).exit_code == 0
    for k in range(4):
        f = f"sample_{k:05d}_seed{k}.png"
        a = np.asarray(Image.open(tmp_path / "b4" / f), dtype=int)
        b = np.asarray(Image.open(tmp_path / "b1" / f), dtype=int)
        assert np.abs(a - b).max() <= 1


def test_cfg_scale_doubles_model_evals(tmp_path):
    result = run("generate", *SMALL, "--cfg-scale", "2", "--class", "3", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["nfe"] == 3 and record["model_evals"] == 6 and record["classes"] == [3, 3, 3, 3]


@pytest.mark.parametrize("args, message", [
    (["--solver", "nope"], "unknown solver 'nope'; valid: euler"),
    (["--schedule", "nope"], "unknown step schedule 'nope'; valid: karras"),
    (["--guidance", "nope"], "unknown guidance 'nope'; valid: none"),
    (["--model", "does/not/exist"], "not found"),
    (["--steps", "0"], "--steps"),
    (["--num-samples", "-1"], "--num-samples"),
    (["--seed", "-3"], "--seed"),
    (["--class", "10"], "class 10 is outside 0..9"),
    (["--class", "-1"], "class -1 is outside 0..9"),
    (["--solver", "dpmpp_2m:order=7"], "order must be 1, 2 or 3, got 7"),
    (["--solver", "euler:bogus=1"], "unknown option 'bogus' for solver 'euler'; valid: eta=0.0"),
    (["--prompt", "a cat"], "--prompt needs a text-to-image pipeline"),
    (["--solver", "heun", "--guidance", "noisetilt"], "deterministic with no stochastic variant; use one of: "
                                                      "euler_ancestral"),
    (["--solver", "unipc_bh2", "--guidance", "svdd"], "deterministic with no stochastic variant"),
    (["--cfg-scale", "7", "--guidance", "cfg"], "--cfg-scale and guidance 'cfg' both set the CFG scale"),
    (["--solver", "euler_ancestral", "--guidance", "noisetilt:strength=1.5"], "strength must be in [0, 1], got 1.5"),
    (["--solver", "euler_ancestral", "--guidance", "svdd:k=0"], "particles (K) must be an integer >= 1, got 0"),
    (["--solver", "euler_ancestral", "--guidance", "best_of_n:n=0"], "N must be an integer >= 1, got 0"),
    (["--solver", "euler_ancestral", "--guidance", "dps:reward=nope"], "unknown reward 'nope'; valid: class_logp"),
    (["--solver", "euler_ancestral", "--guidance", "dps:reward=aesthetic:clip=/no/clip;head=/no/h.safetensors"],
     "/no/h.safetensors"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "o"
    result = run("generate", *SMALL, "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_main_job_with_noisetilt_records_backward_passes(tmp_path):
    result = run("generate", *SMALL, "--solver", "stein-dpm:eta=1", "--guidance", "noisetilt", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    steps = record["nfe"]
    # 1 forward + 1 backward (2) per step, + 2 per Stein probe on the corrected first step (5 probes)
    assert record["model_evals"] == 3 * steps + 10
    assert record["events"]["backward_rows"] == steps * record["num_samples"]


def test_headline_command_as_typed_switches_stein_to_its_stochastic_variant(tmp_path):
    """`diffsample generate --solver stein-dpm --guidance noisetilt` works as typed: NoiseTilt acts on
    the noise of stochastic steps, so stein-dpm runs with eta=1, says so in one line, and records it;
    the samples equal an explicit `stein-dpm:eta=1` run."""
    from PIL import Image

    typed = run("generate", *SMALL, "--solver", "stein-dpm", "--guidance", "noisetilt", "--out", str(tmp_path / "a"))
    assert typed.exit_code == 0, typed.output
    assert "runs as its stochastic variant 'stein-dpm:eta=1.0'" in typed.output
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["solver"] == "stein-dpm:eta=1.0" and record["solver_requested"] == "stein-dpm"
    meta = json.loads(Image.open(tmp_path / "a" / "sample_00000_seed0.png").text["diffsample"])
    assert meta["solver"] == "stein-dpm:eta=1.0" and meta["guidance"] == ["noisetilt"]
    explicit = run("generate", *SMALL, "--solver", "stein-dpm:eta=1", "--guidance", "noisetilt", "--out",
                   str(tmp_path / "b"))
    assert explicit.exit_code == 0 and "stochastic variant" not in explicit.output
    for name in ("sample_00000_seed0.png", "sample_00001_seed1.png"):
        assert (tmp_path / "a" / name).read_bytes() != b"" and \
            Image.open(tmp_path / "a" / name).tobytes() == Image.open(tmp_path / "b" / name).tobytes()


def test_existing_out_dir_with_files_needs_overwrite(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run("generate", *SMALL, "--out", str(out))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    result = run("generate", *SMALL, "--out", str(out), "--overwrite")
    assert result.exit_code == 0 and (out / "keep.txt").read_text() == "precious" and (out / "grid.png").exists()


def test_out_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        result = run("generate", *SMALL, "--out", str(out))
        assert result.exit_code == 2, result.output
    assert blocker.read_text() == "x"


def test_model_folder_without_safetensors_is_refused(tmp_path):
    folder = tmp_path / "m"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    result = run("generate", *SMALL, "--model", str(folder), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "no safetensors" in result.output and "pickle" in result.output
    assert not (tmp_path / "o").exists()


def test_generate_from_a_diffusers_model_folder(tmp_path):
    """Any diffusers model folder (unet/ + scheduler/, safetensors) runs through the same path."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    unet.save_pretrained(tmp_path / "m" / "unet", safe_serialization=True)
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "m" / "scheduler")
    result = run("generate", *SMALL, "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "o" / "sample_00000_seed0.png").size == (8, 8)
    result = run("generate", *SMALL, "--model", str(tmp_path / "m"), "--class", "1", "--out", str(tmp_path / "p"))
    assert result.exit_code == 2 and "unconditional" in result.output


def test_sweep_resumes_without_losing_or_repeating_cells(tmp_path):
    out = tmp_path / "s"
    args = ["sweep", "--solver", "euler", "--solver", "dpmpp_2m", "--steps", "2,3", "--num-samples", "32",
            "--batch-size", "16", "--out", str(out), "-q"]
    assert run(*args).exit_code == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    row = json.loads(lines[0])
    assert row["mnist_fd"] > 0 and 0 <= row["class_accuracy"] <= 1 and row["nfe"] == 2
    # Simulate an interruption: the last cell was lost and a torn line was left behind.
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + '\n{"model": "mni')
    assert run(*args).exit_code == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.endswith("}")]
    keys = [(r["solver"], r["steps"]) for r in rows]
    assert sorted(keys) == sorted({("euler", 2), ("euler", 3), ("dpmpp_2m", 2), ("dpmpp_2m", 3)})
    assert (out / "results.md").exists() and (out / "fd_vs_nfe.png").exists()


def test_sweep_bad_input(tmp_path):
    result = run("sweep", "--solver", "nope", "--out", str(tmp_path / "s"))
    assert result.exit_code == 2 and "valid:" in result.output and not (tmp_path / "s").exists()
    result = run("sweep", "--steps", "0,5", "--out", str(tmp_path / "s"))
    assert result.exit_code == 2


def test_python_api_matches_cli(tmp_path):
    import diffsample

    result = diffsample.generate(solver="dpmpp_2m", steps=3, num_samples=2, seed=5)
    assert result.images.shape == (2, 1, 16, 16) and result.record["nfe"] == 3
    assert 0 <= float(result.images.min()) and float(result.images.max()) <= 1
    assert run("generate", "--steps", "3", "--num-samples", "2", "--seed", "5", "-q", "--out", str(tmp_path)).exit_code == 0
    png = np.asarray(Image.open(tmp_path / "sample_00001_seed6.png"), dtype=int)
    api = (result.images[1, 0] * 255).round().numpy().astype(int)
    assert np.abs(png - api).max() == 0


def test_api_validates_every_class_before_sampling():
    import diffsample
    from diffsample.run.models import load_model

    model = load_model()
    calls = []
    inner = model.denoiser.model_fn
    model.denoiser.model_fn = lambda *a, **k: calls.append(1) or inner(*a, **k)
    with pytest.raises(ValueError, match=r"class labels must be in 0..9, got \[0, 12\]"):
        diffsample.generate(model, classes=[0, 12], num_samples=2, batch_size=1, steps=2)
    assert calls == []  # nothing was sampled
