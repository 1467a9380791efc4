"""Adapters eps / v / x0 / flow-velocity -> denoised are exact on the GMM."""

import pytest
import torch

from diffsample.samplers import ModelDenoiser, from_eps, from_v, from_velocity, from_x0
from diffsample.solvers import VE, LinearVP, RectifiedFlow
from diffsample.solvers.numerics import append_dims
from diffsample.testbed.gmm import GaussianMixture

GMM = GaussianMixture.random(dim=4, components=3, seed=0)


def _networks(ns):
    def exact(x, t):
        a, s = append_dims(ns.alpha(t.double()), x.ndim), append_dims(ns.sigma(t.double()), x.ndim)
        return a, s, GMM.denoised(x, ns.alpha(t.double()), ns.sigma(t.double()))

    def eps(x, t):
        a, s, d = exact(x, t)
        return (x - a * d) / s

    def v(x, t):
        a, s, d = exact(x, t)
        return a * (x - a * d) / s - s * d

    def x0(x, t):
        return exact(x, t)[2]

    def velocity(x, t):
        a, s, d = exact(x, t)
        return (x - a * d) / s - d

    return eps, v, x0, velocity


@pytest.mark.parametrize("ns", [LinearVP(), VE(), RectifiedFlow()], ids=repr)
def test_adapters_recover_denoised(ns):
    eps, v, x0, velocity = _networks(ns)
    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.full((6,), 0.5 * (ns.t_min + ns.t_max_finite), dtype=torch.float64)
    expected = GMM.denoised(x, ns.alpha(t), ns.sigma(t))
    adapters = [from_eps(eps, ns), from_v(v, ns), from_x0(x0, ns)]
    if isinstance(ns, RectifiedFlow):
        adapters.append(from_velocity(velocity, ns))
    for adapter in adapters:
        assert torch.allclose(adapter(x, t), expected, rtol=1e-10, atol=1e-10), adapter.prediction_type
    # A batch with different times per sample takes the general path.
    t_var = torch.linspace(ns.t_min + 0.01, ns.t_max_finite, 6, dtype=torch.float64)
    assert torch.allclose(from_eps(eps, ns)(x, t_var), GMM.denoised(x, ns.alpha(t_var), ns.sigma(t_var)), rtol=1e-9)


def test_bad_prediction_types():
    with pytest.raises(ValueError, match="unknown prediction_type 'score'; valid: epsilon"):
        ModelDenoiser(lambda x, t: x, VE(), "score")
    with pytest.raises(ValueError, match="needs a RectifiedFlow"):
        from_velocity(lambda x, t: x, VE())
