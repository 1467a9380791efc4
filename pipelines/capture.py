"""Capture the calls a diffusers pipeline makes to its network, and replay them at other points.

The "they drive" front-end (docs/design.md#one-attached-pipeline-call): PyTorch
forward hooks (``register_forward_hook(..., with_kwargs=True)``) on ``pipe.unet`` /
``pipe.transformer`` record the arguments and raw output of every call between two
``scheduler.step`` calls. A :class:`Replay` then re-evaluates the pipeline's *guided* prediction at
another sample ``x'`` and time: it substitutes ``x'`` for the latent argument of each captured call
(repeated as the pipeline repeated it, e.g. ``cat([x] * 2)`` for CFG), rescales the timestep
argument by the captured ratio (1 for SD / SD3, 1/1000 for FLUX), and recombines the outputs with
per-sample weights fitted to the prediction the pipeline passed to ``step``
(``model_output ~ sum_j w_j[b] o_j[b]``, exact for CFG, true CFG and guidance_rescale at the captured
point). A fit whose relative residual is too large (a non-affine guider, a layout we cannot
locate) raises :class:`ReplayError` instead of producing wrong numbers.

Torch-native hooks live in ``module._forward_hooks``, not in ``module.forward``, so they survive
``enable_model_cpu_offload`` / accelerate hooks that patch ``forward``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffsample.core.accounting import add_model_evals

TIMESTEP_KEYS = ("timestep", "timesteps", "t")
NATIVE_LOOP_HINT = ("use the native loop instead: diffsample.pipelines.sample_pipeline(pipe, prompt, "
                    "solver=..., guidance=[...])")


class ReplayError(RuntimeError):
    """The pipeline's network calls cannot be replayed at another point (re-evaluation impossible)."""


