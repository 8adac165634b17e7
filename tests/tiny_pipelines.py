"""Tiny random-weight diffusers pipelines, built fully offline, for fast CPU tests.

Every component is constructed from a config (no hub downloads). Text tokenizers are
`tokenizers` WordLevel tokenizers over a small vocabulary wrapped in
``PreTrainedTokenizerFast``, so pipelines can be called with a plain text prompt and
survive ``save_pretrained`` + ``DiffusionPipeline.from_pretrained(folder)`` offline.

Usage::

    from tests.tiny_pipelines import FAMILIES, build, run
    case = build("flux")
    out = run(case, seed=0)               # numpy array (images or video frames)
    out = run(case, seed=0, num_inference_steps=3, height=32, width=32)

Notes:
  * ``call_kwargs`` always passes an explicit small height/width (and num_frames for video):
    the pipelines' *default* resolutions are derived from hard-coded sizes (e.g. Flux/Qwen
    use 128 * vae_scale_factor, Wan/HunyuanVideo default to 480p/720p and 81/129 frames),
    so ``pipe("x")`` without size arguments works but is much slower.
  * PixArt and Sana use ``use_resolution_binning=False`` in ``call_kwargs``; with binning on
    (the pipeline default) the output is still produced but the latent size comes from the
    256/512 px aspect-ratio bins.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["TinyCase", "FAMILIES", "build", "run", "make_tokenizer"]


@dataclass
class TinyCase:
    pipe: "object"  # DiffusionPipeline
    call_kwargs: dict = field(default_factory=dict)
    denoiser_attr: str = "transformer"
    is_video: bool = False
    cfg_layout: str = "batched"  # "batched" (one doubled batch) or "separate" (cache_context cond/uncond)
    name: str = ""
    calls_per_step: int = 2  # CFG branches evaluated per step: 1 for guidance-distilled or text-free models

    @property
    def denoiser(self):
        return getattr(self.pipe, self.denoiser_attr)


# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------

VOCAB_SIZE = 256  # size used for every tiny text encoder's embedding table

_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
_WORDS = (
    "a an the of and or with in on at to from by for is are be this that it its as "
    "red green blue yellow black white orange purple pink brown gray grey dark light bright "
    "circle square triangle star cat dog bird fish car house tree flower sky sun moon water "
    "man woman person child face hand eye city street mountain river forest beach snow rain "
    "photo image video picture painting drawing render portrait landscape close up view "
    "big small large tiny tall short long round old new beautiful ugly happy sad "
    "high low quality detailed blurry blur lowres worst best sharp realistic cartoon style "
    "running walking flying sitting standing moving camera slow fast motion scene frame "
    "x y z describe detailing color shape size texture quantity text spatial relationships "
    "objects background main content theme actions events user assistant system "
    "1 2 3 4 5 0 . , : ; ! ? - ' \" ( ) [ ] < > | / _ { }"
).split()


def _vocab() -> dict:
    vocab = {}
    for tok in _SPECIALS + _WORDS:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    assert len(vocab) <= VOCAB_SIZE
    return vocab


PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def make_tokenizer(model_max_length: int = 512, add_bos: bool = False, add_eos: bool = True, padding_side: str = "right"):
    """A word-level fast tokenizer built in-process (no files, no network)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab=_vocab(), unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = ("<s> " if add_bos else "") + "$A" + (" </s>" if add_eos else "")
    pair = single + " $B" + (" </s>" if add_eos else "")
    special = [("<s>", BOS_ID), ("</s>", EOS_ID)]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        padding_side=padding_side,
    )


def clip_tokenizer():
    # CLIP-style: bos + text + eos, padded to model_max_length=77
    return make_tokenizer(model_max_length=77, add_bos=True, add_eos=True)


def t5_tokenizer():
    return make_tokenizer(model_max_length=512, add_bos=False, add_eos=True)


# ----------------------------------------------------------------------------------------
# Tiny text encoders
# ----------------------------------------------------------------------------------------


def _seed(s: int = 0):
    torch.manual_seed(s)


def clip_text_model(hidden_size=32, projection_dim=32, with_projection=False, layers=2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )
    _seed(0)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def t5_encoder(d_model=32, layers=2, umt5=False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(
        vocab_size=VOCAB_SIZE,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    _seed(0)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kw)).eval()
    return T5EncoderModel(T5Config(**kw)).eval()


def qwen25_vl_encoder():
    """A 16-wide Qwen2.5-VL (Qwen-Image's and HunyuanImage's text encoder), vision tower included."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": VOCAB_SIZE,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=VOCAB_SIZE,
        vision_end_token_id=VOCAB_SIZE - 4,
        vision_start_token_id=VOCAB_SIZE - 3,
        vision_token_id=VOCAB_SIZE - 2,
        image_token_id=VOCAB_SIZE - 1,
        video_token_id=VOCAB_SIZE - 2,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen3_text_model(layers: int, causal_lm: bool = False):
    """A 16-wide Qwen3 (FLUX.2 [klein] takes the causal LM, Z-Image the bare model)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    _seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def chat_tokenizer(separator: str = ""):
    """The word-level tokenizer with a chat template that joins the messages' contents (by ``separator``)."""
    tokenizer = make_tokenizer(model_max_length=4096, add_bos=False, add_eos=False)
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}" + separator + "{% endfor %}"
    return tokenizer


# ----------------------------------------------------------------------------------------
# Tiny VAEs
# ----------------------------------------------------------------------------------------


def kl_vae(latent_channels=4, levels=4, ch=8, **kw):
    """AutoencoderKL with 2**(levels-1) spatial compression (levels=4 -> 8x, like real SD/Flux)."""
    from diffusers import AutoencoderKL

    _seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(ch,) * levels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **kw,
    ).eval()


# ----------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    return pipe


def _case(pipe, cfg_layout: str, is_video: bool = False, **call) -> TinyCase:
    """A tiny case with the common call: "a red circle", 4 steps, 64 px, numpy output; ``call`` adds or overrides."""
    call_kwargs = dict(prompt="a red circle", num_inference_steps=4, height=64, width=64, output_type="np")
    call_kwargs.update(call)
    return TinyCase(pipe=_finish(pipe), call_kwargs=call_kwargs, denoiser_attr="transformer", is_video=is_video,
                    cfg_layout=cfg_layout)


def _pixart(sigma: bool) -> TinyCase:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    _seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=32,  # 32 -> 256px aspect-ratio bins if resolution binning is on
        num_layers=3,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,  # learned sigma, like the real model
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    vae = kl_vae(latent_channels=4)
    text_encoder = t5_encoder(d_model=32)
    tokenizer = t5_tokenizer()
    if sigma:
        scheduler = DPMSolverMultistepScheduler()
        cls = PixArtSigmaPipeline
    else:
        scheduler = DDIMScheduler()
        cls = PixArtAlphaPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    return TinyCase(
        pipe=_finish(pipe),
        call_kwargs=dict(
            prompt="a red circle",
            num_inference_steps=4,
            guidance_scale=4.5,
            height=64,
            width=64,
            use_resolution_binning=False,
            clean_caption=False,
            max_sequence_length=32,
            output_type="np",
        ),
        denoiser_attr="transformer",
        is_video=False,
        cfg_layout="batched",
    )


def pixart_alpha() -> TinyCase:
    return _pixart(sigma=False)


def pixart_sigma() -> TinyCase:
    return _pixart(sigma=True)


def sd3() -> TinyCase:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    text_encoder = clip_text_model(hidden_size=16, projection_dim=16, with_projection=True)
    text_encoder_2 = clip_text_model(hidden_size=16, projection_dim=16, with_projection=True)
    text_encoder_3 = t5_encoder(d_model=32)
    vae = kl_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer(),
    )
    return TinyCase(
        pipe=_finish(pipe),
        call_kwargs=dict(
            prompt="a red circle",
            num_inference_steps=4,
            guidance_scale=5.0,
            height=64,
            width=64,
            max_sequence_length=32,
            output_type="np",
        ),
        denoiser_attr="transformer",
        is_video=False,
        cfg_layout="batched",
    )


def flux() -> TinyCase:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    _seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        out_channels=None,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    text_encoder = clip_text_model(hidden_size=32, projection_dim=32)
    text_encoder_2 = t5_encoder(d_model=32)
    vae = kl_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    return TinyCase(
        pipe=_finish(pipe),
        call_kwargs=dict(
            prompt="a red circle",
            negative_prompt="blurry",
            true_cfg_scale=2.0,
            guidance_scale=3.5,  # embedded (distilled) guidance
            num_inference_steps=4,
            height=64,
            width=64,
            max_sequence_length=32,
            output_type="np",
        ),
        denoiser_attr="transformer",
        is_video=False,
        cfg_layout="separate",
    )


def sana() -> TinyCase:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    _seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        mlp_ratio=2.0,
        sample_size=16,  # 16 -> 512px aspect-ratio bins when resolution binning is on
    ).eval()
    _seed(0)
    # 6 levels -> 32x spatial compression like the real DC-AE
    n = 6
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock",) * (n - 1) + ("EfficientViTBlock",),
        decoder_block_types=("ResBlock",) * (n - 1) + ("EfficientViTBlock",),
        encoder_block_out_channels=(8,) * n,
        decoder_block_out_channels=(8,) * n,
        encoder_qkv_multiscales=((),) * (n - 1) + ((5,),),
        decoder_qkv_multiscales=((),) * (n - 1) + ((5,),),
        encoder_layers_per_block=(1,) * n,
        decoder_layers_per_block=(1,) * n,
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    _seed(0)
    text_encoder = Gemma2Model(
        Gemma2Config(
            head_dim=8,
            hidden_size=16,
            intermediate_size=32,
            max_position_embeddings=2048,
            num_attention_heads=2,
            num_hidden_layers=2,
            num_key_value_heads=1,
            vocab_size=VOCAB_SIZE,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            attn_implementation="eager",
        )
    ).eval()
    tokenizer = make_tokenizer(model_max_length=4096, add_bos=True, add_eos=False)
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    return TinyCase(
        pipe=_finish(pipe),
        call_kwargs=dict(
            prompt="a red circle",
            num_inference_steps=4,
            guidance_scale=4.5,
            height=128,
            width=128,
            use_resolution_binning=False,
            clean_caption=False,
            complex_human_instruction=None,
            max_sequence_length=32,
            output_type="np",
        ),
        denoiser_attr="transformer",
        is_video=False,
        cfg_layout="batched",
    )


def qwenimage() -> TinyCase:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    _seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()
    z_dim = 4
    _seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=z_dim * 2,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 8x spatial like the real VAE
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    ).eval()
    text_encoder = qwen25_vl_encoder()
    tokenizer = make_tokenizer(model_max_length=32768, add_bos=False, add_eos=False)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return TinyCase(
        pipe=_finish(pipe),
        call_kwargs=dict(
            prompt="a red circle",
            negative_prompt="blurry",
            true_cfg_scale=4.0,
            num_inference_steps=4,
            height=64,
            width=64,
            max_sequence_length=32,
            output_type="np",
        ),
        denoiser_attr="transformer",
        is_video=False,
        cfg_layout="separate",
    )


def chroma() -> TinyCase:
    """Chroma: FLUX.1-style blocks whose single-stream ones take [text, image] joined; its pipeline runs the
    CFG branches as two calls without a cache context."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    _seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    vae = kl_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=t5_encoder(d_model=32),
        tokenizer=t5_tokenizer(),
        transformer=transformer,
    )
    return _case(pipe, "separate", negative_prompt="blurry", guidance_scale=3.0, max_sequence_length=32)


def flux2_klein() -> TinyCase:
    """FLUX.2 [klein] base (Qwen3 text encoder, CFG as separate calls in cache contexts); its single-stream
    blocks take [text, image] joined."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    _seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, 2x2 patchified by the pipeline
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,  # three hidden-state layers of a 16-wide text encoder
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flux2_vae(4),
        text_encoder=qwen3_text_model(3, causal_lm=True),
        tokenizer=chat_tokenizer(),
        transformer=transformer,
    )
    return _case(pipe, "separate", guidance_scale=3.0, max_sequence_length=32, text_encoder_out_layers=(1, 2, 3))


def lumina2() -> TinyCase:
    """Lumina-Image 2.0: one joint stream of [caption, image] tokens after the refiners; its pipeline runs the
    CFG branches as two calls without a cache context."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    _seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=3,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=2,
        multiple_of=16,
        cap_feat_dim=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(300, 64, 64),
    ).eval()
    vae = kl_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
    _seed(0)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )).eval()
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(model_max_length=256, add_bos=True, add_eos=False),
    )
    return _case(pipe, "separate", negative_prompt="blurry", guidance_scale=4.0, max_sequence_length=32,
                 system_prompt="")


def z_image() -> TinyCase:
    """Z-Image: the transformer takes a list of per-image latents and batches CFG conditional first; one joint
    stream of [image, caption] tokens after the refiners."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    _seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=3,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[300, 64, 64],
    ).eval()
    vae = kl_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=qwen3_text_model(2),
        tokenizer=chat_tokenizer(),
        transformer=transformer,
    )
    return _case(pipe, "batched", negative_prompt="blurry", guidance_scale=3.0, max_sequence_length=32)


QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                 "<|endoftext|>"]

# A Qwen-style chat template: "<|im_start|>{role}\n{content}<|im_end|>\n" per message (content a string or a list of
# {"type": "text", "text": ...} parts), then "<|im_start|>assistant\n" when a generation prompt is asked for.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_chat_tokenizer(padding_side: str = "right"):
    """The word-level tokenizer plus Qwen's special tokens (ids 172.., inside VOCAB_SIZE) and a Qwen chat template."""
    tokenizer = make_tokenizer(model_max_length=4096, add_bos=False, add_eos=False, padding_side=padding_side)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    assert max(tokenizer.convert_tokens_to_ids(QWEN_SPECIALS)) < VOCAB_SIZE
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def qwen_vl_processor(tokenizer, processor_cls_name: str = "Qwen3VLProcessor", patch_size: int = 16):
    """A real Qwen-VL processor (``Qwen3VLProcessor`` or ``Qwen2VLProcessor``; PIL image processor, merge 2) without a
    video processor: the video processors need torchvision, which is not installed, and the processor's constructor
    type-checks every component, so that check is let through for ``video_processor=None`` while it is built.
    Text-to-image and image-conditioned calls never touch the video processor."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    cls = getattr(transformers, processor_cls_name)
    check = cls.check_argument_for_proper_class
    own = "check_argument_for_proper_class" in cls.__dict__

    def lenient(self, name, argument):
        return None if (name == "video_processor" and argument is None) else check(self, name, argument)

    cls.check_argument_for_proper_class = lenient
    try:
        return cls(
            image_processor=Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                                     min_pixels=32 * 32, max_pixels=64 * 64),
            tokenizer=tokenizer, video_processor=None, chat_template=QWEN_CHAT_TEMPLATE,
        )
    finally:
        if own:
            cls.check_argument_for_proper_class = check
        else:
            del cls.check_argument_for_proper_class


def _flux2_vae(latent_channels: int = 4):
    """A tiny AutoencoderKLFlux2 (8x spatial, batch-norm statistics), as the FLUX.2 [klein] builder makes it."""
    from diffusers import AutoencoderKLFlux2

    _seed(0)
    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    ).eval()


def _qwen3_vl(layers: int = 2, bare: bool = False):
    """A 16-wide Qwen3-VL (vision tower included; text-only calls never run it) and its processor; ``bare``: the
    ``Qwen3VLModel`` without the LM head (Krea 2 takes that)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLModel

    tokenizer = qwen_chat_tokenizer()
    ids = dict(zip(QWEN_SPECIALS, tokenizer.convert_tokens_to_ids(QWEN_SPECIALS)))
    _seed(0)
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": VOCAB_SIZE, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": layers,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
        },
        vision_config={
            "depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = (Qwen3VLModel if bare else Qwen3VLForConditionalGeneration)(config).eval()
    return model, qwen_vl_processor(tokenizer, "Qwen3VLProcessor")


def _hunyuan_video_vae(latent_channels: int = 4):
    """The tiny AutoencoderKLHunyuanVideo of the kandinsky5 builder (8x spatial, 4x temporal)."""
    from diffusers import AutoencoderKLHunyuanVideo

    _seed(0)
    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=latent_channels, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4, scaling_factor=0.476986,
    ).eval()


def _clip_vision(hidden_size: int = 16):
    """A tiny CLIP vision tower and its processor, made in-process (32 px, 8 px patches)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    _seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=hidden_size,
    )).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, processor


def _test_image(size: int = 32):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8"))


def _tiny_ltx2_vae():
    """A tiny AutoencoderKLLTX2Video (LTX-2's, SANA-WM's): 2x spatial, 2x temporal."""
    from diffusers import AutoencoderKLLTX2Video

    _seed(0)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return vae


def qwenimage21(use_kv_cache: bool = True) -> TinyCase:
    """Qwen-Image 2.1: one list of single-stream blocks over one joint sequence [text (condition images in their VLM
    slots), target image]; text and condition-image K/V are prefilled at step 0 and later steps run only the target
    tokens (``use_kv_cache=True``, the pipeline default). CFG as two calls in cache contexts "cond" / "uncond".
    Qwen3-VL text encoder behind a Qwen3VLProcessor (word-level tokenizer with Qwen's special tokens); the VAE is
    16x spatial and decodes RGBA (4 output channels)."""
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)

    z_dim = 8  # not 4: prepare_latents takes a 4-channel (RGBA) condition image for latents otherwise
    _seed(0)
    transformer = QwenImage21Transformer2DModel(
        patch_size=1, in_channels=z_dim, out_channels=z_dim, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=16, mlp_ratio=2, axes_dims_rope=(4, 6, 6),
    ).eval()
    _seed(0)
    vae = AutoencoderKLQwenImage21(
        base_dim=4, decoder_base_dim=4, z_dim=z_dim, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True, True], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    ).eval()
    text_encoder, processor = _qwen3_vl(layers=2)
    pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                               processor=processor, transformer=transformer)
    return _case(pipe, "separate", negative_prompt="blurry", true_cfg_scale=4.0, use_kv_cache=use_kv_cache)


def aura_flow() -> TinyCase:
    """AuraFlow: MMDiT joint blocks (return (encoder, hidden)) then single DiT blocks over one [text, image] tensor
    the model joins before them (8 learned register tokens lead the text stream); BCHW latents; CFG as one doubled
    batch, unconditional first. UMT5 text encoder."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    _seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=3,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64,
    ).eval()
    pipe = AuraFlowPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(d_model=32, umt5=True),
        vae=kl_vae(latent_channels=4, scaling_factor=0.13025),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _case(pipe, "batched", negative_prompt="blurry", guidance_scale=3.5, max_sequence_length=16)


def hidream_image() -> TinyCase:
    """HiDream-I1: dual-stream blocks then single-stream blocks (both lists hold ``HiDreamBlock`` wrappers), a MoE
    feed-forward, and a fresh Llama-3 hidden state per block appended to the text stream; CFG as one doubled batch,
    unconditional first. Two CLIPs (pooled), T5 and a Llama (``llama_layers`` picks one hidden state per block).
    The pipeline rescales height/width to the area of ``default_sample_size * vae_scale_factor`` squared (1024 px for
    the real model), so ``default_sample_size`` is set to 8 here (64 px)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed(0)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[32, 16], text_emb_dim=32, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1, 2, 3),
    ).eval()
    _seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        max_position_embeddings=256, attn_implementation="eager",  # the pipeline asks for output_attentions
    )).eval()
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=kl_vae(latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=clip_text_model(hidden_size=16, projection_dim=16, with_projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_model(hidden_size=16, projection_dim=16, with_projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(d_model=32),
        tokenizer_3=t5_tokenizer(),
        text_encoder_4=llama,
        tokenizer_4=make_tokenizer(model_max_length=256, add_bos=True, add_eos=False),
        transformer=transformer,
    )
    pipe.default_sample_size = 8  # the pipeline keeps the aspect ratio and rescales to this area (x8 VAE): 64x64
    return _case(pipe, "batched", negative_prompt="blurry", guidance_scale=5.0, max_sequence_length=16)


def bria_fibo() -> TinyCase:
    """Bria FIBO: FLUX.1-style dual-stream blocks (return (encoder, hidden)) then single-stream blocks over [text,
    image] that the model joins and splits around every single block; before each block the model overwrites the
    second half of the text stream's channels with a projection of one SmolLM3 hidden layer (one per block). Latents
    are unpatched tokens (B, H/16 * W/16, C) from a 16x Wan-2.2-style VAE (patch 2); CFG as one doubled batch,
    unconditional first. SmolLM3 keeps its default 128256-token vocabulary: the pipeline feeds the hard-coded id
    128000 for an empty prompt (the default negative prompt)."""
    from diffusers import AutoencoderKLWan, BriaFiboPipeline, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.transformer_bria_fibo import BriaFiboTransformer2DModel
    from transformers.models.smollm3.modeling_smollm3 import SmolLM3Config, SmolLM3ForCausalLM

    _seed(0)
    transformer = BriaFiboTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, text_encoder_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4],
    ).eval()
    _seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, in_channels=12,
        out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
        temperal_downsample=[False, True, True],
    ).eval()
    _seed(0)
    text_encoder = SmolLM3ForCausalLM(SmolLM3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
    )).eval()
    pipe = BriaFiboPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                            text_encoder=text_encoder, tokenizer=t5_tokenizer())
    return _case(pipe, "batched", negative_prompt="blurry", guidance_scale=5.0, max_sequence_length=16)


def longcat_image() -> TinyCase:
    """LongCat-Image: FLUX.1-style dual- then single-stream blocks (both return (encoder, hidden); the single ones
    join [text, image] inside), 2x2-packed latents of 16 channels (hard-coded), CFG as two calls in cache contexts
    followed by CFG renormalisation. The pipeline pads prompts to ``tokenizer_max_length`` (512; 16 here) and by
    default rewrites them by generating with its text encoder, which the call turns off."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel

    _seed(0)
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6],
    ).eval()
    pipe = LongCatImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=kl_vae(latent_channels=16, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                   use_post_quant_conv=False),
        text_encoder=qwen25_vl_encoder(),
        tokenizer=chat_tokenizer(),
        text_processor=None,  # only the prompt rewriter uses it
        transformer=transformer,
    )
    pipe.tokenizer_max_length = 16
    return _case(pipe, "separate", negative_prompt="blurry", guidance_scale=4.5, enable_prompt_rewrite=False)


def ovis_image() -> TinyCase:
    """Ovis-Image: FLUX.1-style dual- then single-stream blocks (the single ones join [text, image] inside),
    2x2-packed latents, CFG as two calls in cache contexts. Qwen3 text encoder behind a chat template whose first
    ``user_prompt_begin_id`` tokens the pipeline drops (set to what this tokenizer makes of the template)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel

    _seed(0)
    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    ).eval()
    tokenizer = chat_tokenizer()
    pipe = OvisImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=kl_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                   use_post_quant_conv=False),
        text_encoder=qwen3_text_model(2),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.user_prompt_begin_id = len(tokenizer(pipe.system_prompt, add_special_tokens=False).input_ids)
    return _case(pipe, "separate", negative_prompt="blurry", guidance_scale=5.0, max_sequence_length=16)


def hunyuandit() -> TinyCase:
    """Hunyuan-DiT: cross-attention blocks with U-Net-style long skips (block l > N/2 takes block N-1-l's output),
    BCHW latents, CFG as one doubled batch; learned sigma. BERT and T5 text encoders (padded to 77 and 256
    tokens by the pipeline, as the model's text_len / text_len_t5 expect). ``num_layers`` must be even."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    _seed(0)
    transformer = HunyuanDiT2DModel(
        sample_size=16, num_layers=6, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=16,
        activation_fn="gelu-approximate",
    ).eval()
    _seed(0)
    bert = BertModel(BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=PAD_ID,
    ), add_pooling_layer=False).eval()
    pipe = HunyuanDiTPipeline(
        vae=kl_vae(latent_channels=4, scaling_factor=0.13025),
        text_encoder=bert,
        tokenizer=make_tokenizer(model_max_length=77, add_bos=True, add_eos=True),
        transformer=transformer,
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.03,
                                prediction_type="v_prediction", steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=t5_encoder(d_model=32),
        tokenizer_2=t5_tokenizer(),
    )
    return _case(pipe, "batched", negative_prompt="blurry", guidance_scale=5.0, use_resolution_binning=False)


def wan() -> TinyCase:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    _seed(0)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    text_encoder = t5_encoder(d_model=32, umt5=True)
    _seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=3,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    return TinyCase(
        pipe=_finish(pipe),
        call_kwargs=dict(
            prompt="a red circle",
            negative_prompt="blurry",
            num_inference_steps=4,
            guidance_scale=5.0,
            height=32,
            width=32,
            num_frames=9,
            max_sequence_length=32,
            output_type="np",
        ),
        denoiser_attr="transformer",
        is_video=True,
        cfg_layout="separate",
    )


def wan_vace() -> TinyCase:
    """Wan VACE: Wan's blocks plus VACE blocks whose hints the model adds to the hidden stream between blocks;
    with no control video the pipeline conditions on an empty one."""
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    base = wan().pipe
    _seed(0)
    transformer = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=96,
    ).eval()
    with torch.no_grad():  # the VACE hint projections start at zero: make the hints non-zero
        for block in transformer.vace_blocks:
            block.proj_out.weight.normal_(std=0.05)
    pipe = WanVACEPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                           scheduler=base.scheduler, transformer=transformer)
    return _case(pipe, "separate", is_video=True, negative_prompt="blurry", guidance_scale=5.0, height=32, width=32,
                 num_frames=9, max_sequence_length=32)


def skyreels_v2() -> TinyCase:
    """SkyReels V2: Wan-style blocks (their own class), CFG as separate calls in cache contexts."""
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    base = wan().pipe
    _seed(0)
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    pipe = SkyReelsV2Pipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, transformer=transformer,
                              vae=base.vae, scheduler=UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True,
                                                                              prediction_type="flow_prediction"))
    return _case(pipe, "separate", is_video=True, negative_prompt="blurry", guidance_scale=5.0, height=32, width=32,
                 num_frames=9, max_sequence_length=32)


