"""``diffsample list [WHAT]`` and the CLI's spec checks: entries with their options, aliases, one-line
refusals, and a name check that imports no guidance / diffusers module."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from diffsample.cli.main import main
from diffsample.guidance import GUIDANCE, REWARDS
from diffsample.solvers import SOLVERS, STEP_SCHEDULES

REGISTRIES = {"solvers": SOLVERS, "schedules": STEP_SCHEDULES, "guidance": GUIDANCE, "rewards": REWARDS}


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_list_noisetilt_shows_every_option_with_default_and_meaning():
    result = run("list", "noisetilt")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("noisetilt (guidance term): NoiseTilt")
    for option in GUIDANCE.options("noisetilt"):
        line = next(line for line in result.output.splitlines() if line.strip().startswith(f"{option.name}="))
        assert str(option) in line and option.meaning in line
    for name in ("reward=class_logp", "rho=search_matched", "strength=1.0", "beta=1.0", "grad_wrt=x_t", "tile=8",
                 "whiten_alpha"):
        assert name in result.output
    assert "resources" not in result.output  # supplied by the model, not an option


@pytest.mark.parametrize("word", list(REGISTRIES))
def test_every_name_and_alias_can_be_listed(word):
    registry = REGISTRIES[word]
    for name in registry.names():
        for typed in (name, *registry.aliases(name)):
            result = run("list", typed)
            assert result.exit_code == 0, result.output
            assert registry.summary(name) in result.output
            for option in registry.options(name):
                assert f"  {option.name}=" in result.output


def test_alias_is_named_as_such():
    result = run("list", "stein-dpm")
    assert result.exit_code == 0
    assert result.output.startswith("stein-dpm (solver, alias of stein_dpm): experimental")
    assert "aliases: stein-dpm" in result.output
    listing = run("list", "solvers").output
    assert "  stein-dpm          alias of stein_dpm" in listing and "  ddim               alias of euler" in listing
    assert "  stein_dpm          experimental" in listing


def test_list_sections_as_before():
    result = run("list", "rewards")
    assert result.exit_code == 0
    assert result.output.splitlines()[0] == "rewards:" and "solvers:" not in result.output
    for name in REWARDS.names():
        assert f"  {name} " in result.output


def test_unknown_name_exits_2_with_one_line():
    result = run("list", "noisetlit")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1
    assert "unknown name 'noisetlit'; valid: solvers, schedules, guidance, rewards, euler" in errors[0]
    # The valid names overflow the one-line cap (cut in the middle); the suggestion sits at the end.
    assert errors[0].rstrip().endswith("did you mean 'noisetilt'?")


@pytest.mark.parametrize("args, message", [
    (["--solver", "unipc_bh2:order=5"], "unknown option 'order' for solver 'unipc_bh2'; valid: predictor_order=2"),
    (["--solver", "dpmpp_2m:order=1,order=3"], "option 'order' given twice"),
    (["--solver", "dpmpp_2z"], "unknown solver 'dpmpp_2z'; valid: euler"),
    (["--schedule", "karras:rho=x"], "option 'rho' of step schedule 'karras' must be a number, got x"),
    (["--guidance", "noisetilt:betta=0.05"], "unknown option 'betta' for guidance 'noisetilt'; valid: reward=class_logp"),
    (["--guidance", "noisetilt:tile=1e309"], "option 'tile' of guidance 'noisetilt' must be a finite integer, got inf"),
    (["--guidance", "dps:normalize=maybe"], "option 'normalize' of guidance 'dps' must be true or false"),
])
def test_bad_specs_are_refused_before_sampling(tmp_path, args, message):
    result = run("generate", "--steps", "2", "--num-samples", "1", "-q", "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "()" not in errors[0]  # no Python signature
    assert not (tmp_path / "o").exists()


CHECK = """
import json, sys
from diffsample.cli.main import main
try:
    main(ARGS, standalone_mode=False)
    code = 0
except Exception as exc:
    code = type(exc).__name__
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "scipy", "transformers")
               or m.startswith(("diffsample.guidance.", "diffsample.samplers", "diffsample.pipelines",
                                "diffsample.run", "diffsample.testbed.")))
print(json.dumps({"code": code, "heavy": heavy, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("args", [
    ["generate", "--solver", "dpmpp_2z"],
    ["generate", "--schedule", "karas"],
    ["generate", "--guidance", "noisetlit"],
    ["generate", "--solver", "stein-dpm", "--guidance", "cfg", "--guidance", "noisetilt:betta=1"],
])
def test_name_check_imports_no_guidance_or_diffusers_module(args):
    out = subprocess.run([sys.executable, "-c", CHECK.replace("ARGS", repr(args))], capture_output=True, text=True,
                         timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["code"] in ("BadParameter", "UsageError"), out
    assert report["heavy"] == [], report["heavy"]


def test_help_imports_no_numerics():
    out = subprocess.run([sys.executable, "-c", CHECK.replace("ARGS", repr(["--help"]))], capture_output=True,
                         text=True, timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [] and report["torch"] is False, report
