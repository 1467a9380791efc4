"""Guidance terms: denoiser -> denoiser transforms (see :mod:`.base`).

Registry: :data:`GUIDANCE`. Each factory takes ``resources`` (:class:`~.base.Resources`, what the
model offers: classifiers, decoder) plus the options of the spec ``name:key=value,...``:
``GUIDANCE.create("cfg:scale=2", resources=Resources(conditional=True))``.

Reward guidance (``noisetilt``, ``dps``, ``freedom``, ``svdd``, ``best_of_n``) takes
``reward=NAME[:key=value;...]`` from :data:`~.rewards.REWARDS` (default ``class_logp``: the
log-probability of each sample's class under the model's noise-aware classifier).

The CFG family accepts ``sigma_lo`` / ``sigma_hi``: apply guidance only for VE sigma in
``(sigma_lo, sigma_hi]`` (:class:`~.interval.Interval`). Lists inside a spec use ``;`` between
entries, since ``,`` separates options: ``jeffrey:target=0:0.5;1:0.5`` (or a JSON file path).
"""

import math

from diffsample.guidance.apg import APG
from diffsample.guidance.term import Cond, Denoiser, Guidance, Resources
from diffsample.guidance.best_of_n import BestOfN
from diffsample.guidance.dps import DPS, FreeDoM
from diffsample.guidance.noisetilt import NoiseTilt
from diffsample.guidance.rewards import REWARDS, Reward, RewardError, RewardModelMissing, as_reward, reward_from_spec
from diffsample.guidance.svdd import SVDD
from diffsample.guidance.jeffrey.twist import TDS
from diffsample.guidance.whitening import whiten
from diffsample.guidance.cfg import CFG
from diffsample.guidance.cfg_zero_star import CFGZeroStar
from diffsample.guidance.cfgpp import CFGPlusPlus
from diffsample.guidance.classifier import ClassifierGuidance
from diffsample.guidance.identity import NoGuidance
from diffsample.guidance.interval import Interval, within
from diffsample.guidance.jeffrey.embedding_guidance import JeffreyEmbedding, RatioClassifier, _jeffrey_embedding
from diffsample.guidance.jeffrey.class_guidance import JeffreyGuidance
from diffsample.guidance.jeffrey.class_marginal import MarginalEstimate, estimate_marginal, load_marginal, parse_target, save_marginal
from diffsample.core.registry import Registry


def _need_conditional(resources: Resources, name: str) -> None:
    if not resources.conditional:
        raise ValueError(f"guidance {name!r} needs a conditional model (one with a null / negative condition)")


def _window(term: Guidance, sigma_lo: float, sigma_hi: float, base: str = "conditional") -> Guidance:
    return within(term, float(sigma_lo), float(sigma_hi), base)