def wan22() -> TinyCase:
    """Wan 2.2's two experts: ``transformer`` runs the high-noise steps (t >= 850: the first two of four),
    ``transformer_2`` (other weights) the low-noise ones. Not in FAMILIES: its own tests (test_experts.py)."""
    case = wan()
    _seed(1)
    expert = type(case.pipe.transformer)(**case.pipe.transformer.config).eval()
    case.pipe.register_modules(transformer_2=expert)
    case.pipe.register_to_config(boundary_ratio=0.85)
    case.name = "wan22"
    return case


def cogvideox() -> TinyCase:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    _seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=4,
        text_embed_dim=32,
        num_layers=3,
        sample_width=4,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,  # must equal the pipeline's max_sequence_length (226 by default)
    ).eval()
    _seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    text_encoder = t5_encoder(d_model=32)
    pipe = CogVideoXPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )
    return TinyCase(
        pipe=_finish(pipe),
        call_kwargs=dict(
            prompt="a red circle",
            num_inference_steps=4,
            guidance_scale=6.0,
            height=32,
            width=32,
            num_frames=9,
            output_type="np",
        ),
        denoiser_attr="transformer",
        is_video=True,
        cfg_layout="batched",
    )


def hunyuan_video() -> TinyCase:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    _seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=2,
        num_single_layers=3,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    ).eval()
    _seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()
    _seed(0)
    text_encoder = LlamaModel(
        LlamaConfig(
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=3,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=1024,
            hidden_act="silu",
        )
    ).eval()
    text_encoder_2 = clip_text_model(hidden_size=8, projection_dim=8)
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(model_max_length=4096, add_bos=True, add_eos=False),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
    )
    return TinyCase(
        pipe=_finish(pipe),
        call_kwargs=dict(
            prompt="a red circle",
            negative_prompt="blurry",
            true_cfg_scale=2.0,
            guidance_scale=6.0,  # embedded guidance
            num_inference_steps=4,
            height=32,
            width=32,
            num_frames=9,
            max_sequence_length=32,
            output_type="np",
        ),
        denoiser_attr="transformer",
        is_video=True,
        cfg_layout="separate",
    )


def hunyuan_image() -> TinyCase:
    """HunyuanImage 2.1: dual- then single-stream blocks, CFG through a diffusers guider (adaptive projected
    guidance); Qwen2.5-VL and ByT5 text encoders."""
    from diffusers import (AdaptiveProjectedMixGuidance, AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler,
                           HunyuanImagePipeline, HunyuanImageTransformer2DModel)
    from transformers import ByT5Tokenizer

    _seed(0)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, text_embed_2_dim=32, rope_axes_dim=(4, 4),
    ).eval()
    _seed(0)
    vae = AutoencoderKLHunyuanImage(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        spatial_compression_ratio=2, sample_size=32, scaling_factor=0.75,
    ).eval()
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=qwen25_vl_encoder(),
        tokenizer=make_tokenizer(model_max_length=4096, add_bos=False, add_eos=False),
        text_encoder_2=t5_encoder(d_model=32),
        tokenizer_2=ByT5Tokenizer(),
        transformer=transformer,
        guider=AdaptiveProjectedMixGuidance(guidance_scale=4.0, adaptive_projected_guidance_start_step=1),
    )
    pipe.prompt_template_encode = "describe the image {}"  # 3 tokens, cropped off as the real 34-token prefix is
    pipe.prompt_template_encode_start_idx = 3
    pipe.tokenizer_max_length = 16
    pipe.tokenizer_2_max_length = 8
    return _case(pipe, "separate", negative_prompt="blurry", height=32, width=32, distilled_guidance_scale=None)


def hunyuan_video15() -> TinyCase:
    """HunyuanVideo 1.5: CFG through a diffusers guider, whose calls open the cache contexts
    "pred_cond" / "pred_uncond"; Qwen2.5-VL and ByT5 text encoders (ByT5's tokenizer needs no files)."""
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel)
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    _seed(0)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,  # 4 latent channels + 4 image-condition channels + 1 mask
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=3,
        num_refiner_layers=1,
        text_embed_dim=16,
        text_embed_2_dim=32,
        image_embed_dim=16,
        rope_axes_dim=(2, 2, 4),
        target_size=64,
        task_type="t2v",
    ).eval()
    _seed(0)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
    ).eval()
    _seed(0)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )).eval()
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=chat_tokenizer(separator=" "),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder_2=t5_encoder(d_model=32),
        tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=4.0),
    )
    pipe.system_message = "describe the video"  # 3 tokens, cropped off as the real 108-token prefix is
    pipe.prompt_template_encode_start_idx = 3
    pipe.tokenizer_max_length = 16
    pipe.tokenizer_2_max_length = 8
    return _case(pipe, "separate", is_video=True, negative_prompt="blurry", height=32, width=32, num_frames=5)


def ltx() -> TinyCase:
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    _seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=3,
        caption_channels=32,
    ).eval()
    _seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    text_encoder = t5_encoder(d_model=32)
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=t5_tokenizer(),
        transformer=transformer,
    )
    return TinyCase(
        pipe=_finish(pipe),
        call_kwargs=dict(
            prompt="a red circle",
            num_inference_steps=4,
            guidance_scale=3.0,
            height=32,
            width=32,
            num_frames=9,
            max_sequence_length=32,
            output_type="np",
        ),
        denoiser_attr="transformer",
        is_video=True,
        cfg_layout="batched",
    )


def ltx2() -> TinyCase:
    """LTX-2: one transformer for video and audio (its blocks carry both streams), CFG as a doubled batch;
    Gemma 3 text encoder, text connectors, a video and an audio VAE, a vocoder (sizes as diffusers' own tests)."""
    from diffusers import (AutoencoderKLLTX2Audio, FlowMatchEulerDiscreteScheduler, LTX2Pipeline,
                           LTX2VideoTransformer3DModel)
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    _seed(0)
    config = Gemma3Config(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=PAD_ID, sliding_window=32),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=VOCAB_SIZE - 3, eoi_token_index=VOCAB_SIZE - 2,
        image_token_index=VOCAB_SIZE - 1,
    )
    text_encoder = Gemma3ForConditionalGeneration(config).eval()
    width = config.text_config.hidden_size
    _seed(0)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=3, qk_norm="rms_norm_across_heads",
        caption_channels=width, rope_double_precision=False, rope_type="split",
    ).eval()
    _seed(0)
    connectors = LTX2TextConnectors(
        caption_channels=width, text_proj_in_factor=config.text_config.num_hidden_layers + 1,
        video_connector_num_attention_heads=2, video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1, audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32, rope_theta=10000.0, rope_double_precision=False,
        causal_temporal_positioning=False, rope_type="split",
    ).eval()
    vae = _tiny_ltx2_vae()
    _seed(0)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    ).eval()
    _seed(0)
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins, hidden_channels=32, out_channels=2,
        upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1, output_sampling_rate=16000,
    ).eval()
    pipe = LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=text_encoder,
        tokenizer=make_tokenizer(model_max_length=1024, add_bos=True, add_eos=False, padding_side="left"),
        connectors=connectors, transformer=transformer, vocoder=vocoder,
    )
    # CFG alone (no spatio-temporal or modality guidance, whose extra calls run in contexts of their own)
    return _case(pipe, "batched", is_video=True, negative_prompt="blurry", guidance_scale=4.0,
                 audio_guidance_scale=4.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0,
                 audio_modality_scale=1.0, guidance_rescale=0.0, audio_guidance_rescale=0.0,
                 spatio_temporal_guidance_blocks=None, use_cross_timestep=False, height=32, width=32, num_frames=5,
                 frame_rate=25.0, max_sequence_length=16)


def _wan_vae(z_dim: int = 16):
    """A tiny AutoencoderKLWan (8x spatial, 4x temporal), as diffusers' own fast tests build it."""
    from diffusers import AutoencoderKLWan

    _seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def _gemma2(hidden_size: int = 16):
    from transformers import Gemma2Config, Gemma2Model

    _seed(0)
    return Gemma2Model(Gemma2Config(
        head_dim=8, hidden_size=hidden_size, intermediate_size=32, max_position_embeddings=2048, num_attention_heads=2,
        num_hidden_layers=2, num_key_value_heads=1, vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, attn_implementation="eager",
    )).eval()


def sana_video() -> TinyCase:
    """Sana-Video: Wan-style (B, C, F, H, W) latents, one block list of linear-attention blocks with cross
    attention to Gemma-2 text; CFG as one doubled batch, unconditional first. Its frame count is ``frames``."""
    from diffusers import DPMSolverMultistepScheduler, SanaVideoPipeline, SanaVideoTransformer3DModel

    _seed(0)
    transformer = SanaVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=3,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
        mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    pipe = SanaVideoPipeline(
        tokenizer=make_tokenizer(model_max_length=4096, add_bos=True, add_eos=False),
        text_encoder=_gemma2(16),
        vae=_wan_vae(16),
        transformer=transformer,
        # a flow-matching DPM-Solver++ (Sana-Video is a flow model; the pipeline's type hint is DPMSolverMultistep)
        scheduler=DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0),
    )
    return _case(pipe, "batched", is_video=True, negative_prompt="blurry", guidance_scale=6.0, height=32, width=32,
                 frames=9, max_sequence_length=16, use_resolution_binning=False, complex_human_instruction=[])


def mochi() -> TinyCase:
    """Mochi 1: one list of dual-stream blocks (video and a narrower text stream, joint attention [video, valid
    text]; the last block is context_pre_only); CFG as one doubled batch, unconditional first, in
    ``cache_context("cond_uncond")``. The VAE is fixed at 12 latent channels, 8x spatial, 6x temporal, and its
    group norms take 32 groups, so its channels are 32."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    _seed(0)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3, pooled_projection_dim=16,
        in_channels=12, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4, activation_fn="swiglu",
        max_sequence_length=16,
    ).eval()
    with torch.no_grad():  # the learned RoPE frequencies start at zero: make the rotary embedding non-trivial
        transformer.pos_frequencies.normal_(std=0.5)
    _seed(0)
    vae = AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
    ).eval()
    pipe = MochiPipeline(
        # as genmo/mochi-1-preview's scheduler: the denoiser sees reversed timesteps (rising from ~0 to ~1000)
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=vae,
        text_encoder=t5_encoder(d_model=32),
        tokenizer=t5_tokenizer(),
        transformer=transformer,
    )
    return _case(pipe, "batched", is_video=True, negative_prompt="blurry", guidance_scale=4.5, height=32, width=32,
                 num_frames=7, max_sequence_length=16)


class DummyCosmosSafetyChecker(ModelMixin, ConfigMixin):
    """Stands in for NVIDIA's Cosmos Guardrail (the ``cosmos_guardrail`` package), as diffusers' own fast tests do:
    the Cosmos pipelines refuse to run with ``safety_checker=None``. Not an instance of the pipeline module's
    ``CosmosSafetyChecker``, so the pipelines skip their video check; pass it again to ``from_pretrained``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_device_tracker", torch.zeros(1), persistent=False)

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


def _content_chat_tokenizer():
    """The word-level tokenizer with a chat template for messages whose content is a string or a list of
    ``{"type": "text", "text": ...}`` parts (the Qwen2.5-VL message form)."""
    tokenizer = make_tokenizer(model_max_length=4096, add_bos=False, add_eos=False)
    tokenizer.chat_template = (
        "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}{{ part['text'] }} {% endfor %}{% endif %} {% endfor %}"
    )
    return tokenizer


def cosmos() -> TinyCase:
    """Cosmos Predict 2.5 (text2world: no image or video given): one list of cross-attention blocks over
    (B, C, F, H, W) latents plus a condition-mask channel; Qwen2.5-VL text features of every layer, normalised and
    concatenated, projected by ``crossattn_proj``; CFG as two calls, conditional FIRST, no cache context.
    ``concat_padding_mask=False``: with it on the model resizes the padding mask with torchvision, not installed here."""
    from diffusers import Cosmos2_5_PredictBasePipeline, CosmosTransformer3DModel, UniPCMultistepScheduler

    text_encoder = qwen25_vl_encoder()  # 16 wide, 2 layers: prompt features 2 x 16 = 32 wide
    _seed(0)
    transformer = CosmosTransformer3DModel(
        in_channels=16 + 1, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=3, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable", use_crossattn_projection=True,
        crossattn_proj_in_channels=32, encoder_hidden_states_channels=16,
    ).eval()
    pipe = Cosmos2_5_PredictBasePipeline(
        text_encoder=text_encoder,
        tokenizer=_content_chat_tokenizer(),
        transformer=transformer,
        vae=_wan_vae(16),
        scheduler=UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0),
        safety_checker=DummyCosmosSafetyChecker(),
    )
    return _case(pipe, "separate", is_video=True, negative_prompt="blurry", guidance_scale=3.0, height=32, width=32,
                 num_frames=9, max_sequence_length=16)