def network_output(out: Any) -> Tensor:
    """The prediction tensor of a network's return value (``.sample``, ``[0]`` or the tensor)."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ReplayError(f"cannot read a prediction tensor from the network output of type {type(out).__name__}")


def _copy_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Shallow copy, one level deep for dicts (FLUX mutates ``joint_attention_kwargs`` between calls)."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in kwargs.items()}


@dataclass
class CapturedCall:
    """One network call: the module, its arguments and its raw prediction (detached)."""

    module: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    output: Tensor


class DenoiserCapture:
    """Forward hooks recording every call of the pipeline's network(s) (``calls``), except replays.

    Args:
        modules: ``{component name: nn.Module}``, e.g. ``{"unet": pipe.unet}``.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.calls: list[CapturedCall] = []
        self.replaying = False
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules.values()]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.replaying:
            return
        try:
            out = network_output(output).detach()
        except ReplayError:
            return
        self.calls.append(CapturedCall(module, tuple(args), _copy_kwargs(kwargs), out))

    def rows(self) -> int:
        """Network rows (batch items) of the calls captured since the last :meth:`clear`."""
        return sum(c.output.shape[0] for c in self.calls)

    def clear(self) -> None:
        self.calls = []

    def remove(self) -> None:
        """Remove the hooks (detach)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.calls = []


@dataclass
class _Slot:
    where: str  # "arg" or "kw"
    key: int | str

    def get(self, call: CapturedCall) -> Any:
        return call.args[self.key] if self.where == "arg" else call.kwargs[self.key]

    def put(self, args: list, kwargs: dict, value: Any) -> None:
        if self.where == "arg":
            args[self.key] = value
        else:
            kwargs[self.key] = value


def _locate_sample(call: CapturedCall, sample: Tensor) -> tuple[_Slot, int] | None:
    """The argument holding ``sample`` repeated ``k`` times along dim 0, and ``k``."""
    b = sample.shape[0]
    candidates = [(_Slot("arg", i), a) for i, a in enumerate(call.args)]
    candidates += [(_Slot("kw", k), v) for k, v in call.kwargs.items()]
    for slot, value in candidates:
        if not isinstance(value, Tensor) or value.ndim != sample.ndim or value.shape[1:] != sample.shape[1:]:
            continue
        if value.shape[0] % b:
            continue
        k = value.shape[0] // b
        ref = sample.detach().to(device=value.device, dtype=value.dtype)
        if all(torch.equal(value[m * b:(m + 1) * b], ref) for m in range(k)):
            return slot, k
    return None


def _locate_timestep(call: CapturedCall) -> _Slot | None:
    for key in TIMESTEP_KEYS:
        if key in call.kwargs and call.kwargs[key] is not None:
            return _Slot("kw", key)
    if len(call.args) > 1 and isinstance(call.args[1], (Tensor, int, float)):
        return _Slot("arg", 1)
    return None


def _learned_sigma_split(out: Tensor, like: Tensor) -> Tensor:
    """The first ``C`` channels of a ``2 C``-channel (learned-variance) output, as PixArt / DiT pipelines
    keep them; other outputs unchanged."""
    if out.ndim == like.ndim and out.ndim >= 3 and out.shape[2:] == like.shape[2:] and out.shape[1] == 2 * like.shape[1]:
        return out[:, : like.shape[1]]
    return out


class Replay:
    """Re-evaluate the pipeline's guided prediction at new samples and timesteps.

    Built from the calls captured during one pipeline step. ``replay(x, timestep)`` takes ``x`` of
    shape ``(n B, *dims)`` (``n`` copies of the pipeline's batch, e.g. Stein probes) and the
    scheduler timestep per row ``(n B,)``; it returns the prediction in the network's own
    parameterisation (eps / v / velocity), shape of ``x``. Each network row counts as one model
    evaluation (``add_model_evals``) beyond the one the caller's adapter records per row.

    Raises:
        ReplayError: no calls were captured, the sample cannot be found among a call's arguments
            (e.g. inpainting concatenates a mask along channels), no timestep argument, or the
            pipeline's prediction is not a per-sample affine combination of the captured outputs.
    """

    def __init__(self, capture: DenoiserCapture, sample: Tensor, model_output: Tensor, timestep: float,
                 rtol: float | None = None) -> None:
        calls = list(capture.calls)
        if not calls:
            raise ReplayError("no network call was captured before scheduler.step (the pipeline's network is not "
                              "the hooked unet / transformer, or the call arguments cannot be captured); "
                              + NATIVE_LOOP_HINT)
        self.capture, self.batch = capture, sample.shape[0]
        self.specs: list[tuple[CapturedCall, _Slot, int, _Slot, float]] = []
        chunks: list[Tensor] = []
        b = self.batch
        for call in calls:
            located = _locate_sample(call, sample)
            if located is None:
                raise ReplayError("a captured network call does not take the sample scheduler.step received (its "
                                  "latents are concatenated with other inputs or rescaled); " + NATIVE_LOOP_HINT)
            x_slot, k = located
            t_slot = _locate_timestep(call)
            if t_slot is None:
                raise ReplayError("cannot find the timestep argument of a captured network call; " + NATIVE_LOOP_HINT)
            captured_t = float(torch.as_tensor(t_slot.get(call)).reshape(-1)[0])
            ratio = captured_t / timestep if timestep != 0 else 1.0
            out = _learned_sigma_split(call.output, model_output)
            if out.shape[0] != k * b or out.shape[1:] != model_output.shape[1:]:
                raise ReplayError(f"captured network output of shape {tuple(call.output.shape)} does not match the "
                                  f"prediction passed to step {tuple(model_output.shape)}; " + NATIVE_LOOP_HINT)
            self.specs.append((call, x_slot, k, t_slot, ratio))
            chunks += [out[m * b:(m + 1) * b] for m in range(k)]
        self.chunks = chunks
        """The captured network outputs at the pipeline's own point, one ``(B, *dims)`` tensor per
        batch chunk (e.g. ``[uncond, cond]`` for a CFG pipeline)."""
        self.weights = self._fit(chunks, model_output, rtol)

    @staticmethod
    def _fit(chunks: list[Tensor], target: Tensor, rtol: float | None) -> Tensor:
        """Per-sample least-squares weights ``(B, J)`` with ``target[b] ~ sum_j w[b, j] chunks[j][b]``."""
        b = target.shape[0]
        a = torch.stack([c.reshape(b, -1) for c in chunks], dim=2).to(torch.float64).cpu()  # (B, n, J)
        y = target.reshape(b, -1, 1).to(torch.float64).cpu()
        w = torch.linalg.lstsq(a, y, driver="gelsd").solution  # (B, J, 1)
        residual = (a @ w - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1).clamp_min(1e-30)
        if rtol is None:
            rtol = 1e-4 if target.dtype in (torch.float32, torch.float64) else 2e-2
        worst = float(residual.max())
        if worst > rtol:
            raise ReplayError(f"the pipeline's prediction is not an affine combination of its network outputs "
                              f"(relative residual {worst:.2e} > {rtol:g}: a non-linear guider or a layout we cannot "
                              "replay); " + NATIVE_LOOP_HINT)
        return w[..., 0]

    def __call__(self, x: Tensor, timestep: Tensor) -> Tensor:
        b = self.batch
        if x.shape[0] % b:
            raise ReplayError(f"replay needs a multiple of the pipeline batch {b}, got {x.shape[0]} rows")
        outs = []
        for r in range(x.shape[0] // b):
            outs.append(self._replay_chunk(x[r * b:(r + 1) * b], timestep[r * b:(r + 1) * b]))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def chunk_outputs(self, x: Tensor, timestep: Tensor) -> list[Tensor]:
        """The network outputs of every captured batch chunk at ``x`` (``(B, *dims)``, one pipeline
        batch) and per-row scheduler ``timestep`` ``(B,)``: one ``(B, *dims)`` tensor per chunk, in
        the order of :attr:`chunks`. Counts the network rows it evaluates beyond the ``B`` that a
        caller's adapter counts (``add_model_evals``)."""
        b = self.batch
        outs: list[Tensor] = []
        for call, x_slot, k, t_slot, ratio in self.specs:
            args, kwargs = list(call.args), dict(call.kwargs)
            ref = x_slot.get(call)
            x_in = x.to(device=ref.device, dtype=ref.dtype)
            x_slot.put(args, kwargs, torch.cat([x_in] * k) if k > 1 else x_in)
            t_slot.put(args, kwargs, self._timestep(t_slot.get(call), timestep, ratio, k))
            self.capture.replaying = True
            try:
                out = _learned_sigma_split(network_output(call.module(*args, **kwargs)), x)
            finally:
                self.capture.replaying = False
            add_model_evals(k * b - b / len(self.specs))  # the adapter counts b rows per replay in all
            outs += [out[m * b:(m + 1) * b] for m in range(k)]
        return outs

    def _replay_chunk(self, x: Tensor, timestep: Tensor) -> Tensor:
        b = self.batch
        work = torch.promote_types(x.dtype, torch.float32)
        total: Tensor | float = 0.0
        for j, out in enumerate(self.chunk_outputs(x, timestep)):
            w = self.weights[:, j].to(device=x.device, dtype=work).reshape((b,) + (1,) * (x.ndim - 1))
            total = total + w * out.to(device=x.device, dtype=work)
        return total

    @staticmethod
    def _timestep(captured: Any, timestep: Tensor, ratio: float, k: int) -> Any:
        """The timestep argument for the replay, in the captured form (scalar, 0-d or per-row)."""
        values = timestep.to(torch.float64) * ratio
        if not isinstance(captured, Tensor):
            return float(values[0])
        dtype = captured.dtype if captured.is_floating_point() else torch.float32
        if bool((values == values[0]).all()):
            return torch.full(captured.shape, float(values[0]), dtype=dtype, device=captured.device)
        if captured.ndim != 1:
            raise ReplayError("per-row timesteps cannot be replayed through a scalar timestep argument")
        return torch.cat([values] * k).to(device=captured.device, dtype=dtype)
