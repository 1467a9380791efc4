"""A seed gives the same sample whatever the batch size, for every registered solver, or the
solver declares itself batch-coupled and generate() records it (run.json ``batch_coupled``).

The model is an exact Gaussian mixture behind the same adapter and ``generate`` path as real
models (every row is computed alone, so batching changes nothing but the noise bookkeeping)."""

from __future__ import annotations

import warnings

import pytest
import torch

import diffsample
from diffsample.guidance.term import Resources
from diffsample.run.models import LoadedModel
from diffsample.run.validate import batch_coupled
from diffsample.samplers.denoisers import ModelDenoiser
from diffsample.solvers import SOLVERS
from diffsample.solvers.noise_schedules import DiscreteVP, RectifiedFlow
from diffsample.testbed.gmm import GaussianMixture

SHAPE = (2, 2, 2)
GMM = GaussianMixture.random(dim=8, components=3, seed=4, spread=0.6)


def gmm_model(noise_schedule) -> LoadedModel:
    """The mixture as an x0-prediction network: ``E[x0 | x_t]`` in closed form, row by row."""
    def model_fn(x, t, **kwargs):
        t64 = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        a, s = noise_schedule.alpha(t64), noise_schedule.sigma(t64)
        return GMM.denoised(x.reshape(x.shape[0], -1).double(), a, s).reshape(x.shape).to(x.dtype)

    return LoadedModel("gmm", ModelDenoiser(model_fn, noise_schedule, "sample"), SHAPE, Resources(), None, None,
                       torch.device("cpu"), torch.float32)


def run(name: str, batch_size: int):
    model = gmm_model(RectifiedFlow() if name.startswith("flow_sde") else DiscreteVP.from_config({}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SteinDiff warns on batches of 1
        return diffsample.generate(model, solver=name, steps=4, num_samples=4, batch_size=batch_size, seed=11,
                                   schedule="karras" if name.startswith("flow_sde") else "trailing")


@pytest.mark.parametrize("name", SOLVERS.names())
def test_same_seed_same_sample_whatever_the_batch_size_or_declared_coupled(name):
    full, single = run(name, 4), run(name, 1)
    coupled = bool(getattr(SOLVERS.create(name), "batch_coupled", False))
    assert full.record["batch_coupled"] is single.record["batch_coupled"] is coupled
    if not coupled:
        assert torch.allclose(full.samples, single.samples, rtol=0, atol=1e-5), name


@pytest.mark.parametrize("stats", ["batch", "per_sample"])
def test_the_stein_declaration_is_needed(stats):
    """With an unclipped gamma, SteinDiff's samples do depend on the batch (batch means, or probes
    by batch position), so the declaration is true."""
    spec = f"stein_dpm:gamma_min=0,gamma_max=10,apply_steps=all,coupling=marginal,stats={stats}"
    full, single = run(spec, 4), run(spec, 1)
    assert full.record["batch_coupled"] and (full.samples - single.samples).abs().max() > 1e-3


def test_stein_declares_coupling_unless_no_step_is_corrected():
    assert SOLVERS.create("stein_dpm").batch_coupled and SOLVERS.create("stein_dpm:stats=per_sample").batch_coupled
    assert not SOLVERS.create("stein_dpm:apply_steps=0").batch_coupled
    assert not hasattr(SOLVERS.create("dpmpp_2m"), "batch_coupled") or not SOLVERS.create("dpmpp_2m").batch_coupled


def test_batch_coupled_terms_and_twisted_smc():
    from diffsample.guidance.svdd import SVDD

    class Hooks:
        twist = None

    reward = lambda x: x.flatten(1).sum(1)  # noqa: E731
    assert batch_coupled(SOLVERS.create("euler_ancestral"), [SVDD(reward, particles=4, temperature=1.0)])
    assert not batch_coupled(SOLVERS.create("euler_ancestral"), [SVDD(reward, particles=4, temperature=0.0)])
    assert not batch_coupled(SOLVERS.create("euler_ancestral"), [], Hooks())
    Hooks.twist = object()
    assert batch_coupled(SOLVERS.create("euler_ancestral"), [], Hooks())