def _cfg(resources: Resources, scale: float = 2.0, rescale: float = 0.0, space: str = "eps",
         sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
    _need_conditional(resources, "cfg")
    return _window(CFG(scale=float(scale), rescale=float(rescale), space=space), sigma_lo, sigma_hi)


def _cfg_rescale(resources: Resources, scale: float = 5.0, phi: float = 0.7, space: str = "eps",
                 sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
    _need_conditional(resources, "cfg_rescale")
    return _window(CFG(scale=float(scale), rescale=float(phi), space=space), sigma_lo, sigma_hi)


def _apg(resources: Resources, scale: float = 7.5, eta: float = 0.0, momentum: float = -0.5,
         norm_threshold: float = 15.0, space: str = "x0", sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
    _need_conditional(resources, "apg")
    return _window(APG(float(scale), float(eta), float(momentum), float(norm_threshold), space), sigma_lo, sigma_hi)


def _cfgpp(resources: Resources, scale: float = 0.6, sampler=None, grid=None) -> Guidance:
    _need_conditional(resources, "cfgpp")
    return CFGPlusPlus(float(scale), grid=grid, sampler=sampler)


def _cfg_zero_star(resources: Resources, scale: float = 4.0, zero_init_steps: int = 0, space: str = "flow",
                   sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
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


def _classifier(resources: Resources, scale: float = 1.0, label=None, estimator: str = "noisy",
                base: str = "unconditional", sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
    _classifier_resources(resources, "classifier", estimator)
    term = ClassifierGuidance(resources.classifier, resources.clean_classifier, float(scale),
                              None if label is None else int(label), estimator=estimator, base=base)
    return _window(term, sigma_lo, sigma_hi, base)


def _jeffrey(resources: Resources, target=None, model_marginal=None, estimator: str = "noisy",
             variant: str = "score", scale: float = 1.0, log_w_clip=None, prune: float = 0.0,
             sigma_lo: float = 0.0, sigma_hi: float = math.inf, particles: int = 1, ess: float = 0.5,
             resample: str = "systematic", tds_seed: int = 0) -> Guidance:
    if target is None:
        raise ValueError("guidance 'jeffrey' needs target=CLASS:PROB;CLASS:PROB... or target=FILE.json")
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
                           tds=TDS(particles, float(ess), str(resample), int(tds_seed)) if particles != 1 else None)
    return _window(term, sigma_lo, sigma_hi, "unconditional")


def _noisetilt(resources: Resources, reward="class_logp", rho: str = "beta_matched", strength: float = 1.0,
               beta: float = 1.0, grad_wrt: str = "x_t", tile: int = 8, whiten_alpha: float = 1e-4) -> Guidance:
    return NoiseTilt(reward_from_spec(reward, resources), str(rho), float(strength), float(beta), str(grad_wrt),
                     resources.decode, int(tile), float(whiten_alpha))


def _dps(resources: Resources, reward="class_logp", scale: float = 1.0, normalize: bool = False,
         grad_wrt: str = "x_t", sigma_lo: float = 0.0, sigma_hi: float = math.inf) -> Guidance:
    term = DPS(reward_from_spec(reward, resources), float(scale), bool(normalize), str(grad_wrt), resources.decode)
    return _window(term, sigma_lo, sigma_hi)


def _freedom(resources: Resources, reward="class_logp", scale: float = 1.0, normalize: bool = False,
             grad_wrt: str = "x_t", repeats: int = 2, window="0.3;0.7") -> Guidance:
    lo, _, hi = str(window).replace(",", ";").partition(";")
    try:
        bounds = (float(lo), float(hi))
    except ValueError:
        raise ValueError(f"freedom: window must be START;STOP fractions, got {window!r}") from None
    return FreeDoM(reward_from_spec(reward, resources), float(scale), bool(normalize), str(grad_wrt),
                   resources.decode, repeats=repeats, window=bounds)


def _svdd(resources: Resources, reward="class_logp", particles: int = 8, temperature: float = 0.0,
          seed: int = 0, k=None) -> Guidance:
    return SVDD(reward_from_spec(reward, resources), particles if k is None else k, float(temperature),
                resources.decode, seed)


def _best_of_n(resources: Resources, reward="class_logp", n: int = 4) -> Guidance:
    return BestOfN(reward_from_spec(reward, resources), n, resources.decode)


GUIDANCE: Registry[Guidance] = Registry("guidance")
GUIDANCE.add("none", lambda resources: NoGuidance(), "no guidance: the (conditional) model as is")
GUIDANCE.add("cfg", _cfg, "classifier-free guidance, scale=2 (Ho & Salimans 2022, arXiv 2207.12598)")
GUIDANCE.add("cfg_rescale", _cfg_rescale, "CFG with std rescale, scale=5, phi=0.7 (Lin et al. 2023, arXiv 2305.08891)")
GUIDANCE.add("apg", _apg, "adaptive projected guidance, scale=7.5, eta=0, momentum=-0.5 (arXiv 2410.02416)")
GUIDANCE.add("cfgpp", _cfgpp, "CFG++ scale=0.6, Euler/DDIM only; needs sampler=... (arXiv 2406.08070)")
GUIDANCE.add("cfg_zero_star", _cfg_zero_star, "CFG-Zero*: optimised scale, optional zero-init (arXiv 2503.18886)")
GUIDANCE.add("classifier", _classifier, "classifier guidance, scale=1, noise-aware or tweedie (arXiv 2105.05233)")
GUIDANCE.add("jeffrey", _jeffrey, "Jeffrey marginal guidance: target=CLASS:PROB;... (arXiv 2606.13240); "
             "particles=K runs twisted SMC (TDS, arXiv 2306.17775)")
GUIDANCE.add("jeffrey_embedding", _jeffrey_embedding, "Jeffrey guidance to a target set of embeddings: "
             "ratio=FILE.safetensors (linear logistic ratio on features), Tweedie plug-in (arXiv 2606.13240)")
GUIDANCE.add("noisetilt", _noisetilt, "NoiseTilt: whitened reward gradient in the noise of stochastic steps, rho=beta_matched, beta=1 (arXiv 2606.18066)")
GUIDANCE.add("dps", _dps, "DPS reward guidance: score + scale * grad r(D(x_t)), scale=1 (arXiv 2209.14687)")
GUIDANCE.add("freedom", _freedom, "FreeDoM: DPS-form gradient + time travel, repeats=2 on window 0.3;0.7 (arXiv 2303.09833)")
GUIDANCE.add("svdd", _svdd, "SVDD search: best of particles=8 kernel draws per stochastic step by value (arXiv 2408.08252)")
GUIDANCE.add("best_of_n", _best_of_n, "best-of-N: n=4 independent chains, keep the highest reward (composes: NTRK-dagger)")

__all__ = [
    "APG", "BestOfN", "DPS", "FreeDoM", "NoiseTilt", "REWARDS", "Reward", "RewardError", "RewardModelMissing",
    "SVDD", "as_reward", "reward_from_spec", "whiten", "CFG", "CFGPlusPlus", "CFGZeroStar", "ClassifierGuidance", "GUIDANCE", "Cond", "Denoiser", "Guidance",
    "Interval", "JeffreyEmbedding", "JeffreyGuidance", "RatioClassifier", "TDS", "MarginalEstimate", "NoGuidance", "Resources", "estimate_marginal",
    "load_marginal", "parse_target", "save_marginal", "within",
]
