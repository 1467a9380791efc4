"""Rewards for reward guidance: differentiable scores of (decoded) clean samples.

A reward maps clean samples ``x0`` of shape ``(B, *dims)`` -- pixel space, after the model's
decoder for latent models -- and the run's conditioning to one value per sample, shape ``(B,)``;
higher is better. Reward-guidance terms (:mod:`.noisetilt`, :mod:`.dps`, :mod:`.svdd`, best-of-N)
call it on the Tweedie estimate ``D(x_t)`` and, for gradient methods, differentiate it.

Registry: :data:`REWARDS` (``"class_logp:label=3"``, ``"ink"``; ``diffsample list rewards``); any
Python callable ``(x0) -> (B,)`` or ``(x0, cond) -> (B,)`` becomes a reward with :func:`as_reward`.
Inside a guidance spec a reward with options is bracketed:
``noisetilt:reward=(class_logp:label=3,classifier=clean),beta=0.5``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from diffsample.core.registry import Registry
from diffsample.core.spec import Spec

from diffsample.guidance._common import class_log_prob, target_labels
from diffsample.guidance.term import Cond, Resources


class RewardError(ValueError):
    """A reward returned something unusable (wrong shape, non-finite values, no gradient)."""


class RewardModelMissing(ValueError):
    """An optional reward model's local weight files are absent (nothing is downloaded)."""


class RewardFileError(ValueError):
    """An optional reward model's local file is unusable: not a regular file, too large, not
    safetensors (pickle is refused), corrupt, or with the wrong tensors / config."""


@runtime_checkable
class Reward(Protocol):
    """``(x0 (B, *dims), cond) -> reward (B,)``; ``name`` identifies it in error messages."""

    name: str

    def __call__(self, x0: Tensor, cond: Cond | None = None) -> Tensor: ...


@dataclass(frozen=True)
class CallableReward:
    """Wrap a Python callable ``fn(x0) -> (B,)`` or ``fn(x0, cond) -> (B,)`` as a :class:`Reward`."""

    fn: Callable[..., Tensor]
    name: str = "callable"

    def __call__(self, x0: Tensor, cond: Cond | None = None) -> Tensor:
        return self.fn(x0, cond) if _takes_two(self.fn) else self.fn(x0)


def _takes_two(fn: Callable[..., Any]) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def as_reward(reward: Reward | Callable[..., Tensor], name: str | None = None) -> Reward:
    """``reward`` itself if it is a :class:`Reward`, else a :class:`CallableReward` around it.

    Raises:
        ValueError: ``reward`` is not callable.
    """
    if isinstance(reward, Reward) and name is None:
        return reward
    if not callable(reward):
        raise ValueError(f"a reward must be callable (x0) -> (B,), got {reward!r}")
    return CallableReward(reward, name or getattr(reward, "__name__", "callable"))


def check_reward(value: Any, x0: Tensor, reward: Reward, *, need_grad: bool) -> Tensor:
    """Validate a reward's output for the batch ``x0``: a tensor of shape ``(B,)``, finite, and
    (``need_grad``) attached to the autograd graph of ``x0``.

    Raises:
        RewardError: naming the reward and what is wrong.
    """
    name = getattr(reward, "name", repr(reward))
    b = x0.shape[0]
    if not isinstance(value, Tensor):
        raise RewardError(f"reward {name!r} returned {type(value).__name__}, expected a tensor of shape ({b},)")
    if tuple(value.shape) != (b,):
        raise RewardError(f"reward {name!r} returned shape {tuple(value.shape)}, expected ({b},): one value per sample")
    if not bool(torch.isfinite(value).all()):
        bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
        raise RewardError(f"reward {name!r} returned non-finite values for samples {bad}")
    if need_grad and not value.requires_grad:
        raise RewardError(f"reward {name!r} returned no gradient (its output is not differentiable with respect to "
                          "the sample); gradient methods need a differentiable reward, search methods (svdd, "
                          "best_of_n) do not")
    return value


