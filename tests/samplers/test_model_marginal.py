"""The model marginal of Jeffrey guidance, estimated and cached by the term's preparation step
(guidance/jeffrey/model_marginal.py, run/prepare.py), on an exact Gaussian-mixture eps-model:
class = component, so the marginal of an accurate unguided sampler is the mixture weights, and the
exact classifiers are the component responsibilities."""

import json
import math
import pytest
import torch

from diffsample.guidance import JeffreyGuidance, NoGuidance
from diffsample.guidance.term import Resources
from diffsample.guidance.interval import Interval, windowed_term, with_windowed_term
from diffsample.samplers.denoisers import ModelDenoiser
from diffsample.run.generate import build_sampler, generate
from diffsample.guidance.jeffrey.model_marginal import (MARGINAL_SEED_BASE, default_cache_path, model_identity,
                                                        model_marginal_for)
from diffsample.guidance.term import Preparable
from diffsample.run.models import LoadedModel, folder_weight_files, load_model
from diffsample.run.prepare import prepare_context, prepare_terms
from diffsample.solvers.noise_schedules import DiscreteVP
from diffsample.testbed.gmm import GaussianMixture

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)
STDS = torch.tensor([0.55, 0.5, 0.45], dtype=torch.float64)
PI = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
PI_STAR = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
GMM = GaussianMixture(MEANS, STDS, PI)
NS = DiscreteVP.from_config({})  # DDPM linear betas 1e-4 .. 0.02, 1000 timesteps


class Classifier:
    """Exact responsibilities ``p_t(y | x_t)`` (``t`` in DDPM timesteps) as logits; ``drop`` gives a
    class probability 0 (a classifier that never predicts it)."""

    num_classes = 3

    def __init__(self, noisy: bool = True, drop: int | None = None) -> None:
        self.noisy, self.drop = noisy, drop

    def __call__(self, x, t=None):
        t64 = torch.zeros(x.shape[0], dtype=torch.float64) if t is None else t.to(torch.float64)
        a, s = (NS.alpha(t64), NS.sigma(t64)) if self.noisy else (1.0, 0.0)
        logits = torch.log(GMM.component_posterior(x.to(torch.float64), a, s))
        if self.drop is not None:
            logits[:, self.drop] = -math.inf
        return logits


def gmm_model(drop: int | None = None) -> tuple[LoadedModel, list]:
    """The mixture as an exact eps-prediction network (DDPM timesteps) behind the same adapter as
    real models, plus a list collecting the rows of every network call."""
    calls = []

    def model_fn(x, t, **kwargs):
        calls.append(x.shape[0])
        t64 = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        a, s = NS.alpha(t64)[:, None], NS.sigma(t64)[:, None]
        x64 = x.to(torch.float64)
        return ((x64 - a * GMM.denoised(x64, a[:, 0], s[:, 0])) / s).to(x.dtype)

    resources = Resources(classifier=Classifier(True, drop), clean_classifier=Classifier(False, drop))
    loaded = LoadedModel("gmm-test", ModelDenoiser(model_fn, NS, "epsilon"), (2,), resources, None, None,
                         torch.device("cpu"), torch.float32)
    return loaded, calls


def term(**kw):
    loaded, _ = gmm_model()
    return JeffreyGuidance(PI_STAR, None, loaded.resources.classifier, loaded.resources.clean_classifier, **kw)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSAMPLE_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.mark.parametrize("estimator", ["noisy", "tweedie"])
def test_estimate_is_the_mixture_weights(tmp_path, estimator):
    loaded, calls = gmm_model()
    n, steps = 2000, 20
    found = model_marginal_for(term(estimator=estimator),
                               prepare_context(loaded, build_sampler("dpmpp_2m", "trailing", steps), batch_size=500),
                               n=n, cache=tmp_path / "m.json")
    se = torch.sqrt(PI * (1 - PI) / n)  # binomial standard error (soft labels have less variance)
    assert ((found.estimate.probs - PI).abs() <= 4 * se).all(), found.estimate.probs
    assert found.source == "estimated" and found.estimate.n == n and found.estimate.kind == "soft"
    assert found.nfe == steps and found.model_evals == n * steps == sum(calls)
    assert found.seeds == (MARGINAL_SEED_BASE, MARGINAL_SEED_BASE + n - 1)


def test_cache_hit_is_identical_and_samples_nothing(tmp_path):
    loaded, calls = gmm_model()
    sampler, cache = build_sampler("dpmpp_2m", "trailing", 5), tmp_path / "sub" / "m.json"
    first = model_marginal_for(term(), prepare_context(loaded, sampler), n=60, cache=cache)
    spent = len(calls)
    assert first.source == "estimated" and spent > 0 and cache.is_file()
    # another target and scale reuse the estimate: p_theta does not depend on them
    again = model_marginal_for(JeffreyGuidance(PI, None, loaded.resources.classifier, scale=2.0),
                               prepare_context(loaded, sampler), n=60, cache=cache)
    assert again.source == "cache" and again.key == first.key and again.model_evals == 0
    assert torch.equal(again.estimate.probs, first.estimate.probs)
    assert len(calls) == spent  # the model was not called
    assert [p.name for p in cache.parent.iterdir()] == ["m.json"]  # no temporary file left behind


