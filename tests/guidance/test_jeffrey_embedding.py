"""Jeffrey guidance with an embedding target (docs/methods/jeffrey.md): a linear
logistic ratio classifier on feature embeddings and the Tweedie plug-in guidance term.

Exact answers used here:

* two Gaussians with equal covariance have a log density ratio linear in ``x``, so the fitted
  logistic ratio on ``f(x) = x`` must recover it (whatever the set sizes: classes are balanced);
* for a Gaussian model and a linear ``log w``, the plug-in ``grad log w(D(x_t))`` equals the exact
  ``grad log E[w(x0) | x_t]``, so the guided denoiser is the exact denoiser of the tilted Gaussian;
* for two mixtures sharing components, ``log q(x) / p(x)`` is closed-form; an injective feature map
  leaves the ratio unchanged (``log q_f(f(x)) / p_f(f(x)) = log q(x) / p(x)``, the Jacobians cancel).
"""

import math
from types import SimpleNamespace

import pytest
import torch

from diffsample.guidance import Interval
from diffsample.guidance.jeffrey.embedding_guidance import JeffreyEmbedding, RatioClassifier, jeffrey_embedding_factory, feature_map
from diffsample.guidance.term import Resources
from diffsample.samplers import Sampler
from diffsample.solvers import Euler, TimeUniform
from diffsample.core.accounting import count_events
from diffsample.core.registry import Registry
from diffsample.testbed.gmm import GaussianMixture

from .gmm_models import NS, PI, PI_STAR, alpha_sigma, assign, mixture, proportions

GMM = mixture(PI)
TARGET = mixture(PI_STAR)
FEATURES, HIDDEN = 32, 64


def random_mlp(seed: int = 0):
    """A fixed random 2-layer tanh MLP ``R^2 -> R^32``.

    Why a linear logistic model on these features can represent the GMM log ratio: the hidden layer
    is a bank of 64 random tanh ridges whose offsets (std 2) put their transitions across the data's
    range (|x| <= 3.5), i.e. random features in the sense of Rahimi & Recht; the output layer mixes
    them into 32 smooth, still generic features. The true ``log q/p`` of two mixtures sharing
    components is smooth and nearly piecewise constant (``log pi*_k / pi_k`` on component ``k``), which a
    linear read-out of such features fits closely (correlation ~0.99 at n = 4000 per set).
    """
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(HIDDEN, 2, generator=g, dtype=torch.float64)
    b1 = 2.0 * torch.randn(HIDDEN, generator=g, dtype=torch.float64)
    w2 = 2.0 * torch.randn(FEATURES, HIDDEN, generator=g, dtype=torch.float64) / math.sqrt(HIDDEN)
    b2 = 0.5 * torch.randn(FEATURES, generator=g, dtype=torch.float64)

    def features(x):
        return torch.tanh(torch.tanh(x.reshape(x.shape[0], -1) @ w1.T + b1) @ w2.T + b2)

    return features


F_MLP = random_mlp()


@pytest.fixture(scope="module")
def gmm_ratio():
    g = torch.Generator().manual_seed(1)
    return RatioClassifier.fit(F_MLP(TARGET.sample(4000, generator=g)), F_MLP(GMM.sample(4000, generator=g)), l2=1e-3)


def _states(gmm=GMM, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=torch.float64) * (NS.t_max - 0.02) + 0.01
    a, s = alpha_sigma(t)
    x0 = gmm.sample(n, generator=g)
    x = a[:, None] * x0 + s[:, None] * torch.randn(n, gmm.dim, generator=g, dtype=torch.float64)
    return x, t, a, s


