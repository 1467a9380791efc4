"""Property-based fuzzing (hypothesis) of what users type: registry specs and option values, and
``diffsample generate`` argument combinations through the command line.

Properties:

* ``SOLVERS`` / ``STEP_SCHEDULES`` / ``GUIDANCE.create(spec)`` either builds something that then
  works (a schedule gives a grid, a solver runs two steps on an exact Gaussian mixture), or
  raises one ``ValueError`` line (or the project's own error type, e.g. ``NonFiniteError``);
  never another exception (``OverflowError``, ``TypeError``, ``KeyError``, numpy's type errors).
* ``diffsample generate`` (tiny: 1-3 steps, 1-2 samples) exits 0 with complete output (one PNG
  per sample, ``grid.png``, a ``run.json`` naming every seed), or exits 2 with one ``Error:``
  line and nothing written; never exit 1 (an internal error) or a traceback.

The examples are derandomised (the same every run) so the suite is stable; set
``DIFFSAMPLE_FUZZ_EXAMPLES=N`` to draw ``N`` fresh random examples per property instead.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import torch  # noqa: E402

RANDOM_EXAMPLES = int(os.environ.get("DIFFSAMPLE_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int):
    return settings(max_examples=RANDOM_EXAMPLES or examples, deadline=None, derandomize=not RANDOM_EXAMPLES,
                    database=None, suppress_health_check=list(HealthCheck), print_blob=True)


def is_project_error(exc: BaseException) -> bool:
    """A refusal the project means: a ValueError or an exception type defined in diffsample."""
    return isinstance(exc, ValueError) or any(c.__module__.split(".")[0] == "diffsample" for c in type(exc).__mro__)


# ---- spec strings and option values --------------------------------------------------------------
TRICKY = ["1e309", "-1e309", "1e300", "nan", "inf", "-inf", "true", "false", "True", "yes", "no", "0", "1", "-1",
          "none", "None", "null", "abc", "", "[1,2]", "[0:0.5,1:0.5]", "[0.5,0.5]", "(ink)", "(class_logp:label=3)",
          "(nope)", "0x10", "1_000", "-0", "3.7", "2**63", "9223372036854775808", "[", "]", "(", ")", ":", "=",
          "'quoted'", "\"q\"", "\\", "é", "0.3,0.7", "[0.3,0.7]", "[[1]]", "1e-320", "/dev/zero", "/tmp",
          "/nonexistent.json", "x.json", "~"]
VALUES = st.one_of(st.sampled_from(TRICKY), st.integers(-2**70, 2**70).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.text(alphabet="abcxyz019.-_:=,[]() ", max_size=8))


@pytest.fixture(scope="module")
def resources():
    from diffsample.run.models import load_model

    return load_model().resources


def spec_strategy(registry):
    names = [n for name in registry.names() for n in (name, *registry.aliases(name))]

    @st.composite
    def specs(draw):
        name = draw(st.one_of(st.sampled_from(names), st.sampled_from(["nope", "", "DPMPP_2M", "dpmpp-2m", ":x"])))
        try:
            keys = [o.name for o in registry.options(name)]
        except ValueError:
            keys = []
        options = draw(st.lists(st.tuples(st.one_of(st.sampled_from(keys or ["x"]), st.sampled_from(["x", "", "a b"])),
                                          VALUES), max_size=3))
        if not options:
            return name
        return name + ":" + ",".join(f"{k}={v}" for k, v in options)

    return specs()


def check_refusal(exc: BaseException, spec: str) -> None:
    assert is_project_error(exc), f"{spec!r}: {type(exc).__name__}: {exc}"
    text = str(exc)
    assert text and "\n" not in text and len(text) < 2000, f"{spec!r}: message {text!r}"


@fuzz_settings(60)
@given(spec=spec_strategy(__import__("diffsample").STEP_SCHEDULES))
def test_step_schedule_specs(spec):
    from diffsample.solvers import STEP_SCHEDULES
    from diffsample.solvers.noise_schedules import DiscreteVP, RectifiedFlow

    try:
        schedule = STEP_SCHEDULES.create(spec)
        for ns in (DiscreteVP.from_config({}), RectifiedFlow()):
            try:
                t = schedule(ns, 3)
            except Exception as exc:  # a schedule for one process may refuse another: one line
                check_refusal(exc, spec)
            else:
                assert isinstance(t, torch.Tensor) and t.numel() >= 3
    except Exception as exc:
        check_refusal(exc, spec)


@fuzz_settings(60)
@given(spec=spec_strategy(__import__("diffsample").SOLVERS))
def test_solver_specs(spec):
    from diffsample.samplers import Sampler
    from diffsample.solvers import SOLVERS, STEP_SCHEDULES, LinearVP, RectifiedFlow
    from diffsample.testbed.gmm import GaussianMixture

    gmm = GaussianMixture.random(dim=4, components=2, seed=0)
    try:
        solver = SOLVERS.create(spec)
        ns = RectifiedFlow() if "flow" in spec else LinearVP()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = Sampler(solver, STEP_SCHEDULES.create("karras"), 2)(
                gmm.denoiser(ns), torch.randn(3, 4, dtype=torch.float64),
                noise_fn=lambda s, sn: torch.randn(3, 4, dtype=torch.float64))
        assert result.x.shape == (3, 4)
    except Exception as exc:
        check_refusal(exc, spec)


@fuzz_settings(80)
@given(spec=spec_strategy(__import__("diffsample").GUIDANCE))
def test_guidance_specs(resources, spec):
    from diffsample.guidance import GUIDANCE
    from diffsample.run.generate import build_sampler

    try:
        extra = {"sampler": build_sampler("dpmpp_2m", "trailing", 3)} if GUIDANCE.accepts(spec, "sampler") else {}
        GUIDANCE.create(spec, resources=resources, **extra)
    except Exception as exc:
        check_refusal(exc, spec)


# ---- the command line ----------------------------------------------------------------------------
SOLVERS_OK = ["dpmpp_2m", "euler", "euler_ancestral", "heun", "unipc_bh2", "dpmpp_2m_sde", "stein_dpm"]
SOLVERS_BAD = ["flow_sde", "nope", "dpmpp_2m:order=3", "euler:eta=abc", "dpmpp_2m:order=1,order=3", "euler:eta=1e309"]
SCHEDULES_OK = ["trailing", "karras", "leading:steps_offset=1", "exponential", "linspace"]
SCHEDULES_BAD = ["leading:steps_offset=abc", "karras:rho=1e309", "nope", "polyexponential:rho=0"]
GUIDANCE_OK = ["cfg_zero_star", "apg", "cfg_rescale", "classifier:label=3", "dps:normalize=false", "svdd:particles=2",
               "best_of_n:n=2", "noisetilt:beta=0.5", "none",
               "jeffrey:target=[0:0.5,1:0.5],marginal_samples=2,marginal_cache=none"]
GUIDANCE_BAD = ["noisetilt:tile=1e309", "classifier:label=1e300", "dps:normalize=maybe",
                "cfg_zero_star:zero_init_steps=1e309", "nope", "jeffrey:target=null", "classifier:label=True",
                "cfg:scale=1e309", "freedom:window=[0.9,0.1]"]


def mostly(good: list[str], bad: list[str]) -> st.SearchStrategy[str]:
    """One of ``good`` about three times in four, else one of ``bad``."""
    return st.one_of(st.sampled_from(good), st.sampled_from(good), st.sampled_from(good), st.sampled_from(bad))


@st.composite
def generate_args(draw):
    args = ["generate", "-q", "--steps", draw(mostly(["1", "2", "3"], ["0", "-1", "abc", "1.5"])),
            "--num-samples", draw(mostly(["1", "2"], ["0", "1000000000"])),
            "--batch-size", draw(mostly(["1", "2", "3"], ["0"]))]
    optional = {
        "--solver": mostly(SOLVERS_OK, SOLVERS_BAD),
        "--schedule": mostly(SCHEDULES_OK, SCHEDULES_BAD),
        "--seed": mostly(["0", "1", str(2**32), str(2**63 - 2)], [str(2**63), "-1", "abc", "1.5"]),
        "--class": mostly(["0", "9"], ["10", "-1", "3.7", "True"]),
        "--cfg-scale": mostly(["0", "1.5"], ["inf", "nan", "1e309", "-1", "1e30"]),
        "--final": mostly(["zero", "last"], ["middle"]),
        "--dtype": mostly(["fp32", "bf16"], ["fp64"]),
        "--device": mostly(["cpu"], ["nonsense", "meta", "cuda:99"]),
        "--negative-prompt": st.sampled_from(["blurry"]),
        "--prompt": st.sampled_from(["a cat"]),
    }
    for flag, values in optional.items():
        if draw(st.integers(0, 6)) == 0:
            args += [flag, draw(values)]
    for spec in draw(st.lists(mostly(GUIDANCE_OK, GUIDANCE_BAD), max_size=2)):
        args += ["--guidance", spec]
    return args


def _value(args: list[str], flag: str, default: str) -> str:
    return args[args.index(flag) + 1] if flag in args else default


@fuzz_settings(10)
@given(args=generate_args())
def test_generate_command_line(tmp_path_factory, args):
    from click.testing import CliRunner

    from diffsample.cli.main import main

    out = tmp_path_factory.mktemp("fuzz") / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(main, [*args, "--out", str(out)])
    shown = f"diffsample {' '.join(args)} -> exit {result.exit_code}: {result.output[-600:]!r}"
    hypothesis.event(f"exit {result.exit_code}")
    assert "Traceback" not in result.output, shown
    assert result.exit_code in (0, 2), shown
    if result.exit_code == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and len(errors[0]) < 800, shown
        assert not out.exists() or not any(out.iterdir()), f"{shown}; wrote {sorted(os.listdir(out))}"
        return
    n = int(_value(args, "--num-samples", "16"))
    files = sorted(p.name for p in Path(out).iterdir())
    pngs = [f for f in files if f.startswith("sample_") and f.endswith(".png")]
    assert len(pngs) == n and "grid.png" in files and "run.json" in files, f"{shown}; files {files}"
    record = json.loads((out / "run.json").read_text())
    seed = int(_value(args, "--seed", "0"))
    assert record["seeds"] == list(range(seed, seed + n)) and record["nfe"] >= 1, shown
    assert isinstance(record["batch_coupled"], bool), shown
