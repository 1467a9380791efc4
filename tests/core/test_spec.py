"""The spec boundary and the registries: grammar, round trip, aliases, option introspection, typed
options and one-line errors."""

import math
import re

import pytest
import torch

from diffsample.core.registry import Registry, parse_spec
from diffsample.core.spec import Spec
from diffsample.guidance import GUIDANCE, REWARDS, Resources
from diffsample.solvers import SOLVERS, STEP_SCHEDULES, DPMSolverPP, Euler, SteinDiff, UniPC

REGISTRIES = [SOLVERS, STEP_SCHEDULES, GUIDANCE, REWARDS]


def logits3(x, t=None):
    return torch.zeros(x.shape[0], 3)


RES = Resources(classifier=logits3, clean_classifier=logits3, num_classes=3, conditional=True)


# ---- grammar ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, name, options", [
    ("euler", "euler", {}),
    ("cfg:scale=2.5,x=a", "cfg", {"scale": 2.5, "x": "a"}),
    ("cfg: scale = 2 , space=eps", "cfg", {"scale": 2, "space": "eps"}),
    ("jeffrey:target=[0:0.5,1:0.5],scale=2", "jeffrey", {"target": "0:0.5,1:0.5", "scale": 2}),
    ("jeffrey:target=0:0.5;1:0.5,scale=2", "jeffrey", {"target": "0:0.5;1:0.5", "scale": 2}),
    ("jeffrey:target=0:0.5,1:0.5,scale=2", "jeffrey", {"target": "0:0.5,1:0.5", "scale": 2}),
    ("noisetilt:reward=(class_logp:label=3,classifier=clean),beta=0.5", "noisetilt",
     {"reward": "class_logp:label=3,classifier=clean", "beta": 0.5}),
    ("noisetilt:reward=class_logp:label=3;classifier=clean,beta=0.5", "noisetilt",
     {"reward": "class_logp:label=3;classifier=clean", "beta": 0.5}),
    ("x:a=[[1,2],(3)],b=(c:d=[e,f])", "x", {"a": "[1,2],(3)", "b": "c:d=[e,f]"}),
    ("x:p='a, b',q=None,r=True,s=-inf,t=1e309,u=", "x",
     {"p": "a, b", "q": None, "r": True, "s": -math.inf, "t": math.inf, "u": ""}),
    ("x:path=/tmp/a(1).json", "x", {"path": "/tmp/a(1).json"}),
])
def test_parse(text, name, options):
    spec = Spec.parse(text)
    assert spec == Spec(name, options)
    assert parse_spec(text) == (name, options)


def test_legacy_nested_semicolons_are_separators_on_request():
    assert Spec.parse("class_logp:label=3;classifier=clean", separators=",;") == \
        Spec("class_logp", {"label": 3, "classifier": "clean"})


@pytest.mark.parametrize("spec", [
    Spec("euler"),
    Spec("cfg", {"scale": 2.0, "space": "eps", "sigma_hi": math.inf, "sigma_lo": -math.inf}),
    Spec("jeffrey", {"target": "0:0.5,1:0.5", "model_marginal": "0.5;0.3;0.2"}),
    Spec("noisetilt", {"reward": "class_logp:label=3,classifier=clean", "beta": 0.25}),
    Spec("x", {"a": "3", "b": "None", "c": "", "d": " padded ", "e": "it's, odd", "f": "[", "g": "a)b,c",
               "h": True, "i": None, "j": -7, "k": 1e-4, "l": "'quoted'", "m": "true"}),
    Spec.parse("stein-dpm:eta=1,apply_steps=all"),
])
def test_round_trip(spec):
    assert Spec.parse(str(spec)) == spec
    assert Spec.parse(str(Spec.parse(str(spec)))) == spec


def test_nested_spec_value_is_written_in_parentheses():
    outer = Spec("noisetilt", {"reward": Spec("class_logp", {"label": 3, "classifier": "clean"})})
    assert str(outer) == "noisetilt:reward=(class_logp:label=3,classifier=clean)"
    assert Spec.parse(str(outer)).options["reward"] == "class_logp:label=3,classifier=clean"