def allegro() -> TinyCase:
    """Allegro: PixArt-style cross-attention blocks over (B, C, F, H, W) latents, 3D RoPE built by the pipeline
    and passed as ``image_rotary_emb``; CFG as one doubled batch, unconditional first, no cache context. Its VAE
    decodes only with tiling on (as in diffusers' own tests); 8 frames -> 2 latent frames."""
    from diffusers import AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro, DDIMScheduler

    _seed(0)
    transformer = AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=3,
        cross_attention_dim=24, sample_width=8, sample_height=8, sample_frames=8, caption_channels=32,
    ).eval()
    _seed(0)
    vae = AutoencoderKLAllegro(
        in_channels=3, out_channels=3, down_block_types=("AllegroDownBlock3D",) * 4,
        up_block_types=("AllegroUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    vae.enable_tiling()  # AutoencoderKLAllegro.decode without tiling is not implemented
    # its tiles are 24 frames x sample_size px with fixed overlaps (8, 120, 80): make one tile cover the tiny video
    vae.kernel, vae.stride = (8, 32, 32), (4, 16, 16)
    pipe = AllegroPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(d_model=32),
        vae=vae,
        transformer=transformer,
        # the real checkpoint ships EulerAncestralDiscreteScheduler; DDIM (clip_sample) keeps a random model's
        # epsilon predictions from blowing the latents up to the init noise sigma (~150) and saturating the frames
        scheduler=DDIMScheduler(),
    )
    return _case(pipe, "batched", is_video=True, negative_prompt="blurry", guidance_scale=7.5, height=32, width=32,
                 num_frames=8, max_sequence_length=16, clean_caption=False)


def _qwen2_vl_encoder():
    """A 16-wide Qwen2-VL (EasyAnimate V5.1's text encoder), vision tower included."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    _seed(0)
    config = Qwen2VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0, "vocab_size": VOCAB_SIZE, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
        },
        vision_config={"depth": 2, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 1},
        vocab_size=VOCAB_SIZE, vision_end_token_id=VOCAB_SIZE - 4, vision_start_token_id=VOCAB_SIZE - 3,
        vision_token_id=VOCAB_SIZE - 2, image_token_id=VOCAB_SIZE - 1, video_token_id=VOCAB_SIZE - 2,
    )
    return Qwen2VLForConditionalGeneration(config).eval()


def easyanimate() -> TinyCase:
    """EasyAnimate V5.1: one list of MMDiT blocks whose joint attention runs over [text, video] (text FIRST) with
    no padding mask; CFG as one doubled batch, unconditional first, no cache context. Qwen2-VL text encoder
    (second-to-last hidden state, prompts padded to a fixed 256 tokens: ``max_sequence_length`` is not a call
    argument), Magvit VAE."""
    from diffusers import (AutoencoderKLMagvit, EasyAnimatePipeline, EasyAnimateTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler)

    _seed(0)
    transformer = EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=3, mmdit_layers=3, sample_width=16, sample_height=16, patch_size=2,
    ).eval()
    _seed(0)
    vae = AutoencoderKLMagvit(
        in_channels=3, out_channels=3,
        down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
        up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        spatial_group_norm=False,
    ).eval()
    pipe = EasyAnimatePipeline(
        vae=vae,
        text_encoder=_qwen2_vl_encoder(),
        tokenizer=_content_chat_tokenizer(),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _case(pipe, "batched", is_video=True, negative_prompt="blurry", guidance_scale=6.0, height=32, width=32,
                 num_frames=5)


def _kandinsky_text_encoders() -> dict:
    """Kandinsky 5's and 6's two text encoders: Qwen2.5-VL (last hidden state) and CLIP (pooled)."""
    return dict(text_encoder=qwen25_vl_encoder(),
                tokenizer=make_tokenizer(model_max_length=4096, add_bos=False, add_eos=False),
                text_encoder_2=clip_text_model(hidden_size=32, projection_dim=32), tokenizer_2=clip_tokenizer())


def kandinsky5() -> TinyCase:
    """Kandinsky 5.0 text-to-video: latents channels-last (B, F, H, W, C) — with ``visual_cond`` the pipeline
    appends C zero condition channels and a mask channel and steps only the first C; text-only encoder blocks
    (``text_transformer_blocks``) then visual decoder blocks with cross attention (``visual_transformer_blocks``);
    CFG as two calls, conditional FIRST, no cache context. Qwen2.5-VL (last hidden state, prompt template cropped)
    and CLIP (pooled) text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline, Kandinsky5Transformer3DModel

    _seed(0)
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=32, time_dim=32, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=48, ff_dim=64, num_text_blocks=2, num_visual_blocks=3, axes_dims=(8, 8, 8), visual_cond=True,
    ).eval()
    with torch.no_grad():  # the modulations (block gates included) start at zero, making every block an identity
        for name, module in transformer.named_modules():
            if type(module).__name__ == "Kandinsky5Modulation":
                module.out_layer.weight.normal_(std=0.2)
                module.out_layer.bias.normal_(std=0.2)
    pipe = Kandinsky5T2VPipeline(
        transformer=transformer,
        vae=_hunyuan_video_vae(4),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        **_kandinsky_text_encoders(),
    )
    pipe.prompt_template = "describe the video {} ."  # 3 tokens cropped off as the real 128-token system prefix is
    pipe.prompt_template_encode_start_idx = 3
    return _case(pipe, "separate", is_video=True, negative_prompt="blurry", guidance_scale=5.0, height=32, width=32,
                 num_frames=5, max_sequence_length=16)


def _t5gemma2_encoder(hidden_size: int = 32):
    from transformers import T5Gemma2Encoder, T5Gemma2EncoderConfig, T5Gemma2TextConfig

    text_config = T5Gemma2TextConfig(
        hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden_size,
        vocab_size=VOCAB_SIZE, max_position_embeddings=128, head_dim=16, num_key_value_heads=2,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    text_config.dropout_rate = 0.0
    _seed(0)
    return T5Gemma2Encoder(T5Gemma2EncoderConfig(text_config=text_config)).eval()


def motif_video() -> TinyCase:
    """Motif-Video: dual-stream blocks, then single-stream blocks that join [video, text] inside each block and
    split it again, then DDT decoder blocks (the last ``num_decoder_layers`` single blocks) that run on a copy of
    the patch-embedded input with the encoder blocks' video tokens as their second stream; shared text cross
    attention; CFG through a diffusers guider (``ClassifierFreeGuidance``: cache contexts pred_cond, pred_uncond).
    The model input is [latents, zero condition latents, zero mask] (2C + 1 channels)."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, MotifVideoPipeline
    from diffusers.models.transformers.transformer_motif_video import MotifVideoTransformer3DModel

    _seed(0)
    transformer = MotifVideoTransformer3DModel(
        in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        num_single_layers=3, num_decoder_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
        text_embed_dim=32, rope_axes_dim=(4, 4, 4), enable_text_cross_attention_dual=True,
        enable_text_cross_attention_single=True,
    ).eval()
    pipe = MotifVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        vae=_wan_vae(16),
        text_encoder=_t5gemma2_encoder(32),
        tokenizer=t5_tokenizer(),
        transformer=transformer,
        guider=ClassifierFreeGuidance(guidance_scale=5.0),
    )
    return _case(pipe, "separate", is_video=True, negative_prompt="blurry", height=32, width=32, num_frames=9,
                 max_sequence_length=16)


def cosmos2_t2i() -> TinyCase:
    """Cosmos Predict 2 text-to-image (an image case of the same ``CosmosTransformer3DModel``, one latent frame):
    T5 text features, EDM-style preconditioning around the transformer inside the pipeline, CFG as two calls,
    conditional FIRST, no cache context."""
    from diffusers import Cosmos2TextToImagePipeline, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler

    _seed(0)
    transformer = CosmosTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=3, mlp_ratio=2,
        text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=False, extra_pos_embed_type=None,
    ).eval()
    pipe = Cosmos2TextToImagePipeline(
        text_encoder=t5_encoder(d_model=32),
        tokenizer=t5_tokenizer(),
        transformer=transformer,
        vae=_wan_vae(16),
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
        safety_checker=DummyCosmosSafetyChecker(),
    )
    return _case(pipe, "separate", negative_prompt="blurry", guidance_scale=4.0, height=32, width=32,
                 max_sequence_length=16)


def latte() -> TinyCase:
    """Latte: spatial ``transformer_blocks`` (over each frame's patches, batch B*F, with text cross attention) and
    temporal ``temporal_transformer_blocks`` (over each patch's frames, batch B*N) run INTERLEAVED, spatial i then
    temporal i, the model re-laying the tokens between them (and adding its temporal position embedding before
    temporal block 0); both lists are ``BasicTransformerBlock``. Learned sigma (8 output channels for 4 latent
    ones). CFG as one doubled batch, unconditional first, no cache context. Image VAE, decoded frame by frame."""
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    _seed(0)
    transformer = LatteTransformer3DModel(
        sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=4,  # the temporal position embedding has exactly this many frames: the call must match it
    ).eval()
    pipe = LattePipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(d_model=32),
        vae=kl_vae(latent_channels=4),
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )
    return _case(pipe, "batched", is_video=True, negative_prompt="blurry", guidance_scale=7.5, height=64, width=64,
                 video_length=4, clean_caption=False)


# 2026 families: FLUX.3, Krea 2, ERNIE-Image, Bria FIBO 2; Kandinsky 6, Helios, AnyFlow, ChronoEdit


@dataclass
class ImagesOutput:
    images: Any


def _flux3_pipeline_class():
    """``Flux3ModularPipeline`` with a classic ``__call__`` (what ``tiny_pipelines.run`` calls): keyword arguments go
    into the modular state, and it returns ``.images``. It takes no ``latents=``, as the modular call does not, so
    the bottleneck refuses it as it refuses the modular pipeline (tests/test_modular.py)."""
    from diffusers.modular_pipelines.flux3.modular_pipeline import Flux3ModularPipeline

    class Flux3TinyPipeline(Flux3ModularPipeline):
        def __call__(self, prompt: str | None = None, negative_prompt: str | None = None, height: int | None = None,
                     width: int | None = None, num_inference_steps: int = 50, generator: torch.Generator | None = None,
                     output_type: str = "pil", return_dict: bool = True, **kwargs):
            inputs = dict(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                          num_inference_steps=num_inference_steps, generator=generator, **kwargs)
            inputs = {k: v for k, v in inputs.items() if v is not None}
            out = super().__call__(**inputs, output="images", output_type=output_type)
            return ImagesOutput(images=out) if return_dict else (out,)

    return Flux3TinyPipeline


def flux3() -> TinyCase:
    """FLUX.3 (modular pipeline only, ``Flux3AutoBlocks`` without its prompt upsampler): per-mode blocks first
    (``txt_mode_blocks`` over the text, ``mode_blocks["image"]`` over the image tokens, in a ModuleDict: they
    always run), then joint single blocks over [text, image (, reference image)] that return (encoder, hidden);
    BSC latent tokens (B, h·w, 4C), 2x2-patchified by the VAE step, timestep in [0, 1]. CFG through the modular
    ``ClassifierFreeGuidance`` guider: cond then uncond calls without a cache context (branches by call order).
    Qwen3-VL text encoder behind a Qwen3VLProcessor; its text window is right-padded to 80 tokens. The call
    goes through ``Flux3TinyPipeline``, a classic ``__call__`` over the modular one."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
    from diffusers.modular_pipelines.flux3.image_processor import Flux3ImageProcessor
    from diffusers.modular_pipelines.flux3.modular_blocks_flux3 import Flux3AutoBlocks

    _seed(0)
    transformer = Flux3Transformer2DModel(
        in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_channels=32, axes_dims_rope=(4, 4, 4, 4),
    ).eval()
    text_encoder, processor = _qwen3_vl(layers=2)
    blocks = Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    pipe = _flux3_pipeline_class()(blocks=blocks)
    pipe.update_components(transformer=transformer, vae=_flux2_vae(4), text_encoder=text_encoder, tokenizer=processor,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=6.93),
                           image_processor=Flux3ImageProcessor(vae_scale_factor=16, vae_latent_channels=4),
                           guider=ClassifierFreeGuidance(guidance_scale=4.0))
    pipe.set_progress_bar_config(disable=True)
    return TinyCase(pipe=pipe, call_kwargs=dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=4,
                                                height=64, width=64, output_type="np",
                                                text_encoder_out_layers=(0, 1, 2)),
                    denoiser_attr="transformer", is_video=False, cfg_layout="separate")


def krea2() -> TinyCase:
    """Krea 2: one list of single-stream blocks over [text, image] joined by the model (a text-fusion stage first
    collapses a stack of tapped Qwen3-VL hidden states, (B, L, layers, D)); 2x2-packed latent tokens from a Qwen-Image
    VAE. CFG as two calls, cond then uncond, without a cache context, guiding as ``cond + s·(cond − uncond)``: CFG
    is on for ``guidance_scale > 0`` and 0 is the unguided run (not 1). The prompt template's system prefix is
    cropped by a token count, set here to this tokenizer's count."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel

    _seed(0)
    transformer = Krea2Transformer2DModel(
        in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=16, num_text_layers=2,
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    ).eval()
    z_dim = 4
    _seed(0)
    vae = AutoencoderKLQwenImage(base_dim=z_dim * 2, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                                 latents_std=[1.0] * z_dim).eval()
    text_encoder, processor = _qwen3_vl(layers=2, bare=True)
    tokenizer = processor.tokenizer
    pipe = Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                         text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                         text_encoder_select_layers=(1, 2))
    pipe.prompt_template_encode_start_idx = len(tokenizer(pipe.prompt_template_encode_prefix).input_ids)
    pipe.prompt_template_encode_num_suffix_tokens = len(tokenizer(pipe.prompt_template_encode_suffix).input_ids)
    return _case(pipe, "separate", negative_prompt="blurry", guidance_scale=3.5, max_sequence_length=16)


def ideogram4() -> TinyCase:
    """Ideogram 4: asymmetric CFG with TWO transformers (the second one an expert of the runtime's, which
    computes the unconditional branch). ``transformer`` (conditional) runs one packed sequence
    [left-padded text (max_sequence_length), image tokens] whose hidden stream holds zeros at the text positions and
    the text features ride in ``encoder_hidden_states``; ``unconditional_transformer`` (other weights) runs the image
    tokens alone. One call of each per step, no cache context; v = g·cond + (1 − g)·uncond, and the scheduler steps
    on −v (model time 0 = noise, 1 = clean: the denoiser's timestep rises). Latent tokens are 2x2 patches with the
    channels LAST within a patch ((ph, pw, c), unlike Flux's (c, ph, pw)), normalised by the FLUX.2 VAE's batch
    norm. The text encoder taps 13 fixed decoder layers up to layer 35, so the tiny Qwen3-VL has 36 layers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline, Ideogram4Transformer2DModel

    def transformer():
        return Ideogram4Transformer2DModel(
            in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2, intermediate_size=64,
            adaln_dim=32, llm_features_dim=13 * 16, mrope_section=(4, 2, 2),
        ).eval()

    _seed(0)
    conditional = transformer()
    _seed(1)
    unconditional = transformer()
    text_encoder, processor = _qwen3_vl(layers=36, bare=True)
    pipe = Ideogram4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux2_vae(4), text_encoder=text_encoder,
                             tokenizer=processor.tokenizer, transformer=conditional,
                             unconditional_transformer=unconditional)
    return _case(pipe, "separate", guidance_scale=4.0, guidance_schedule=None, max_sequence_length=16)


def ernie_image() -> TinyCase:
    """ERNIE-Image: one list of shared-AdaLN single-stream blocks over [image, text] joined by the model, laid out
    SEQUENCE-FIRST (S, B, H), the block's stream argument named ``x``; BCHW latents, 2x2-patchified (4C channels)
    and normalised by the FLUX.2 VAE's batch norm (``vae_scale_factor`` 16 covers the patchify). CFG as one doubled
    batch, unconditional first; the text of both halves is padded to one length (``text_lens`` masks it).
    Mistral-3 text encoder (second-to-last hidden state). The model zero-initialises its AdaLN modulation and its
    output layer (every block an identity, a zero prediction): made random here."""
    from diffusers import ErnieImagePipeline, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import Mistral3Config, Mistral3Model

    _seed(0)
    transformer = ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=3, ffn_hidden_size=64, in_channels=16, out_channels=16,
        patch_size=1, text_in_dim=16, rope_axes_dim=(4, 6, 6),
    ).eval()
    with torch.no_grad():
        for layer in (transformer.adaLN_modulation[-1], transformer.final_linear):
            layer.weight.normal_(std=0.2)
            layer.bias.normal_(std=0.2)
    _seed(0)
    text_encoder = Mistral3Model(Mistral3Config(
        text_config=dict(model_type="ministral3", vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                         pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           head_dim=8, image_size=28, patch_size=14),
    )).eval()
    pipe = ErnieImagePipeline(transformer=transformer, vae=_flux2_vae(4), text_encoder=text_encoder,
                              tokenizer=make_tokenizer(model_max_length=512, add_bos=True, add_eos=False),
                              scheduler=FlowMatchEulerDiscreteScheduler())
    return _case(pipe, "batched", negative_prompt="blurry", guidance_scale=4.0)


def bria_fibo2() -> TinyCase:
    """Bria FIBO 2 (nothing like FIBO's architecture: Z-Image-style blocks): noise-refiner blocks over the image
    tokens (always run), then ``layers`` over one sequence [gist tokens, image, context images], the gist being a
    Perceiver's resampling of the text (it goes LAST when a batch pads its gist counts); some layers
    (``injection_layer_ids``) also cross-attend to their own Qwen3-VL layer bundle. Blocks take ``x`` and return one
    tensor; the main layers modulate per token from ``adaln_noisy`` / ``adaln_clean`` (``adaln_input`` is None).
    BCHW latents (unpatched, normalised; the model patchifies 2x2). CFG as two calls, cond then uncond, without a
    cache context. The text bundles (three Qwen3-VL layers each, one for the Perceiver and one per injection layer)
    and the gist counts are set for a 2-layer encoder; the injection blocks' cross-attention gate starts at zero
    (made non-zero here)."""
    from diffusers import BriaFibo2Pipeline, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.transformer_bria_fibo2 import BriaFibo2Transformer2DModel

    _seed(0)
    transformer = BriaFibo2Transformer2DModel(
        in_channels=4, patch_size=2, dim=32, n_layers=3, n_refiner_layers=1, n_heads=2, cap_feat_dim=48,
        injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
        gist_min_text_len=4, gist_max_text_len=32, axes_dims=(4, 6, 6), axes_lens=(64, 32, 32),
    ).eval()
    with torch.no_grad():
        for block in transformer.layers:
            if block.cross_attention is not None:
                block.cross_attn_gate.fill_(0.5)
    text_encoder, processor = _qwen3_vl(layers=2)
    pipe = BriaFibo2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                             vae=_flux2_vae(4), text_encoder=text_encoder, processor=processor)
    pipe.text_encoder_out_layers = ((0, 1, 2), (2, 1, 0))
    pipe.tokenizer_max_length = 64
    return _case(pipe, "separate", negative_prompt="blurry", guidance_scale=5.0)


