"""Guidance terms: denoiser -> denoiser transforms (see :mod:`.term`).

Registry: :data:`GUIDANCE`. Each factory takes ``resources`` (:class:`~.term.Resources`, what the
model offers: classifiers, decoder) plus the options of the spec ``name:key=value,...``:
``GUIDANCE.create("cfg:scale=2", resources=Resources(conditional=True))``.

Reward guidance (``noisetilt``, ``dps``, ``freedom``, ``svdd``, ``best_of_n``) takes
``reward=NAME`` or, with options, ``reward=(NAME:key=value,...)`` from :data:`~.rewards.REWARDS`
(default ``class_logp``: the log-probability of each sample's class under the model's noise-aware
classifier).

The CFG family accepts ``sigma_lo`` / ``sigma_hi``: apply guidance only for VE sigma in
``(sigma_lo, sigma_hi]`` (:class:`~.interval.Interval`). A list value is bracketed, since ``,``
separates options: ``jeffrey:target=[0:0.5,1:0.5]`` (or a JSON file path); the older
``target=0:0.5;1:0.5`` is read too (grammar: :mod:`diffsample.core.spec`). Every option, with its
default and meaning: ``diffsample list NAME``.
"""

from __future__ import annotations

import importlib
import math

from diffsample.core.registry import Registry

# Public names, imported on first access (module ``__getattr__``): importing this package -- the
# registry, for a name check -- imports no guidance module, and the factories below import what
# they build.
_LAZY = {
    "APG": "diffsample.guidance.apg",
    "Cond": "diffsample.guidance.term",
    "Denoiser": "diffsample.guidance.term",
    "Guidance": "diffsample.guidance.term",
    "Resources": "diffsample.guidance.term",
    "BestOfN": "diffsample.guidance.best_of_n",
    "DPS": "diffsample.guidance.dps",
    "FreeDoM": "diffsample.guidance.dps",
    "NoiseTilt": "diffsample.guidance.noisetilt",
    "REWARDS": "diffsample.guidance.rewards",
    "Reward": "diffsample.guidance.rewards",
    "RewardError": "diffsample.guidance.rewards",
    "RewardModelMissing": "diffsample.guidance.rewards",
    "as_reward": "diffsample.guidance.rewards",
    "reward_from_spec": "diffsample.guidance.rewards",
    "SVDD": "diffsample.guidance.svdd",
    "TDS": "diffsample.guidance.jeffrey.twist",
    "whiten": "diffsample.guidance.whitening",
    "CFG": "diffsample.guidance.cfg",
    "CFGZeroStar": "diffsample.guidance.cfg_zero_star",
    "CFGPlusPlus": "diffsample.guidance.cfgpp",
    "ClassifierGuidance": "diffsample.guidance.classifier",
    "NoGuidance": "diffsample.guidance.identity",
    "Interval": "diffsample.guidance.interval",
    "within": "diffsample.guidance.interval",
    "JeffreyEmbedding": "diffsample.guidance.jeffrey.embedding_guidance",
    "RatioClassifier": "diffsample.guidance.jeffrey.embedding_guidance",
    "jeffrey_embedding_factory": "diffsample.guidance.jeffrey.embedding_guidance",
    "JeffreyGuidance": "diffsample.guidance.jeffrey.class_guidance",
    "MarginalEstimate": "diffsample.guidance.jeffrey.class_marginal",
    "estimate_marginal": "diffsample.guidance.jeffrey.class_marginal",
    "load_marginal": "diffsample.guidance.jeffrey.class_marginal",
    "parse_target": "diffsample.guidance.jeffrey.class_marginal",
    "save_marginal": "diffsample.guidance.jeffrey.class_marginal",
}


def _none(resources: Resources) -> Guidance:
    from diffsample.guidance.identity import NoGuidance

    return NoGuidance()


def _need_conditional(resources: Resources, name: str) -> None:
    if not resources.conditional:
        raise ValueError(f"guidance {name!r} needs a conditional model (one with a null / negative condition)")


def _window(term: Guidance, sigma_lo: float, sigma_hi: float, base: str = "conditional") -> Guidance:
    from diffsample.guidance.interval import within

    return within(term, float(sigma_lo), float(sigma_hi), base)


