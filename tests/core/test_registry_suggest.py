"""A misspelt name gets the closest registered names at the end of the one-line error."""

import pytest

from diffsample.core.registry import did_you_mean
from diffsample.solvers import SOLVERS


def test_did_you_mean_picks_close_names_only():
    assert did_you_mean("noisetlit", ["noisetilt", "dps", "svdd"]) == "; did you mean 'noisetilt'?"
    assert did_you_mean("zzzz", ["noisetilt", "dps"]) == ""


def test_unknown_solver_ends_with_suggestion():
    with pytest.raises(ValueError) as info:
        SOLVERS.create("dpmpp_2z")
    message = str(info.value)
    assert message.startswith("unknown solver 'dpmpp_2z'; valid: euler")
    assert "did you mean 'dpmpp_2m'" in message.rsplit(";", 1)[-1]
