"""The per-step model selector and the bundled distilled students of the MNIST teacher.

Routing is checked exactly (each grid point reaches its own network, rows and conditioning split
as they should, a per-step model of identical networks is the plain model bit for bit); the shipped
students are checked against the metric they were trained for (class accuracy of few-step samples
with the clean classifier) and against their grids; bad weight files and grids fail in one line.
"""

from __future__ import annotations

import pytest
import torch

import diffsample
from diffsample.guidance.term import Cond
from diffsample.run.generate import SolverSwitched
from diffsample.run.models import ModelLoadError, load_model
from diffsample.samplers.denoisers import from_eps
from diffsample.samplers.per_step_model import PerStepModel
from diffsample.samplers.sampler import Sampler
from diffsample.samplers.seeds import seeded_run
from diffsample.solvers import SOLVERS
from diffsample.solvers.noise_schedules import DiscreteVP
from diffsample.solvers.solver import Grid
from diffsample.solvers.step_schedules import TimeUniform
from diffsample.testbed import BUNDLED_INFO, BUNDLED_MODELS, mnist
from diffsample.testbed.mnist import students

NS = DiscreteVP.from_config({})
STUDENT_NAMES = ["mnist-pd-4", "mnist-pd-2", "mnist-decoupled-2", "mnist-mfd-1"]


class Tagged:
    """A denoiser returning ``tag + class label`` everywhere, counting its rows."""

    def __init__(self, tag: float) -> None:
        self.tag, self.noise_schedule, self.rows = tag, NS, 0

    def __call__(self, x, t, cond=None):
        self.rows += x.shape[0]
        label = cond.positive["class_labels"].to(x.dtype) if cond is not None else torch.zeros(x.shape[0])
        return torch.zeros_like(x) + self.tag + label.view(-1, *([1] * (x.ndim - 1)))


def test_per_step_model_routes_each_row_to_its_grid_points_network():
    nets = [Tagged(100.0), Tagged(200.0)]
    model = PerStepModel(nets, [999.0, 499.0])
    x = torch.zeros(4, 1, 2, 2)
    t = torch.tensor([999.0, 499.0, 499.0, 999.0])
    cond = Cond({"class_labels": torch.tensor([1, 2, 3, 4])}, {"class_labels": torch.full((4,), 10)})
    out = model(x, t, cond)
    assert out[:, 0, 0, 0].tolist() == [101.0, 202.0, 203.0, 104.0]
    assert (nets[0].rows, nets[1].rows) == (2, 2)
    assert model(x[:2], torch.full((2,), 499.0), None)[:, 0, 0, 0].tolist() == [200.0, 200.0]


def test_per_step_model_of_one_network_is_the_plain_model_bit_for_bit():
    def net(x, t, **kw):
        return torch.sin(x * 3 + t.view(-1, 1, 1, 1) / 300)

    plain = from_eps(net, NS)
    grid = Grid.from_t(NS, TimeUniform(spacing="trailing")(NS, 4), final_zero=True)
    per_step = PerStepModel.on_grid([from_eps(net, NS) for _ in range(4)], grid)
    sampler = Sampler(SOLVERS.create("ddim"), TimeUniform(spacing="trailing"), 4)
    a = sampler(plain, cond=None, **seeded_run([0, 1, 2], (1, 4, 4), torch.device("cpu")))
    b = sampler(per_step, cond=None, **seeded_run([0, 1, 2], (1, 4, 4), torch.device("cpu")))
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe == 4 and a.model_evals == b.model_evals == 4