def kandinsky6() -> TinyCase:
    """Kandinsky 6 text-to-video+audio: ONE transformer denoises video (channels-last (B, F, H, W, C) latents, plus
    C zero condition channels and a mask channel with ``visual_cond``) and audio ((B, L, C_audio) tokens) together.
    Per-modality text-encoder blocks (``video_/audio_text_transformer_blocks``, always run) then fused blocks
    (``visual_transformer_blocks``) that take ``(vis, aud, ...)`` positionally and return ``(vis, aud)``: the audio
    stream rides where other blocks carry text (as LTX-2's), and is None when ``sample_audio=False``. CFG as two
    calls, conditional FIRST, in ``cache_context("cond"/"uncond")``; the output is a (video, audio) tuple and the
    audio latents step on a deep copy of the scheduler (as LTX-2's). Qwen2.5-VL (last hidden state, the chat template
    cropped at a fixed 129 tokens) and CLIP (pooled) text encoders; audio through a tiny MMAudio VAE + vocoder."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, Kandinsky6TI2VAPipeline, Kandinsky6Transformer3DModel,
                           MMAudioVAE, MMAudioVocoder)

    _seed(0)
    transformer = Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=32, time_dim=32, patch_size=(1, 2, 2),
        model_dim=48, ff_dim=64, num_text_blocks=1, num_visual_blocks=3, axes_dims=(8, 8, 8), visual_cond=True,
        in_audio_dim=8, out_audio_dim=8, model_dim_a=24, time_dim_a=32, ff_dim_a=32,  # ca_rope: head dims must match
        # the released checkpoints' flags
        text_token_padding=True, ca_rope=True, cross_gates=True, fix_modulation=True, visual_token_type_num_embeddings=2,
    ).eval()
    _seed(0)
    audio_vae = MMAudioVAE(mel_bins=16, latent_channels=8, hidden_channels=8, channel_multipliers=(1, 2),
                           layers_per_block=1, sample_rate=4096, n_fft=64, hop_length=16).eval()
    _seed(0)
    vocoder = MMAudioVocoder(num_mels=16, upsample_initial_channel=16, upsample_rates=(4, 4),
                             upsample_kernel_sizes=(8, 8), resblock_kernel_sizes=(3,),
                             resblock_dilation_sizes=((1, 3),)).eval()
    pipe = Kandinsky6TI2VAPipeline(
        transformer=transformer,
        vae=_hunyuan_video_vae(4),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        **_kandinsky_text_encoders(),
        audio_vae=audio_vae,
        vocoder=vocoder,
    )
    return _case(pipe, "separate", is_video=True, negative_prompt="blurry", guidance_scale=5.0, height=32, width=32,
                 num_frames=5, max_sequence_length=16)


def _helios_transformer():
    from diffusers import HeliosTransformer3DModel

    _seed(0)
    return HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32,
        freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_dim=(4, 4, 4),
    ).eval()


HELIOS_CALL = dict(negative_prompt="blurry", guidance_scale=5.0, height=32, width=32, num_frames=5,
                   max_sequence_length=32, history_sizes=[4, 2, 1], num_latent_frames_per_chunk=2)


def helios() -> TinyCase:
    """Helios: autoregressive video in chunks of ``num_latent_frames_per_chunk`` latent frames; each chunk is one
    scheduler schedule (``set_timesteps`` per chunk: a new call to the step clock) denoised with Wan-style blocks over
    ONE sequence [long, mid, short history tokens (patchified at 4x, 2x, 1x), current chunk tokens]; the history
    part is fixed within a chunk (timestep 0 modulation) and the blocks cross-attend to the text for the current
    tokens only. CFG as two calls in ``cache_context("cond"/"uncond")``, cond first. ``HeliosScheduler`` (UniPC on
    flow sigmas, one stage, dynamic shift). The pipeline ignores its ``latents=`` argument. At 5 frames with chunks
    of 2 latent frames (5 frames) one chunk runs; the resized test call (9 frames) runs two."""
    from diffusers import HeliosPipeline, HeliosScheduler

    base_vae = _wan_vae(16)
    pipe = HeliosPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(d_model=32, umt5=True),
        vae=base_vae,
        scheduler=HeliosScheduler(stages=1, shift=1.0, use_dynamic_shifting=True, scheduler_type="unipc"),
        transformer=_helios_transformer(),
    )
    return _case(pipe, "separate", is_video=True, **HELIOS_CALL)


def helios_pyramid() -> TinyCase:
    """Helios' pyramid pipeline (Helios-Mid / -Distilled): per chunk, ``len(pyramid_num_inference_steps_list)``
    resolution stages (latents downsampled 2x per stage, then upsampled and re-noised between stages), each with its
    own ``set_timesteps(n, stage_index)``. Its call has no ``num_inference_steps`` (the family tests pass one), so it
    is not in BUILDERS: work.fam_video_probe runs it (``EXTRA``). 3 stages of 2 steps at 64 px: 2x2, 4x4, 8x8
    latents."""
    from diffusers import HeliosPyramidPipeline, HeliosScheduler

    pipe = HeliosPyramidPipeline(
        tokenizer=t5_tokenizer(), text_encoder=t5_encoder(d_model=32, umt5=True), vae=_wan_vae(16),
        scheduler=HeliosScheduler(stages=3, shift=1.0, use_dynamic_shifting=True, scheduler_type="unipc"),
        transformer=_helios_transformer(),
    )
    call = dict(HELIOS_CALL, height=64, width=64, pyramid_num_inference_steps_list=[2, 2, 2])
    case = _case(pipe, "separate", is_video=True, **call)
    case.call_kwargs.pop("num_inference_steps")
    return case


def _anyflow_case(pipeline_cls, transformer) -> TinyCase:
    """An AnyFlow pipeline (plain or FAR) around ``transformer``: UMT5 text, Wan VAE, flow-map scheduler, CFG on."""
    from diffusers import FlowMapEulerDiscreteScheduler

    pipe = pipeline_cls(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(d_model=32, umt5=True),
                        transformer=transformer, vae=_wan_vae(16), scheduler=FlowMapEulerDiscreteScheduler(shift=5.0))
    return _case(pipe, "batched", is_video=True, negative_prompt="blurry", guidance_scale=5.0, height=32, width=32,
                 num_frames=5, max_sequence_length=32)


def anyflow() -> TinyCase:
    """AnyFlow (flow-map distilled Wan 2.1): Wan-style blocks over (B, F, C, H, W) latents (frames before channels;
    its ``latents=`` and latent output are (B, C, F, H, W)); every forward conditions on the source timestep ``t`` and
    the target ``r`` (both per frame, (B, F)), the scheduler a ``FlowMapEulerDiscreteScheduler``. The released
    checkpoints fold CFG into the weights (default ``guidance_scale=1``); with a scale > 1 the pipeline runs one
    doubled batch, unconditional first, no cache context. The tiny case turns CFG on (scale 5)."""
    from diffusers import AnyFlowPipeline, AnyFlowTransformer3DModel

    _seed(0)
    transformer = AnyFlowTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()
    return _anyflow_case(AnyFlowPipeline, transformer)


def anyflow_far() -> TinyCase:
    """AnyFlow FAR: chunk-wise causal generation (``chunk_partition`` latent frames per chunk, here (1, 1)); each
    chunk is one ``set_timesteps`` (a new call to the step clock), its forwards read a per-layer KV cache of the
    earlier chunks, and after a chunk's last step the pipeline makes one more forward at timestep 0 (the "cache
    step", ``is_cache_step``) that WRITES the chunk's keys/values into that cache and returns no prediction
    (``sample=None``). Doubled-batch CFG when the scale is > 1 (the tiny case: 5)."""
    from diffusers import AnyFlowFARPipeline, AnyFlowFARTransformer3DModel

    _seed(0)
    transformer = AnyFlowFARTransformer3DModel(
        patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3, num_attention_heads=2,
        attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3,
        cross_attn_norm=True, rope_max_seq_len=32, chunk_partition=(1, 1),
    ).eval()
    return _anyflow_case(AnyFlowFARPipeline, transformer)


def chronoedit() -> TinyCase:
    """ChronoEdit: image editing as a short video (Wan 2.1 I2V backbone, its own ``ChronoEditTransformer3DModel``
    with Wan-style blocks): the input image is frame 0 of a (B, 16 + 4 mask + 16 condition, F, H, W) latent, CLIP
    vision tokens join the text in cross attention, and the edit is the last frame. Without temporal reasoning the
    pipeline forces ``num_frames=5`` (2 latent frames); with ``enable_temporal_reasoning`` it drops the middle
    frames after ``num_temporal_reasoning_steps`` steps (a grid change inside one call). CFG as two calls, cond then
    uncond, WITHOUT a cache context (branches by call order)."""
    from diffusers import ChronoEditPipeline, ChronoEditTransformer3DModel, FlowMatchEulerDiscreteScheduler

    image_encoder, image_processor = _clip_vision(16)
    _seed(0)
    transformer = ChronoEditTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        image_dim=16, added_kv_proj_dim=24, rope_max_seq_len=32,
    ).eval()
    pipe = ChronoEditPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(d_model=32, umt5=True),
                              image_encoder=image_encoder, image_processor=image_processor, transformer=transformer,
                              vae=_wan_vae(16), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    return _case(pipe, "separate", is_video=True, image=_test_image(32), negative_prompt="blurry", guidance_scale=5.0,
                 height=32, width=32, num_frames=5, max_sequence_length=32)


# More 2025-26 families: Cosmos 3 Omni, GLM-Image, NucleusMoE-Image, PRX, CogView3-Plus


def _cosmos3_transformer():
    from diffusers import Cosmos3OmniTransformer

    _seed(0)
    return Cosmos3OmniTransformer(
        head_dim=8, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3, latent_channel=16, latent_patch_size=2, patch_latent_dim=16 * 2 * 2,
        rope_axes_dim=(2, 1, 1), rope_theta=10000.0, vocab_size=VOCAB_SIZE, dtype="float32",
    ).eval()


def cosmos3_omni(num_frames: int = 5) -> TinyCase:
    """Cosmos 3 Omni (``Cosmos3OmniPipeline``): one LLM-style (Qwen3 MoT) decoder over ONE joint sequence, no batch
    axis: [text tokens (causal "understanding" pathway), vision patch tokens (the "generation" pathway)]. The model
    embeds the prompt's token ids itself (no text encoder: the pipeline only tokenises, with a chat template and the
    ``<|vision_start|>`` token); every decoder layer takes (und_seq, gen_seq, rotary_emb) as (tokens, D) tensors and
    returns both, the text pathway never seeing the vision tokens. The latents reach the model as a list of one
    (1, C, T, H, W) tensor (``vision_tokens``), the timestep as one value per noisy token (``vision_timesteps``),
    added to the tokens before the layers (no timestep embedding reaches a layer). Text-to-image when
    ``num_frames == 1``, text-to-video otherwise (templates differ, the model is the same). CFG as two calls in
    cache contexts "cond" / "uncond" (conditional first; cond and uncond have different text lengths). The VAE is a
    Wan VAE (8x here; Wan 2.2's 16x in the real model). Its output holds one ``video`` (no batch axis)
    where other pipelines hold ``frames``."""
    from diffusers import Cosmos3OmniPipeline, UniPCMultistepScheduler


    pipe = Cosmos3OmniPipeline(
        transformer=_cosmos3_transformer(),
        text_tokenizer=qwen_chat_tokenizer(),
        vae=_wan_vae(16),
        scheduler=UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0),
        enable_safety_checker=False,
    )
    return _case(pipe, "separate", is_video=True, negative_prompt="blurry", guidance_scale=3.0, height=32, width=32,
                 num_frames=num_frames, fps=24.0)


GLM_SPECIALS = {"image_token": "<|image|>", "grid_bos_token": "<|grid_bos|>", "grid_eos_token": "<|grid_eos|>"}


def _glm_image_processor():
    """A real ``GlmImageProcessor`` (PIL image processor) over the word-level tokenizer with GLM-Image's named special
    tokens (``image_token``, ``grid_bos_token``, ``grid_eos_token``: ids 172-174) and a chat template that keeps the
    text parts. The processor appends the target grids ("<|grid_bos|>h w<|grid_eos|>" twice) and the BOS token."""
    from transformers import GlmImageImageProcessorPil, GlmImageProcessor

    tokenizer = make_tokenizer(model_max_length=4096, add_bos=False, add_eos=False, padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": list(GLM_SPECIALS.values())})
    tokenizer._set_model_specific_special_tokens(GLM_SPECIALS)  # what a saved tokenizer_config's dict would set
    tokenizer.chat_template = (
        "{% for message in messages %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
        "{{ part['text'] }}{% endif %}{% endfor %}{% endfor %}"
    )
    return GlmImageProcessor(image_processor=GlmImageImageProcessorPil(), tokenizer=tokenizer,
                             chat_template=tokenizer.chat_template)


def _glm_image_ar_model():
    """A 32-wide ``GlmImageForConditionalGeneration`` (the AR model that samples the prior image tokens): its head
    predicts the 128 vision-vocabulary ids, which the text embedding (256 ids) reads back while decoding."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    config = GlmImageConfig(
        text_config={"vocab_size": VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                     "vision_vocab_size": 128, "rope_parameters": {"mrope_section": (4, 2, 2)},
                     "pad_token_id": PAD_ID, "eos_token_id": VOCAB_SIZE - 1},
        vision_config={"depth": 2, "hidden_size": 32, "num_heads": 2, "image_size": 32, "patch_size": 8,
                       "intermediate_size": 32},
        vq_config={"embed_dim": 32, "num_embeddings": 128, "latent_channels": 32},
        image_token_id=172, image_start_token_id=VOCAB_SIZE - 3, image_end_token_id=VOCAB_SIZE - 2,
    )
    _seed(0)
    return GlmImageForConditionalGeneration(config).eval()