@dataclass(frozen=True)
class ClassLogProb:
    """``log p(y | x0)`` of a classifier: a clean one ``x0 -> logits`` (``classifier="clean"``) or a
    noise-aware one ``(x_t, t) -> logits`` evaluated at schedule time ``t0`` (``"noisy"``, default
    ``t0 = 0``: the least-noisy level the bundled MNIST classifier was trained on).

    Args:
        model: the classifier network.
        kind: ``"clean"`` or ``"noisy"``.
        label: fixed target class, or ``None`` to read per-row labels from ``cond``.
        t0: time passed to a noise-aware classifier.

    Units: nats, ``<= 0``.
    """

    model: Any
    kind: str = "noisy"
    label: int | None = None
    t0: float = 0.0
    name: str = "class_logp"

    def __post_init__(self) -> None:
        if self.kind not in ("clean", "noisy"):
            raise ValueError(f"class_logp: unknown classifier {self.kind!r}; valid: noisy, clean")

    def __call__(self, x0: Tensor, cond: Cond | None = None) -> Tensor:
        y = target_labels(x0, cond, self.label, "class_labels", "reward 'class_logp'")
        if self.kind == "clean":
            logits = self.model(x0)
        else:
            logits = self.model(x0, torch.full((x0.shape[0],), self.t0, dtype=torch.float64, device=x0.device))
        return class_log_prob(logits.float(), y, "class_logp")


@dataclass(frozen=True)
class Ink:
    """Mean ink (stroke mass) of an image in ``[low, high]`` data range: ``mean((x0 - low) / (high - low))``
    over all non-batch dims, in ``[0, 1]`` for in-range pixels (``low=-1, high=1``: white strokes on
    black, the bundled MNIST convention)."""

    low: float = -1.0
    high: float = 1.0
    name: str = "ink"

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"ink: need high > low, got low={self.low}, high={self.high}")

    def __call__(self, x0: Tensor, cond: Cond | None = None) -> Tensor:
        return ((x0 - self.low) / (self.high - self.low)).flatten(1).mean(1)


@dataclass(frozen=True, eq=False)
class TemplateScore:
    """Smooth template score ``r(x0) = scale * <template, x0>`` (sum over all non-batch dims): a
    linear, non-saturating reward (unlike ``class_logp``, which saturates at 0), whose exactly tilted
    target is closed form on Gaussian testbeds (``testbed/random_field.py``). ``template`` has the
    sample shape ``dims``; ``x0`` is ``(B, *dims)``; units: those of ``scale * template * x0``.

    Raises:
        ValueError: a template that is not a floating tensor, or a non-finite ``scale``.
    """

    template: Tensor
    scale: float = 1.0
    name: str = "template"

    def __post_init__(self) -> None:
        if not isinstance(self.template, Tensor) or not self.template.is_floating_point():
            raise ValueError(f"template: the template must be a floating-point tensor, got {type(self.template).__name__}")
        if not torch.isfinite(torch.tensor(float(self.scale))):
            raise ValueError(f"template: scale must be finite, got {self.scale}")

    def __call__(self, x0: Tensor, cond: Cond | None = None) -> Tensor:
        if tuple(x0.shape[1:]) != tuple(self.template.shape):
            raise RewardError(f"reward 'template': samples of shape {tuple(x0.shape[1:])}, template of shape "
                              f"{tuple(self.template.shape)}")
        return self.scale * (x0 * self.template.to(x0)).flatten(1).sum(1)


def _class_logp(resources: Resources, label: int | None = None, classifier: str = "noisy", t0: float = 0.0) -> Reward:
    model = resources.classifier if classifier == "noisy" else resources.clean_classifier
    if classifier not in ("noisy", "clean"):
        raise ValueError(f"class_logp: unknown classifier {classifier!r}; valid: noisy, clean")
    if model is None:
        raise ValueError(f"reward 'class_logp' with classifier={classifier} needs a {classifier} classifier; "
                         "the model provides none")
    return ClassLogProb(model, classifier, None if label is None else int(label), float(t0))


def _ink(resources: Resources, low: float = -1.0, high: float = 1.0) -> Reward:
    return Ink(low, high)


