"""Model folders are checked before the network is built: a missing or malformed scheduler
config, a UNet config whose samples would be absurd, a FIFO or device among the files, a broken
model_index.json: one ModelLoadError line each (a ValueError: the CLI exits 2)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from diffsample.run.models import MAX_SAMPLE_ELEMENTS, ModelLoadError, load_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffusers import DDPMScheduler, UNet2DModel

    root = tmp_path_factory.mktemp("model") / "m"
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    DDPMScheduler().save_pretrained(root / "scheduler")
    return root


def variant(folder, tmp_path, change):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    change(copy)
    return copy


def edit(path, **values):
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


def sched(d):
    return d / "scheduler" / "scheduler_config.json"


def unet(d):
    return d / "unet" / "config.json"


def fifo(path):
    path.unlink()
    os.mkfifo(path)


CASES = {
    "scheduler config missing": (lambda d: sched(d).unlink(), "scheduler_config.json' not found"),
    "scheduler config [1,2,3]": (lambda d: sched(d).write_text("[1,2,3]"), r"must be a JSON object \{\.\.\.\}, got array \[1, 2, 3\]"),
    "scheduler config not JSON": (lambda d: sched(d).write_text("{"), "is not valid JSON"),
    "scheduler config UTF-16": (lambda d: sched(d).write_bytes("{}".encode("utf-16")), "not UTF-8"),
    "scheduler config a FIFO": (lambda d: fifo(sched(d)), "not a regular file"),
    "a link to /dev/zero": (lambda d: os.symlink("/dev/zero", d / "unet" / "extra.json"), "not a regular file"),
    "num_train_timesteps 1e12": (lambda d: edit(sched(d), num_train_timesteps=10**12), "num_train_timesteps must be an integer in 2..1000000"),
    "num_train_timesteps text": (lambda d: edit(sched(d), num_train_timesteps="abc"), "num_train_timesteps must be"),
    "beta_end 2": (lambda d: edit(sched(d), beta_end=2), r"beta_end must be a number in \(0, 1\)"),
    "trained_betas garbage": (lambda d: edit(sched(d), trained_betas=[0.1, "x"]), "trained_betas must be"),
    "learned variance": (lambda d: edit(sched(d), variance_type="learned_range"), "2C-channel"),
    "unknown beta_schedule": (lambda d: edit(sched(d), beta_schedule="cosine"), "unknown beta_schedule 'cosine'"),
    "sample_size 200000": (lambda d: edit(unet(d), sample_size=200000), "refused before allocating"),
    "sample_size text": (lambda d: edit(unet(d), sample_size="8"), "sample_size must be an integer >= 1"),
    "in_channels 0": (lambda d: edit(unet(d), in_channels=0), "in_channels must be an integer >= 1"),
    "unet config null": (lambda d: unet(d).write_text("null"), "got null"),
    "broken model_index.json": (lambda d: (d / "model_index.json").write_text("[{"), "model index"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_model_folders_are_one_line(folder, tmp_path, case):
    change, match = CASES[case]
    bad = variant(folder, tmp_path, change)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=match) as exc:
        load_model(bad)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 400
    assert time.perf_counter() - start < 10  # no hang on a FIFO, no huge allocation


def test_the_folder_itself_loads_and_non_square_sizes_are_read(folder, tmp_path):
    assert load_model(folder).sample_shape == (3, 8, 8)
    ok = variant(folder, tmp_path, lambda d: edit(unet(d), sample_size=[8, 16]))
    assert load_model(ok).sample_shape == (3, 8, 16)
    assert 3 * 2048 * 2048 <= MAX_SAMPLE_ELEMENTS < 200000 * 200000
