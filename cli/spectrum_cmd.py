"""``diffsample spectrum``: a data spectrum (RAPSD) for the ``csflow`` step schedule, as JSON."""

from __future__ import annotations

import shlex
from datetime import datetime, timezone
from pathlib import Path

import click

from diffsample.cli.options import fail


def _command(source: Path, params: dict) -> str:
    """The command line that reproduces this run (options that were given, in a fixed order)."""
    words = ["diffsample", "spectrum", str(source)]
    for key in ("out", "name", "resolution", "max_images", "key", "pipeline", "batch_size"):
        value = params.get(key)
        if value is not None and not (key == "batch_size" and value == 16):
            words += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(words)


@click.command("spectrum")
@click.argument("source", type=click.Path(path_type=Path), metavar="IMAGES")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="The spectrum JSON file to write.")
@click.option("--name", default=None, help="The spectrum's name (default: the file's stem).")
@click.option("--resolution", type=click.IntRange(min=2), default=None,
              help="Centre crop size in pixels, no resizing (default: the smallest image side).")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Use the first N images only.")
@click.option("--key", default=None, help="Array name inside an .npz (default: its first array).")
@click.option("--pipeline", type=click.Path(path_type=Path), default=None,
              help="A diffusers pipeline folder (or its vae/ folder): the spectrum of its normalised VAE latents "
                   "(for latent models: SD, SDXL, SD3, FLUX).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per VAE call (--pipeline).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def spectrum_cmd(source, out, name, resolution, max_images, key, pipeline, batch_size, overwrite):
    """Compute the radially averaged power spectrum (RAPSD) of IMAGES -- a folder of image files or an
    .npz array (uint8 in [0, 255] or float in [-1, 1]) -- for `--schedule csflow:spectrum=FILE`.

    \b
    Examples:
      diffsample spectrum digits.npz --out my_digits.json
      diffsample spectrum photos/ --resolution 512 --pipeline ./sd3-folder --out sd3_latents.json
    """
    if out.exists() and (out.is_dir() or not overwrite):
        fail(f"--out {str(out)!r} exists; pass --overwrite or choose another file" if not out.is_dir()
             else f"--out {str(out)!r} is a directory; give a file name")
    params = click.get_current_context().params
    info = {"source": str(source), "command": _command(source, params),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    label = name or out.stem
    try:
        from diffsample.solvers.spectrum import load_images, save_spectrum, spectrum_from_images

        images = load_images(source, resolution=resolution, max_images=max_images, key=key)
        if pipeline is None:
            spectrum = spectrum_from_images(images, name=label, **info)
        else:
            from diffsample.pipelines.spectrum import latent_spectrum

            spectrum = latent_spectrum(_load_vae(pipeline), images, name=label, batch_size=batch_size,
                                       pipeline=str(pipeline), **info)
    except ValueError as exc:
        fail(str(exc))
    tmp = out.with_name(out.name + ".tmp")
    save_spectrum(spectrum, tmp)
    tmp.replace(out)
    click.echo(f"wrote {out} ({spectrum.frequency_cpp.size} bins from {spectrum.provenance['num_images']} images"
               + (f", latents / {spectrum.provenance['latent_factor']}" if pipeline is not None else "") + ")")


def _load_vae(folder: Path):
    """The ``AutoencoderKL`` of a pipeline folder (``vae/``) or a VAE folder, offline, safetensors only."""
    from diffusers import AutoencoderKL

    path = folder / "vae" if (folder / "vae").is_dir() else folder
    if not (path / "config.json").is_file():
        raise ValueError(f"--pipeline {str(folder)!r}: no vae/config.json (a diffusers pipeline or VAE folder)")
    try:
        vae = AutoencoderKL.from_pretrained(path, use_safetensors=True, local_files_only=True)
    except Exception as exc:  # diffusers raises many types for bad folders
        raise ValueError(f"--pipeline {str(folder)!r}: cannot load its VAE ({exc})") from None
    return vae.eval().requires_grad_(False)
