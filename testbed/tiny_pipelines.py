"""Tiny randomly initialised diffusers pipelines, built offline from configs (no hub access).

For tests and the attach-overhead benchmark: every family diffsample adapts, with a few channels,
byte-level CLIP tokenizers and a character-level Unigram T5 tokenizer built in memory.
Weights are seeded (``torch.manual_seed(seed)`` before each
component), and every component is put in eval mode. Images are 16 x 16 (latents 8 x 8).

``build(family)`` with ``family`` in :data:`FAMILIES`; ``"ddpm_gmm"`` wraps the exact
Gaussian-mixture eps-model and ``"ddpm_mnist"`` the bundled MNIST model (null class) in a
``DDPMPipeline``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FAMILIES = ("ddpm", "ddpm_gmm", "ddpm_mnist", "sd", "sd2", "sdxl", "sd3", "flux", "pixart")
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, clip_sample=False, set_alpha_to_one=False)
TEXT_LEN = 16


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer(max_length: int = TEXT_LEN):
    """Byte-level CLIP tokenizer (514 tokens: 256 bytes, 256 word-final bytes, BOS 512, EOS 513)."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {v: i for i, v in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = TEXT_LEN):
    """Character-level Unigram T5 tokenizer (98 pieces: pad 0, eos 1, unk 2, ASCII, '▁')."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(c), -1.0) for c in range(33, 127)] + [("▁", -1.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_config(projection_dim: int | None = None, hidden: int = 32):
    from transformers import CLIPTextConfig

    kw = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=hidden, intermediate_size=37,
              layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=514,
              max_position_embeddings=TEXT_LEN)
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=d_model, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=98,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8))


def _vae(latent_channels: int = 4, **kw: Any):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=2, sample_size=16, **kw)


def _seeded(seed: int, fn, *args: Any, **kw: Any):
    torch.manual_seed(seed)
    return fn(*args, **kw)


class NullClassUNet(nn.Module):
    """A class-conditional ``UNet2DModel`` called with the null class (its unconditional branch),
    so ``DDPMPipeline`` can run it; ``config`` and ``dtype`` are the wrapped UNet's."""

    def __init__(self, unet: nn.Module, null_class: int) -> None:
        super().__init__()
        self.unet, self.null_class = unet, null_class
        self.config = unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: torch.Tensor, timestep: Any, return_dict: bool = True, **kwargs: Any):
        labels = torch.full((sample.shape[0],), self.null_class, dtype=torch.long, device=sample.device)
        return self.unet(sample, timestep, class_labels=labels, return_dict=return_dict)