REWARDS: Registry[Reward] = Registry("reward", context=("resources",))
REWARDS.add("class_logp", _class_logp, "log p(label | x0) under the model's noise-aware (default) or clean classifier",
            meanings={"label": "target class (None: each sample's own class label)",
                      "classifier": "noisy (noise-aware, evaluated at t0) or clean (on x0)",
                      "t0": "schedule time at which the noise-aware classifier is evaluated"})
REWARDS.add("ink", _ink, "mean ink / stroke mass in [0, 1] (pixels in [low, high])",
            meanings={"low": "pixel value of no ink", "high": "pixel value of full ink (> low)"})


def reward_from_spec(spec: str | Spec | Reward | Callable[..., Tensor], resources: Resources) -> Reward:
    """A reward from a registry spec -- ``"class_logp:label=3,classifier=clean"`` (bracketed inside a
    guidance spec: ``reward=(class_logp:label=3,classifier=clean)``; the older ``;``-separated
    ``class_logp:label=3;classifier=clean`` is read too) or a :class:`Spec` -- or a callable.

    Raises:
        ValueError: unknown reward name (listing the valid ones), bad options, missing resources.
    """
    if isinstance(spec, str):
        spec = Spec.parse(spec, separators=",;")
    if not isinstance(spec, Spec):
        return as_reward(spec)
    return REWARDS.create(spec, resources=resources)


# ---- optional rewards with external weights (local files only) ------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


HEAD_MAX_BYTES = 256 << 20
"""Size limit of an aesthetic head file (the public one is under 4 MiB)."""
HEAD_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
_HEAD_DIMS = (1024, 128, 64, 16, 1)
CLIP_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
"""A CLIP folder needs one of these sets of tokenizer files."""


def _require_path(path, reward: str, what: str):
    from pathlib import Path

    if path is None:
        raise RewardModelMissing(f"reward {reward!r} needs {what}; nothing is downloaded")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise RewardModelMissing(f"reward {reward!r}: {what} not found at {str(p)!r} (nothing is downloaded)")
    return p