@pytest.mark.parametrize("text, match", [
    ("cfg:2.5", r"bad option '2\.5' in 'cfg:2\.5'; expected key=value"),
    ("dpmpp_2m:order=1,order=3", "option 'order' given twice"),
    ("x:a=[1,2", r"unclosed '\['"),
    ("x:a=(1]", r"stray '\]'"),
    ("x:a=[1]b", r"unexpected 'b' after a bracketed"),
    (":a=1", "no name"),
    ("x:a='b", "unclosed quote"),
])
def test_malformed_specs(text, match):
    with pytest.raises(ValueError, match=match) as err:
        Spec.parse(text)
    assert "\n" not in str(err.value)


# ---- the bad specs of the issue: one line, naming the valid keys ---------------------------------------

def _one_line_error(registry, spec, **kw):
    with pytest.raises(ValueError) as err:
        registry.create(spec, **kw)
    message = str(err.value)
    assert "\n" not in message
    assert not re.search(r"\w\(\) (got|missing|takes)", message), message  # no Python signature leaks
    return message


def test_unknown_option_lists_the_valid_ones():
    message = _one_line_error(GUIDANCE, "noisetilt:betta=0.05", resources=RES)
    assert message.startswith("unknown option 'betta' for guidance 'noisetilt'; valid: reward=class_logp, "
                              "rho=search_matched, strength=1.0, beta=1.0, grad_wrt=x_t, tile=8")
    assert "resources" not in message  # supplied by the caller, not an option
    message = _one_line_error(SOLVERS, "unipc_bh2:order=5")
    assert message == ("unknown option 'order' for solver 'unipc_bh2'; valid: predictor_order=2, variant=bh2, "
                       "corrector=True, lower_order_final=True")
    assert _one_line_error(SOLVERS, "heun:eta=1") == "unknown option 'eta' for solver 'heun'; valid: space=ve"
    assert _one_line_error(SOLVERS, "heunpp2:eta=1") == "unknown option 'eta' for solver 'heunpp2'; valid: (none: it takes no options)"
    assert _one_line_error(GUIDANCE, "cfg", resources=RES, bogus=1).startswith("unknown option 'bogus' for guidance 'cfg'")


def test_check_validates_keys_and_types_without_building():
    assert SOLVERS.check("stein-dpm:eta=1") == "stein-dpm"
    with pytest.raises(ValueError, match="unknown option 'betta' for guidance 'noisetilt'"):
        GUIDANCE.check("noisetilt:betta=0.05")
    with pytest.raises(ValueError, match="unknown step schedule 'karas'; valid: karras"):
        STEP_SCHEDULES.check("karas")
    with pytest.raises(ValueError, match="option 'rho' of step schedule 'karras' must be a number, got high"):
        STEP_SCHEDULES.check("karras:rho=high")


@pytest.mark.parametrize("text, expected", [
    ("false", False), ("False", False), ("0", False), ("true", True), ("True", True), ("1", True),
])
def test_bool_options_read_words(text, expected):
    assert GUIDANCE.create(f"dps:normalize={text}", resources=RES).normalize is expected


@pytest.mark.parametrize("text", ["yes", "no", "on", "off", "2", "maybe"])
def test_bool_options_accept_true_false_1_0_only(text):
    with pytest.raises(ValueError, match="must be true or false"):
        GUIDANCE.create(f"dps:normalize={text}", resources=RES)


