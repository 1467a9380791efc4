"""Reliability battery: bad inputs and faults through the command line and the Python API.

Every case runs in a fresh temporary folder (the working directory of a fresh interpreter, with
its own ``DIFFSAMPLE_CACHE_DIR``), under a memory limit and a timeout; every file in the folder is
hashed before and after. Each case is classified as

* ``clear error``: exit code 2, one ``Error:`` line on stderr, no traceback, nothing written
  (cases marked ``keeps`` may keep what they document, e.g. a sweep's finished cells);
* ``unclear error``: exit code 2 but more than one error line, or a line over 1,000 characters;
* ``crash``: a traceback, exit code 1 (an internal error) or a signal (e.g. out of memory);
* ``hang``: the timeout was reached;
* ``partial output``: an error, and files were written or changed;
* ``silent wrong``: exit code 0 although the input is invalid, or a check of the result failed;
* ``ok``: exit code 0 and the result checked (cases that should succeed).

Cases expecting an error count as passed only as ``clear error``; the others only as ``ok``. The
families are those of the project's reliability issue (numerics, devices, typed options, model
folders, output folders, JSON inputs and caches, reward files, sweep folders, silently wrong
results, messages). Cases that cannot mean anything in this environment (a read-only folder when
running as root) are reported as ``skipped``.

Not part of the test suite (it takes minutes). Run from the repository root:

    python benchmarks/reliability_battery.py [--only SUBSTRING] [--timeout 120]

Writes ``benchmarks/results/reliability_battery.json`` (every case: command, exit code, stderr
tail, files changed, class) and ``benchmarks/results/reliability_battery.md`` (the table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MEMORY_LIMIT = 12 * 2**30  # bytes of address space per case: a 160 GB allocation must fail, not swap
SMALL = ["--steps", "2", "--num-samples", "2", "-q"]
SWEEP = ["sweep", "--solver", "euler", "--steps", "2", "--num-samples", "8", "--batch-size", "8", "-q"]
JEFFREY = "jeffrey:target=[0:0.5,1:0.5],marginal_samples=16"


@dataclass
class Case:
    """One bad input or fault. ``args``: CLI arguments after ``diffsample`` (``{tmp}`` is the
    case's folder), or ``None`` with ``python`` code (run by :data:`API_HARNESS`: a ``ValueError``
    is exit 2 with one line; print ``WRONG: ...`` for a silently wrong result, ``UNCLEAR: ...`` for
    an error whose message misses what it must name). ``setup(tmp)``
    prepares files; ``check(tmp, stdout)`` returns a reason when an exit-0 result is wrong."""

    name: str
    family: str
    args: list[str] | None = None
    python: str | None = None
    expect: str = "error"  # "error" or "ok"
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, str], str | None] | None = None
    keeps: bool = False  # an error may keep documented output (a sweep's finished cells)
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None
    after: list[str] | None = None  # a second command (the "next start") whose result is classified


API_HARNESS = """\
import sys
def _line(e):
    return " ".join(str(e).split())
try:
{body}
except ValueError as _e:
    print("Error:", _line(_e), file=sys.stderr)
    sys.exit(2)
"""


# --- set-ups -----------------------------------------------------------------------------------

def write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)


def unet_folder(folder: Path, sample_size: int = 8) -> None:
    """A tiny diffusers UNet folder (unet/ + scheduler/, safetensors)."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDPMScheduler().save_pretrained(folder / "scheduler")
    if sample_size != 8:
        config = json.loads((folder / "unet" / "config.json").read_text())
        config["sample_size"] = sample_size
        write(folder / "unet" / "config.json", json.dumps(config))


