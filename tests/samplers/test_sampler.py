"""The sampling loop: NFE / model_evals accounting, shapes, seeds, non-finite outputs."""

import pytest
import torch

from diffsample.guidance import CFG, Cond
from diffsample.samplers import NonFiniteError, Sampler, SeededNoiseFn, seeded_noise
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, VE, Karras, LinearVP, RectifiedFlow
from diffsample.testbed.gmm import GaussianMixture

GMM = GaussianMixture.random(dim=2 * 4 * 4, components=4, seed=1)
EXPECTED_NFE = {"heun": lambda steps: 2 * steps - 1, "dpm_2": lambda steps: 2 * steps - 1,
                "dpm_2_ancestral": lambda steps: 2 * steps - 1, "heunpp2": lambda steps: 3 * steps - 3}
# stochastic breadth solvers: 2 (3) calls per step, 1 on the step to sigma = 0; restart adds its
# default segments' K x (N_restart - 1) Heun steps, (2 + 1) x 2; PECE re-evaluates every corrected step
EXPECTED_NFE |= {"dpmpp_2s_ancestral": lambda steps: 2 * steps - 1, "dpmpp_sde": lambda steps: 2 * steps - 1,
                 "seeds_2": lambda steps: 2 * steps - 1, "seeds_3": lambda steps: 3 * steps - 2,
                 "restart": lambda steps: 2 * steps - 1 + 2 * 3 * 2, "sa_solver_pece": lambda steps: 2 * steps - 1}


@pytest.mark.parametrize("name", SOLVERS.names())
def test_nfe_and_model_evals(name):
    steps = 7
    solver = SOLVERS.create(name)
    ns = RectifiedFlow() if name == "flow_sde" else LinearVP()  # flow_sde is for flow models only
    result = Sampler(solver, Karras(), steps)(GMM.denoiser(ns), torch.randn(3, 32, dtype=torch.float64))
    expected = EXPECTED_NFE.get(name, lambda s: s)(steps)
    assert result.nfe == expected == solver.nfe(result.grid)
    # One network pass per call and sample; SteinDiff adds its probes' backward passes.
    expected_evals = solver.model_evals(result.grid) if hasattr(solver, "model_evals") else expected
    assert result.model_evals == expected_evals
    assert hasattr(solver, "model_evals") or result.model_evals == result.nfe


def test_cfg_doubles_model_evals():
    class Cond2:
        noise_schedule = LinearVP()

        def __call__(self, x, t, cond=None):
            return GMM.denoiser(self.noise_schedule)(x, t) * (1.0 if cond.positive.get("on") else 0.9)

    result = Sampler(SOLVERS.create("dpmpp_2m"), Karras(), 5)(
        CFG(2.0)(Cond2()), torch.randn(2, 32, dtype=torch.float64), Cond({"on": True}, {"on": False}))
    assert result.nfe == 5 and result.model_evals == 10


@pytest.mark.parametrize("shape", [(2, 2, 4, 4), (2, 2, 2, 2, 4)], ids=["4d", "5d"])
@pytest.mark.parametrize("name", SOLVERS.names())
def test_image_and_video_shapes(name, shape):
    noise = torch.randn(*shape, dtype=torch.float64)
    ns = RectifiedFlow() if name == "flow_sde" else VE()
    flat = Sampler(SOLVERS.create(name), Karras(), 6)(GMM.denoiser(ns), noise.reshape(2, -1),
                                                       noise_fn=lambda s, sn: torch.zeros(2, 32, dtype=torch.float64))
    shaped = Sampler(SOLVERS.create(name), Karras(), 6)(GMM.denoiser(ns), noise,
                                                         noise_fn=lambda s, sn: torch.zeros(shape, dtype=torch.float64))
    assert shaped.x.shape == shape
    assert torch.allclose(shaped.x.reshape(2, -1), flat.x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral"])
def test_seeds_independent_of_batch_size(name):
    shape = (32,)
    den = GMM.denoiser(LinearVP())
    sampler = Sampler(SOLVERS.create(name), STEP_SCHEDULES.create("karras"), 8)
    seeds = [5, 17, 3, 99]
    full = sampler(den, seeded_noise(seeds, shape), noise_fn=SeededNoiseFn(seeds, shape))
    for k, seed in enumerate(seeds):
        one = sampler(den, seeded_noise([seed], shape), noise_fn=SeededNoiseFn([seed], shape))
        assert torch.allclose(one.x[0], full.x[k], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full.x[0], full.x[1])


def test_same_seed_same_noise_any_batch():
    a = seeded_noise([1, 2, 3], (4, 4))
    b = seeded_noise([3], (4, 4))
    assert torch.equal(a[2], b[0])
    with pytest.raises(ValueError, match="seeds"):
        seeded_noise([-1], (2,))


def test_nonfinite_model_output_names_step_and_sigma():
    class Bad:
        noise_schedule = LinearVP()
        calls = 0

        def __call__(self, x, t, cond=None):
            self.calls += 1
            return x * float("nan") if self.calls == 3 else x * 0

    with pytest.raises(NonFiniteError, match=r"step 2 \(t=.*sigma=.*allow_nonfinite"):
        Sampler(SOLVERS.create("dpmpp_2m"), Karras(), 5)(Bad(), torch.randn(2, 3))
    result = Sampler(SOLVERS.create("dpmpp_2m"), Karras(), 5, allow_nonfinite=True)(Bad(), torch.randn(2, 3))
    assert result.nfe == 5


def test_half_precision_noise_runs_in_float32_state():
    out = Sampler(SOLVERS.create("unipc_bh2"), Karras(), 5)(GMM.denoiser(VE()), torch.randn(2, 32).half())
    assert out.x.dtype == torch.float32 and torch.isfinite(out.x).all()