def test_key_changes_with_what_determines_the_estimate(tmp_path):
    loaded, calls = gmm_model()
    cache = tmp_path / "m.json"
    base = model_marginal_for(term(), prepare_context(loaded, build_sampler("dpmpp_2m", "trailing", 4)), n=40,
                              cache=cache)
    keys = {base.key}
    for t, sampler, n in [(term(), build_sampler("dpmpp_2m", "trailing", 5), 40),  # steps
                          (term(), build_sampler("euler", "trailing", 4), 40),  # solver
                          (term(), build_sampler("dpmpp_2m", "karras", 4), 40),  # step schedule
                          (term(), build_sampler("dpmpp_2m", "trailing", 4, final="last"), 40),
                          (term(), build_sampler("dpmpp_2m", "trailing", 4), 41),  # n
                          (term(estimator="tweedie"), build_sampler("dpmpp_2m", "trailing", 4), 40)]:
        found = model_marginal_for(t, prepare_context(loaded, sampler), n=n, cache=cache)
        assert found.source == "estimated" and found.key not in keys
        keys.add(found.key)
    assert "steps=4" in base.key and "gmm-test" in base.key
    assert set(json.loads(cache.read_text())) == keys


def test_corrupt_cache_is_recomputed_and_overwritten(tmp_path):
    loaded, calls = gmm_model()
    sampler, cache = build_sampler("dpmpp_2m", "trailing", 4), tmp_path / "m.json"
    cache.write_text('{"half a file": [0.1, ')
    with pytest.warns(UserWarning, match="corrupt"):
        found = model_marginal_for(term(), prepare_context(loaded, sampler), n=40, cache=cache)
    assert found.source == "estimated" and list(json.loads(cache.read_text())) == [found.key]
    assert model_marginal_for(term(), prepare_context(loaded, sampler), n=40, cache=cache).source == "cache"
    # a malformed entry (wrong number of classes) is replaced as well
    data = json.loads(cache.read_text())
    data[found.key]["probs"] = [0.5, 0.5]
    cache.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="malformed"):
        fixed = model_marginal_for(term(), prepare_context(loaded, sampler), n=40, cache=cache)
    assert fixed.source == "estimated" and torch.equal(fixed.estimate.probs, found.estimate.probs)
    assert len(json.loads(cache.read_text())[found.key]["probs"]) == 3


def test_no_cache_and_default_cache(tmp_path):
    loaded, _ = gmm_model()
    sampler = build_sampler("dpmpp_2m", "trailing", 3)
    found = model_marginal_for(term(), prepare_context(loaded, sampler), n=20, cache="none")
    assert found.cache_path is None and not default_cache_path().exists()
    found = model_marginal_for(term(), prepare_context(loaded, sampler), n=20)  # default: $DIFFSAMPLE_CACHE_DIR/marginals.json
    assert found.cache_path == str(tmp_path / "default-cache" / "marginals.json") and default_cache_path().is_file()


def test_conditional_variant_is_the_classifier_prior_without_sampling(tmp_path):
    loaded, calls = gmm_model()
    found = model_marginal_for(term(variant="conditional"),
                               prepare_context(loaded, build_sampler("dpmpp_2m", "trailing", 4)),
                               n=500, cache=tmp_path / "m.json")
    # at t_max (alpha ~ 0.006) the exact classifier is the prior: the mixture weights
    assert calls == [] and found.estimate.kind == "prior" and found.model_evals == 0
    assert (found.estimate.probs - PI).abs().max() < 0.01, found.estimate.probs
    assert "variant=conditional" in found.key and "steps" not in found.key


def test_bad_input():
    loaded, calls = gmm_model()
    sampler = build_sampler("dpmpp_2m", "trailing", 3)
    for n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="marginal_samples must be an integer >= 1"):
            model_marginal_for(term(), prepare_context(loaded, sampler), n=n, cache="none")
        with pytest.raises(ValueError, match="marginal_samples must be an integer >= 1"):
            term(marginal_samples=n)
    with pytest.raises(ValueError, match="marginal_samples must be an integer >= 1, got 0"):
        generate(loaded, guidance=["jeffrey:target=0:0.5,1:0.5,marginal_samples=0"], steps=3, num_samples=2)
    assert calls == []


def test_bad_cache_path_is_refused_before_sampling(tmp_path):
    loaded, calls = gmm_model()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for cache, message in [(tmp_path, "is a directory"), (blocker / "m.json", "is not a directory")]:
        with pytest.raises(ValueError, match=message):
            generate(loaded, guidance=[f"jeffrey:target=0:0.5,1:0.5,marginal_cache={cache}"], steps=3, num_samples=2)
    assert calls == [] and blocker.read_text() == "x"


