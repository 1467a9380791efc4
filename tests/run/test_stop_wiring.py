"""The stop time through generate(), the CLI (--stop / --stop-unit / --stop-return) and the native
pipeline loop: the run ends at the stop, the return modes and their accounting, run.json and PNG
metadata, and one-line refusals (exit 2, nothing written) -- docs/methods/truncation.md."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import diffsample
from diffsample.cli.main import main
from diffsample.guidance.term import Resources
from diffsample.run.models import LoadedModel
from diffsample.samplers.denoisers import ModelDenoiser
from diffsample.solvers.noise_schedules import DiscreteVP
from diffsample.solvers.stop_time import StopTime
from diffsample.testbed.gmm import GaussianMixture

SHAPE = (2, 2, 2)
GMM = GaussianMixture.random(dim=8, components=3, seed=4, spread=0.6)
NS = DiscreteVP.from_config({})


def gmm_model() -> LoadedModel:
    def model_fn(x, t, **kwargs):
        t64 = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        a, s = NS.alpha(t64), NS.sigma(t64)
        return GMM.denoised(x.reshape(x.shape[0], -1).double(), a, s).reshape(x.shape).to(x.dtype)

    return LoadedModel("gmm", ModelDenoiser(model_fn, NS, "sample"), SHAPE, Resources(), None, None,
                       torch.device("cpu"), torch.float32)


def test_generate_stops_at_the_stop_and_records_it():
    model = gmm_model()
    kw = dict(solver="dpmpp_2m", schedule="karras", steps=30, num_samples=6, seed=3)
    noisy = diffsample.generate(model, stop=0.3, **kw)
    stop = noisy.record["stop"]
    assert stop["unit"] == "ou_time" and stop["return"] == "noisy" and stop["value"] == 0.3
    assert stop["sigma_ve"] == pytest.approx(math.sqrt(math.expm1(0.3)))
    t_stop = stop["native"]
    assert float(NS.sigma_ve(torch.tensor(t_stop, dtype=torch.float64))) == pytest.approx(stop["sigma_ve"], rel=1e-9)
    # The state at the stop is the exact probability-flow ODE's, from the same seeded noise.
    from diffsample.samplers.seeds import seeded_run

    noise = seeded_run(list(range(3, 9)), SHAPE, torch.device("cpu"))["noise"].double()
    t_max = NS.t_max
    x_t = noise * math.hypot(float(NS.alpha(torch.tensor(t_max))), float(NS.sigma(torch.tensor(t_max))))
    ref = GMM.reference_ode(x_t, NS, t_max, t_stop)
    assert (noisy.samples.double() - ref).abs().max() < 0.02
    denoised = diffsample.generate(model, stop=0.3, stop_return="denoised", **kw)
    assert denoised.record["nfe"] == noisy.record["nfe"] + 1 == 31
    assert denoised.record["model_evals"] == noisy.record["model_evals"] + 1
    a = float(NS.alpha(torch.tensor(t_stop, dtype=torch.float64)))
    s = float(NS.sigma(torch.tensor(t_stop, dtype=torch.float64)))
    exact = GMM.denoised(noisy.samples.double().reshape(6, -1), a, s).reshape(noisy.samples.shape)
    assert torch.allclose(denoised.samples.double(), exact, atol=1e-5)
    rescaled = diffsample.generate(model, stop=math.sqrt(math.expm1(0.3)), stop_unit="sigma", stop_return="rescaled", **kw)
    assert torch.allclose(rescaled.samples, noisy.samples / a, atol=1e-6)
    assert diffsample.generate(model, **kw).record["stop"] is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(stop=-0.5), "stop must be >= 0"),
    (dict(stop=float("inf")), "stop must be finite"),
    (dict(stop=0.3, stop_unit="seconds"), "stop_unit must be one of"),
    (dict(stop=0.3, stop_return="clean"), "stop_return must be one of"),
    (dict(stop=40.0), "below the first grid point"),
    (dict(stop=1e-9), "smallest noise level"),
])
def test_generate_refuses_bad_stops_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        diffsample.generate(gmm_model(), steps=4, num_samples=2, **kwargs)
    assert "\n" not in str(err.value)


def test_cli_stop_writes_the_record_and_png_metadata(tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["generate", "--steps", "3", "--num-samples", "2", "-q", "--out", str(out),
                                       "--stop", "0.5", "--stop-unit", "sigma", "--stop-return", "denoised"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["stop"]["value"] == 0.5 and record["stop"]["unit"] == "sigma" and record["stop"]["return"] == "denoised"
    assert record["nfe"] == 4
    meta = json.loads(Image.open(out / "sample_00000_seed0.png").text["diffsample"])
    assert meta["stop"]["sigma_ve"] == pytest.approx(0.5)


@pytest.mark.parametrize("args", [["--stop", "-1"], ["--stop", "nan"], ["--stop", "0.3", "--stop-unit", "hours"],
                                  ["--stop", "0.3", "--stop-return", "x0"], ["--stop", "60"]])
def test_cli_bad_stop_exits_2_and_writes_nothing(tmp_path, args):
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["generate", "--steps", "3", "--num-samples", "2", "-q", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_native_loop_cuts_the_pipeline_grid_at_the_stop():
    from diffsample.pipelines.native_loop import sample_pipeline
    from diffsample.testbed.tiny_pipelines import build

    pipe = build("ddpm_gmm")
    stop = StopTime(0.3)
    gen = torch.Generator().manual_seed(0)
    full = sample_pipeline(pipe, solver="dpmpp_2m", steps=20, output_type="latent", generator=gen)
    ns = full.result.grid.noise_schedule
    t_stop = stop.t(ns)
    above = [t for t in full.grid.t.tolist() if t > t_stop]
    runs = {}
    for mode in ("noisy", "denoised"):
        runs[mode] = sample_pipeline(pipe, solver="dpmpp_2m", steps=20, output_type="latent",
                                     generator=torch.Generator().manual_seed(0), stop=stop, stop_return=mode)
    grid = runs["noisy"].result.grid
    assert list(grid.t_list[:-1]) == pytest.approx(above) and grid.t_list[-1] == pytest.approx(t_stop)
    assert grid.sigma_list[-1] / grid.alpha_list[-1] == pytest.approx(stop.sigma_ve())
    assert runs["noisy"].result.nfe == len(above) and runs["denoised"].result.nfe == len(above) + 1
    gmm = pipe.unet.gmm
    x = runs["noisy"].latents.double()
    expected = gmm.denoised(x.reshape(x.shape[0], -1), grid.alpha_list[-1], grid.sigma_list[-1]).reshape(x.shape)
    assert torch.allclose(runs["denoised"].latents.double(), expected, atol=1e-4)
    decoded = sample_pipeline(pipe, solver="dpmpp_2m", steps=20, generator=torch.Generator().manual_seed(0), stop=stop)
    assert decoded.images is not None and decoded.images.shape[0] == x.shape[0]


@pytest.mark.parametrize("mode", ["noisy", "rescaled"])
def test_attach_cuts_the_pipelines_own_loop_at_the_stop_like_the_native_loop(mode):
    import numpy as np

    from diffsample.pipelines.attach import attach, detach
    from diffsample.pipelines.native_loop import sample_pipeline
    from diffsample.testbed.tiny_pipelines import build

    pipe = build("ddpm_gmm")
    stop = StopTime(0.3)
    native = sample_pipeline(pipe, solver="dpmpp_2m", steps=20, generator=torch.Generator().manual_seed(0), stop=stop,
                             stop_return=mode)
    full = pipe(num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="np").images
    shim = attach(pipe, "dpmpp_2m", stop=stop, stop_return=mode)
    try:
        out = pipe(num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="np").images
    finally:
        detach(pipe)
    expected = native.images.permute(0, 2, 3, 1).numpy()
    assert 0.05 < expected.mean() < 0.95 and np.abs(expected - full).max() > 0.01  # truncation changed the output
    assert np.abs(out - expected).max() < 1e-5
    assert shim.report()["nfe"] == native.result.nfe < 20
    assert shim.grid.sigma_list[-1] / shim.grid.alpha_list[-1] == pytest.approx(stop.sigma_ve())


def test_attach_refuses_a_denoised_return():
    from diffsample.pipelines.attach import attach
    from diffsample.testbed.tiny_pipelines import build

    with pytest.raises(ValueError, match="native loop"):
        attach(build("ddpm_gmm"), "dpmpp_2m", stop=StopTime(0.3), stop_return="denoised")
