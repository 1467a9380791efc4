"""diffsample.generate types its arguments once: every bad value is one ValueError line naming the
argument, raised before the model is called (nothing is cast: True, 3.7, [1.9, 2.9] are refused)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import diffsample
from diffsample.run.models import load_model
from diffsample.run.validate import check_device, check_memory, result_bytes_per_sample


@pytest.fixture(scope="module")
def counted():
    model = load_model()
    calls = []
    inner = model.denoiser.model_fn
    model.denoiser.model_fn = lambda *a, **k: calls.append(1) or inner(*a, **k)
    return model, calls


def refused(counted, match: str, **kwargs) -> str:
    model, calls = counted
    before = len(calls)
    with pytest.raises(ValueError, match=match) as exc:
        diffsample.generate(model, **{"steps": 1, "num_samples": 2, **kwargs})
    assert len(calls) == before, "the model ran before the refusal"
    text = str(exc.value)
    assert "\n" not in text and len(text) < 300, text
    return text


@pytest.mark.parametrize("seed", [True, -1, 2**63, 1.5, "0", None])
def test_seed(counted, seed):
    refused(counted, r"seed must be an integer in 0..2\*\*63-1", seed=seed)


def test_seed_range_covers_every_sample(counted):
    refused(counted, "exceeds the largest seed", seed=2**63 - 1)  # 2 samples: the second seed would be 2**63
    result = diffsample.generate(counted[0], steps=1, num_samples=1, seed=2**63 - 1)
    assert result.record["seeds"] == [2**63 - 1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_label=True), "class_label must be an integer class label, got True"),
    (dict(class_label=3.7), "class_label must be an integer class label, got 3.7"),
    (dict(class_label="3"), "class_label must be an integer"),
    (dict(classes=[1.9, 2.9]), "classes must hold integer class labels only, got 1.9"),
    (dict(classes=[True, 1]), "got True"),
    (dict(classes=[[1], [2]]), r"got \[1\]"),
    (dict(classes="12"), "classes must be a sequence"),
    (dict(classes=torch.tensor([1.0, 2.0])), "1-D sequence of integer class labels"),
    (dict(classes=np.array([[1, 2]])), "1-D sequence"),
    (dict(classes=[0, 12]), r"class labels must be in 0..9, got \[0, 12\]"),
    (dict(class_label=10), "outside 0..9"),
])
def test_class_labels_are_refused_not_cast(counted, kwargs, match):
    refused(counted, match, **kwargs)


def test_integer_classes_in_any_container(counted):
    for classes in ([3, 4], (3, 4), range(3, 5), torch.tensor([3, 4]), np.array([3, 4]), [np.int64(3), 4]):
        assert diffsample.generate(counted[0], steps=1, num_samples=2, classes=classes).record["classes"] == [3, 4]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=0), "num_samples must be an integer >= 1"),
    (dict(num_samples=True), "num_samples must be an integer"),
    (dict(num_samples=2.0), "num_samples must be an integer"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(dtype="fp64"), "unknown dtype 'fp64'; valid: fp32, fp16, bf16"),
    (dict(dtype=["fp32"]), "unknown dtype"),
    (dict(guidance="cfg_zero_star"), "guidance must be a list of specs"),
    (dict(guidance=[3]), "guidance entries must be spec strings"),
    (dict(solver=3), "solver must be a spec string"),
    (dict(cfg_scale=float("inf")), "cfg_scale must be a finite number"),
    (dict(cfg_scale=True), "cfg_scale must be a finite number"),
    (dict(cfg_scale="2"), "cfg_scale must be a finite number"),
    (dict(prompt="a cat"), "--prompt needs a text-to-image pipeline"),
    (dict(negative_prompt="blurry"), "--negative-prompt needs a text-to-image pipeline"),
    (dict(steps=True), "steps must be an integer"),
])
def test_other_arguments(counted, kwargs, match):
    refused(counted, match, **kwargs)


@pytest.mark.parametrize("device, match", [
    ("nonsense", "unknown device 'nonsense'; valid: cpu, cuda, cuda:N, mps"),
    ("meta", "device 'meta' cannot run a model"),
    (3, "device must be a string"),
    ("cuda:99", "cuda"),
])
def test_devices_this_machine_does_not_have(device, match):
    with pytest.raises(ValueError, match=match):
        check_device(device)
    with pytest.raises(ValueError, match=match):
        diffsample.generate(steps=1, num_samples=1, device=device)


def test_cuda_without_cuda_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        diffsample.generate(steps=1, num_samples=1, device="cuda")
    assert check_device("cpu") == torch.device("cpu")


def test_a_billion_samples_are_refused_before_allocating(counted):
    start = time.perf_counter()
    text = refused(counted, "more than 25% of this machine's RAM", num_samples=10**9)
    assert "num_samples=1000000000" in text and time.perf_counter() - start < 5


def test_memory_estimate():
    model = counted_model = load_model()
    per_sample = result_bytes_per_sample(counted_model)
    assert per_sample == 12 * 16 * 16 + 64  # float32 samples, their batches and the images of a 1x16x16 model
    check_memory(1000, per_sample, memory=4 * 1000 * per_sample)  # exactly at the limit: accepted
    with pytest.raises(ValueError, match=r"use num_samples <= 1000 per run"):
        check_memory(1001, per_sample, memory=4 * 1000 * per_sample)
    del model