def clip_folder(folder: Path, *, config: bool = True, tokenizer: bool = True, garbage: bool = False) -> None:
    """A tiny CLIP folder (transformers CLIPModel, safetensors, a CLIP tokenizer)."""
    from transformers import CLIPConfig, CLIPModel

    from diffsample.testbed import tiny_pipelines as tp

    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=2, vocab_size=1000),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, image_size=30, patch_size=2), projection_dim=32)
    CLIPModel(cfg).save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        tp.clip_tokenizer().save_pretrained(folder)
    if not config:
        (folder / "config.json").unlink()
    if garbage:
        for f in folder.glob("*.safetensors"):
            f.write_bytes(os.urandom(4096))


def sd_folder(folder: Path) -> None:
    from diffsample.testbed import tiny_pipelines as tp

    tp.build("sd").save_pretrained(folder, safe_serialization=True)


def readonly(folder: Path) -> None:
    folder.mkdir()
    folder.chmod(0o555)


def sweep_folder(tmp: Path, extra: list[str] | None = None) -> None:
    run_cli([*SWEEP, *(extra or []), "--out", str(tmp / "s")], tmp)


def generate_folder(tmp: Path, out: str = "o", seed: int = 0, extra: tuple[str, ...] = ()) -> None:
    run_cli(["generate", *SMALL, "--seed", str(seed), "--out", str(tmp / out), *extra], tmp)


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run([sys.executable, "-m", "diffsample.cli.main", *args], cwd=cwd, env=case_env(cwd, env),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"set-up command failed: {args}: {proc.stderr[-500:]}")


# --- checks ------------------------------------------------------------------------------------

def run_record(tmp: Path, out: str = "o") -> dict:
    return json.loads((tmp / out / "run.json").read_text())


def check_overwrite_whole(tmp: Path, _: str) -> str | None:
    names = sorted(p.name for p in (tmp / "o").iterdir())
    want = ["grid.png", "keep.txt", "run.json", "sample_00000_seed50.png", "sample_00001_seed51.png"]
    return None if names == want else f"--out holds {names}, expected {want}"


def check_old_state_kept(tmp: Path, _: str) -> str | None:
    names = sorted(p.name for p in (tmp / "o").iterdir()) if (tmp / "o").is_dir() else None
    leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".o.")]
    if names is None:
        return "--out is gone"
    if any("seed50" in n for n in names) and any("seed0" in n for n in names):
        return f"--out mixes two runs: {names}"
    if leftovers:
        return f"staging left behind: {leftovers}"
    return None


def check_sweep_tables(tmp: Path, _: str) -> str | None:
    table = (tmp / "s" / "results.md").read_text()
    if "mnist_fd (N=8)" not in table or "wall_time_s (N=8)" not in table:
        return f"results.md mixes metrics: {table!r}"
    return None


def check_cache_repaired(tmp: Path, _: str) -> str | None:
    try:
        json.loads((tmp / "cache.json").read_text())
    except (OSError, ValueError) as exc:
        return f"the cache was not repaired: {exc}"
    return None


# --- the cases ---------------------------------------------------------------------------------

