"""Shipped rewards: class log-probability, ink, callables, and the optional CLIP-based rewards
(built here from a tiny random CLIP saved to a temporary folder: nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from diffsample.guidance import REWARDS, Resources, RewardModelMissing, as_reward
from diffsample.guidance.rewards import CLIP_MEAN, CLIP_STD, ClassLogProb, Ink


def test_class_logp_and_ink_are_exact():
    logits = torch.randn(4, 10)
    noisy = ClassLogProb(lambda x, t: logits + 0 * x.sum(), "noisy", 3)
    assert torch.allclose(noisy(torch.zeros(4, 1, 2, 2)), torch.log_softmax(logits, 1)[:, 3])
    clean = ClassLogProb(lambda x: logits, "clean")
    from diffsample.guidance import Cond
    y = torch.tensor([0, 1, 2, 9])
    assert torch.allclose(clean(torch.zeros(4, 1), Cond({"class_labels": y})), torch.log_softmax(logits, 1)[range(4), y])
    with pytest.raises(ValueError, match="target class"):
        clean(torch.zeros(4, 1))
    x = torch.tensor([[-1.0, 1.0], [1.0, 1.0]])
    assert torch.equal(Ink()(x), torch.tensor([0.5, 1.0]))


def test_callables_become_rewards():
    r = as_reward(lambda x: x.sum(1))
    assert torch.equal(r(torch.ones(2, 3)), torch.tensor([3.0, 3.0]))
    r2 = as_reward(lambda x, cond: x.sum(1) + (0 if cond is None else 1), "two")
    assert r2.name == "two" and torch.equal(r2(torch.ones(2, 3)), torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="callable"):
        as_reward(3)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip")
    tc = dict(vocab_size=60, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vc = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=2)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=16)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                                     eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return folder, model, tok


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_score_matches_the_model_and_has_a_gradient(tiny_clip):
    folder, model, tok = tiny_clip
    reward = REWARDS.create(f"clip_score:clip={folder},prompt=a cat", resources=Resources())
    x = (torch.rand(3, 1, 16, 16) * 2 - 1).requires_grad_(True)
    value = reward(x)
    assert value.shape == (3,) and value.requires_grad
    (g,) = torch.autograd.grad(value.sum(), x)
    assert float(g.abs().sum()) > 0
    # independent computation: resize, CLIP-normalise, cosine
    pix = torch.nn.functional.interpolate(((x.detach() + 1) / 2).expand(-1, 3, -1, -1), size=(30, 30), mode="bicubic")
    pix = (pix - torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1)) / torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        img = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pix)), dim=-1)
        txt = torch.nn.functional.normalize(_features(model.get_text_features(**tok(["a cat"], return_tensors="pt"))), dim=-1)
    assert torch.allclose(value.detach(), 100 * (img @ txt.T).squeeze(1), atol=1e-4)
    pick = REWARDS.create(f"pickscore:clip={folder},prompt=a cat", resources=Resources())
    assert torch.allclose(pick(x).detach(), value.detach() / 100 * float(model.logit_scale.exp()), atol=1e-4)


def test_aesthetic_head_from_a_local_safetensors_file(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    folder, model, _ = tiny_clip
    dims = [16, 1024, 128, 64, 16, 1]
    torch.manual_seed(1)
    idx = [0, 2, 4, 6, 7]
    state = {}
    for k, (i, o) in zip(idx, zip(dims[:-1], dims[1:])):
        state[f"layers.{k}.weight"] = torch.randn(o, i) / i**0.5
        state[f"layers.{k}.bias"] = torch.randn(o)
    head = tmp_path / "head.safetensors"
    save_file(state, str(head))
    reward = REWARDS.create(f"aesthetic:clip={folder},head={head}", resources=Resources())
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    emb = torch.nn.functional.normalize(_features(model.get_image_features(
        pixel_values=(torch.nn.functional.interpolate(((x + 1) / 2).expand(-1, 3, -1, -1), size=(30, 30), mode="bicubic")
                      - torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1)) / torch.tensor(CLIP_STD).reshape(1, 3, 1, 1))), dim=-1)
    h = emb
    for k in idx:
        h = h @ state[f"layers.{k}.weight"].T + state[f"layers.{k}.bias"]
    assert torch.allclose(reward(x).detach(), h.squeeze(1).detach(), atol=1e-4)


@pytest.mark.parametrize("spec, path", [("aesthetic:clip=/no/such/clip,head=/no/head.safetensors", "/no/head.safetensors"),
                                        ("clip_score:clip=/no/such/clip", "/no/such/clip"),
                                        ("pickscore:clip=/no/such/clip", "/no/such/clip")])
def test_missing_optional_reward_models_name_the_file(spec, path):
    with pytest.raises(RewardModelMissing, match=path):
        REWARDS.create(spec, resources=Resources())
