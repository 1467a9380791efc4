"""Guidance registry: specs, resources and bad input (issue 6)."""

import json

import pytest
import torch

from diffsample.guidance import GUIDANCE, CFGPlusPlus, JeffreyGuidance, Resources

from .gmm_models import PI, mixture, noisy_classifier

CLF = noisy_classifier(mixture(PI))
RES = Resources(classifier=CLF, num_classes=3, conditional=True)


def test_all_names_build():
    for spec in ["none", "cfg", "cfg:scale=3,sigma_lo=0.28,sigma_hi=5.42", "cfg_rescale:phi=0.5", "apg",
                 "cfg_zero_star:zero_init_steps=1", "classifier:scale=2", "cfgpp",
                 "jeffrey:target=0:0.2;1:0.2;2:0.6,model_marginal=0:0.5;1:0.3;2:0.2"]:
        assert GUIDANCE.create(spec, resources=RES) is not None


def test_jeffrey_spec_and_json_file(tmp_path):
    term = GUIDANCE.create("jeffrey:target=0:0.5;1:0.5,model_marginal=0.5;0.3;0.2", resources=RES)
    assert isinstance(term, JeffreyGuidance)
    assert torch.allclose(term.target, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"2": 1.0}))
    term = GUIDANCE.create(f"jeffrey:target={f}", resources=RES)
    assert term.target.tolist() == [0.0, 0.0, 1.0] and term.model_marginal is None


@pytest.mark.parametrize("target,match", [
    ("0:0.5;1:0.4", "sums to 0.9"),
    ("0:1.2;1:-0.2", "negative"),
    ("0:0.5;7:0.5", "class 7"),
    ("0:0.5;x:0.5", "not an integer"),
])
def test_bad_targets(target, match):
    with pytest.raises(ValueError, match=match):
        GUIDANCE.create(f"jeffrey:target={target}", resources=RES)


def test_target_within_tolerance_is_accepted():
    GUIDANCE.create("jeffrey:target=0:0.5;1:0.5000001", resources=RES)


def test_zero_model_marginal():
    with pytest.raises(ValueError, match=r"p_theta\(y=2\) is estimated as 0"):
        GUIDANCE.create("jeffrey:target=0:0.5;1:0.5,model_marginal=0.5;0.5;0", resources=RES)


@pytest.mark.parametrize("name", ["jeffrey:target=0:1", "classifier"])
def test_unconditional_model_without_classifier(name):
    with pytest.raises(ValueError, match="noise-aware classifier"):
        GUIDANCE.create(name, resources=Resources())
    with pytest.raises(ValueError, match="clean classifier"):
        GUIDANCE.create(name + (",estimator=tweedie" if ":" in name else ":estimator=tweedie"), resources=Resources())


@pytest.mark.parametrize("name", ["cfg", "cfg_rescale", "apg", "cfgpp", "cfg_zero_star"])
def test_cfg_family_needs_conditional_model(name):
    with pytest.raises(ValueError, match="conditional model"):
        GUIDANCE.create(name, resources=Resources(classifier=CLF))


@pytest.mark.parametrize("spec,match", [
    ("cfg:scale=-1", "scale"), ("cfg_rescale:phi=2", r"\[0, 1\]"), ("apg:space=v", "space"),
    ("cfg:sigma_lo=3,sigma_hi=1", "sigma_lo"), ("jeffrey:target=0:1,estimator=magic", "estimator"),
    ("cfgpp:scale=5", "lambda"),
])
def test_bad_options(spec, match):
    with pytest.raises(ValueError, match=match):
        GUIDANCE.create(spec, resources=RES)


def test_cfgpp_takes_the_sampler():
    from diffsample.samplers import Sampler
    from diffsample.solvers import Euler, TimeUniform

    assert isinstance(GUIDANCE.create("cfgpp", resources=RES, sampler=Sampler(Euler(), TimeUniform(), 4)), CFGPlusPlus)
