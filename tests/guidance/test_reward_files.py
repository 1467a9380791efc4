"""Reward files a user names (CLIP folders, aesthetic heads) are checked before use: a corrupt or
pickle head, garbage CLIP safetensors, a CLIP folder without config.json or tokenizer files, a
FIFO: one ValueError line each (nothing is downloaded, no pickle is loaded)."""

from __future__ import annotations

import os
import pickle
import shutil
import time

import pytest
import torch

from diffsample.guidance import REWARDS, Resources, RewardModelMissing
from diffsample.guidance.rewards import HEAD_KEYS, RewardFileError


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip") / "clip"
    tc = dict(vocab_size=60, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
              max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vc = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=30,
              patch_size=2)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=16))
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate("abcdefgh")}}
    transformers.CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(folder)
    return folder


def head_state(embed: int = 16) -> dict[str, torch.Tensor]:
    dims = [embed, 1024, 128, 64, 16, 1]
    return {f"layers.{k}.{p}": (torch.randn(o, i) if p == "weight" else torch.randn(o))
            for k, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])) for p in ("weight", "bias")}


def save_head(path, state):
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def create(spec):
    return REWARDS.create(spec, resources=Resources())


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 400, text
    return text


def copy_clip(clip_folder, tmp_path, change):
    copy = tmp_path / "clip"
    shutil.copytree(clip_folder, copy)
    change(copy)
    return copy


def test_a_good_folder_and_head_load(clip_folder, tmp_path):
    head = save_head(tmp_path / "head.safetensors", head_state())
    reward = create(f"aesthetic:clip={clip_folder},head={head}")
    assert reward(torch.zeros(2, 1, 8, 8)).shape == (2,)


@pytest.mark.parametrize("case", ["garbage", "pickle", "missing key", "extra key", "wrong shape", "wrong width",
                                  "nan", "fifo", "directory", "dev zero"])
def test_bad_aesthetic_heads(clip_folder, tmp_path, case):
    head = tmp_path / "head.safetensors"
    state = head_state()
    match = {"garbage": "not a readable safetensors file", "pickle": "pickle checkpoints are refused",
             "missing key": "missing layers.7.bias", "extra key": "unexpected extra", "wrong shape": r"layers.2 has weight",
             "wrong width": "the head takes 8-dimensional embeddings, the CLIP model gives 16",
             "nan": "not finite", "fifo": "FIFO", "directory": "directory", "dev zero": "character device"}[case]
    if case == "garbage":
        head.write_bytes(os.urandom(4096))
    elif case == "pickle":
        head.write_bytes(pickle.dumps({k: v.numpy() for k, v in state.items()}))
    elif case == "missing key":
        save_head(head, {k: v for k, v in state.items() if k != "layers.7.bias"})
    elif case == "extra key":
        save_head(head, {**state, "extra": torch.zeros(1)})
    elif case == "wrong shape":
        save_head(head, {**state, "layers.2.weight": torch.zeros(128, 7)})
    elif case == "wrong width":
        save_head(head, head_state(8))
    elif case == "nan":
        save_head(head, {**state, "layers.4.bias": torch.full((64,), float("nan"))})
    elif case == "fifo":
        os.mkfifo(head)
    elif case == "directory":
        head.mkdir()
    else:
        os.symlink("/dev/zero", head)
    start = time.perf_counter()
    with pytest.raises(RewardFileError, match=match) as exc:
        create(f"aesthetic:clip={clip_folder},head={head}")
    assert "aesthetic" in one_line(exc) and time.perf_counter() - start < 20


def test_bad_clip_folders(clip_folder, tmp_path):
    def garbage_weights(d):
        for f in d.glob("*.safetensors"):
            f.write_bytes(os.urandom(2048))

    def no_tokenizer(d):
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):
            (d / name).unlink(missing_ok=True)

    def not_clip(d):
        (d / "config.json").write_text('{"model_type": "bert"}')

    cases = [(garbage_weights, RewardFileError, "cannot load .* as a CLIP model"),
             (lambda d: (d / "config.json").unlink(), RewardModelMissing, "has no config.json"),
             (lambda d: (d / "config.json").write_text("[1, 2]"), RewardFileError, r"must be a JSON object"),
             (lambda d: (d / "config.json").write_text("{" * 100_000), RewardFileError, "nested more than"),
             (not_clip, RewardFileError, "not a CLIP model"),
             (no_tokenizer, RewardModelMissing, "has no tokenizer files"),
             (lambda d: os.mkfifo(d / "extra.json"), RewardFileError, "not a regular file")]
    for k, (change, error, match) in enumerate(cases):
        folder = copy_clip(clip_folder, tmp_path / str(k), change)
        for spec in (f"clip_score:clip={folder},prompt=abc", f"pickscore:clip={folder},prompt=abc"):
            with pytest.raises(error, match=match) as exc:
                create(spec)
            one_line(exc)
    with pytest.raises(RewardFileError, match="is not a folder"):
        create(f"clip_score:clip={save_head(tmp_path / 'f.safetensors', head_state())},prompt=a")