def glm_image() -> TinyCase:
    """GLM-Image (``GlmImagePipeline``): an AR model (``GlmImageForConditionalGeneration``) first samples prior image
    tokens (the target grid at 1/32 and a fixed 16x16 preview grid, ~260 tokens), upsampled 2x to the DiT's patch
    grid; the DiT (CogView4-style blocks returning (hidden, encoder), joint attention over [glyph text, image]) adds
    their embedding to the image tokens. Text conditioning is ByT5 "glyph" embeddings of the prompt's QUOTED text
    only. CFG as two calls, conditional first, without a cache context: the unconditional one drops the prior tokens
    and takes the empty prompt's glyphs. The VAE latents are normalised by ``latents_mean`` / ``latents_std``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer

    _seed(0)
    transformer = GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=128,
    ).eval()
    vae = kl_vae(latent_channels=4, latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 1.2])
    pipe = GlmImagePipeline(
        tokenizer=ByT5Tokenizer(),
        processor=_glm_image_processor(),
        text_encoder=t5_encoder(d_model=32),
        vision_language_encoder=_glm_image_ar_model(),
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _case(pipe, "separate", prompt="a red circle with text 'cat'", guidance_scale=1.5, max_sequence_length=16)


def nucleusmoe_image() -> TinyCase:
    """NucleusMoE-Image (``NucleusMoEImagePipeline``): one list of single-stream blocks over the IMAGE tokens only,
    the text entering every block as extra keys/values (image queries attend to [image, text]; each block projects
    the text itself and returns only the image stream). Blocks after the first have a Mixture-of-Experts MLP with
    expert-choice routing (each expert takes the top tokens of each sample's sequence, router fed the timestep
    embedding) plus a shared expert; the routed experts' weights are ``torch.empty`` until a checkpoint loads, so the
    builder fills them. Latents are 2x2-packed tokens (Qwen-Image's packing) of a Qwen-Image VAE; the
    model predicts the NEGATIVE velocity (the pipeline flips it) from timestep / 1000. Qwen3-VL text features of one
    hidden layer (``return_index``; the default -8 needs 8 layers, -2 here). CFG as two calls, conditional first, no
    cache context, then the guided prediction is rescaled to the conditional one's norm per token."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline,
                           NucleusMoEImageTransformer2DModel)

    z_dim = 4
    _seed(0)
    transformer = NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, num_key_value_heads=1, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
        mlp_ratio=6.0,  # the dense blocks' MLP width rounds down to a multiple of 128: 32 * 6 * 2/3 = 128
        moe_enabled=True, dense_moe_strategy="leave_first_block_dense", num_experts=4, moe_intermediate_dim=16,
        capacity_factors=2.0,
    ).eval()
    # The routed experts' packed weights are created with torch.empty and never initialised by the model (a
    # checkpoint fills them): random values here, seeded, or the output is whatever the memory held (NaN included).
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
    _seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=z_dim * 2, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 1.2],
    ).eval()
    text_encoder, processor = _qwen3_vl(layers=3)
    pipe = NucleusMoEImagePipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                   text_encoder=text_encoder, processor=processor)
    return _case(pipe, "separate", negative_prompt="blurry", guidance_scale=4.0, return_index=-2,
                 max_sequence_length=64)


def _t5gemma_encoder(hidden_size: int = 32):
    """A 32-wide T5Gemma encoder (PRX's text encoder; the pixel pipeline takes any encoder with ``last_hidden_state``)."""
    from transformers import T5GemmaModuleConfig
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder

    config = T5GemmaModuleConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, dropout_rate=0.0,
    )
    _seed(0)
    return T5GemmaEncoder(config).eval()


def _prx_transformer(pixel: bool):
    """The blocks' ``Modulation`` layers are zero-initialised (adaLN-zero: every block starts as the identity, so no
    cache could be seen to skip anything); a checkpoint makes them non-zero, so they get seeded random values here."""
    from diffusers import PRXTransformer2DModel

    _seed(0)
    if pixel:  # RGB patches of 8x8 through a two-layer bottleneck, modulation aware of the resolution (PRX-7B style)
        transformer = PRXTransformer2DModel(in_channels=3, patch_size=8, context_in_dim=32, hidden_size=32,
                                            mlp_ratio=2.0, num_heads=2, depth=3, axes_dim=[8, 8], bottleneck_size=16,
                                            resolution_embeds=True).eval()
    else:
        transformer = PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=32, hidden_size=32,
                                            mlp_ratio=2.0, num_heads=2, depth=3, axes_dim=[8, 8]).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".modulation.lin." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return transformer


def prx() -> TinyCase:
    """PRX (``PRXPipeline``, Photoroom): one list of blocks over the IMAGE tokens, which attend to [text, image] keys
    (the text is projected to keys/values inside each block and never updated: blocks return the image stream only);
    T5Gemma text encoder; latents (B, C, H, W) of an SD/Flux-style KL VAE (or a DC-AE), timestep t / 1000. CFG as ONE
    doubled batch, unconditional first, no cache context. ``use_resolution_binning=False``: with binning on, the call's
    size is mapped to the 256/512 px aspect-ratio bins."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline

    pipe = PRXPipeline(
        transformer=_prx_transformer(pixel=False),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_t5gemma_encoder(),
        tokenizer=t5_tokenizer(),
        vae=kl_vae(latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159),  # Flux VAE's (PRX reads both)
        default_sample_size=512,
    )
    return _case(pipe, "batched", negative_prompt="blurry", guidance_scale=4.0, use_resolution_binning=False,
                 tokenizer_max_length=16)


def prx_pixel() -> TinyCase:
    """PRX pixel (``PRXPixelPipeline``): the same transformer class in RGB PIXEL space (no VAE; 8x8 RGB patches through
    a two-layer ``img_in`` bottleneck; resolution added to the modulation vector). It predicts x0, which the pipeline
    turns into a velocity ``(x - x0) / max(t, 0.05)`` after CFG; sampling starts from ``randn * noise_scale`` (2.0).
    CFG as one doubled batch, unconditional first; prompts padded to ``prompt_max_tokens``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPixelPipeline

    pipe = PRXPixelPipeline(
        transformer=_prx_transformer(pixel=True),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_t5gemma_encoder(),
        tokenizer=t5_tokenizer(),
        default_sample_size=1024,
        prompt_max_tokens=16,
    )
    return _case(pipe, "batched", negative_prompt="blurry", guidance_scale=4.0, use_resolution_binning=False)


