"""The testbed's registries of bundled models and metrics, as the run layer uses them: a bundled
model loads by name with its weight files and metrics; a sweep scores with a registered metric
only on a model it fits, and refuses it elsewhere in one line."""

from __future__ import annotations

import pytest
import torch

from diffsample.guidance.term import Resources
from diffsample.run.models import LoadedModel, ModelLoadError, load_model
from diffsample.run.sweep import METRICS, markdown_table, run_sweep
from diffsample.samplers.denoisers import ModelDenoiser
from diffsample.solvers.noise_schedules import DiscreteVP
from diffsample.testbed import BUNDLED_MODELS, DEFAULT_METRIC, DEFAULT_MODEL
from diffsample.testbed import METRICS as TESTBED_METRICS
from diffsample.testbed import mnist


def test_bundled_model_loads_by_name_with_its_files_and_metrics():
    model = load_model()
    assert model.name == DEFAULT_MODEL and DEFAULT_MODEL in BUNDLED_MODELS
    names = [f.name for f in model.weight_files]
    assert all(f.is_file() for f in model.weight_files)
    assert names == ["diffusion_pytorch_model.safetensors", "config.json", "scheduler_config.json",
                     "classifier.safetensors", "noisy_classifier.safetensors"]
    assert model.metrics == (DEFAULT_METRIC,) and DEFAULT_METRIC in TESTBED_METRICS
    assert model.resources.classifier is not None and model.resources.clean_classifier is not None
    assert METRICS == (*TESTBED_METRICS, "none")


def test_unknown_model_names_the_bundled_ones(tmp_path):
    with pytest.raises(ModelLoadError, match="use a bundled model: " + ", ".join(BUNDLED_MODELS)):
        load_model(str(tmp_path / "missing"))


def test_metric_scores_like_the_testbed_functions():
    x, y = mnist.load_digits("heldout")
    scores = TESTBED_METRICS[DEFAULT_METRIC].score(x[:200], y[:200].tolist())
    assert scores["mnist_fd"] == pytest.approx(mnist.mnist_fd(x[:200]), rel=1e-12)
    assert scores["class_accuracy"] == mnist.class_accuracy(x[:200], y[:200]) > 0.9
    assert set(TESTBED_METRICS[DEFAULT_METRIC].score(x[:50], None)) == {"mnist_fd"}


def _zero_model() -> LoadedModel:
    """An unconditional model built in code (predicts eps = 0): no weight files, no metric."""
    ns = DiscreteVP.from_config({})
    denoiser = ModelDenoiser(lambda x, t, **kw: torch.zeros_like(x), ns, "epsilon")
    return LoadedModel("built-in-code", denoiser, (1, 4, 4), Resources(), None, None, torch.device("cpu"),
                       torch.float32)


def test_sweep_refuses_a_metric_that_does_not_fit_the_model(tmp_path):
    model = _zero_model()
    with pytest.raises(ValueError, match=f"metric '{DEFAULT_METRIC}' needs the bundled MNIST model; use --metric none"):
        run_sweep(model, tmp_path / "a", solvers=["euler"], schedules=["karras"], steps=[2], num_samples=2)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="unknown metric 'fd'; valid: " + ", ".join(METRICS)):
        run_sweep(model, tmp_path / "a", solvers=["euler"], schedules=["karras"], steps=[2], metric="fd")
    rows = run_sweep(model, tmp_path / "b", solvers=["euler"], schedules=["karras"], steps=[2], num_samples=2,
                     metric="none", log=lambda s: None)
    assert len(rows) == 1 and "mnist_fd" not in rows[0] and rows[0]["nfe"] == 2
    assert markdown_table(rows).startswith("| wall_time_s (N=2) | NFE 2 |")
