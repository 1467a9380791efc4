"""Jeffrey guidance's files: targets and model_marginal files are checked (regular file, size,
depth, schema: one ValueError line each); the marginal cache is never a permanent failure: a
binary, UTF-16, FIFO or /dev/zero cache warns, is recomputed and replaced (no hang)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from diffsample.guidance import GUIDANCE, JeffreyGuidance
from diffsample.guidance.jeffrey.class_marginal import load_marginal, parse_target
from diffsample.guidance.jeffrey.model_marginal import model_marginal_for
from diffsample.guidance.term import Resources
from diffsample.run.generate import build_sampler
from diffsample.run.models import LoadedModel
from diffsample.run.prepare import prepare_context
from diffsample.samplers.denoisers import ModelDenoiser
from diffsample.solvers.noise_schedules import DiscreteVP

NS = DiscreteVP.from_config({})
LOGITS = torch.tensor([0.0, 1.0, 2.0])


def classifier(x, t=None):
    return LOGITS.expand(x.shape[0], 3).to(x.dtype)


classifier.num_classes = 3
RESOURCES = Resources(classifier=classifier, clean_classifier=classifier, num_classes=3)


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 400, text
    return text


@pytest.mark.parametrize("content, match", [
    ("[" * 200_000 + "]" * 200_000, "nested more than 64 levels"),
    ("null", "must hold an object {CLASS: PROB, ...} or a list"),
    ('[{"a": 1}, 2]', 'entry 0 must be a number, got object {"a": 1}'),
    ('{"0": true, "1": 0}', "True is not a number"),
    ('{"0": 0.5, "1": 0.5', "not valid JSON"),
    (b"\xff\xfe{\x00}\x00", "not UTF-8"),
])
def test_bad_target_files(tmp_path, content, match):
    path = tmp_path / "target.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    start = time.perf_counter()
    for make in (lambda: parse_target(str(path), 3), lambda: GUIDANCE.create(f"jeffrey:target={path}", resources=RESOURCES)):
        with pytest.raises(ValueError, match=match.replace("{", r"\{").replace("[", r"\[")) as exc:
            make()
        assert str(path) in one_line(exc) or "True" in str(exc.value)
    assert time.perf_counter() - start < 5


def test_target_files_that_are_not_regular(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    (tmp_path / "dir.json").mkdir()
    for name in ("fifo.json", "zero.json", "dir.json"):
        with pytest.raises(ValueError, match="not a regular file"):
            parse_target(str(tmp_path / name), 3)
    good = tmp_path / "t.json"
    good.write_text('{"0": 0.25, "2": 0.75}')
    assert torch.equal(parse_target(str(good), 3), torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64))
    good.write_text("[0.5, 0.25, 0.25]")
    assert torch.equal(parse_target(str(good), 3), torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))


@pytest.mark.parametrize("content, match", [
    ('{"k": {"n": 1}}', "entry 'k' has no 'probs'"),
    ('{"probs": [0.5, "x"], "n": 3}', "probs entry 1 must be a number"),
    ('{"probs": 0.5}', "probs must be a JSON array"),
    ('{"probs": [0.5, 0.5], "n": true}', "n must be an integer"),
    ("[0.5, 0.5]", "must be a JSON object"),
    ('{"a": {"probs": [1]}, "b": {"probs": [1]}}', "holds 2 entries; name one: a, b"),
])
def test_bad_model_marginal_files(tmp_path, content, match):
    path = tmp_path / "mm.json"
    path.write_text(content)
    for make in (lambda: load_marginal(path),
                 lambda: GUIDANCE.create(f"jeffrey:target=[0:0.5,1:0.5,2:0],model_marginal={path}", resources=RESOURCES)):
        with pytest.raises(ValueError, match=match) as exc:
            make()
        one_line(exc)


def test_a_good_model_marginal_file(tmp_path):
    path = tmp_path / "mm.json"
    path.write_text(json.dumps({"probs": [0.2, 0.3, 0.5], "n": 10}))
    term = GUIDANCE.create(f"jeffrey:target=[0:0.5,1:0.5,2:0],model_marginal={path}", resources=RESOURCES)
    inner = getattr(term, "term", term)
    assert torch.equal(inner.model_marginal, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))


def gmm_model() -> LoadedModel:
    def model_fn(x, t, **kwargs):
        return torch.zeros_like(x)

    return LoadedModel("files-test", ModelDenoiser(model_fn, NS, "epsilon"), (2,), RESOURCES, None, None,
                       torch.device("cpu"), torch.float32)


def estimate(cache):
    loaded = gmm_model()
    term = JeffreyGuidance(torch.tensor([0.2, 0.2, 0.6]), None, classifier, classifier)
    return model_marginal_for(term, prepare_context(loaded, build_sampler("euler", "trailing", 2)), n=4, cache=cache)


@pytest.mark.parametrize("kind", ["binary", "utf16", "fifo", "dev zero", "deep", "nan", "list"])
def test_a_corrupt_cache_is_recomputed_and_replaced(tmp_path, kind):
    cache = tmp_path / "marginals.json"
    if kind == "binary":
        cache.write_bytes(os.urandom(512) + b"\xff")
    elif kind == "utf16":
        cache.write_bytes(json.dumps({"k": {"probs": [1.0], "n": 1}}).encode("utf-16"))
    elif kind == "fifo":
        os.mkfifo(cache)
    elif kind == "dev zero":
        os.symlink("/dev/zero", cache)
    elif kind == "deep":
        cache.write_text("[" * 200_000 + "]" * 200_000)
    elif kind == "nan":
        cache.write_text('{"k": {"probs": [NaN], "n": 1}}')
    else:
        cache.write_text("[1, 2, 3]")
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="corrupt"):
        found = estimate(cache)
    assert time.perf_counter() - start < 20
    assert found.source == "estimated"
    assert cache.is_file() and not cache.is_symlink() and list(json.loads(cache.read_text())) == [found.key]
    again = estimate(cache)  # repaired: the next run reads it
    assert again.source == "cache" and torch.equal(again.estimate.probs, found.estimate.probs)
    assert torch.allclose(found.estimate.probs, torch.softmax(LOGITS.double(), 0))  # the classifier's constant answer