def cases() -> list[Case]:
    gen = ["generate", *SMALL, "--out", "o"]
    fifo = lambda name: (lambda tmp: os.mkfifo(tmp / name))  # noqa: E731
    root = "running as root: a read-only folder is writable" if os.geteuid() == 0 else None
    c = [
        # numerics
        Case("cfg-scale 1e30", "numerics", [*gen, "--cfg-scale", "1e30", "--class", "3"]),
        Case("cfg-scale inf", "numerics", [*gen, "--cfg-scale", "inf"]),
        Case("cfg-scale nan", "numerics", [*gen, "--cfg-scale", "nan"]),
        Case("guidance cfg:scale=1e309", "numerics", [*gen, "--guidance", "cfg:scale=1e309"]),
        Case("sweep: second cell non-finite (finished cell and results.md kept)", "numerics",
             [*SWEEP, "--guidance", "none", "--guidance", "cfg:scale=1e30", "--out", "s"], keeps=True),
        # devices
        Case("device cuda", "devices", [*gen, "--device", "cuda"],
             skip="this machine has CUDA" if _has_cuda() else None),
        Case("device nonsense", "devices", [*gen, "--device", "nonsense"]),
        Case("device meta", "devices", [*gen, "--device", "meta"]),
        Case("device cuda:99", "devices", [*gen, "--device", "cuda:99"]),
        # typed options
        Case("noisetilt:tile=1e309", "typed options", [*gen, "--solver", "euler_ancestral", "--guidance",
                                                       "noisetilt:tile=1e309"]),
        Case("cfg_zero_star:zero_init_steps=1e309", "typed options", [*gen, "--guidance",
                                                                      "cfg_zero_star:zero_init_steps=1e309"]),
        Case("classifier:label=1e300", "typed options", [*gen, "--guidance", "classifier:label=1e300"]),
        Case("leading:steps_offset=abc", "typed options", [*gen, "--schedule", "leading:steps_offset=abc"]),
        Case("dps:normalize=maybe", "typed options", [*gen, "--guidance", "dps:normalize=maybe"]),
        Case("duplicate key dpmpp_2m:order=1,order=3", "typed options", [*gen, "--solver", "dpmpp_2m:order=1,order=3"]),
        Case("dps:normalize=false is off", "typed options", python=textwrap.dedent("""\
            from diffsample.guidance import GUIDANCE
            from diffsample.run.models import load_model
            term = GUIDANCE.create("dps:normalize=false", resources=load_model().resources)
            flags = [v for k, v in vars(term).items() if "normal" in k]
            if not flags or any(flags):
                print("WRONG: normalize=false left", flags)"""), expect="ok"),
        Case("steps 1.5", "typed options", [*gen, "--steps", "1.5"]),
        Case("seed 2**63", "typed options", [*gen, "--seed", str(2**63)]),
        Case("seed -1", "typed options", [*gen, "--seed", "-1"]),
        Case("num-samples 1000000000", "typed options", [*gen, "--num-samples", "1000000000"]),
        Case("batch-size 0", "typed options", [*gen, "--batch-size", "0"]),
        Case("class 10", "typed options", [*gen, "--class", "10"]),
        Case("unknown solver option", "typed options", [*gen, "--solver", "euler:bogus=1"]),
        Case("unbalanced bracket in a spec", "typed options", [*gen, "--guidance", "jeffrey:target=[0:0.5"]),
        # model folders
        Case("model folder missing", "model folders", [*gen, "--model", "nope"]),
        Case("scheduler_config.json missing", "model folders", [*gen, "--model", "m"],
             setup=lambda tmp: (unet_folder(tmp / "m"), (tmp / "m/scheduler/scheduler_config.json").unlink())),
        Case("scheduler_config.json holding [1,2,3]", "model folders", [*gen, "--model", "m"],
             setup=lambda tmp: (unet_folder(tmp / "m"), write(tmp / "m/scheduler/scheduler_config.json", "[1,2,3]"))),
        Case("unet config sample_size 200000", "model folders", [*gen, "--model", "m"],
             setup=lambda tmp: unet_folder(tmp / "m", sample_size=200000)),
        Case("unet pickle weights only", "model folders", [*gen, "--model", "m"],
             setup=lambda tmp: (unet_folder(tmp / "m"),
                                (tmp / "m/unet/diffusion_pytorch_model.safetensors").rename(
                                    tmp / "m/unet/diffusion_pytorch_model.bin"))),
        Case("unet garbage safetensors", "model folders", [*gen, "--model", "m"],
             setup=lambda tmp: (unet_folder(tmp / "m"),
                                write(tmp / "m/unet/diffusion_pytorch_model.safetensors", os.urandom(2048)))),
        Case("model_index.json garbage", "model folders", [*gen, "--model", "m"],
             setup=lambda tmp: (unet_folder(tmp / "m"), write(tmp / "m/model_index.json", b"\xff\xfe\x00garbage"))),
        # output folders
        Case("generate --out exe/sub", "output", ["generate", *SMALL, "--out", "exe/sub"],
             setup=lambda tmp: (write(tmp / "exe", "#!/bin/sh\n"), (tmp / "exe").chmod(0o755))),
        Case("generate --out afile", "output", ["generate", *SMALL, "--out", "afile"],
             setup=lambda tmp: write(tmp / "afile", "x")),
        Case("sweep --out afile/sub", "output", [*SWEEP, "--out", "afile/sub"], setup=lambda tmp: write(tmp / "afile", "x")),
        Case("generate under a read-only folder", "output", ["generate", *SMALL, "--out", "ro/sub"],
             setup=lambda tmp: readonly(tmp / "ro"), skip=root),
        Case("sweep under a read-only folder", "output", [*SWEEP, "--out", "ro/sub"],
             setup=lambda tmp: readonly(tmp / "ro"), skip=root),
        Case("--out holds files, no --overwrite", "output", gen, setup=lambda tmp: write(tmp / "o/keep.txt", "x")),
        Case("--overwrite with a folder named grid.png", "output", [*gen, "--overwrite"],
             setup=lambda tmp: write(tmp / "o/grid.png/inner.txt", "mine")),
        Case("sweep with a folder named results.md", "output", [*SWEEP, "--out", "s"],
             setup=lambda tmp: write(tmp / "s/results.md/inner.txt", "mine")),
        Case("sweep with a FIFO as results.jsonl", "output", [*SWEEP, "--out", "s"],
             setup=lambda tmp: ((tmp / "s").mkdir(), os.mkfifo(tmp / "s/results.jsonl"))),
        Case("--overwrite replaces the whole run, keeps other files", "output",
             ["generate", *SMALL, "--seed", "50", "--out", "o", "--overwrite"], expect="ok",
             setup=lambda tmp: (generate_folder(tmp, extra=("--num-samples", "3")), write(tmp / "o/keep.txt", "k")),
             check=check_overwrite_whole),
        Case("SIGKILL between copy and swap, then the next start", "output",
             ["generate", *SMALL, "--seed", "50", "--out", "o", "--overwrite"],
             env={"DIFFSAMPLE_TEST_KILL_AT": "copied"}, setup=lambda tmp: generate_folder(tmp),
             after=["generate", *SMALL, "--out", "o"], expect="ok", check=check_old_state_kept),
        Case("SIGKILL between the two renames, then the next start", "output",
             ["generate", *SMALL, "--seed", "50", "--out", "o", "--overwrite"],
             env={"DIFFSAMPLE_TEST_KILL_AT": "aside", "DIFFSAMPLE_TEST_NO_EXCHANGE": "1"},
             setup=lambda tmp: generate_folder(tmp),
             after=["generate", *SMALL, "--out", "o"], expect="ok", check=check_old_state_kept),
        # JSON inputs and caches
        Case("jeffrey target 200,000 deep", "json inputs", [*gen, "--guidance", "jeffrey:target=t.json"],
             setup=lambda tmp: write(tmp / "t.json", "[" * 200_000 + "]" * 200_000)),
        Case("jeffrey target null", "json inputs", [*gen, "--guidance", "jeffrey:target=t.json"],
             setup=lambda tmp: write(tmp / "t.json", "null")),
        Case("jeffrey target [{\"a\":1},2]", "json inputs", [*gen, "--guidance", "jeffrey:target=t.json"],
             setup=lambda tmp: write(tmp / "t.json", '[{"a":1},2]')),
        Case("jeffrey target a FIFO", "json inputs", [*gen, "--guidance", "jeffrey:target=t.json"],
             setup=fifo("t.json")),
        Case("jeffrey target /dev/zero", "json inputs", [*gen, "--guidance", "jeffrey:target=t.json"],
             setup=lambda tmp: os.symlink("/dev/zero", tmp / "t.json")),
        Case("model_marginal {\"k\":{\"n\":1}}", "json inputs",
             [*gen, "--guidance", "jeffrey:target=[0:0.5,1:0.5],model_marginal=mm.json"],
             setup=lambda tmp: write(tmp / "mm.json", '{"k":{"n":1}}')),
        Case("marginal cache binary garbage (recomputed and replaced)", "json inputs",
             [*gen, "--guidance", f"{JEFFREY},marginal_cache=cache.json"], expect="ok",
             setup=lambda tmp: write(tmp / "cache.json", os.urandom(512)), check=check_cache_repaired),
        Case("marginal cache UTF-16 (recomputed and replaced)", "json inputs",
             [*gen, "--guidance", f"{JEFFREY},marginal_cache=cache.json"], expect="ok",
             setup=lambda tmp: write(tmp / "cache.json", '{"a": 1}'.encode("utf-16")), check=check_cache_repaired),
        Case("marginal cache a FIFO", "json inputs", [*gen, "--guidance", f"{JEFFREY},marginal_cache=cache.json"],
             expect="ok", setup=fifo("cache.json")),
        Case("marginal cache -> /dev/zero", "json inputs", [*gen, "--guidance", f"{JEFFREY},marginal_cache=cache.json"],
             expect="ok", setup=lambda tmp: os.symlink("/dev/zero", tmp / "cache.json")),
        # reward files
        Case("aesthetic head garbage", "reward files",
             [*gen, "--solver", "euler_ancestral", "--guidance", "dps:reward=(aesthetic:clip=clip,head=h.safetensors)"],
             setup=lambda tmp: (clip_folder(tmp / "clip"), write(tmp / "h.safetensors", os.urandom(1024)))),
        Case("aesthetic head a pickle", "reward files",
             [*gen, "--solver", "euler_ancestral", "--guidance", "dps:reward=(aesthetic:clip=clip,head=h.safetensors)"],
             setup=lambda tmp: (clip_folder(tmp / "clip"), _pickle(tmp / "h.safetensors"))),
        Case("CLIP garbage safetensors", "reward files",
             [*gen, "--guidance", "dps:reward=(clip_score:clip=clip,prompt=a digit)"],
             setup=lambda tmp: clip_folder(tmp / "clip", garbage=True)),
        Case("CLIP folder without config.json", "reward files",
             [*gen, "--guidance", "dps:reward=(clip_score:clip=clip,prompt=a digit)"],
             setup=lambda tmp: clip_folder(tmp / "clip", config=False)),
        Case("CLIP folder without tokenizer files", "reward files",
             [*gen, "--guidance", "dps:reward=(clip_score:clip=clip,prompt=a digit)"],
             setup=lambda tmp: clip_folder(tmp / "clip", tokenizer=False)),
        Case("CLIP folder missing", "reward files", [*gen, "--guidance", "dps:reward=(clip_score:clip=nope,prompt=x)"]),
        # sweep folders
        Case("sweep: JSON lines that are not rows", "sweep folders", [*SWEEP, "--out", "s"], expect="ok",
             setup=lambda tmp: (sweep_folder(tmp), _append(tmp / "s/results.jsonl", '[]\n{"a":1}\n'))),
        Case("sweep: --metric none cell in an mnist-fd folder, then another sweep", "sweep folders",
             [*SWEEP, "--steps", "3", "--out", "s"], expect="ok",
             setup=lambda tmp: (sweep_folder(tmp), sweep_folder(tmp, ["--metric", "none"])), check=check_sweep_tables),
        Case("sweep: torn last line", "sweep folders", [*SWEEP, "--out", "s"], expect="ok",
             setup=lambda tmp: (sweep_folder(tmp), _append(tmp / "s/results.jsonl", '{"model": "mni'))),
        # silently wrong results
        Case("stein-dpm: same image whatever the batch size, or declared batch-coupled", "silent wrong",
             python=textwrap.dedent("""\
            import diffsample, torch
            a = diffsample.generate(solver="stein-dpm", steps=3, num_samples=4, batch_size=4)
            b = diffsample.generate(solver="stein-dpm", steps=3, num_samples=4, batch_size=1)
            diff = float((a.images - b.images).abs().max()) * 255
            if diff > 1 and not a.record.get("batch_coupled"):
                print(f"WRONG: images differ by {diff:.0f}/255 with batch size and the record does not say so")"""),
             expect="ok"),
        Case("seed streams of 0, 2**32, 2**63-1 distinct", "silent wrong", python=textwrap.dedent("""\
            import torch
            from diffsample.samplers.seeds import seeded_chain
            draws = {}
            for seed in (0, 2**32, 2**63 - 1):
                for chain in (0, 1):
                    noise, noise_fn = seeded_chain([seed], (1, 4, 4), chain)
                    draws[(seed, chain, "initial")] = noise.flatten()
                    draws[(seed, chain, "step")] = noise_fn(1.0, 0.5).flatten()
            keys = list(draws)
            for i, a in enumerate(keys):
                for b in keys[i + 1:]:
                    if torch.equal(draws[a], draws[b]):
                        print("WRONG: streams coincide:", a, b)"""), expect="ok"),
        Case("class_label True", "silent wrong", python="import diffsample\ndiffsample.generate(class_label=True, steps=2, num_samples=2)"),
        Case("class_label 3.7", "silent wrong", python="import diffsample\ndiffsample.generate(class_label=3.7, steps=2, num_samples=2)"),
        Case("classes [1.9, 2.9]", "silent wrong", python="import diffsample\ndiffsample.generate(classes=[1.9, 2.9], steps=2, num_samples=2)"),
        Case("from_eps model output of shape ()", "silent wrong", python=textwrap.dedent("""\
            import torch
            from diffsample.run.models import load_model
            from diffsample.samplers.denoisers import from_eps
            from diffsample.run.generate import build_sampler
            ns = load_model().denoiser.noise_schedule
            den = from_eps(lambda x, t, cond=None: torch.tensor(0.5), ns)
            build_sampler("euler", "karras", 2)(den, noise=torch.randn(2, 1, 4, 4))
            print("WRONG: a scalar model output was broadcast over the batch")""")),
        Case("complex initial noise", "silent wrong", python=textwrap.dedent("""\
            import torch
            from diffsample.run.models import load_model
            from diffsample.run.generate import build_sampler
            m = load_model()
            build_sampler("euler", "karras", 2)(m.denoiser, cond=m.cond(torch.tensor([1])),
                                                 noise=torch.randn(1, 1, 16, 16, dtype=torch.complex64))
            print("WRONG: complex noise was accepted")""")),
        Case("--negative-prompt on MNIST", "silent wrong", [*gen, "--negative-prompt", "blurry"]),
        Case("--class on a text pipeline", "silent wrong",
             ["generate", *SMALL, "--model", "sd", "--prompt", "a fox", "--class", "3", "--out", "o"],
             setup=lambda tmp: sd_folder(tmp / "sd")),
        Case("--prompt on MNIST", "silent wrong", [*gen, "--prompt", "a cat"]),
        # messages
        Case("--steps 100000 (short message)", "messages", [*gen, "--steps", "100000"]),
        Case("non-finite reward gradient names step and sigma", "messages", python=textwrap.dedent("""\
            import torch
            from diffsample.guidance import GUIDANCE
            from diffsample.guidance.composition import compose
            from diffsample.run.generate import build_sampler
            from diffsample.run.models import load_model
            from diffsample.samplers.seeds import seeded_run
            m = load_model()
            reward = lambda x0: (x0.abs() * 0).sqrt().flatten(1).sum(1)  # finite value, NaN gradient
            den = compose(m.denoiser, [GUIDANCE.create("noisetilt", reward=reward, resources=m.resources)], None)
            try:
                build_sampler("euler_ancestral", "karras", 3)(den, cond=m.cond(torch.tensor([1, 2])),
                                                              **seeded_run([0, 1], m.sample_shape))
            except Exception as exc:
                if "step" not in str(exc) or "sigma" not in str(exc):
                    print("UNCLEAR:", exc)
                raise ValueError(str(exc))
            print("WRONG: a NaN reward gradient was accepted")""")),
        Case("unknown command", "messages", ["genrate"]),
        Case("unknown guidance", "messages", [*gen, "--guidance", "nope"]),
    ]
    return c


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _pickle(path: Path) -> None:
    import pickle

    write(path, pickle.dumps({"weight": [1.0, 2.0]}))


