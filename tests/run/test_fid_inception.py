"""FID with the 2015-12-05 Inception-v3 (run/fid_inception.py) and ``--metric fid`` of the sweep.

No real weights exist here: the tests write a random-weights safetensors file with the network's
names and shapes (variance-preserving, so the features are not all zero)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from diffsample.cli.main import main
from diffsample.run.fid_inception import FID_FEATURES, FIDInceptionV3, load_fid_inception
from diffsample.run.sweep_metrics import build_metric


def random_state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in FIDInceptionV3().state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[name] = torch.randn(value.shape, generator=gen) * math.sqrt(2.0 / fan_in)
        elif name.endswith("bn.running_var"):
            state[name] = torch.ones(value.shape)
        elif name.endswith(("bn.weight",)):
            state[name] = 1 + 0.1 * torch.randn(value.shape, generator=gen)
        elif name.endswith(("bn.bias", "bn.running_mean")):
            state[name] = 0.1 * torch.randn(value.shape, generator=gen)
        else:  # num_batches_tracked, as in a state dict saved by torch
            state[name] = value
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "inception.safetensors"
    state = random_state()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # as the released file
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Four 12x12 RGB PNGs and the same images as a (4, 3, 12, 12) tensor in [0, 1]."""
    folder = tmp_path_factory.mktemp("ref")
    arrays = np.random.default_rng(0).integers(0, 256, size=(4, 12, 12, 3), dtype=np.uint8)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image; skipped")
    return folder, torch.from_numpy(arrays).permute(0, 3, 1, 2).to(torch.float32) / 255


def test_architecture_matches_inception_v3():
    net = FIDInceptionV3()
    # torchvision's inception_v3 has 27,161,264 parameters; less its auxiliary head (3,326,696) and
    # its 1000-way classifier (2,049,000) that leaves the 21,785,568 of the trunk up to pool3.
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 - 2_049_000
    shapes = {}
    for name in ("Mixed_5d", "Mixed_6e", "Mixed_7c"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    assert net(torch.rand(1, 3, 40, 50)).shape == (1, FID_FEATURES)
    # arXiv 1512.00567, Table 1: grids 35x35x288, 17x17x768, 8x8x2048 at a 299x299 input.
    assert shapes == {"Mixed_5d": (1, 288, 35, 35), "Mixed_6e": (1, 768, 17, 17), "Mixed_7c": (1, 2048, 8, 8)}


def test_load_gives_the_files_weights_and_2048_d_features(weights):
    net = load_fid_inception(weights)
    twin = FIDInceptionV3()
    twin.load_state_dict(random_state())
    x = torch.rand(2, 1, 16, 16)
    features = net(x)
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    assert torch.isfinite(features).all() and features.std() > 0.01
    assert torch.equal(features, twin.eval()(x))
    assert torch.equal(features, net(x.expand(-1, 3, -1, -1)))  # grey images are repeated to RGB


def test_fid_through_the_sweep_metric(weights, reference):
    folder, images = reference
    metric = build_metric("fid", SimpleNamespace(name="m", metrics=()), fid_weights=str(weights),
                          fid_reference=str(folder))
    shifted = metric.score(None, (images * 0.5 + 0.4).clamp(0, 1), None, None)
    same = metric.score(None, images, None, None)
    assert same["fid_reference_n"] == 4
    # the same set scores ~0 (after the shifted cell: reset keeps the reference, drops the old cell)
    assert abs(same["fid"]) < 1e-3 * shifted["fid"] and shifted["fid"] > 1.0


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


SMALL = ("sweep", "--solver", "ddim", "--steps", "2", "--num-samples", "4", "--batch-size", "4", "-q")


def test_sweep_cli_with_fid(weights, reference, tmp_path):
    folder, _ = reference
    out = tmp_path / "s"
    result = run(*SMALL, "--metric", "fid", "--fid-weights", weights, "--fid-reference", folder, "--out", out)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["metric"] == "fid" and row["fid"] > 0 and row["fid_reference_n"] == 4
    assert "fid (N=4)" in (out / "results.md").read_text()


def _write(path, tensors):
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("case, fragment", [
    ("none", "give --fid-weights PATH"),
    ("missing", "no such file"),
    ("text", "not a safetensors file"),
    ("shape", "tensor 'Conv2d_1a_3x3.conv.weight' has shape (32, 3, 5, 5), expected (32, 3, 3, 3)"),
    ("missing-tensor", "tensor 'Conv2d_1a_3x3.bn.weight' missing"),
    ("no-reference", "no such folder"),
])
def test_bad_fid_input_writes_nothing(case, fragment, weights, tmp_path):
    args = {
        "none": [],
        "missing": ["--fid-weights", tmp_path / "absent.safetensors"],
        "text": ["--fid-weights", tmp_path / "w.txt"],
        "shape": ["--fid-weights", tmp_path / "w.safetensors"],
        "missing-tensor": ["--fid-weights", tmp_path / "w.safetensors"],
        "no-reference": ["--fid-weights", weights, "--fid-reference", tmp_path / "absent"],
    }[case]
    if case == "text":
        (tmp_path / "w.txt").write_text("not weights")
    if case in ("shape", "missing-tensor"):
        k = 5 if case == "shape" else 3
        _write(tmp_path / "w.safetensors", {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, k, k)})
    result = run(*SMALL, "--metric", "fid", *args, "--out", tmp_path / "s")
    assert result.exit_code == 2, result.output
    assert fragment in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_a_file_of_another_network_names_its_extra_tensor(tmp_path):
    state = random_state()
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    path = _write(tmp_path / "w.safetensors", state)
    with pytest.raises(ValueError, match="unexpected tensor 'AuxLogits.fc.weight'"):
        load_fid_inception(path)


def test_a_model_without_bundled_digits_needs_a_reference_folder(weights):
    with pytest.raises(ValueError, match="for model 'pipe': give --fid-reference FOLDER"):
        build_metric("fid", SimpleNamespace(name="pipe", metrics=()), fid_weights=str(weights))


def test_a_reference_folder_with_one_image_is_refused(weights, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="holds 1 image"):
        build_metric("fid", SimpleNamespace(name="pipe", metrics=()), fid_weights=str(weights),
                     fid_reference=str(tmp_path))