def cogview3plus() -> TinyCase:
    """CogView3-Plus (``CogView3PlusPipeline``): CogView4's predecessor. The model patch-embeds [text, image] together,
    splits them, and every block (CogView4-style, returning (hidden, encoder)) runs joint attention over [text, image]
    and one feed-forward over both; T5 text features, SDXL-style size micro-conditioning. Unlike CogView4 (flow
    matching, CFG as two calls in cache contexts), CFG is ONE doubled batch, unconditional first, and the scheduler is
    ``CogVideoXDDIMScheduler`` (v-prediction, zero-terminal-SNR; the real model's), not flow matching."""
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline, CogView3PlusTransformer2DModel

    _seed(0)
    transformer = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32, sample_size=8,
    ).eval()
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=4.0, timestep_spacing="trailing",
    )
    pipe = CogView3PlusPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(d_model=32),
                                vae=kl_vae(latent_channels=4), transformer=transformer, scheduler=scheduler)
    return _case(pipe, "batched", negative_prompt="blurry", guidance_scale=5.0, max_sequence_length=16)


# Wan Animate, SANA-WM, FramePack


def _frames(count: int, size: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")) for _ in range(count)]


def wan_animate() -> TinyCase:
    """Wan Animate (Wan 2.2 Animate): character animation from a reference image plus a pose video and a face video.
    Wan 2.1 I2V-style blocks (its own ``WanTransformerBlock`` copy, CLIP image tokens joined before the text in cross
    attention) over a (B, 16 + 20 reference, T + 1, H, W) latent whose frame 0 is the reference image; the pose
    latents are added to the patch embedding of frames 1.., and a face adapter (motion encoder on the face pixels ->
    face encoder) adds its cross attention output between blocks 0, k, 2k, ... (``inject_face_latents_blocks``): outside
    a cached span's residual, as Wan VACE's hints. The output keeps all T + 1 latent frames. The video is made in
    segments of ``segment_frame_length`` frames (here 5: one segment), each its own denoising loop over the same
    timesteps; the pipeline calls ``scheduler.set_timesteps`` before the first segment AND after every segment (a
    "reset" after the last one too). CFG as two calls in ``cache_context("cond"/"uncond")``, cond first; the uncond
    call blanks the face video (all -1) besides taking the negative prompt. ``guidance_scale`` defaults to 1 (no CFG)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel

    image_encoder, image_processor = _clip_vision(16)
    _seed(0)
    transformer = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, latent_channels=16,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", image_dim=16, added_kv_proj_dim=24, rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=2,  # face adapters after blocks 0 and 2
    ).eval()
    pipe = WanAnimatePipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(d_model=32, umt5=True),
                              vae=_wan_vae(16), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                              image_processor=image_processor, image_encoder=image_encoder, transformer=transformer)
    return _case(pipe, "separate", is_video=True, image=_test_image(32), pose_video=_frames(5, 32, 1),
                 face_video=_frames(5, 16, 2), segment_frame_length=5, negative_prompt="blurry", guidance_scale=5.0,
                 height=32, width=32, max_sequence_length=32)


def sana_wm() -> TinyCase:
    """SANA-WM (camera-controlled image-to-video world model, stage 1: the bidirectional DiT): one list of
    ``SanaVideoMSCamCtrlBlock`` s over (B, C, T, H, W) latents (patch (1, 1, 1)), called POSITIONALLY
    ``block(x, y, t, mask, THW, rope, ...)``; each block's self-attention is a camera-conditioned (UCPE) Gated DeltaNet
    linear attention, every ``softmax_every_n``-th a softmax one, then cross attention to Gemma-2 text and a temporal
    GLUMBConv FFN, with per-FRAME adaLN (t is (B, 1, T, 6D)). The first latent frame is the VAE-encoded image, pinned
    clean: the timestep is per frame, (B, 1, T), and 0 on frame 0 (so the forward's first timestep element is always 0).
    The camera comes as an action string (``"w-8"``: forward 8 steps) plus intrinsics; raymaps and Plücker rays ride
    in the forward's keyword arguments. CFG as one doubled batch, unconditional first. The pipeline makes exactly one
    video, takes no ``latents=`` and returns ``frames`` WITHOUT a batch axis, (T, H, W, 3). The stage-2 refiner
    (``SanaWMLTX2Refiner``) is a separate pipeline, not part of this call. Tiny LTX-2 VAE (2x spatial and temporal)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaWMPipeline, SanaWMTransformer3DModel

    vae = _tiny_ltx2_vae()
    _seed(0)
    transformer = SanaWMTransformer3DModel(
        in_channels=4, num_layers=3, hidden_size=32, num_attention_heads=2, softmax_every_n=2, linear_head_dim=16,
        t_kernel_size=3, conv_kernel_size=4, caption_channels=16, mlp_ratio=2.0,
        chunk_plucker_channels=6 * vae.temporal_compression_ratio, chunk_plucker_post_attn_blocks=3,
    ).eval()
    with torch.no_grad():  # the Plücker embedder starts at zero (as released before training): make it act
        transformer.plucker_embedder.proj.weight.normal_(std=0.05)
    pipe = SanaWMPipeline(tokenizer=make_tokenizer(model_max_length=4096, add_bos=True, add_eos=False),
                          text_encoder=_gemma2(16), vae=vae, transformer=transformer,
                          scheduler=FlowMatchEulerDiscreteScheduler())
    return _case(pipe, "batched", is_video=True, image=_test_image(32), action="w-8",
                 intrinsics=[32.0, 32.0, 16.0, 16.0], negative_prompt="blurry", guidance_scale=5.0, height=32,
                 width=32, num_frames=5, max_sequence_length=16, chi_prompt=["describe the scene :"])


def _siglip_vision(hidden_size: int = 16):
    """A tiny SigLIP vision tower and its processor, made in-process (32 px, 8 px patches)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    _seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8,
    )).eval()
    return model, SiglipImageProcessor(size={"height": 32, "width": 32})


def framepack() -> TinyCase:
    """FramePack (HunyuanVideo I2V with a frame-packed history): HunyuanVideo's dual- then single-stream blocks (the
    existing block rows) over ONE latent stream [4x history tokens, 2x history tokens, clean tokens (the image and the
    1x history), current window tokens] that the model packs before the blocks (it cuts the window back out after
    them); the text (with SigLIP image tokens in front) is the blocks' encoder stream, joined after the latents in
    attention. The video is made in SECTIONS of ``latent_window_size`` latent frames, each from fresh noise with its own
    ``set_timesteps`` (a new call to the step clock: caches and guidance restart per section, and stats() reports the
    last section); the history latents change between sections only, so each section is an ordinary call with other
    conditioning. Inverted anti-drifting sampling (the default) makes the sections last-to-first. True CFG
    (``true_cfg_scale`` > 1 with a negative prompt) as two calls, cond then uncond, WITHOUT a cache context (branches by
    call order); ``guidance_scale`` is the distilled guidance embedding. The model's patch must be 2 (the history
    embedders' kernels are fixed at 2x, 4x, 8x cells). At 5 frames with ``latent_window_size=2`` one section runs; the
    resized test call (9 frames) runs two. No ``latents=`` argument."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline,
                           HunyuanVideoFramepackTransformer3DModel)
    from transformers import LlamaConfig, LlamaModel

    image_encoder, feature_extractor = _siglip_vision(16)
    _seed(0)
    transformer = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2, num_single_layers=3,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None, has_image_proj=True,
        image_proj_dim=16, has_clean_x_embedder=True,
    ).eval()
    _seed(0)
    text_encoder = LlamaModel(LlamaConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, hidden_size=16, intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3, vocab_size=VOCAB_SIZE,
        max_position_embeddings=1024, hidden_act="silu",
    )).eval()
    pipe = HunyuanVideoFramepackPipeline(
        text_encoder=text_encoder, tokenizer=make_tokenizer(model_max_length=4096, add_bos=True, add_eos=False),
        transformer=transformer, vae=_hunyuan_video_vae(4), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip_text_model(hidden_size=8, projection_dim=8), tokenizer_2=clip_tokenizer(),
        image_encoder=image_encoder, feature_extractor=feature_extractor,
    )
    return _case(pipe, "separate", is_video=True, image=_test_image(32), negative_prompt="blurry", true_cfg_scale=2.0,
                 guidance_scale=6.0, height=32, width=32, num_frames=5, latent_window_size=2, max_sequence_length=32)


@dataclass
class FramesOutput:
    frames: Any
    audio: Any = None


# MiniMax H3 (modular), Kandinsky 6 SR: no CFG, one forward per step


def _minimax_h3_pipeline_class():
    """``MiniMaxH3ModularPipeline`` with a classic ``__call__`` (what ``tiny_pipelines.run`` calls), returning
    ``.frames`` (and ``.audio``). The tiny components need three of the pipeline's model facts changed, which it keeps
    as properties: ``text_encoder_layer`` (the real one reads ``hidden_states[50]`` of a 64-layer Qwen3-VL; here the
    last of 2), and ``min_duration`` / ``max_duration`` (5-15 s at 24 fps, i.e. at least 120 frames; here any length).
    Its ``num_inference_steps`` counts model evaluations (the modular call's counts the scheduler's sigma grid points,
    one more). It takes no ``latents=`` in the classic sense (the modular call's ``latents`` is the noise), so the bottleneck
    refuses it as it refuses the modular pipeline."""
    from diffusers.modular_pipelines.minimax_h3.modular_pipeline import MiniMaxH3ModularPipeline

    class MiniMaxH3TinyPipeline(MiniMaxH3ModularPipeline):
        text_encoder_layer = 1
        min_duration = 0.0
        max_duration = 15.0

        def __call__(self, prompt: str | None = None, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, num_inference_steps: int = 50,
                     generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True,
                     **kwargs):
            # MiniMaxH3Scheduler counts sigma grid points, the terminal 0 included: N points make N - 1 model
            # evaluations. The classic call's num_inference_steps counts evaluations, as every other pipeline's.
            inputs = dict(prompt=prompt, height=height, width=width, num_frames=num_frames,
                          num_inference_steps=num_inference_steps + 1, generator=generator, **kwargs)
            inputs = {k: v for k, v in inputs.items() if v is not None}
            state = super().__call__(**inputs, output_type=output_type)
            out = FramesOutput(frames=state.get("videos"), audio=state.get("audio"))
            return out if return_dict else (out.frames,)

    return MiniMaxH3TinyPipeline


def _minimax_h3_components():
    from diffusers import AutoencoderKLMiniMaxH3, AutoencoderKLMiniMaxH3Audio, MiniMaxH3Scheduler, MiniMaxH3Transformer3DModel

    _seed(0)
    transformer = MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=3, num_refiner_layers=1, ffn_dim=64,
        in_channels=4, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=16, freq_dim=32, time_embed_hidden_dim=32,
        time_embed_dim=32, rope_freq_dim=2,
    ).eval()
    _seed(0)
    vae = AutoencoderKLMiniMaxH3(
        latent_channels=4, block_out_channels=(8, 8), layers_per_block=1, spatial_downsample_factors=(2, 2),
        temporal_downsample_factors=(1, 2), norm_num_groups=4, decoder_num_layers=1, decoder_num_attention_heads=2,
        decoder_attention_head_dim=8, decoder_num_register_tokens=1, decoder_ffn_mult=2, clip_length=5, token_drop=1,
        latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4,
    ).eval()
    _seed(0)
    audio_vae = AutoencoderKLMiniMaxH3Audio(
        encoder_dim=4, encoder_rates=(2, 2), latent_dim=8, latent_channels=4, num_attention_heads=2, decoder_dim=8,
        decoder_rates=(2, 2), decoder_kernel_sizes=(4, 4), resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),),
        sampling_rate=160, latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()
    text_encoder, processor = _qwen3_vl(layers=2)
    return dict(transformer=transformer, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder,
                tokenizer=processor.tokenizer, processor=processor, scheduler=MiniMaxH3Scheduler(shift=12.0),
                audio_scheduler=MiniMaxH3Scheduler(shift=3.0))