def mmd2(x, y):
    """Unbiased MMD^2 with an RBF kernel at the median bandwidth."""
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    k = torch.exp(-d2 / d2[d2 > 0].median())
    n, m = len(x), len(y)
    kxx, kyy = k[:n, :n], k[n:, n:]
    return float((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
                 - 2 * k[:n, n:].mean())


def _identity(x):
    return x.reshape(x.shape[0], -1)


def _linear_ratio(a, b, seed=0):
    """A hand-built classifier with ``log_ratio(x) = a . x + b`` behind a random standardization."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(a.numel(), generator=g, dtype=torch.float64)
    std = 0.5 + torch.rand(a.numel(), generator=g, dtype=torch.float64)
    return RatioClassifier(mean, std, a * std, torch.tensor(b + float(a @ mean), dtype=torch.float64))


# ---- the ratio classifier ---------------------------------------------------------------------------

@pytest.mark.parametrize("n1,n0", [(20000, 20000), (5000, 20000)])
def test_fit_recovers_linear_log_ratio_of_two_gaussians(n1, n0):
    mu1, mu0, s = torch.tensor([1.0, 0.5]), torch.tensor([-0.5, 0.0]), 1.2
    g = torch.Generator().manual_seed(0)
    e1 = mu1 + s * torch.randn(n1, 2, generator=g, dtype=torch.float64)
    e0 = mu0 + s * torch.randn(n0, 2, generator=g, dtype=torch.float64)
    clf = RatioClassifier.fit(e1, e0, l2=0.0)
    slope_exact = (mu1 - mu0).double() / s**2
    bias_exact = -float(mu1.double() @ mu1.double() - mu0.double() @ mu0.double()) / (2 * s**2)
    slope = clf.weight / clf.std
    bias = float(clf.bias - slope @ clf.mean)
    assert torch.allclose(slope, slope_exact, atol=0.05), (slope, slope_exact)
    assert abs(bias - bias_exact) < 0.05, (bias, bias_exact)  # balanced: no log(n0/n1) offset left


def test_fitted_logit_tracks_true_gmm_log_ratio(gmm_ratio):
    g = torch.Generator().manual_seed(2)
    x = torch.cat([GMM.sample(2000, generator=g), TARGET.sample(2000, generator=g)])
    true = TARGET.log_prob(x) - GMM.log_prob(x)
    est = gmm_ratio.log_ratio(F_MLP(x))
    assert torch.corrcoef(torch.stack([true, est]))[0, 1] > 0.97
    assert (true - est).abs().mean() < 0.15


def test_save_load_round_trip(tmp_path, gmm_ratio):
    path = gmm_ratio.save(tmp_path / "sub" / "ratio.safetensors", metadata={"n_target": 4000})
    back = RatioClassifier.load(path)
    for k in ("mean", "std", "weight", "bias"):
        assert torch.equal(getattr(back, k), getattr(gmm_ratio, k))
    e = F_MLP(GMM.sample(16, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(back.log_ratio(e), gmm_ratio.log_ratio(e))
    assert back.log_ratio(e.float()).dtype == torch.float32
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "diffsample.RatioClassifier" and meta["n_target"] == "4000" and meta["dim"] == str(FEATURES)


# ---- the guidance term --------------------------------------------------------------------------------

def test_plugin_is_exact_for_gaussian_and_linear_log_ratio():
    # p_theta = N(mu, s^2 I), w(x) = exp(a.x + b): the target is N(mu + s^2 a, s^2 I), and
    # grad log E[w(x0) | x_t] = J_D^T a = grad_{x_t} log w(D(x_t)) exactly.
    f64 = dict(dtype=torch.float64)
    mu, s0, a = torch.tensor([[0.5, -1.0]], **f64), 0.7, torch.tensor([0.8, -0.4], **f64)
    model = GaussianMixture(mu, torch.tensor([s0], **f64), torch.tensor([1.0], **f64))
    target = GaussianMixture(mu + s0**2 * a, torch.tensor([s0], **f64), torch.tensor([1.0], **f64))
    term = JeffreyEmbedding(_linear_ratio(a, 0.3), _identity, logit_clip=None)
    guided = term(model.denoiser(NS))
    x, t, at, st = _states(model)
    assert torch.allclose(guided(x, t), target.denoised(x, at, st), rtol=0, atol=1e-10)
    assert torch.allclose(guided.correction(x, t), target.score(x, at, st) - model.score(x, at, st), rtol=0, atol=1e-8)


def test_guided_sampling_reduces_mmd_in_feature_and_x_space(gmm_ratio):
    n, steps = 1000, 100
    ref = TARGET.sample(n, generator=torch.Generator().manual_seed(7))
    sampler = Sampler(Euler(eta=1.0), TimeUniform(), steps)
    out = {}
    for key, den in [("plain", GMM.denoiser(NS)), ("guided", JeffreyEmbedding(gmm_ratio, F_MLP)(GMM.denoiser(NS)))]:
        torch.manual_seed(3)
        x = sampler(den, torch.randn(n, 2, dtype=torch.float64)).x
        out[key] = (mmd2(x, ref), mmd2(F_MLP(x), F_MLP(ref)), proportions(assign(TARGET, x), 3))
    (mx0, mf0, p0), (mx1, mf1, p1) = out["plain"], out["guided"]
    assert mx1 < 0.2 * mx0 and mf1 < 0.2 * mf0, out  # measured: x 0.17 -> 0.002, features 0.15 -> 0.002
    tv0, tv1 = 0.5 * (p0 - PI_STAR).abs().sum(), 0.5 * (p1 - PI_STAR).abs().sum()
    assert tv1 < 0.1 < tv0, (p0, p1)  # plug-in bias: measured (0.137, 0.247, 0.616) vs (0.2, 0.2, 0.6)


@pytest.mark.parametrize("window", [None, (0.0, 1.0)])
def test_vjp_counted_in_model_evals(window, gmm_ratio):
    steps, n = 8, 5
    term = JeffreyEmbedding(gmm_ratio, F_MLP)
    sampler = Sampler(Euler(eta=0.0), TimeUniform(), steps)
    grid = sampler.grid(NS)
    inside = steps
    guided_term = term
    if window is not None:
        guided_term = Interval(term, *window, base="unconditional")
        sve = [grid.sigma_list[i] / grid.alpha_list[i] for i in range(steps)]  # Euler: 1 call at each t_i
        inside = sum(window[0] < v <= window[1] for v in sve)
        assert 0 < inside < steps
    res = sampler(guided_term(GMM.denoiser(NS)), torch.randn(n, 2, dtype=torch.float64))
    assert res.nfe == steps
    assert res.model_evals == steps + 2 * inside  # one VJP = 2 forward-equivalents per network row
    assert res.events["backward_rows"] == inside * n


def test_grad_clip_caps_norm_and_logs_event(gmm_ratio):
    x, t, a, s = _states()
    free = JeffreyEmbedding(gmm_ratio, F_MLP)(GMM.denoiser(NS))
    clip = 0.05
    clipped = JeffreyEmbedding(gmm_ratio, F_MLP, scale=1.5, grad_clip=clip)(GMM.denoiser(NS))
    with count_events() as events:
        g = clipped.correction(x, t)
    g0 = free.correction(x, t)
    norm0 = g0.norm(dim=1)
    assert events["jeffrey_embedding_grad_clip"] == int((norm0 > clip).sum()) > 0
    assert (g.norm(dim=1) <= clip * (1 + 1e-12)).all()
    keep = norm0 <= clip
    assert torch.allclose(g[keep], g0[keep], rtol=0, atol=0)
    d = GMM.denoised(x, a, s)
    expect = d + 1.5 * (s**2 / a)[:, None] * g
    assert torch.allclose(clipped(x, t), expect, rtol=0, atol=1e-12)
    with count_events() as events:
        free.correction(x, t)
    assert "jeffrey_embedding_grad_clip" not in events


def test_logit_clip_flattens_and_logs():
    a = torch.tensor([0.8, -0.4], dtype=torch.float64)
    den = GMM.denoiser(NS)
    x, t, at, st = _states()
    term = JeffreyEmbedding(_linear_ratio(a, 50.0), _identity, logit_clip=20.0)
    with count_events() as events:
        out = term(den)(x, t)
    assert events["jeffrey_embedding_logit_clip"] == x.shape[0]
    assert torch.allclose(out, GMM.denoised(x, at, st), rtol=0, atol=0)  # clipped: zero gradient
    assert torch.equal(term.log_w(x), torch.full((x.shape[0],), 20.0, dtype=torch.float64))


def test_scale_zero_is_the_unguided_denoiser(gmm_ratio):
    x, t, a, s = _states()
    out = JeffreyEmbedding(gmm_ratio, F_MLP, scale=0.0)(GMM.denoiser(NS))(x, t)
    assert torch.equal(out, GMM.denoised(x, a, s))


# ---- factory ------------------------------------------------------------------------------------------

def test_factory_reads_file_and_window(tmp_path, gmm_ratio):
    path = gmm_ratio.save(tmp_path / "r.safetensors")
    res = Resources(clean_classifier=SimpleNamespace(features=F_MLP, num_features=FEATURES))
    term = jeffrey_embedding_factory(res, ratio=str(path), scale=2, grad_clip=100)
    assert isinstance(term, JeffreyEmbedding) and term.scale == 2.0 and term.grad_clip == 100.0
    assert term.features is F_MLP and torch.equal(term.ratio.weight, gmm_ratio.weight)
    windowed = jeffrey_embedding_factory(res, ratio=str(path), sigma_hi=0.5, logit_clip=None)
    assert isinstance(windowed, Interval) and windowed.sigma_hi == 0.5 and windowed.term.logit_clip is None
    assert feature_map(res) == (F_MLP, FEATURES)
    registry = Registry("guidance")  # the spec syntax the GUIDANCE registry line will use
    registry.add("jeffrey_embedding", jeffrey_embedding_factory, "test")
    term = registry.create(f"jeffrey_embedding:ratio={path},sigma_lo=0.01,sigma_hi=2,logit_clip=None", resources=res)
    assert (term.sigma_lo, term.sigma_hi, term.base, term.term.logit_clip) == (0.01, 2.0, "unconditional", None)


def test_factory_errors(tmp_path, gmm_ratio):
    path = gmm_ratio.save(tmp_path / "r.safetensors")
    with pytest.raises(ValueError, match="needs ratio=FILE.safetensors"):
        jeffrey_embedding_factory(Resources())
    with pytest.raises(ValueError, match="needs a feature network"):
        jeffrey_embedding_factory(Resources(), ratio=str(path))
    wrong = Resources(clean_classifier=SimpleNamespace(features=F_MLP, num_features=64))
    with pytest.raises(ValueError, match="expects 32 features, the model's feature network gives 64"):
        jeffrey_embedding_factory(wrong, ratio=str(path))


# ---- bad input ----------------------------------------------------------------------------------------

E = torch.randn(10, 3, dtype=torch.float64)


@pytest.mark.parametrize("e1,e0,match", [
    (torch.empty(0, 3), E, "e_target is empty"),
    (E, torch.empty(0, 3), "e_model is empty"),
    (E, torch.cat([E[:9], torch.full((1, 3), math.nan)]), r"e_model contains NaN or inf \(1 of 10 rows\)"),
    (torch.cat([E[:9], torch.full((1, 3), math.inf)]), E, "e_target contains NaN or inf"),
    (E, E[:, :2], "e_target has 3 features but e_model has 2"),
    (E[:, 0], E, r"e_target must have shape \(n, d\)"),
    (E.numpy(), E, "e_target must be a tensor"),
])
def test_fit_bad_embeddings(e1, e0, match):
    with pytest.raises(ValueError, match=match):
        RatioClassifier.fit(e1, e0)


def test_fit_bad_options():
    with pytest.raises(ValueError, match="l2 must be"):
        RatioClassifier.fit(E, E + 1, l2=-1.0)
    with pytest.raises(ValueError, match="max_iter must be"):
        RatioClassifier.fit(E, E + 1, max_iter=0)


def test_bad_classifier_and_term_options(gmm_ratio):
    with pytest.raises(ValueError, match=r"std must have shape \(3,\)"):
        RatioClassifier(torch.zeros(3), torch.ones(2), torch.zeros(3), torch.tensor(0.0))
    with pytest.raises(ValueError, match="std must be > 0"):
        RatioClassifier(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.zeros(2), torch.tensor(0.0))
    with pytest.raises(ValueError, match="bias must be a scalar"):
        RatioClassifier(torch.zeros(2), torch.ones(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"embeddings must have shape \(B, 32\), got \(4, 3\)"):
        gmm_ratio.log_ratio(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="ratio must be a RatioClassifier"):
        JeffreyEmbedding("ratio.safetensors", F_MLP)
    with pytest.raises(ValueError, match="features must be a callable"):
        JeffreyEmbedding(gmm_ratio, None)
    with pytest.raises(ValueError, match="scale must be"):
        JeffreyEmbedding(gmm_ratio, F_MLP, scale=-1.0)
    with pytest.raises(ValueError, match="grad_clip must be > 0"):
        JeffreyEmbedding(gmm_ratio, F_MLP, grad_clip=0.0)
    with pytest.raises(ValueError, match="unknown jeffrey_embedding base"):
        JeffreyEmbedding(gmm_ratio, F_MLP, base="both")


@pytest.mark.parametrize("features,got", [
    (lambda x: F_MLP(x)[:, :5], r"\(64, 5\)"),
    (lambda x: F_MLP(x)[0], r"\(32,\)"),
    (lambda x: F_MLP(x).tolist(), "list"),
])
def test_features_with_wrong_shape(features, got, gmm_ratio):
    x, t, _, _ = _states()
    guided = JeffreyEmbedding(gmm_ratio, features)(GMM.denoiser(NS))
    with pytest.raises(ValueError, match=r"features\(x0\) must return shape \(B, d\) = \(64, 32\).*got " + got):
        guided(x, t)


def test_load_errors(tmp_path, gmm_ratio):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="not found"):
        RatioClassifier.load(tmp_path / "missing.safetensors")
    pickled = tmp_path / "ratio.pt"
    torch.save({"mean": gmm_ratio.mean}, pickled)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        RatioClassifier.load(pickled)
    keys = tmp_path / "keys.safetensors"
    save_file({"mean": torch.zeros(2), "std": torch.ones(2), "w": torch.zeros(2)}, str(keys))
    with pytest.raises(ValueError, match=r"missing \['bias', 'weight'\]; unexpected \['w'\]"):
        RatioClassifier.load(keys)
    shapes = tmp_path / "shapes.safetensors"
    save_file({"mean": torch.zeros(2), "std": torch.ones(2), "weight": torch.zeros(3), "bias": torch.zeros(1)},
              str(shapes))
    with pytest.raises(ValueError, match=r"shapes.safetensors'.*weight must have shape \(2,\)"):
        RatioClassifier.load(shapes)