def test_zero_estimated_marginal_is_the_clear_log_weights_error():
    loaded, _ = gmm_model(drop=2)  # the classifier never gives class 2 any probability
    with pytest.raises(ValueError, match=r"model marginal p_theta\(y=2\) is estimated as 0"):
        generate(loaded, guidance=["jeffrey:target=0:0.5,2:0.5,marginal_samples=20,marginal_cache=none"], steps=3,
                 num_samples=2)


def test_generate_fills_the_marginal_and_records_it(tmp_path):
    loaded, calls = gmm_model()
    cache = str(tmp_path / "m.json")
    kw = dict(steps=4, num_samples=8)
    jeffrey = f"jeffrey:target=0:0.2,1:0.2,2:0.6,marginal_samples=50,marginal_cache={cache}"
    result = generate(loaded, guidance=[jeffrey], **kw)
    rec = result.record
    m = rec["model_marginal"]
    assert m["source"] == "estimated" and m["n"] == 50 and m["model_evals"] == 50 * 4 and m["cache_path"] == cache
    assert rec["model_evals"] == 4 and sum(calls) == 50 * 4 + 8 * 4  # the estimate is not in the run's count
    assert abs(sum(m["probs"]) - 1) < 1e-9 and m["cache_key"] in json.loads((tmp_path / "m.json").read_text())
    calls.clear()
    again = generate(loaded, guidance=[jeffrey], **kw)
    assert again.record["model_marginal"]["source"] == "cache" and sum(calls) == 8 * 4
    assert again.record["model_marginal"]["probs"] == m["probs"] and torch.equal(again.samples, result.samples)
    # inside a guidance window (Interval wrapper) the same estimate is found and used
    windowed = generate(loaded, guidance=[jeffrey + ",sigma_hi=1"], **kw)
    assert windowed.record["model_marginal"]["source"] == "cache"
    # a model marginal given in the spec is used as is: nothing estimated, nothing cached
    (tmp_path / "m.json").unlink()
    calls.clear()
    given = generate(loaded, guidance=[jeffrey + ",model_marginal=0.5;0.3;0.2"], **kw)
    assert given.record["model_marginal"]["source"] == "given"
    assert given.record["model_marginal"]["probs"] == [0.5, 0.3, 0.2]
    assert sum(calls) == 8 * 4 and not (tmp_path / "m.json").exists()
    # no Jeffrey term: no record entry
    assert "model_marginal" not in generate(loaded, steps=2, num_samples=2).record


def test_prepare_estimates_on_the_chain_below_the_term(tmp_path):
    loaded, _ = gmm_model()
    windowed = Interval(term(marginal_samples=30, marginal_cache=tmp_path / "m.json"), 0.0, 1.0, "unconditional")
    assert isinstance(windowed_term(windowed), JeffreyGuidance) and isinstance(windowed_term(windowed), Preparable)
    assert with_windowed_term(windowed, NoGuidance()).term == NoGuidance()
    terms, found = prepare_terms([NoGuidance(), windowed], ["none", "jeffrey:..."], loaded,
                                 build_sampler("dpmpp_2m", "trailing", 3))
    found = found["model_marginal"]
    assert found["n"] == 30 and 'below=["none"]' in found["cache_key"]
    assert isinstance(terms[1], Interval) and (terms[1].sigma_lo, terms[1].sigma_hi) == (0.0, 1.0)
    assert windowed_term(terms[1]).model_marginal.tolist() == found["probs"]
    # two Jeffrey terms report a list, in order
    plain = term(marginal_samples=30, marginal_cache="none").with_model_marginal(PI)
    _, found = prepare_terms([plain, windowed], ["jeffrey:a", "jeffrey:b"], loaded,
                             build_sampler("dpmpp_2m", "trailing", 3))
    given, estimated = found["model_marginal"]
    assert given["source"] == "given" and given["probs"] == PI.tolist()
    assert estimated["source"] == "estimated" and 'below=["jeffrey:a"]' in estimated["cache_key"]


def test_model_identity_follows_weight_content(tmp_path):
    folder = tmp_path / "m"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"weights-a")
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    first = model_identity(str(folder), folder_weight_files(folder))
    assert first.startswith(str(folder) + "@") and model_identity(str(folder), folder_weight_files(folder)) == first
    weights.write_bytes(b"weights-b")
    assert model_identity(str(folder), folder_weight_files(folder)) != first
    assert model_identity("built-in-code") == "built-in-code"
    bundled = load_model()
    mnist = model_identity(bundled.name, bundled.weight_files)
    assert mnist.startswith("mnist@") and len(mnist) == len("mnist@") + 16
    assert len(bundled.weight_files) == 5  # unet weights + config, scheduler config, both classifiers