def test_per_step_model_refuses_a_list_that_does_not_match_the_grid_and_off_grid_times():
    grid = Grid.from_t(NS, TimeUniform(spacing="trailing")(NS, 2), final_zero=True)
    with pytest.raises(ValueError, match=r"per-step model list has 3 denoisers for a grid of 2 steps"):
        PerStepModel.on_grid([Tagged(0), Tagged(1), Tagged(2)], grid)
    with pytest.raises(ValueError, match=r"per-step model list has 1 denoisers for a grid of 2 evaluation points"):
        PerStepModel([Tagged(0)], [999.0, 499.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        PerStepModel([Tagged(0), Tagged(1)], [499.0, 999.0])
    model = PerStepModel([Tagged(0), Tagged(1)], [999.0, 499.0])
    with pytest.raises(ValueError, match=r"t=749, which is not one of its grid times \[999.0, 499.0\]"):
        model(torch.zeros(2, 1, 2, 2), torch.tensor([999.0, 749.0]))


def test_every_student_is_registered_with_its_own_grid_as_default():
    for name in STUDENT_NAMES:
        info = BUNDLED_INFO[name]
        assert name in BUNDLED_MODELS and students.STUDENTS[name].path.is_file()
        grid = TimeUniform(spacing="trailing")(NS, info.steps).tolist()
        assert (info.solver, info.schedule) == ("ddim", "trailing")
        assert grid == list(students.STUDENTS[name].grid)  # the default sampler is the student's own grid
    assert (BUNDLED_INFO["mnist"].solver, BUNDLED_INFO["mnist"].steps) == ("dpmpp_2m", 20)


@pytest.mark.parametrize("name", STUDENT_NAMES)
def test_student_samples_its_classes_at_its_own_step_count(name, one_thread):
    """A student with its defaults gives digits of the asked class (the clean classifier scores
    98.7 % on held-out digits)."""
    result = diffsample.generate(model=name, num_samples=40, seed=5, batch_size=40)
    steps = BUNDLED_INFO[name].steps
    assert result.record["steps"] == result.record["nfe"] == steps and result.record["solver"] == "ddim"
    assert result.record["model_evals"] == steps
    x = result.samples.clamp(-1, 1)
    acc = mnist.class_accuracy(x, torch.as_tensor(result.record["classes"]))
    assert acc >= 0.8, (name, acc)


def test_decoupled_student_loads_one_network_per_step():
    model = load_model("mnist-decoupled-2")
    assert isinstance(model.denoiser, PerStepModel) and model.denoiser.t == (999.0, 499.0)
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 499.0)
    cond = model.cond(torch.tensor([3, 7]))
    first, second = (d(x, t, cond) for d in model.denoiser.denoisers)
    assert not torch.allclose(first, second, atol=1e-3)  # two parameter sets, not one
    assert torch.equal(model.denoiser(x, t, cond), second)  # t = 499 is the second step's network
    assert not isinstance(load_model("mnist-pd-2").denoiser, PerStepModel)


def test_student_refuses_steps_its_grid_cannot_give():
    for kwargs, bad in ((dict(steps=3), "[666.0, 332.0]"), (dict(steps=8), "874.0"),
                        (dict(schedule="karras", steps=4), "")):
        with pytest.raises(ValueError, match=r"model 'mnist-pd-4' is a 4-step student distilled at t = "
                                             r"\[999, 749, 499, 249\]; this run's grid asks for t = .*valid: "
                                             r"--schedule trailing with --steps 1 or 2 or 4"):
            diffsample.generate(model="mnist-pd-4", num_samples=2, **kwargs)
    assert diffsample.generate(model="mnist-pd-4", num_samples=2, steps=2).record["nfe"] == 2


@pytest.mark.parametrize("content, why", [(None, "is missing"), (b"not a safetensors file at all",
                                                                   "is not a readable safetensors file")])
def test_missing_or_bad_student_file_is_one_line_error(tmp_path, monkeypatch, content, why):
    monkeypatch.setattr(students, "STUDENT_DIR", tmp_path)
    if content is not None:
        (tmp_path / "mnist-pd-4.safetensors").write_bytes(content)
    with pytest.raises(ModelLoadError, match=f"bundled model 'mnist-pd-4': student weights .*mnist-pd-4.safetensors' "
                                             f"{why}.*rebuild them with") as info:
        load_model("mnist-pd-4")
    assert "\n" not in str(info.value)


def test_student_file_without_the_networks_its_entry_names_is_refused(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    save_file({"step0.bogus": torch.zeros(2)}, str(tmp_path / "mnist-pd-2.safetensors"))
    monkeypatch.setattr(students, "STUDENT_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="does not hold the parameter set step0"):
        load_model("mnist-pd-2")


def test_guidance_on_a_student_noisetilt_raises_the_reward_and_cfg_counts_both_branches(one_thread):
    """NoiseTilt (class_logp reward of the noise-aware classifier) and CFG through ``generate`` on
    mnist-pd-4: honest model_evals, and NoiseTilt raises the clean classifier's log p(class | x0)
    over the same seeds and the same stochastic solver without guidance."""
    common = dict(model="mnist-pd-4", num_samples=48, batch_size=48, seed=11)
    plain = diffsample.generate(solver="ddim:eta=1", **common)
    with pytest.warns(SolverSwitched, match="runs as its stochastic variant 'ddim:eta=1.0'"):
        tilted = diffsample.generate(guidance=["noisetilt:beta=0.05"], **common)
    rec = tilted.record
    assert rec["solver"] == "ddim:eta=1.0" and rec["nfe"] == 4
    # 1 forward + 1 backward (2 forward-equivalents) per step, per sample
    assert rec["model_evals"] == 12 and rec["events"]["backward_rows"] == 4 * 48
    clf = mnist.load_classifier()
    labels = torch.as_tensor(rec["classes"])

    def logp(samples):
        with torch.no_grad():
            return torch.log_softmax(clf(samples.clamp(-1, 1)), 1)[torch.arange(len(labels)), labels]

    assert torch.isfinite(tilted.samples).all()
    assert logp(tilted.samples).mean() > logp(plain.samples).mean() + 0.05
    cfg = diffsample.generate(cfg_scale=2.0, **common)
    assert cfg.record["nfe"] == 4 and cfg.record["model_evals"] == 8 and torch.isfinite(cfg.samples).all()


def test_distillation_targets_clamp_the_teachers_denoised_to_the_data_range():
    """``--clip-x`` (default): the target DDIM step uses ``clamp(denoised, -1, 1)``, exactly
    ``z' = alpha' d + sigma' (z - alpha d) / sigma`` with the clamped ``d``; to sigma = 0 it returns ``d``."""
    from diffsample.testbed.mnist import distill

    class Wild:  # a teacher whose data prediction is far outside [-1, 1], as the eps teacher's at t = 999
        def denoised(self, z, t, y):
            return torch.full_like(z, 7.0) * torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)

    ns = DiscreteVP.from_config({})
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t, t_next, y = torch.full((2,), 999.0, dtype=torch.float64), torch.full((2,), 874.0, dtype=torch.float64), None
    d = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
    a, s = ns.alpha(t).float().view(-1, 1, 1, 1), ns.sigma(t).float().view(-1, 1, 1, 1)
    an, sn = ns.alpha(t_next).float().view(-1, 1, 1, 1), ns.sigma(t_next).float().view(-1, 1, 1, 1)
    out = distill.ddim_step(Wild(), z, t, t_next, y, ns, clip_x=True)
    torch.testing.assert_close(out, an * d + sn * (z - a * d) / s)
    end = distill.ddim_step(Wild(), z, t, torch.full((2,), -1.0, dtype=torch.float64), y, ns, clip_x=True)
    assert torch.equal(end, d.expand_as(z))
    unclipped = distill.ddim_step(Wild(), z, t, torch.full((2,), -1.0, dtype=torch.float64), y, ns)
    assert unclipped.abs().max() == 7.0
