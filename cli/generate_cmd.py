"""``diffsample generate``: sample images, write PNGs (with parameters in a text chunk), a grid
and a run-record JSON.

Everything is checked before sampling (device, ``--out``, options that do not fit the model).
The run is written into a hidden staging folder next to ``--out`` and appears there at once by
rename (:mod:`diffsample.run.publish`): a failed or killed run leaves ``--out`` as it was, and
``--overwrite`` replaces the old run as a whole (files of the old ``--out`` that are not run
outputs are kept)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from diffsample.cli.options import FiniteFloat, fail, registry_spec

DEFAULT_OUT = "out"


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse (exit 2) an output path that is a file, lies under a file, cannot be written, holds
    files without ``--overwrite``, or holds a non-file under an output name (a folder called
    ``grid.png``; :func:`diffsample.run.publish.check_out`)."""
    from diffsample.run.publish import check_out

    try:
        check_out(out, "--out", overwrite=overwrite, outputs=("grid.png", "run.json"))
    except ValueError as exc:
        fail(str(exc))


def check_device(device: str) -> str:
    """``device`` if this machine has it, else exit 2 with one line listing the valid devices."""
    import torch

    valid = ["cpu"]
    if torch.cuda.is_available():
        valid += ["cuda", *(f"cuda:{k}" for k in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        valid.append("mps")
    if device not in valid and device != "cpu:0":
        why = "" if device.split(":")[0] in ("cpu", "cuda", "mps", "meta") else " (unknown device)"
        if device.startswith("cuda") and not torch.cuda.is_available():
            why = " (no CUDA device on this machine)"
        raise click.BadParameter(f"device {device!r} is not available{why}; valid: {', '.join(valid)}",
                                 param_hint="'--device'")
    return device


def png_bytes_metadata(params: dict) -> "PngInfo":  # noqa: F821
    """A PNG text chunk ``parameters`` (A1111-style one-liner) plus ``diffsample`` (full JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", ", ".join(f"{k}: {v}" for k, v in params.items() if k != "versions"))
    info.add_text("diffsample", json.dumps(params))
    return info


def to_pil(image) -> "Image.Image":  # noqa: F821
    """``(C, H, W)`` float in [0, 1] -> PIL image (L or RGB)."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(dtype=__import__("torch").uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def make_grid(images, ncol: int, scale: int) -> "Image.Image":  # noqa: F821
    """Tile ``(N, C, H, W)`` images into one picture, upscaled ``scale`` times (nearest)."""
    from PIL import Image

    n = images.shape[0]
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    tiles = [to_pil(img) for img in images]
    w, h = tiles[0].size
    pad = 1
    grid = Image.new(tiles[0].mode, (ncol * (w + pad) + pad, nrow * (h + pad) + pad), 255 if tiles[0].mode == "L" else (255, 255, 255))
    for k, tile in enumerate(tiles):
        grid.paste(tile, (pad + (k % ncol) * (w + pad), pad + (k // ncol) * (h + pad)))
    return grid.resize((grid.size[0] * scale, grid.size[1] * scale), Image.NEAREST)


def write_outputs(result, out: Path) -> list[Path]:
    """Write every file into a staging folder next to ``out``, then publish it as ``out`` at once
    (:func:`diffsample.run.publish.publish`)."""
    from diffsample.run.publish import make_staging, publish

    record = result.record
    staging = make_staging(out)
    try:
        common = {k: record[k] for k in ("model", "solver", "schedule", "steps", "final", "guidance", "cfg_scale",
                                          "nfe", "model_evals", "dtype")}
        common["version"] = record["versions"]["diffsample"]
        if record.get("stop") is not None:
            common["stop"] = record["stop"]
        names = []
        for k, image in enumerate(result.images):
            params = {**common, "seed": record["seeds"][k]}
            if record["classes"] is not None:
                params["class"] = record["classes"][k]
            name = f"sample_{k:05d}_seed{record['seeds'][k]}.png"
            to_pil(image).save(staging / name, pnginfo=png_bytes_metadata(params))
            names.append(name)
        ncol = 10 if record["classes"] is not None else math.ceil(math.sqrt(len(names)))
        make_grid(result.images, ncol, scale=4).save(staging / "grid.png", pnginfo=png_bytes_metadata(common))
        names.append("grid.png")
        (staging / "run.json").write_text(json.dumps(record, indent=2) + "\n")
        names.append("run.json")
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out)
    return [out / n for n in names]


def _quiet_loaders(model: str) -> None:
    """No loading progress bars from diffusers / transformers (``-q``) for a model folder."""
    from diffsample.testbed import BUNDLED_MODELS

    if model in BUNDLED_MODELS:
        return
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers comes with the pipeline extras
        return
    transformers.utils.logging.disable_progress_bar()


def marginal_summary(m: dict) -> str:
    """One line on where a Jeffrey model marginal came from."""
    probs = "[" + ", ".join(f"{p:.3f}" for p in m["probs"]) + "]"
    if m["source"] == "given":
        return f"model marginal (given): {probs}"
    if m["source"] == "cache":
        return f"model marginal from cache {m['cache_path']} (n={m['n']}): {probs}"
    where = f", cached in {m['cache_path']}" if m["cache_path"] else ""
    return (f"model marginal estimated from {m['n']} unguided samples (model_evals={m['model_evals']:g}, "
            f"{m['wall_time_s']:.1f} s{where}): {probs}")


@click.command("generate")
@click.option("--model", "model", metavar="PATH_OR_ID", default="mnist", show_default=True,
              help="A bundled model ('mnist', or a distilled student such as 'mnist-pd-4': `diffsample list "
                   "models`) or a diffusers model folder (unet/ + scheduler/, or a pipeline folder with "
                   "model_index.json; safetensors only).")
@click.option("--solver", default=None, callback=registry_spec("solvers"),
              help="Solver spec NAME[:key=value,...] (see `diffsample list solvers`). Default: the model's "
                   "(dpmpp_2m; ddim for a distilled student; `diffsample list models`), or an optimised "
                   "schedule file's solver.")
@click.option("--schedule", default=None, callback=registry_spec("schedules"),
              help="Step schedule spec NAME[:key=value,...]. Default: the model's (trailing).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Grid intervals. Default: the model's (20; a distilled student's own step count), or an "
                   "optimised schedule file's step count.")
@click.option("--final", type=click.Choice(["zero", "last"]), default="zero", show_default=True,
              help="Denoise to sigma=0 on the last step, or stop at the last grid point.")
@click.option("--guidance", multiple=True, callback=registry_spec("guidance"), metavar="NAME[:k=v,...]",
              help="Guidance term (repeatable, applied in order).")
@click.option("--cfg-scale", type=FiniteFloat(min=0), default=None, help="Classifier-free guidance scale.")
@click.option("--class", "class_label", type=int, default=None,
              help="Class for every sample (default: sample index mod #classes).")
@click.option("--prompt", default=None, help="Text prompt (text-to-image pipeline folders: SD, SDXL, SD3, FLUX, PixArt).")
@click.option("--negative-prompt", default=None, help="Negative prompt (the CFG branch; default empty).")
@click.option("--stop", type=FiniteFloat(), default=None, metavar="VALUE",
              help="Stop every run at this noise level and return the state there (truncated sampling, "
                   "arXiv 2606.13796).")
@click.option("--stop-unit", default="ou_time", show_default=True,
              help="Unit of --stop: ou_time, logsnr, lambda, sigma (EDM), t_rf or native (the model's timestep).")
@click.option("--stop-return", default="noisy", show_default=True,
              help="What a stopped run returns: noisy (x_stop), denoised (+1 model evaluation), rescaled "
                   "(x_stop / alpha) or ou (VP coordinates).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="First seed; sample k uses seed + k.")
@click.option("--num-samples", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path(DEFAULT_OUT), show_default=True)
@click.option("--overwrite", is_flag=True, help="Write into an --out folder that already holds files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
def generate_cmd(model, solver, schedule, steps, final, guidance, cfg_scale, class_label, prompt, negative_prompt, stop,
                 stop_unit, stop_return, seed, num_samples, batch_size, device, dtype, out, overwrite, quiet):
    """Generate samples: one PNG each (parameters in a text chunk), grid.png and run.json."""
    import warnings

    from diffsample.run.generate import DTYPES, SolverSwitched, generate
    from diffsample.solvers.schedule_file import ScheduleMismatch
    from diffsample.run.models import PipelineModel, load_model
    from diffsample.run.publish import recover
    from diffsample.solvers.stop_time import stop_options

    check_device(device)
    stop_options(stop, stop_unit, stop_return)  # one-line refusal before anything is loaded or written
    for note in recover(out):
        click.echo(note, err=True)
    check_out_dir(out, overwrite)
    if quiet:
        _quiet_loaders(model)
    loaded = load_model(model, device=device, dtype=DTYPES[dtype])
    text_to_image = isinstance(loaded, PipelineModel) and loaded.denoiser.text_conditioned
    if class_label is not None and isinstance(loaded, PipelineModel):
        fail(f"--class needs a class-conditional model; {loaded.name!r} is a diffusers pipeline"
             + (" (use --prompt)" if text_to_image else ""))
    if negative_prompt is not None and not text_to_image:
        fail(f"--negative-prompt needs a text-to-image pipeline; model {loaded.name!r} is not one")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverSwitched)  # printed below as one line, from the record
        # A schedule file tuned for another model / solver: printed below once, from the record.
        warnings.filterwarnings("ignore", message=r"schedule .* was optimised for ", category=ScheduleMismatch)
        result = generate(loaded, solver=solver, schedule=schedule, steps=steps, guidance=guidance, cfg_scale=cfg_scale,
                          class_label=class_label, seed=seed, num_samples=num_samples, batch_size=batch_size,
                          device=device, dtype=dtype, final=final, progress=not quiet, prompt=prompt,
                          negative_prompt=negative_prompt, stop=stop, stop_unit=stop_unit, stop_return=stop_return)
    for note in result.record.get("notes", []):
        click.echo(note, err=True)
    files = write_outputs(result, out)
    if not quiet:
        rec = result.record
        marginals = rec.get("model_marginal")
        for m in ([marginals] if isinstance(marginals, dict) else marginals or []):
            click.echo(marginal_summary(m))
        click.echo(f"wrote {len(files) - 2} samples, grid.png and run.json to {out} "
                   f"(nfe={rec['nfe']}, model_evals={rec['model_evals']:g}, {rec['wall_time_s']:.2f} s)")