def _one_line(exc: BaseException, n: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= n else text[:n - 3] + "..."


def _check_clip_folder(folder, reward: str) -> None:
    """Refuse, one line each, a CLIP folder that is not a directory, holds a FIFO / device, has
    no readable ``config.json`` object of a CLIP model, no safetensors weights, or no tokenizer
    files (a tokenizer built from nothing would turn every prompt into unknown tokens)."""
    import stat

    from diffsample.core.files import json_object, read_json

    if not folder.is_dir():
        raise RewardFileError(f"reward {reward!r}: clip={str(folder)!r} is not a folder (a local CLIP model folder)")
    for entry in folder.iterdir():
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise RewardFileError(f"reward {reward!r}: {str(entry)!r} in the CLIP folder is not a regular file "
                                  "(a FIFO, socket or device); refused")
    config_path = folder / "config.json"
    try:
        config = json_object(read_json(config_path, "CLIP config", max_bytes=1 << 20), f"CLIP config {str(config_path)!r}")
    except FileNotFoundError:
        raise RewardModelMissing(f"reward {reward!r}: the CLIP folder {str(folder)!r} has no config.json "
                                 "(save it with CLIPModel.save_pretrained)") from None
    except ValueError as exc:
        raise RewardFileError(f"reward {reward!r}: {exc}") from None
    if config.get("model_type", "clip") != "clip":
        raise RewardFileError(f"reward {reward!r}: {str(config_path)!r} describes a {config.get('model_type')!r} "
                              "model, not a CLIP model (model_type 'clip')")
    if not any(folder.glob("*.safetensors")):
        raise RewardModelMissing(f"reward {reward!r}: no *.safetensors weights in {str(folder)!r} (pickle weights "
                                 "are refused)")
    if not any(all((folder / f).is_file() for f in files) for files in CLIP_TOKENIZER_FILES):
        raise RewardModelMissing(f"reward {reward!r}: the CLIP folder {str(folder)!r} has no tokenizer files "
                                 "(tokenizer.json, or vocab.json and merges.txt; save them with the tokenizer's "
                                 "save_pretrained)")


def _load_clip(folder, reward: str):
    """A ``transformers.CLIPModel`` (+ tokenizer) from a local folder with safetensors weights.

    Raises:
        RewardModelMissing: no folder, no config.json, weights or tokenizer files in it, or no
            ``transformers``.
        RewardFileError: the folder or its files are unusable (one line naming what is wrong).
    """
    folder = _require_path(folder, reward, "a local CLIP model folder (clip=FOLDER)")
    _check_clip_folder(folder, reward)
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError:
        raise RewardModelMissing(f"reward {reward!r} needs the 'transformers' package (pip install transformers)") from None
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except Exception as exc:  # transformers / safetensors raise many types for corrupt folders
        raise RewardFileError(f"reward {reward!r}: cannot load {str(folder)!r} as a CLIP model (safetensors "
                              f"only): {_one_line(exc)}") from None
    model.eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise RewardFileError(f"reward {reward!r}: cannot load the tokenizer of {str(folder)!r}: "
                              f"{_one_line(exc)}") from None
    return model, tokenizer


def _load_head(head_file, reward: str) -> dict[str, Tensor]:
    """The aesthetic head's tensors from a local safetensors file, checked: a regular file of at
    most :data:`HEAD_MAX_BYTES`, exactly the keys :data:`HEAD_KEYS`, shapes of the MLP
    ``E -> 1024 -> 128 -> 64 -> 16 -> 1`` and finite floating-point values.

    Raises:
        RewardModelMissing: no file given or none at the path.
        RewardFileError: anything else, one line.
    """
    from safetensors.torch import load_file

    from diffsample.core.files import regular_file

    path = _require_path(head_file, reward, "the aesthetic head weights (head=FILE.safetensors)")
    try:
        regular_file(path, "aesthetic head file", HEAD_MAX_BYTES)
    except (OSError, ValueError) as exc:
        raise RewardFileError(f"reward {reward!r}: {exc}") from None
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for malformed headers
        raise RewardFileError(f"reward {reward!r}: head file {str(path)!r} is not a readable safetensors file "
                              f"(pickle checkpoints are refused): {_one_line(exc)}") from None
    missing, extra = sorted(set(HEAD_KEYS) - set(state)), sorted(set(state) - set(HEAD_KEYS))
    if missing or extra:
        raise RewardFileError(f"reward {reward!r}: head file {str(path)!r} must hold exactly {', '.join(HEAD_KEYS)}"
                              + (f"; missing {', '.join(missing)}" if missing else "")
                              + (f"; unexpected {', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}" if extra else ""))
    first = state["layers.0.weight"]
    dims = [first.shape[1] if first.ndim == 2 else -1, *_HEAD_DIMS]
    for (i, out_dim), in_dim in zip(zip((0, 2, 4, 6, 7), _HEAD_DIMS), dims):
        w, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        if tuple(w.shape) != (out_dim, in_dim) or tuple(b.shape) != (out_dim,):
            raise RewardFileError(f"reward {reward!r}: head file {str(path)!r}: layers.{i} has weight "
                                  f"{tuple(w.shape)} and bias {tuple(b.shape)}, expected ({out_dim}, {in_dim}) and "
                                  f"({out_dim},) (MLP E -> 1024 -> 128 -> 64 -> 16 -> 1)")
        if not (w.is_floating_point() and b.is_floating_point()) or not (
                bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())):
            raise RewardFileError(f"reward {reward!r}: head file {str(path)!r}: layers.{i} is not finite floating point")
    return state