def _append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


# --- running and classifying -------------------------------------------------------------------

def case_env(tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSAMPLE_")}
    env.update({"DIFFSAMPLE_CACHE_DIR": str(tmp / ".cache"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONWARNINGS": "ignore"})
    env.update(extra or {})
    return env


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def snapshot(folder: Path) -> dict[str, str]:
    """Path -> sha256 (or the kind of a non-regular entry) of everything under ``folder``."""
    result = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                result[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                result[rel] = "dir"
            elif path.is_file():
                result[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                result[rel] = "special"
    return result


def run_case(case: Case, timeout: float) -> dict:
    record = {"name": case.name, "family": case.family, "expect": case.expect}
    if case.skip:
        return {**record, "class": "skipped", "why": case.skip}
    tmp = Path(tempfile.mkdtemp(prefix="battery-"))
    try:
        if case.setup:
            case.setup(tmp)
        if case.args is not None:
            command = [sys.executable, "-m", "diffsample.cli.main", *case.args]
            record["command"] = "diffsample " + " ".join(case.args)
        else:
            body = textwrap.indent(case.python, "    ")
            write(tmp / "case.py", API_HARNESS.format(body=body))
            command = [sys.executable, "case.py"]
            record["command"] = "python: " + " | ".join(case.python.splitlines())
        before = snapshot(tmp)
        start = time.monotonic()
        try:
            proc = subprocess.run(command, cwd=tmp, env=case_env(tmp, case.env), capture_output=True, text=True,
                                  timeout=timeout, preexec_fn=_limit_memory)
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, stdout, stderr = None, _text(exc.stdout), _text(exc.stderr)
        record["seconds"] = round(time.monotonic() - start, 1)
        record["exit_code"] = code
        if case.after and code is not None:
            nxt = subprocess.run([sys.executable, "-m", "diffsample.cli.main", *case.after], cwd=tmp,
                                 env=case_env(tmp), capture_output=True, text=True, timeout=timeout,
                                 preexec_fn=_limit_memory)
            record["after"] = {"command": "diffsample " + " ".join(case.after), "exit_code": nxt.returncode,
                               "stderr_tail": nxt.stderr[-500:]}
        after = snapshot(tmp)
        changed = sorted(k for k in set(before) | set(after)
                         if before.get(k) != after.get(k) and not k.startswith(".cache"))
        record["files_changed"] = changed[:20] + ([f"... {len(changed) - 20} more"] if len(changed) > 20 else [])
        record["stderr_tail"] = stderr[-1500:]
        record["class"], record["why"] = classify(case, tmp, code, stdout, stderr, changed)
        record["passed"] = record["class"] == ("clear error" if case.expect == "error" else "ok")
        return record
    except Exception as exc:  # a broken set-up is reported, not hidden
        return {**record, "class": "set-up failed", "why": f"{type(exc).__name__}: {exc}"[:500], "passed": False}
    finally:
        for root, dirs, _ in os.walk(tmp):
            for d in dirs:
                try:
                    os.chmod(Path(root) / d, 0o755)
                except OSError:
                    pass
        shutil.rmtree(tmp, ignore_errors=True)


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def classify(case: Case, tmp: Path, code: int | None, stdout: str, stderr: str, changed: list[str]) -> tuple[str, str]:
    """(class, reason) of one finished case."""
    if code is None:
        return "hang", "timeout"
    if "WRONG:" in stdout:
        return "silent wrong", stdout.split("WRONG:", 1)[1].strip()[:300]
    if "UNCLEAR:" in stdout:
        return "unclear error", stdout.split("UNCLEAR:", 1)[1].strip()[:300]
    if "Traceback (most recent call last)" in stderr:
        return "crash", stderr.strip().splitlines()[-1][:300]
    if code < 0 and case.env.get("DIFFSAMPLE_TEST_KILL_AT"):  # killed on purpose: judge the state left
        problem = case.check(tmp, stdout) if case.check else None
        return ("partial output", problem) if problem else ("ok", "killed mid-publish; --out holds the old run")
    if code < 0:
        return "crash", f"killed by signal {-code}"
    if code == 1:
        return "crash", _last(stderr)
    if code == 2:
        errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
        if changed and not case.keeps:
            return "partial output", f"wrote {changed[:5]}"
        if len(errors) != 1 or len(errors[0]) > 1000:
            return "unclear error", f"{len(errors)} error lines, {len(stderr)} characters"
        return "clear error", errors[0][:300]
    if code == 0:
        if case.expect == "error":
            return "silent wrong", "exit 0 on invalid input"
        if case.check:
            problem = case.check(tmp, stdout)
            if problem:
                return "silent wrong", problem
        return "ok", _last(stderr) or "exit 0"
    return "crash", f"exit code {code}: {_last(stderr)}"


def _last(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per case before it counts as a hang")
    args = parser.parse_args()
    selected = [c for c in cases() if args.only is None or args.only in c.name]
    records = []
    for k, case in enumerate(selected, 1):
        rec = run_case(case, args.timeout)
        records.append(rec)
        print(f"[{k}/{len(selected)}] {rec['class']:<15s} {case.name}: {rec.get('why', '')}"[:200], flush=True)
    counts = Counter(r["class"] for r in records)
    summary = {"cases": len(records), "passed": sum(bool(r.get("passed")) for r in records),
               "classes": dict(sorted(counts.items())),
               "command": "python benchmarks/reliability_battery.py" + (f" --only {args.only!r}" if args.only else ""),
               "git": _git_head(), "python": platform.python_version(), "platform": platform.platform(),
               "uid": os.geteuid()}
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.only is None else "_partial"
    (RESULTS / f"reliability_battery{suffix}.json").write_text(json.dumps({"summary": summary, "cases": records},
                                                                          indent=1) + "\n")
    (RESULTS / f"reliability_battery{suffix}.md").write_text(markdown(summary, records))
    print(json.dumps(summary, indent=1))


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown(summary: dict, records: list[dict]) -> str:
    lines = ["# Reliability battery", "",
             f"`{summary['command']}` at {summary['git']} (Python {summary['python']}, {summary['platform']}, "
             f"uid {summary['uid']}).", "",
             f"{summary['cases']} cases, {summary['passed']} as expected. Classes: "
             + ", ".join(f"{k} {v}" for k, v in summary["classes"].items()) + ".", "",
             "Expected: a bad input is a `clear error` (exit 2, one line, nothing written); a case marked `ok` "
             "runs and its result is checked.", "",
             "| family | case | expected | class | as expected | detail |", "|---|---|---|---|---|---|"]
    for r in records:
        detail = str(r.get("why", "")).replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {r['family']} | {r['name'].replace('|', '/')} | {r['expect']} | {r['class']} | "
                     f"{'yes' if r.get('passed') else ('-' if r['class'] == 'skipped' else 'NO')} | {detail} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