@pytest.mark.parametrize("spec, message", [
    ("noisetilt:tile=1e309", "option 'tile' of guidance 'noisetilt' must be a finite integer, got inf"),
    ("noisetilt:tile=2.5", "option 'tile' of guidance 'noisetilt' must be an integer, got 2.5"),
    ("noisetilt:tile=eight", "option 'tile' of guidance 'noisetilt' must be an integer, got eight"),
    ("noisetilt:tile=True", "option 'tile' of guidance 'noisetilt' must be an integer, got True"),
    ("noisetilt:tile=100000000000000000000", "option 'tile' of guidance 'noisetilt' is out of range"),
    ("noisetilt:beta=nan", "option 'beta' of guidance 'noisetilt' must be a number, got nan"),
    ("noisetilt:beta=big", "option 'beta' of guidance 'noisetilt' must be a number, got big"),
    ("dps:normalize=maybe", "option 'normalize' of guidance 'dps' must be true or false"),
    ("cfg:scale=None", "option 'scale' of guidance 'cfg' must be a number, got None"),
    ("dpmpp_2m:solver_type=euler", "option 'solver_type' of solver 'dpmpp_2m' must be one of midpoint, heun"),
])
def test_typed_options_refuse_bad_values(spec, message):
    registry = SOLVERS if spec.startswith("dpmpp") else GUIDANCE
    assert _one_line_error(registry, spec, **({} if registry is SOLVERS else {"resources": RES})).startswith(message)


def test_typed_options_convert():
    assert SOLVERS.create("dpmpp_2m:order=3.0").order == 3
    assert SOLVERS.create("euler:eta=1").eta == 1.0 and isinstance(SOLVERS.create("euler:eta=1").eta, float)
    assert GUIDANCE.create("noisetilt:tile=4.0", resources=RES).tile == 4
    assert GUIDANCE.create("cfg:sigma_hi=inf,sigma_lo=0.1", resources=RES).sigma_hi == math.inf
    assert REWARDS.create("class_logp:label=[2]", resources=RES).label == 2  # bracketed text of an int option
    assert REWARDS.create("class_logp:label=none", resources=RES).label is None


def test_factory_type_errors_become_one_line():
    def broken(a: int = 1):
        raise TypeError("broken() missing 1 required positional argument: 'x'")

    registry = Registry("thing")
    registry.add("broken", broken, "raises")
    assert _one_line_error(registry, "broken:a=2") == \
        "bad options for thing 'broken' (missing 1 required positional argument: 'x'); valid: a=1"


# ---- list values: bracketed and legacy forms build the same thing --------------------------------------

@pytest.mark.parametrize("target", ["[0:0.5,1:0.5]", "0:0.5;1:0.5", "0:0.5,1:0.5", "[0.5,0.5,0]"])
def test_list_values_bracketed_and_legacy(target):
    term = GUIDANCE.create(f"jeffrey:target={target},model_marginal=[0.5,0.3,0.2]", resources=RES)
    assert term.target.tolist() == [0.5, 0.5, 0.0]
    assert term.model_marginal.tolist() == [0.5, 0.3, 0.2]


@pytest.mark.parametrize("window", ["[0.2,0.6]", "0.2;0.6"])
def test_freedom_window_both_forms(window):
    assert GUIDANCE.create(f"freedom:window={window}", resources=RES).window == (0.2, 0.6)


@pytest.mark.parametrize("reward", ["(class_logp:label=2,classifier=clean)", "class_logp:label=2;classifier=clean"])
def test_nested_reward_bracketed_and_legacy(reward):
    term = GUIDANCE.create(f"noisetilt:reward={reward},beta=0.5", resources=RES)
    assert (term.reward.label, term.reward.kind, term.beta) == (2, "clean", 0.5)


def test_nested_reward_errors_name_the_reward():
    with pytest.raises(ValueError, match="unknown option 'lable' for reward 'class_logp'; valid: label=None"):
        GUIDANCE.create("dps:reward=(class_logp:lable=2)", resources=RES)
    with pytest.raises(ValueError, match="unknown reward 'nope'; valid: class_logp, ink"):
        GUIDANCE.create("dps:reward=nope", resources=RES)


# ---- names and aliases ---------------------------------------------------------------------------------

