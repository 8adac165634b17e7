"""Untrained components of the reference pipelines: ordinary diffusers classes at a small size.

Image: ``CogView4Pipeline`` — flow matching, CFG on by default (separate cond/uncond calls), a
12-block joint-attention transformer, a 4x AutoencoderKL, a tiny bidirectional UMT5 text encoder (in
place of GLM: any encoder returning ``hidden_states`` serves the pipeline) and a word-level tokenizer
over the caption vocabulary. Video: ``WanPipeline`` — flow matching, CFG by default,
12 blocks, a small ``AutoencoderKLWan``, a tiny UMT5 encoder. ``scripts/train_reference.py``
trains them; ``reference.load`` loads the trained copies shipped in ``weights/``.
"""

from __future__ import annotations

import torch

from .scenes import vocabulary

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>")
TEXT_MAX_LENGTH = 48


def make_tokenizer(padding_side: str = "left"):
    """A word-level fast tokenizer over the caption vocabulary; '<bos>' starts every prompt.

    CogView4 pads on the left itself; Wan reads the first ``len`` positions, so it needs right padding.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary():
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        model_max_length=TEXT_MAX_LENGTH,
        padding_side=padding_side,
    )


def small_umt5(vocab_size: int, pad_token_id: int, seed: int):
    """A tiny bidirectional UMT5 encoder (both pipelines; CogView4 reads ``hidden_states[-2]``, Wan the last)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=3,
            num_heads=4,
            relative_attention_num_buckets=16,
            pad_token_id=pad_token_id,
        )
    )


def image_components(seed: int = 0) -> dict:
    """Components of the reference text-to-image pipeline, randomly initialised."""
    from diffusers import AutoencoderKL, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer = make_tokenizer()
    text_encoder = small_umt5(len(tokenizer), tokenizer.pad_token_id, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
    torch.manual_seed(seed + 2)
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=12,
        attention_head_dim=32,
        num_attention_heads=6,
        text_embed_dim=64,
        time_embed_dim=128,
        condition_dim=32,
        pos_embed_max_size=64,
        sample_size=16,  # 16 latent px = 64 image px, the default size
        rope_axes_dim=(64, 64),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "transformer": transformer,
        "scheduler": scheduler,
    }


def image_pipeline(components: dict):
    from diffusers import CogView4Pipeline

    return CogView4Pipeline(**components)


VIDEO_FRAMES = 9
VIDEO_LATENT_CHANNELS = 8
# The VAE's temporal compression: 2 (the shipped model since 2026-12-05: 9 frames -> 5 latent frames, the
# first stage downsampling space only, as Wan 2.2's VAE) or 4 (9 -> 3, as Wan 2.1; the earlier model): a
# moving shape smeared over 4 frames in one latent frame lost its colour (the 4x VAE's reconstructions:
# colour 39%, the 2x VAE's 88.5%).
VIDEO_TEMPORAL_SCALES = {4: [True, True], 2: [False, True]}


def video_components(seed: int = 0, temporal_scale: int = 2) -> dict:
    """Components of the reference text-to-video pipeline (Wan family), randomly initialised; the VAE
    compresses time by ``temporal_scale`` (``VIDEO_TEMPORAL_SCALES``)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    if temporal_scale not in VIDEO_TEMPORAL_SCALES:
        raise ValueError(f"temporal_scale must be one of {sorted(VIDEO_TEMPORAL_SCALES)}, got {temporal_scale!r}")
    tokenizer = make_tokenizer(padding_side="right")
    text_encoder = small_umt5(len(tokenizer), tokenizer.pad_token_id, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        base_dim=24,
        z_dim=VIDEO_LATENT_CHANNELS,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=VIDEO_TEMPORAL_SCALES[temporal_scale],
        latents_mean=[0.0] * VIDEO_LATENT_CHANNELS,
        latents_std=[1.0] * VIDEO_LATENT_CHANNELS,
        scale_factor_temporal=temporal_scale,
        scale_factor_spatial=4,
    )
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=6,
        attention_head_dim=32,
        in_channels=VIDEO_LATENT_CHANNELS,
        out_channels=VIDEO_LATENT_CHANNELS,
        text_dim=64,
        freq_dim=64,
        ffn_dim=512,
        num_layers=12,
        rope_max_seq_len=64,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "transformer": transformer,
        "scheduler": scheduler,
    }


def video_pipeline(components: dict):
    from diffusers import WanPipeline

    return WanPipeline(**components)
