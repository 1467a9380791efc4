"""`diffsample generate --guidance jeffrey:target=...` without model_marginal=: the model marginal is
estimated with the run's sampler on the null class of the bundled MNIST model, and cached
(`marginal_samples=` and `marginal_cache=` are options of the jeffrey term)."""

import json

import pytest
from click.testing import CliRunner

from diffsample.cli.main import main

TARGET = "jeffrey:target=0:0.5,1:0.5"
JEFFREY = ["generate", "--steps", "4", "--num-samples", "8", "-q"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("DIFFSAMPLE_CACHE_DIR", str(path))
    return path


def run(*args):
    return CliRunner().invoke(main, list(args))


def jeffrey(*options):
    """``--guidance jeffrey:target=...,OPTION,...``."""
    return ["--guidance", ",".join([TARGET, *options])]


def test_jeffrey_without_model_marginal_estimates_records_and_caches_it(tmp_path, cache_dir):
    result = run(*JEFFREY, *jeffrey("marginal_samples=50"), "--out", str(tmp_path / "a"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    m = record["model_marginal"]
    assert m["source"] == "estimated" and m["n"] == 50 and len(m["probs"]) == 10 and abs(sum(m["probs"]) - 1) < 1e-9
    assert m["model_evals"] == 50 * 4 and m["nfe"] == 4 and m["cache_path"] == str(cache_dir / "marginals.json")
    assert "model=mnist@" in m["cache_key"] and "steps=4" in m["cache_key"] and "n=50" in m["cache_key"]
    assert record["model_evals"] == 4  # the run's own count excludes the estimate
    assert m["cache_key"] in json.loads((cache_dir / "marginals.json").read_text())
    # the second run reads the cache: same marginal, same images, nothing spent on it
    result = run(*JEFFREY, *jeffrey("marginal_samples=50"), "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "b" / "run.json").read_text())["model_marginal"]
    assert again["source"] == "cache" and again["probs"] == m["probs"] and again["model_evals"] == 0
    for name in ("sample_00000_seed0.png", "sample_00007_seed7.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_explicit_cache_file_and_no_cache(tmp_path, cache_dir):
    mine = tmp_path / "deep" / "mine.json"
    result = run(*JEFFREY, *jeffrey("marginal_samples=40", f"marginal_cache={mine}"), "--out", str(tmp_path / "a"))
    assert result.exit_code == 0, result.output
    assert mine.is_file() and not cache_dir.exists()
    result = run(*JEFFREY, *jeffrey("marginal_samples=40", "marginal_cache=none"), "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "b" / "run.json").read_text())["model_marginal"]
    assert m["source"] == "estimated" and m["cache_path"] is None and not cache_dir.exists()


def test_summary_names_the_marginal(tmp_path):
    result = run(*JEFFREY[:-1], *jeffrey("marginal_samples=40"), "--out", str(tmp_path / "a"))
    assert result.exit_code == 0, result.output
    assert "model marginal estimated from 40 unguided samples" in result.output


def test_list_documents_the_options():
    result = run("list", "jeffrey")
    assert result.exit_code == 0
    assert "marginal_samples" in result.output and "marginal_cache" in result.output
    assert "DIFFSAMPLE_CACHE_DIR" in result.output
    help_text = run("generate", "--help").output  # the options moved into the term
    assert "--marginal-samples" not in help_text and "--marginal-cache" not in help_text


@pytest.mark.parametrize("option, message", [
    ("marginal_samples=0", "marginal_samples"),
    ("marginal_samples=-5", "marginal_samples"),
    ("marginal_samples=many", "marginal_samples"),
    ("marginal_cache={tmp}", "is a directory"),
    ("marginal_cache={tmp}/blocker/m.json", "is not a directory"),
])
def test_bad_marginal_options_exit_2_and_write_nothing(tmp_path, cache_dir, option, message):
    (tmp_path / "blocker").write_text("x")
    out = tmp_path / "o"
    result = run(*JEFFREY, "--out", str(out), *jeffrey(option.format(tmp=tmp_path)))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists() and not cache_dir.exists() and (tmp_path / "blocker").read_text() == "x"


def test_jeffrey_with_tds_particles_on_a_stochastic_solver(tmp_path):
    args = ["generate", "--solver", "dpmpp_2m_sde", "--guidance", "jeffrey:target=0:0.5,1:0.5,particles=3,marginal_samples=20",
            "--steps", "4", "--num-samples", "4", "-q", "--out", str(tmp_path / "a")]
    result = run(*args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["events"]["tds_particles"] == 3 * 4
    assert record["model_evals"] == 3 * 4  # K particles per sample, one row each per step
    assert len(list((tmp_path / "a").glob("sample_*.png"))) == 4


def test_tds_particles_on_a_deterministic_solver_is_bad_input(tmp_path):
    out = tmp_path / "a"
    result = run("generate", "--solver", "heun", "--guidance", "jeffrey:target=0:0.5,1:0.5,particles=3,marginal_samples=20",
                 "--steps", "4", "--num-samples", "4", "-q", "--out", str(out))
    assert result.exit_code == 2
    assert "no stochastic variant" in result.output and "dpmpp_2m_sde" in result.output
    assert not out.exists()
    result = run("generate", "--solver", "dpmpp_2m_sde", "--guidance", "jeffrey:target=0:0.5,1:0.5,particles=0",
                 "--steps", "4", "-q", "--out", str(out))
    assert result.exit_code == 2 and "particles" in result.output and not out.exists()