def minimax_h3_modular(pipeline_cls=None):
    """The plain modular MiniMax H3 pipeline (``MiniMaxH3Blocks``, text-to-video+audio workflow) over the tiny
    components; ``pipeline_cls`` a subclass of ``MiniMaxH3ModularPipeline`` (the tiny model facts above)."""
    from diffusers.modular_pipelines.minimax_h3 import MiniMaxH3Blocks

    pipe = (pipeline_cls or _minimax_h3_pipeline_class())(blocks=MiniMaxH3Blocks())
    pipe.update_components(**_minimax_h3_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def minimax_h3() -> TinyCase:
    """MiniMax H3 (modular only, ``MiniMaxH3Blocks``, text-to-video+audio): ONE packed sequence [text, audio rows,
    video rows] scattered by index tensors inside the model, one list of single-stream blocks over it
    (``MiniMaxH3TransformerBlock(hidden_states, temb, adaln_indices, rotary_emb)`` -> hidden); the model's
    ``hidden_states`` are the 1x2x2-patchified video rows (BSC), audio and text enter as other arguments. Two
    schedulers (video and audio, both stepped per step; the runtime taps ``pipe.scheduler``, the video one).
    Guidance-distilled: NO CFG, no guider, one forward per step (the family tests' "2 calls per step" do not hold).
    Qwen3-VL text encoder (hidden state ``text_encoder_layer``), a causal-CNN / ViT video VAE (4x spatial, clip of 5
    frames: 8 frames -> 5 latent frames here) and a DAC/BigVGAN audio VAE. The call goes through
    ``MiniMaxH3TinyPipeline``, a classic ``__call__`` over the modular one."""
    pipe = minimax_h3_modular()
    return TinyCase(pipe=pipe, call_kwargs=dict(prompt="a red circle", num_inference_steps=4, height=32, width=32,
                                                num_frames=8, output_type="np"),
                    denoiser_attr="transformer", is_video=True, cfg_layout="separate", calls_per_step=1)


def _kandinsky6_sr_pipeline_class():
    """``Kandinsky6SRPipeline`` whose call also takes ``height`` / ``width`` / ``num_frames``: the size of a
    deterministic low-resolution input video it makes (what the family tests vary), unless ``video=`` is given."""
    from diffusers import Kandinsky6SRPipeline

    class Kandinsky6SRTinyPipeline(Kandinsky6SRPipeline):
        def __call__(self, video=None, height: int = 32, width: int = 32, num_frames: int = 5, **kwargs):
            if video is None:
                grid = torch.linspace(-1.0, 1.0, height * width * 3 * num_frames)
                video = torch.sin(7.0 * grid).reshape(1, num_frames, 3, height, width).mul(0.5).add(0.5)  # (B, F, C, H, W) in [0, 1]
            return super().__call__(video=video, **kwargs)

    return Kandinsky6SRTinyPipeline


def kandinsky6_sr() -> TinyCase:
    """Kandinsky 6 video super-resolution: a text-free transformer refines latent tiles; no CFG (one forward per
    step: the family tests' "2 calls per step" do not hold). Channels-last (B, F, H, W, 2C + 1) input
    [noisy latent | anchor latent (zeros) | anchor mask], output (B, F, H, W, C); the blocks run a flattened token
    sequence regrouped into 8x8 spatial patches (NABLA order), self-attention through a flex ``BlockMask`` (NABLA
    sparse pattern; flex backend only). The video is cut into spatial tiles at ``transformer.config.tile_sizes`` /
    scale; every ``tiles_batch_size`` chunk of tiles is its own denoising loop (``set_timesteps`` per chunk): here
    ``tiles_batch_size=4`` so a tiny call is one loop. Input made by ``Kandinsky6SRTinyPipeline`` from ``height`` /
    ``width`` / ``num_frames`` (32x32, 5 frames -> 64x64 output at ``resolution_scale=2``); tiny K-VAE 4x spatial,
    2x temporal."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky6SRTransformer3DModel, Kandinsky6SRVAE

    _seed(0)
    transformer = Kandinsky6SRTransformer3DModel(
        in_visual_dim=4, out_visual_dim=4, time_dim=32, patch_size=(1, 1, 1), model_dim=24, ff_dim=32,
        num_visual_blocks=3, axes_dims=(4, 4, 4), nabla_window=(3, 3, 3), tile_sizes=((64, 64),),
    ).eval()
    _seed(0)
    vae = Kandinsky6SRVAE(latent_channels=4, encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                          layers_per_block=1, temporal_compression_ratio=2, temporal_compression_start_level=1).eval()
    pipe = _kandinsky6_sr_pipeline_class()(transformer=transformer, vae=vae,
                                           scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    return TinyCase(pipe=pipe, call_kwargs=dict(height=32, width=32, num_frames=5, resolution_scale=2,
                                                num_inference_steps=4, tiles_batch_size=4, output_type="np"),
                    denoiser_attr="transformer", is_video=True, cfg_layout="separate", calls_per_step=1)


# Wan Animate 2 (modular)


def _wan_animate_2_pipeline_class(distilled: bool = False):
    """``WanAnimate2ModularPipeline`` (or the distilled one) with a classic ``__call__`` returning ``.frames``."""
    from diffusers.modular_pipelines.wan_animate_2.modular_pipeline import (WanAnimate2DistilledModularPipeline,
                                                                            WanAnimate2ModularPipeline)

    base = WanAnimate2DistilledModularPipeline if distilled else WanAnimate2ModularPipeline

    class WanAnimate2TinyPipeline(base):
        def __call__(self, prompt: str | None = None, negative_prompt: str | None = None, height: int | None = None,
                     width: int | None = None, num_inference_steps: int = 40,
                     generator: torch.Generator | None = None, output_type: str = "np", return_dict: bool = True,
                     **kwargs):
            inputs = dict(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                          num_inference_steps=num_inference_steps, generator=generator, **kwargs)
            inputs = {k: v for k, v in inputs.items() if v is not None}
            videos = super().__call__(**inputs, output_type=output_type, output="videos")
            out = FramesOutput(frames=videos)
            return out if return_dict else (out.frames,)

    return WanAnimate2TinyPipeline


def _clip_vision_224(hidden_size: int = 16):
    """A tiny CLIP vision tower at 224 px (Wan Animate 2 resizes to 224 itself), 32 px patches."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    _seed(0)
    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
        image_size=224, patch_size=32, projection_dim=hidden_size,
    )).eval()


def wan_animate_2_modular(distilled: bool = False, pipeline_cls=None):
    """The plain modular Wan Animate 2 pipeline (``WanAnimate2Blocks`` / ``WanAnimate2DistilledBlocks``) over tiny
    components, with a CFG guider (guidance 1 for the distilled one, its default)."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, WanAnimate2Transformer3DModel
    from diffusers.modular_pipelines.wan_animate_2.modular_blocks_wan_animate_2 import WanAnimate2Blocks
    from diffusers.modular_pipelines.wan_animate_2.modular_blocks_wan_animate_2_distilled import (
        WanAnimate2DistilledBlocks)

    _seed(0)
    transformer = WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2), text_len=32, in_dim=36, dim=24, ffn_dim=32, freq_dim=32, text_dim=32, out_dim=16,
        num_heads=2, num_layers=3, use_img_emb=False,
    ).eval()
    blocks = WanAnimate2DistilledBlocks() if distilled else WanAnimate2Blocks()
    pipe = (pipeline_cls or _wan_animate_2_pipeline_class(distilled))(blocks=blocks)
    pipe.update_components(transformer=transformer, vae=_wan_vae(16), text_encoder=t5_encoder(d_model=32, umt5=True),
                           tokenizer=t5_tokenizer(), image_encoder=_clip_vision_224(16),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                           guider=ClassifierFreeGuidance(guidance_scale=1.0 if distilled else 5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _driving_video(frames: int = 5, size: int = 32):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(3)
    return [Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")) for _ in range(frames)]


def wan_animate_2() -> TinyCase:
    """Wan Animate 2 (modular only, ``WanAnimate2Blocks``): Wan-style blocks whose self attention also attends, through
    a flex ``BlockMask`` (flex backend only, mask built with ``create_block_mask(_compile=True)``), to a per-segment
    KV cache of the driving video's tokens. Per segment: ``scheduler.set_timesteps``, then ONE reference-extraction
    forward (``kv_cache_mode="extract"``, at ``timesteps[0]``, over the driving-video latents: writes every layer's
    K/V), then the denoising loop: cond then uncond calls through the ``ClassifierFreeGuidance`` guider without a cache
    context (the uncond one with ``is_uncondtion=True``, which skips block 9, absent at 3 blocks). Latents are a list
    of per-sample (C, F, H, W) tensors (CFHW_LIST). Tiny: ``use_img_emb=False`` (the CLIP features would be 1280
    wide), one 5-frame segment at 32 px. The extraction forward is the row's ``auxiliary_forward``."""
    pipe = wan_animate_2_modular()
    return TinyCase(pipe=pipe, call_kwargs=dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=4,
                                                height=32, width=32, image=_test_image(32),
                                                driving_video=_driving_video(5, 32), segment_frame_length=5,
                                                max_sequence_length=32, output_type="np"),
                    denoiser_attr="transformer", is_video=True, cfg_layout="separate")


def sd15() -> TinyCase:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    _seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    vae = kl_vae(latent_channels=4)
    text_encoder = clip_text_model(hidden_size=32)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return TinyCase(
        pipe=_finish(pipe),
        call_kwargs=dict(
            prompt="a red circle",
            num_inference_steps=4,
            guidance_scale=7.5,
            height=64,
            width=64,
            output_type="np",
        ),
        denoiser_attr="unet",
        is_video=False,
        cfg_layout="batched",
    )


def sdxl() -> TinyCase:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    _seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 2),
        projection_class_embeddings_input_dim=8 * 6 + 32,
        cross_attention_dim=64,
        norm_num_groups=4,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    vae = kl_vae(latent_channels=4)
    text_encoder = clip_text_model(hidden_size=32, projection_dim=32)
    text_encoder_2 = clip_text_model(hidden_size=32, projection_dim=32, with_projection=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return TinyCase(
        pipe=_finish(pipe),
        call_kwargs=dict(
            prompt="a red circle",
            num_inference_steps=4,
            guidance_scale=5.0,
            height=64,
            width=64,
            output_type="np",
        ),
        denoiser_attr="unet",
        is_video=False,
        cfg_layout="batched",
    )


FAMILIES: dict[str, Callable[[], TinyCase]] = {
    "pixart_alpha": pixart_alpha,
    "pixart_sigma": pixart_sigma,
    "sd3": sd3,
    "flux": flux,
    "sana": sana,
    "qwenimage": qwenimage,
    "chroma": chroma,
    "flux2_klein": flux2_klein,
    "lumina2": lumina2,
    "z_image": z_image,
    "qwenimage21": qwenimage21,
    "aura_flow": aura_flow,
    "hidream_image": hidream_image,
    "bria_fibo": bria_fibo,
    "longcat_image": longcat_image,
    "ovis_image": ovis_image,
    "hunyuandit": hunyuandit,
    "wan": wan,
    "wan_vace": wan_vace,
    "skyreels_v2": skyreels_v2,
    "cogvideox": cogvideox,
    "hunyuan_video": hunyuan_video,
    "hunyuan_video15": hunyuan_video15,
    "hunyuan_image": hunyuan_image,
    "ltx": ltx,
    "ltx2": ltx2,
    "mochi": mochi,
    "sana_video": sana_video,
    "easyanimate": easyanimate,
    "allegro": allegro,
    "cosmos": cosmos,
    "kandinsky5": kandinsky5,
    "motif_video": motif_video,
    "latte": latte,
    "flux3": flux3,
    "krea2": krea2,
    "ideogram4": ideogram4,
    "ernie_image": ernie_image,
    "bria_fibo2": bria_fibo2,
    "kandinsky6": kandinsky6,
    "helios": helios,
    "anyflow": anyflow,
    "chronoedit": chronoedit,
    "cosmos3_omni": cosmos3_omni,
    "glm_image": glm_image,
    "nucleusmoe_image": nucleusmoe_image,
    "prx": prx,
    "prx_pixel": prx_pixel,
    "cogview3plus": cogview3plus,
    "wan_animate": wan_animate,
    "sana_wm": sana_wm,
    "framepack": framepack,
    "minimax_h3": minimax_h3,
    "kandinsky6_sr": kandinsky6_sr,
    "wan_animate_2": wan_animate_2,
    "sd15": sd15,
    "sdxl": sdxl,
}


def build(name: str) -> TinyCase:
    if name not in FAMILIES:
        raise KeyError(f"unknown tiny family {name!r}; choose from {sorted(FAMILIES)}")
    case = FAMILIES[name]()
    case.name = name
    return case


def add_lora(case: TinyCase, rank: int = 4, seed: int = 0) -> TinyCase:
    """A LoRA adapter (peft) on the denoiser's attention projections, with random non-zero weights from
    ``seed``, so it changes the output: a user's fine-tune, as parallel and accelerated runs must carry it."""
    from peft import LoraConfig

    denoiser = getattr(case.pipe, case.denoiser_attr)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return case


def offload(case: TinyCase, mode: str) -> TinyCase:
    """Offload the denoiser's weights as a memory-bound user would: "group" (diffusers' group offloading,
    block level), "sequential" (accelerate's ``cpu_offload``: weights on the meta device, moved in module by
    module, what ``enable_sequential_cpu_offload`` installs) or "model" (the whole denoiser moved in for its
    forward, what ``enable_model_cpu_offload`` installs). On a CPU-only machine both ends are the CPU: the
    hooks, their order and the meta-device weights are exercised, only the copies are free."""
    from accelerate import cpu_offload, cpu_offload_with_hook

    cpu = torch.device("cpu")
    denoiser = getattr(case.pipe, case.denoiser_attr)
    if mode == "group":
        denoiser.enable_group_offload(cpu, cpu, offload_type="block_level", num_blocks_per_group=1)
    elif mode == "sequential":
        cpu_offload(denoiser, execution_device=cpu)
        assert any(p.device.type == "meta" for p in denoiser.parameters())
    elif mode == "model":
        cpu_offload_with_hook(denoiser, execution_device=cpu)
    else:
        raise ValueError(f"unknown offload mode {mode!r}: group, sequential or model")
    return case


def run(case: TinyCase, seed: int = 0, **overrides) -> np.ndarray:
    """Run the case's pipeline deterministically and return images / frames as a numpy array."""
    kwargs = dict(case.call_kwargs)
    kwargs.update(overrides)
    kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        out = case.pipe(**kwargs)
    from diffaccel.media import pipeline_samples

    return pipeline_samples(out, case.is_video)