def build(family: str, seed: int = 0) -> Any:
    """A tiny pipeline of ``family`` (one of :data:`FAMILIES`) on the CPU in float32, eval mode.

    Raises:
        ValueError: unknown family.
    """
    import diffusers as d

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    if family == "ddpm":
        unet = _seeded(seed, d.UNet2DModel, block_out_channels=(8, 16), layers_per_block=1, sample_size=8,
                       in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)
        pipe = d.DDPMPipeline(unet=unet, scheduler=d.DDPMScheduler(num_train_timesteps=1000))
    elif family == "ddpm_gmm":
        from diffsample.testbed.gmm import GaussianMixture

        sched = d.DDPMScheduler(num_train_timesteps=1000)
        unet = GaussianMixture.random(dim=16, components=4, seed=seed).eps_model(sched.alphas_cumprod, (1, 4, 4))
        pipe = d.DDPMPipeline(unet=unet, scheduler=sched)
    elif family == "ddpm_mnist":
        from diffsample.testbed import mnist

        unet = NullClassUNet(mnist.load_unet(), mnist.NULL_CLASS)
        pipe = d.DDPMPipeline(unet=unet, scheduler=d.DDPMScheduler.from_config(mnist.load_scheduler_config()))
    elif family in ("sd", "sd2"):
        unet = _seeded(seed, d.UNet2DConditionModel, block_out_channels=(4, 8), layers_per_block=1, sample_size=8,
                       in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=2,
                       attention_head_dim=2)
        from transformers import CLIPTextModel

        config = dict(SD_SCHEDULER, prediction_type="v_prediction" if family == "sd2" else "epsilon",
                      timestep_spacing="trailing" if family == "sd2" else "leading")
        pipe = d.StableDiffusionPipeline(
            vae=_seeded(seed + 1, _vae), text_encoder=_seeded(seed + 2, CLIPTextModel, _clip_config()),
            tokenizer=clip_tokenizer(), unet=unet, scheduler=d.DDIMScheduler(**config), safety_checker=None,
            feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    elif family == "sdxl":
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        unet = _seeded(seed, d.UNet2DConditionModel, block_out_channels=(8, 16), layers_per_block=1, sample_size=8,
                       in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                       use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                       transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
                       cross_attention_dim=64, norm_num_groups=4)
        pipe = d.StableDiffusionXLPipeline(
            vae=_seeded(seed + 1, _vae), text_encoder=_seeded(seed + 2, CLIPTextModel, _clip_config()),
            text_encoder_2=_seeded(seed + 3, CLIPTextModelWithProjection, _clip_config(projection_dim=32)),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
            scheduler=d.EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULER.items()
                                                  if k not in ("clip_sample", "set_alpha_to_one")}),
            image_encoder=None, feature_extractor=None)
    elif family == "sd3":
        from transformers import CLIPTextModelWithProjection

        transformer = _seeded(seed, d.SD3Transformer2DModel, sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                              attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                              joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
        pipe = d.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_seeded(seed + 1, _vae, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                        use_post_quant_conv=False),
            text_encoder=_seeded(seed + 2, CLIPTextModelWithProjection, _clip_config(projection_dim=32)),
            tokenizer=clip_tokenizer(),
            text_encoder_2=_seeded(seed + 3, CLIPTextModelWithProjection, _clip_config(projection_dim=32)),
            tokenizer_2=clip_tokenizer(), text_encoder_3=_seeded(seed + 4, _t5), tokenizer_3=t5_tokenizer())
    elif family == "flux":
        from transformers import CLIPTextModel

        transformer = _seeded(seed, d.FluxTransformer2DModel, patch_size=1, in_channels=16, num_layers=1,
                              num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                              joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                              guidance_embeds=True)
        pipe = d.FluxPipeline(
            scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
            vae=_seeded(seed + 1, _vae, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                        use_post_quant_conv=False),
            text_encoder=_seeded(seed + 2, CLIPTextModel, _clip_config()), tokenizer=clip_tokenizer(),
            text_encoder_2=_seeded(seed + 3, _t5), tokenizer_2=t5_tokenizer(), transformer=transformer,
            image_encoder=None, feature_extractor=None)
    else:  # pixart
        transformer = _seeded(seed, d.PixArtTransformer2DModel, sample_size=8, num_layers=1, patch_size=1,
                              attention_head_dim=8, num_attention_heads=2, caption_channels=32, in_channels=4,
                              cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                              num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                              norm_eps=1e-6)
        pipe = d.PixArtAlphaPipeline(
            tokenizer=t5_tokenizer(), text_encoder=_seeded(seed + 4, _t5), vae=_seeded(seed + 1, _vae),
            transformer=transformer, scheduler=d.DDIMScheduler(**SD_SCHEDULER))
    for name, component in pipe.components.items():
        if isinstance(component, nn.Module):
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(family: str, steps: int = 4, prompt: str = "a red fox", batch: int = 1) -> dict[str, Any]:
    """Pipeline call arguments for a quick run of ``family`` (output stays as latents)."""
    if family.startswith("ddpm"):
        return dict(batch_size=batch, num_inference_steps=steps, output_type="np")
    kw: dict[str, Any] = dict(prompt=prompt, num_inference_steps=steps, num_images_per_prompt=batch,
                              height=16, width=16, output_type="latent")
    if family in ("sd3", "flux", "pixart"):
        kw["max_sequence_length"] = TEXT_LEN
    if family == "pixart":
        kw["use_resolution_binning"] = False
        kw["clean_caption"] = False
    if family == "flux":
        kw["guidance_scale"] = 3.5
    else:
        kw["guidance_scale"] = 5.0
    return kw