def _cfg(resources: Resources, scale: float = 2.0, rescale: float = 0.0, space: str = "eps",
         sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
    from diffsample.guidance.cfg import CFG

    _need_conditional(resources, "cfg")
    return _window(CFG(scale=float(scale), rescale=float(rescale), space=space), sigma_lo, sigma_hi)


def _cfg_rescale(resources: Resources, scale: float = 5.0, phi: float = 0.7, space: str = "eps",
                 sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
    from diffsample.guidance.cfg import CFG

    _need_conditional(resources, "cfg_rescale")
    return _window(CFG(scale=float(scale), rescale=float(phi), space=space), sigma_lo, sigma_hi)


def _apg(resources: Resources, scale: float = 7.5, eta: float = 0.0, momentum: float = -0.5,
         norm_threshold: float = 15.0, space: str = "x0", sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
    from diffsample.guidance.apg import APG

    _need_conditional(resources, "apg")
    return _window(APG(float(scale), float(eta), float(momentum), float(norm_threshold), space), sigma_lo, sigma_hi)


def _cfgpp(resources: Resources, scale: float = 0.6, sampler=None, grid=None) -> Guidance:
    from diffsample.guidance.cfgpp import CFGPlusPlus

    _need_conditional(resources, "cfgpp")
    return CFGPlusPlus(float(scale), grid=grid, sampler=sampler)


def _cfg_zero_star(resources: Resources, scale: float = 4.0, zero_init_steps: int = 0, space: str = "flow",
                   sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
    from diffsample.guidance.cfg_zero_star import CFGZeroStar

    _need_conditional(resources, "cfg_zero_star")
    return _window(CFGZeroStar(float(scale), int(zero_init_steps), space), sigma_lo, sigma_hi)


def _classifier_resources(resources: Resources, name: str, estimator: str) -> None:
    if estimator == "noisy" and resources.classifier is None:
        raise ValueError(f"guidance {name!r} needs a noise-aware classifier (Resources.classifier); the model "
                         "provides none" + (" (it has a clean classifier: use estimator=tweedie)"
                                            if resources.clean_classifier is not None else ""))
    if estimator == "tweedie" and resources.clean_classifier is None:
        raise ValueError(f"guidance {name!r} with estimator=tweedie needs a clean classifier "
                         "(Resources.clean_classifier); the model provides none")


def _classifier(resources: Resources, scale: float = 1.0, label: int | None = None, estimator: str = "noisy",
                base: str = "unconditional", sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
    from diffsample.guidance.classifier import ClassifierGuidance

    _classifier_resources(resources, "classifier", estimator)
    term = ClassifierGuidance(resources.classifier, resources.clean_classifier, float(scale),
                              None if label is None else int(label), estimator=estimator, base=base)
    return _window(term, sigma_lo, sigma_hi, base)


def _jeffrey(resources: Resources, target=None, model_marginal=None, estimator: str = "noisy",
             variant: str = "score", scale: float = 1.0, log_w_clip: float | None = None, prune: float = 0.0,
             sigma_lo: float = 0.0, sigma_hi: float = math.inf, particles: int = 1, ess: float = 0.5,
             resample: str = "systematic", tds_seed: int = 0, marginal_samples: int = 1000,
             marginal_cache: str | None = None) -> Guidance:
    from diffsample.guidance.jeffrey.class_guidance import JeffreyGuidance
    from diffsample.guidance.jeffrey.class_marginal import load_marginal, parse_target
    from diffsample.guidance.jeffrey.twist import TDS

    if target is None:
        raise ValueError("guidance 'jeffrey' needs target=[CLASS:PROB,...] or target=FILE.json")
    _classifier_resources(resources, "jeffrey", "noisy" if variant == "conditional" else estimator)
    if variant == "conditional":
        _need_conditional(resources, "jeffrey (variant=conditional)")
    num_classes = resources.num_classes or getattr(resources.classifier, "num_classes", None)
    p_star = parse_target(str(target) if not isinstance(target, dict) else target, num_classes)
    p_model = None
    if model_marginal is not None:
        text = str(model_marginal)
        if text.endswith(".json"):
            est = load_marginal(text)
            if est is None:
                raise ValueError(f"model marginal file {text!r} not found")
            p_model = est.probs
        else:
            p_model = parse_target(text, p_star.numel())
    term = JeffreyGuidance(p_star, p_model, resources.classifier, resources.clean_classifier, estimator=estimator,
                           variant=variant, scale=float(scale), prune=float(prune),
                           log_w_clip=None if log_w_clip is None else float(log_w_clip),
                           tds=TDS(particles, float(ess), str(resample), int(tds_seed)) if particles != 1 else None,
                           marginal_samples=marginal_samples,
                           marginal_cache=None if marginal_cache is None else str(marginal_cache))
    return _window(term, sigma_lo, sigma_hi, "unconditional")


def _noisetilt(resources: Resources, reward="class_logp", rho: str = "search_matched", strength: float = 1.0,
               beta: float = 1.0, grad_wrt: str = "x_t", tile: int = 8, whiten_alpha: float = 1e-4,
               schedule: tuple = (), width: int = 20, whitening: str = "normalize") -> Guidance:
    # The name's defaults are the best variant measured (docs/methods/noisetilt.md): search-matched rho
    # with the normalised gradient; the paper's 2OS whitening is whitening=2os (the NoiseTilt class default).
    from diffsample.guidance.noisetilt import NoiseTilt
    from diffsample.guidance.rewards import reward_from_spec

    return NoiseTilt(reward_from_spec(reward, resources), str(rho), float(strength), float(beta), str(grad_wrt),
                     resources.decode, int(tile), float(whiten_alpha), schedule, width, str(whitening))


def _dps(resources: Resources, reward="class_logp", scale: float = 1.0, normalize: bool = False,
         grad_wrt: str = "x_t", sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
    from diffsample.guidance.dps import DPS
    from diffsample.guidance.rewards import reward_from_spec

    term = DPS(reward_from_spec(reward, resources), float(scale), bool(normalize), str(grad_wrt), resources.decode)
    return _window(term, sigma_lo, sigma_hi)


def _freedom(resources: Resources, reward="class_logp", scale: float = 1.0, normalize: bool = False,
             grad_wrt: str = "x_t", repeats: int = 2, window: str = "0.3,0.7") -> Guidance:
    from diffsample.guidance.dps import FreeDoM
    from diffsample.guidance.rewards import reward_from_spec

    lo, _, hi = str(window).replace(",", ";").partition(";")
    try:
        bounds = (float(lo), float(hi))
    except ValueError:
        raise ValueError(f"freedom: window must be [START,STOP] fractions, got {window!r}") from None
    return FreeDoM(reward_from_spec(reward, resources), float(scale), bool(normalize), str(grad_wrt),
                   resources.decode, repeats=repeats, window=bounds)


def _svdd(resources: Resources, reward="class_logp", particles: int = 8, temperature: float = 0.0,
          seed: int = 0, k: int | None = None) -> Guidance:
    from diffsample.guidance.rewards import reward_from_spec
    from diffsample.guidance.svdd import SVDD

    return SVDD(reward_from_spec(reward, resources), particles if k is None else k, float(temperature),
                resources.decode, seed)


def _best_of_n(resources: Resources, reward="class_logp", n: int = 4) -> Guidance:
    from diffsample.guidance.best_of_n import BestOfN
    from diffsample.guidance.rewards import reward_from_spec

    return BestOfN(reward_from_spec(reward, resources), n, resources.decode)


# ---- one line per option, for `diffsample list NAME` and the registry's error messages -----------------

_WINDOW = {"sigma_lo": "guide only where the VE sigma is above sigma_lo",
           "sigma_hi": "guide only where the VE sigma is at most sigma_hi (inf: no upper bound)"}
_REWARD = ("reward: NAME or (NAME:key=value,...) from `diffsample list rewards`, or a Python callable "
           "(x0) -> (B,)")
_GRAD_WRT = "differentiate the reward through the denoiser (x_t) or at the denoised estimate only (x0)"
_MEANINGS: dict[str, dict[str, str]] = {
    "cfg": {"scale": "guidance scale w (1: the conditional model, 0: the unconditional one)",
            "rescale": "std-rescale mix phi in [0, 1] (0: plain CFG)",
            "space": "prediction space of the rescale: eps, x0 or flow", **_WINDOW},
    "cfg_rescale": {"scale": "guidance scale w", "phi": "std-rescale mix in [0, 1] (0: plain CFG)",
                    "space": "prediction space of the rescale: eps, x0 or flow", **_WINDOW},
    "apg": {"scale": "guidance scale w", "eta": "weight of the component parallel to the conditional prediction",
            "momentum": "running-average weight of the guidance difference (the paper: < 0, e.g. -0.5)",
            "norm_threshold": "clip of the guidance difference's norm (> 0; inf: off)",
            "space": "prediction space: x0 (the paper), eps or flow", **_WINDOW},
    "cfgpp": {"scale": "lambda, the guided share of the data prediction (the paper: [0, 1]; up to 2)"},
    "cfg_zero_star": {"scale": "guidance scale w", "zero_init_steps": "zero the prediction on the first k noise levels",
                      "space": "prediction space: flow (the paper), eps or x0", **_WINDOW},
    "classifier": {"scale": "guidance scale (1: p(x | y) with an exact classifier)",
                   "label": "target class (None: each sample's class label)",
                   "estimator": "noisy (noise-aware classifier on x_t) or tweedie (clean classifier on D(x_t))",
                   "base": "branch that is guided: unconditional or conditional", **_WINDOW},
    "jeffrey": {"target": "target class marginal p*(y): [CLASS:PROB,...], a full list [P0,P1,...] or FILE.json",
                "model_marginal": "model marginal p_theta(y), same forms (None: estimated, see marginal_samples)",
                "estimator": "noisy (noise-aware classifier) or tweedie (clean classifier on D(x_t))",
                "variant": "score (classifier-gradient correction) or conditional (mixture of class branches)",
                "scale": "multiplies the correction (1: exact; other values temper the target)",
                "log_w_clip": "clip of log w = log p*(y) / p_theta(y) to [-c, c] (None: off)",
                "prune": "variant=conditional: drop classes with weight <= prune",
                **_WINDOW, "particles": "twisted SMC particles K per sample (1: off; needs a stochastic solver)",
                "ess": "twisted SMC: resample when ESS / K falls below this",
                "resample": "twisted SMC resampling: systematic or multinomial",
                "tds_seed": "seed of the twisted SMC resampling stream",
                "marginal_samples": "unguided samples from which a missing model_marginal is estimated",
                "marginal_cache": "JSON cache of estimated marginals (none: off; default "
                                  "$DIFFSAMPLE_CACHE_DIR/marginals.json)"},
    "jeffrey_embedding": {"ratio": "the fitted ratio classifier (FILE.safetensors, RatioClassifier.save)",
                          "scale": "multiplies the correction (1: exact)", **_WINDOW,
                          "grad_clip": "clip of the correction's norm per sample (None: off)",
                          "logit_clip": "clip of the ratio classifier's logit (None: off)"},
    "noisetilt": {"reward": _REWARD,
                  "rho": "tilt schedule: beta_matched, constant, linear_decay, schedule or search_matched",
                  "strength": "in [0, 1]: the constant rho, or a multiplier of the matched / decaying one",
                  "beta": "KL temperature of the target p0 exp(r / beta), in reward units (> 0)",
                  "grad_wrt": _GRAD_WRT, "tile": "whitening tile size (pixels)",
                  "whiten_alpha": "two-sided confidence level of the whitening tests, in (0, 1) (used by whitening=2os or rfft)",
                  "schedule": "rho=schedule: per-step rho values [V0,V1,...] over the run, interpolated",
                  "width": "rho=search_matched: match a best-of-width search per step (>= 1)",
                  "whitening": "W: 2os (the paper's), rfft (flattened FFT, blocks of 16), normalize or identity"},
    "dps": {"reward": _REWARD, "scale": "step size on the reward gradient (1 / beta: the naive tilt match)",
            "normalize": "divide the gradient by its per-sample RMS", "grad_wrt": _GRAD_WRT, **_WINDOW},
    "freedom": {"reward": _REWARD, "scale": "step size on the reward gradient",
                "normalize": "divide the gradient by its per-sample RMS", "grad_wrt": _GRAD_WRT,
                "repeats": "time-travel repeats per step in the window (>= 0)",
                "window": "[START,STOP]: the fractions of the run with time travel"},
    "svdd": {"reward": _REWARD, "particles": "candidate kernel draws per stochastic step (>= 1)",
             "temperature": "softmax temperature of the selection (0: greedy)",
             "seed": "seed of the selection draws", "k": "alias of particles"},
    "best_of_n": {"reward": _REWARD, "n": "independent chains per sample; the best by reward is kept (>= 1)"},
}


GUIDANCE: Registry[Guidance] = Registry("guidance", context=("resources", "sampler", "grid"))
GUIDANCE.add("none", _none, "no guidance: the (conditional) model as is")
GUIDANCE.add("cfg", _cfg, "classifier-free guidance, scale=2 (Ho & Salimans 2022, arXiv 2207.12598)",
             meanings=_MEANINGS['cfg'])
GUIDANCE.add("cfg_rescale", _cfg_rescale, "CFG with std rescale, scale=5, phi=0.7 (Lin et al. 2023, arXiv 2305.08891)",
             meanings=_MEANINGS['cfg_rescale'])
GUIDANCE.add("apg", _apg, "adaptive projected guidance, scale=7.5, eta=0, momentum=-0.5 (arXiv 2410.02416)",
             meanings=_MEANINGS['apg'])
GUIDANCE.add("cfgpp", _cfgpp, "CFG++ scale=0.6, Euler/DDIM only; needs sampler=... (arXiv 2406.08070)",
             meanings=_MEANINGS['cfgpp'])
GUIDANCE.add("cfg_zero_star", _cfg_zero_star, "CFG-Zero*: optimised scale, optional zero-init (arXiv 2503.18886)",
             meanings=_MEANINGS['cfg_zero_star'])
GUIDANCE.add("classifier", _classifier, "classifier guidance, scale=1, noise-aware or tweedie (arXiv 2105.05233)",
             meanings=_MEANINGS['classifier'])
GUIDANCE.add("jeffrey", _jeffrey, "Jeffrey marginal guidance: target=[CLASS:PROB,...] (arXiv 2606.13240); "
             "particles=K runs twisted SMC (TDS, arXiv 2306.17775)",
             meanings=_MEANINGS['jeffrey'])
GUIDANCE.add("jeffrey_embedding",
             "diffsample.guidance.jeffrey.embedding_guidance:jeffrey_embedding_factory",
             "Jeffrey guidance to a target set of embeddings: "
             "ratio=FILE.safetensors (linear logistic ratio on features), Tweedie plug-in (arXiv 2606.13240)",
             meanings=_MEANINGS['jeffrey_embedding'])
GUIDANCE.add("noisetilt", _noisetilt, "NoiseTilt (arXiv 2606.18066): reward gradient in the noise of stochastic steps; "
             "default = best measured: rho=search_matched,width=20 (SVDD-20 push), whitening=normalize (paper's W: 2os)",
             meanings=_MEANINGS['noisetilt'])
GUIDANCE.add("dps", _dps, "DPS reward guidance: score + scale * grad r(D(x_t)), scale=1 (arXiv 2209.14687)",
             meanings=_MEANINGS['dps'])
GUIDANCE.add("freedom", _freedom, "FreeDoM: DPS-form gradient + time travel, repeats=2 on window=[0.3,0.7] (arXiv 2303.09833)",
             meanings=_MEANINGS['freedom'])
GUIDANCE.add("svdd", _svdd, "SVDD search: best of particles=8 kernel draws per stochastic step by value (arXiv 2408.08252)",
             meanings=_MEANINGS['svdd'])
GUIDANCE.add("best_of_n", _best_of_n, "best-of-N: n=4 independent chains, keep the highest reward (composes: NTRK-dagger)",
             meanings=_MEANINGS['best_of_n'])

__all__ = [
    "APG", "BestOfN", "DPS", "FreeDoM", "NoiseTilt", "REWARDS", "Reward", "RewardError", "RewardModelMissing",
    "SVDD", "as_reward", "reward_from_spec", "whiten", "CFG", "CFGPlusPlus", "CFGZeroStar", "ClassifierGuidance", "GUIDANCE", "Cond", "Denoiser", "Guidance",
    "Interval", "JeffreyEmbedding", "JeffreyGuidance", "RatioClassifier", "TDS", "MarginalEstimate", "NoGuidance", "Resources", "estimate_marginal",
    "load_marginal", "parse_target", "save_marginal", "within",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        if name.isidentifier() and not name.startswith("__"):
            try:  # a submodule (``diffsample.guidance.rewards``) accessed as an attribute
                return importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":
                    raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