def _clip_pixels(x0: Tensor, size: int) -> Tensor:
    """Samples in [-1, 1] ``(B, C, H, W)`` -> CLIP input ``(B, 3, size, size)`` (differentiable)."""
    x = (x0.float().clamp(-1, 1) + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std


class ClipScore:
    """``scale * cos(CLIP image embedding, CLIP text embedding of prompt)`` (CLIP score, Hessel et
    al. 2021, arXiv 2104.08718, with ``scale = 100``; PickScore, Kirstain et al. 2023, arXiv
    2305.01569, is this with PickScore's CLIP weights and ``scale`` = the model's ``logit_scale``).
    Loaded only from a local folder (``transformers`` ``CLIPModel`` saved with safetensors)."""

    def __init__(self, folder, prompt: str, scale: float | None = 100.0, name: str = "clip_score") -> None:
        self.name = name
        self.model, tokenizer = _load_clip(folder, name)
        tokens = tokenizer([prompt], padding=True, return_tensors="pt")
        with torch.no_grad():
            text = self.model.get_text_features(**tokens)
        self.text = torch.nn.functional.normalize(_features(text), dim=-1)
        self.scale = float(self.model.logit_scale.exp()) if scale is None else float(scale)
        self.size = self.model.config.vision_config.image_size

    def __call__(self, x0: Tensor, cond: Cond | None = None) -> Tensor:
        image = _features(self.model.get_image_features(pixel_values=_clip_pixels(x0, self.size)))
        return self.scale * (torch.nn.functional.normalize(image, dim=-1) @ self.text.T.to(image)).squeeze(1)


def _features(out) -> Tensor:
    """``get_*_features`` return a tensor (transformers < 5) or an output object with ``pooler_output``."""
    return out if isinstance(out, Tensor) else out.pooler_output


class Aesthetic:
    """LAION aesthetic predictor: an MLP on the L2-normalised CLIP image embedding
    (``improved-aesthetic-predictor``: dims ``E -> 1024 -> 128 -> 64 -> 16 -> 1``), scores ~1-10.
    CLIP weights from a local folder, the head from a local safetensors file whose keys are
    ``layers.{0,2,4,6,7}.{weight,bias}`` as in the public checkpoint."""

    name = "aesthetic"

    def __init__(self, clip_folder, head_file) -> None:
        state = _load_head(head_file, self.name)  # checked before the CLIP model is loaded
        self.model, _ = _load_clip(clip_folder, self.name)
        dims = [state["layers.0.weight"].shape[1], 1024, 128, 64, 16, 1]
        projection = getattr(self.model.config, "projection_dim", dims[0])
        if dims[0] != projection:
            raise RewardFileError(f"reward {self.name!r}: the head takes {dims[0]}-dimensional embeddings, the CLIP "
                                  f"model gives {projection}")
        nn = torch.nn
        self.head = nn.Sequential(nn.Linear(dims[0], 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                  nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
        self.head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        self.head.eval().requires_grad_(False)
        self.size = self.model.config.vision_config.image_size

    def __call__(self, x0: Tensor, cond: Cond | None = None) -> Tensor:
        image = _features(self.model.get_image_features(pixel_values=_clip_pixels(x0, self.size)))
        return self.head(torch.nn.functional.normalize(image, dim=-1)).squeeze(1)


def _clip_score(resources: Resources, clip: str | None = None, prompt: str = "", scale: float | None = 100.0) -> Reward:
    return ClipScore(clip, prompt, scale)


def _pickscore(resources: Resources, clip: str | None = None, prompt: str = "") -> Reward:
    return ClipScore(clip, prompt, None, "pickscore")


def _aesthetic(resources: Resources, clip: str | None = None, head: str | None = None) -> Reward:
    return Aesthetic(clip, head)


_CLIP = "local CLIP model folder (transformers CLIPModel, safetensors); nothing is downloaded"
_PROMPT = "text the image is scored against (bracket it if it holds commas: prompt=[a cat, a hat])"
REWARDS.add("clip_score", _clip_score, "100 cos(CLIP image, CLIP text) from a local CLIP folder: clip=FOLDER,prompt=TEXT",
            meanings={"clip": _CLIP, "prompt": _PROMPT, "scale": "multiplier of the cosine (None: the model's logit scale)"})
REWARDS.add("pickscore", _pickscore, "PickScore (CLIP with the model's logit scale) from a local folder: "
            "clip=FOLDER,prompt=TEXT", meanings={"clip": "local PickScore CLIP folder (safetensors)", "prompt": _PROMPT})
REWARDS.add("aesthetic", _aesthetic, "LAION aesthetic MLP on CLIP image embeddings, local files: "
            "clip=FOLDER,head=FILE.safetensors",
            meanings={"clip": _CLIP, "head": "the aesthetic MLP head weights (FILE.safetensors)"})