def test_aliases():
    assert SOLVERS.canonical("stein-dpm") == "stein_dpm" and SOLVERS.canonical("stein_dpm") == "stein_dpm"
    assert SOLVERS.canonical("stein-unipc") == "stein_unipc" and SOLVERS.canonical("ddim") == "euler"
    assert SOLVERS.aliases("stein_dpm") == ("stein-dpm",) and SOLVERS.aliases("stein-dpm") == ("stein-dpm",)
    assert "stein-dpm" in SOLVERS and "stein-dpm" not in SOLVERS.names() and "stein-dpm" not in list(SOLVERS)
    assert Spec.parse("stein-dpm:eta=1").name == "stein-dpm"  # the name as typed, for records
    old, new = SOLVERS.create("stein-dpm:eta=1"), SOLVERS.create("stein_dpm:eta=1")
    assert isinstance(old, SteinDiff) and type(old.base) is type(new.base) is DPMSolverPP
    assert old.base.eta == new.base.eta == 1.0 and old.stochastic and new.stochastic
    assert isinstance(SOLVERS.create("stein-unipc").base, UniPC)
    assert isinstance(SOLVERS.create("ddim:eta=1"), Euler) and SOLVERS.create("ddim:eta=1").eta == 1.0
    with pytest.raises(ValueError, match="unknown solver 'stein dpm'; valid: euler, euler_ancestral"):
        SOLVERS.canonical("stein dpm")


def test_names_are_snake_case_and_registration_refuses_others():
    for registry in REGISTRIES:
        for name in registry.names():
            assert re.fullmatch(r"[a-z][a-z0-9_]*", name), (registry.kind, name)
    registry = Registry("thing")
    with pytest.raises(ValueError, match="not snake_case"):
        registry.add("my-thing", dict, "x")
    registry.add("thing", dict, "x", aliases=("old-thing",))
    with pytest.raises(ValueError, match="'old-thing' is already registered"):
        registry.add("other", dict, "y", aliases=("old-thing",))


# ---- option introspection ------------------------------------------------------------------------------

def test_every_option_has_a_default_and_a_meaning():
    for registry in REGISTRIES:
        for name in registry.names():
            for option in registry.options(name):
                assert option.meaning, f"{registry.kind} {name!r}: option {option.name!r} has no meaning"
                assert option.name not in registry.context


def test_options_follow_the_signature_with_presets():
    opts = {o.name: o for o in SOLVERS.options("dpmpp_3m_sde")}
    assert list(opts) == ["order", "eta", "solver_type", "lower_order_final", "third_order"]
    assert (opts["order"].default, opts["eta"].default) == (3, 1.0)
    assert (opts["order"].kind, opts["eta"].kind, opts["lower_order_final"].kind) == ("int", "float", "bool")
    assert opts["solver_type"].choices == ("midpoint", "heun")
    assert [str(o) for o in GUIDANCE.options("cfg")][:2] == ["scale=2.0", "rescale=0.0"]


def test_docstring_args_give_meanings():
    def make(alpha: float = 0.5, label: int | None = None):
        """A test factory.

        Args:
            alpha: how much, in [0, 1];
                continued here.
            label: class to aim at.
        """

    registry = Registry("thing")
    registry.add("make", make, "x", meanings={"label": "given at registration"})
    opts = {o.name: o for o in registry.options("make")}
    assert opts["alpha"].meaning == "how much, in [0, 1]; continued here."
    assert opts["label"].meaning == "given at registration"
    assert (opts["label"].kind, opts["label"].nullable) == ("int", True)


def test_lazy_factories_are_imported_on_first_use(tmp_path, monkeypatch):
    (tmp_path / "lazy_factory_probe.py").write_text("def make(size: int = 3):\n    return [0] * size\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("thing")
    registry.add("zeros", "lazy_factory_probe:make", "a list of zeros")
    assert registry.check("zeros") == "zeros" and "zeros" in registry
    assert "lazy_factory_probe" not in __import__("sys").modules  # a name check imports nothing
    assert registry.create("zeros:size=2.0") == [0, 0]
    assert "lazy_factory_probe" in __import__("sys").modules


def test_round_trip_of_arbitrary_text_values():
    import random

    rng = random.Random(0)
    alphabet = "ab1.,;:=[]()'\" -e\\"
    for _ in range(3000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        spec = Spec("x", {"a": value, "b": 1})
        assert Spec.parse(str(spec)) == spec, (value, str(spec))
