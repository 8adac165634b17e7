"""The supported model families, one row each, and the block classes they use.

Read from diffusers' model code (0.42): where the block lists are, what a block returns, how the
pipeline runs CFG. Rows whose class the installed diffusers lacks are skipped.
"""

from __future__ import annotations

import importlib
import logging

from .adapters import (ENCODER, HIDDEN, BlockSpec, FamilyAdapter, register_adapter, register_block_spec,
                       register_block_wrapper, register_unsupported)

logger = logging.getLogger(__name__)

HIDDEN_ONLY = BlockSpec(returns=(HIDDEN,))
ENCODER_THEN_HIDDEN = BlockSpec(returns=(ENCODER, HIDDEN), encoder_arg="encoder_hidden_states")
HIDDEN_THEN_ENCODER = BlockSpec(returns=(HIDDEN, ENCODER), encoder_arg="encoder_hidden_states")
JOINED_TEXT_FIRST = BlockSpec(returns=(HIDDEN,), joined_text="prefix")

# (module path, block class name) -> spec
BLOCK_ROWS: list[tuple[str, str, BlockSpec]] = [
    ("diffusers.models.attention", "BasicTransformerBlock", HIDDEN_ONLY),  # PixArt
    ("diffusers.models.attention", "JointTransformerBlock", ENCODER_THEN_HIDDEN),  # SD3 (last: (None, hidden))
    ("diffusers.models.transformers.transformer_sd3", "SD3SingleTransformerBlock", HIDDEN_ONLY),
    ("diffusers.models.transformers.transformer_flux", "FluxTransformerBlock", ENCODER_THEN_HIDDEN),
    ("diffusers.models.transformers.transformer_flux", "FluxSingleTransformerBlock", ENCODER_THEN_HIDDEN),
    ("diffusers.models.transformers.sana_transformer", "SanaTransformerBlock", HIDDEN_ONLY),
    ("diffusers.models.transformers.transformer_qwenimage", "QwenImageTransformerBlock", ENCODER_THEN_HIDDEN),
    ("diffusers.models.transformers.transformer_wan", "WanTransformerBlock", HIDDEN_ONLY),
    ("diffusers.models.transformers.cogvideox_transformer_3d", "CogVideoXBlock", HIDDEN_THEN_ENCODER),
    ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoTransformerBlock", HIDDEN_THEN_ENCODER),
    (
        "diffusers.models.transformers.transformer_hunyuan_video",
        "HunyuanVideoSingleTransformerBlock",
        HIDDEN_THEN_ENCODER,
    ),
    ("diffusers.models.transformers.transformer_ltx", "LTXVideoTransformerBlock", HIDDEN_ONLY),
    ("diffusers.models.transformers.transformer_cogview4", "CogView4TransformerBlock", HIDDEN_THEN_ENCODER),
    # FLUX.2 and Chroma join [text, image] before their single-stream blocks, which take and return that one tensor.
    ("diffusers.models.transformers.transformer_flux2", "Flux2TransformerBlock", ENCODER_THEN_HIDDEN),
    ("diffusers.models.transformers.transformer_flux2", "Flux2SingleTransformerBlock", JOINED_TEXT_FIRST),
    ("diffusers.models.transformers.transformer_chroma", "ChromaTransformerBlock", ENCODER_THEN_HIDDEN),
    ("diffusers.models.transformers.transformer_chroma", "ChromaSingleTransformerBlock", JOINED_TEXT_FIRST),
    ("diffusers.models.transformers.transformer_lumina2", "Lumina2TransformerBlock", HIDDEN_ONLY),
    (
        "diffusers.models.transformers.transformer_hunyuan_video15",
        "HunyuanVideo15TransformerBlock",
        HIDDEN_THEN_ENCODER,
    ),
    ("diffusers.models.transformers.transformer_skyreels_v2", "SkyReelsV2TransformerBlock", HIDDEN_ONLY),
    ("diffusers.models.transformers.transformer_hunyuanimage", "HunyuanImageTransformerBlock", HIDDEN_THEN_ENCODER),
    ("diffusers.models.transformers.transformer_hunyuanimage", "HunyuanImageSingleTransformerBlock", HIDDEN_THEN_ENCODER),
    # LTX-2's blocks carry the video and the audio stream; the audio one goes where other blocks carry text.
    (
        "diffusers.models.transformers.transformer_ltx2",
        "LTX2VideoTransformerBlock",
        BlockSpec(returns=(HIDDEN, ENCODER), encoder_arg="audio_hidden_states"),
    ),
    ("diffusers.models.transformers.transformer_z_image", "ZImageTransformerBlock", BlockSpec(returns=(HIDDEN,), hidden_arg="x")),
    # Qwen-Image 2.1: [text, target image] joined; after the first step its KV cache leaves the target tokens only.
    ("diffusers.models.transformers.transformer_qwenimage21", "QwenImage21TransformerBlock", JOINED_TEXT_FIRST),
    # AuraFlow: MMDiT blocks, then single blocks over one [text, image] sequence joined by the model.
    ("diffusers.models.transformers.auraflow_transformer_2d", "AuraFlowJointTransformerBlock", ENCODER_THEN_HIDDEN),
    ("diffusers.models.transformers.auraflow_transformer_2d", "AuraFlowSingleTransformerBlock", JOINED_TEXT_FIRST),
    # Kandinsky 5's visual blocks (its text blocks only refine the text, outside the cached list).
    (
        "diffusers.models.transformers.transformer_kandinsky",
        "Kandinsky5TransformerDecoderBlock",
        BlockSpec(returns=(HIDDEN,), hidden_arg="visual_embed"),
    ),
    # HiDream-I1: both lists hold HiDreamBlock wrappers (WRAPPER_ROWS) of these; the single-stream ones take
    # [image, text, this block's Llama tokens] joined, which the model trims after each block.
    ("diffusers.models.transformers.transformer_hidream_image", "HiDreamImageTransformerBlock", HIDDEN_THEN_ENCODER),
    (
        "diffusers.models.transformers.transformer_hidream_image",
        "HiDreamImageSingleTransformerBlock",
        BlockSpec(returns=(HIDDEN,), joined_text="suffix"),
    ),
    # Bria FIBO: FLUX.1-style blocks; before every block the model rewrites half the text channels from one
    # SmolLM3 layer, and it joins [text, image] around each single block.
    ("diffusers.models.transformers.transformer_bria_fibo", "BriaFiboTransformerBlock", ENCODER_THEN_HIDDEN),
    ("diffusers.models.transformers.transformer_bria_fibo", "BriaFiboSingleTransformerBlock", JOINED_TEXT_FIRST),
    ("diffusers.models.transformers.transformer_motif_video", "MotifVideoTransformerBlock", HIDDEN_THEN_ENCODER),
    ("diffusers.models.transformers.transformer_motif_video", "MotifVideoSingleTransformerBlock", HIDDEN_THEN_ENCODER),
    # LongCat-Image and Ovis-Image: FLUX.1-style blocks; their single-stream blocks join [text, image] inside.
    ("diffusers.models.transformers.transformer_longcat_image", "LongCatImageTransformerBlock", ENCODER_THEN_HIDDEN),
    ("diffusers.models.transformers.transformer_longcat_image", "LongCatImageSingleTransformerBlock", ENCODER_THEN_HIDDEN),
    ("diffusers.models.transformers.transformer_ovis_image", "OvisImageTransformerBlock", ENCODER_THEN_HIDDEN),
    ("diffusers.models.transformers.transformer_ovis_image", "OvisImageSingleTransformerBlock", ENCODER_THEN_HIDDEN),
    # Hunyuan-DiT's blocks cross-attend to the text; the second half takes a long skip from the first.
    ("diffusers.models.transformers.hunyuan_transformer_2d", "HunyuanDiTBlock", HIDDEN_ONLY),
    ("diffusers.models.transformers.transformer_mochi", "MochiTransformerBlock", HIDDEN_THEN_ENCODER),
    ("diffusers.models.transformers.transformer_sana_video", "SanaVideoTransformerBlock", HIDDEN_ONLY),
    ("diffusers.models.transformers.transformer_easyanimate", "EasyAnimateTransformerBlock", HIDDEN_THEN_ENCODER),
    ("diffusers.models.transformers.transformer_allegro", "AllegroTransformerBlock", HIDDEN_ONLY),
    # Cosmos' blocks return one tensor; a ControlNet's blocks (with after_proj) return two and are not described.
    ("diffusers.models.transformers.transformer_cosmos", "CosmosTransformerBlock", HIDDEN_ONLY),
    # FLUX.3: only the joint single blocks are listed (they return (encoder, hidden)); its per-mode blocks sit in a
    # ModuleDict (text, image, reference image) and always run.
    ("diffusers.models.transformers.transformer_flux3", "Flux3SingleTransformerBlock", ENCODER_THEN_HIDDEN),
    # Krea 2: single-stream blocks over [text, image] joined by the model before them.
    ("diffusers.models.transformers.transformer_krea2", "Krea2TransformerBlock", JOINED_TEXT_FIRST),
    # Ideogram 4: one [text, image] sequence enters the conditional model's blocks as one tensor (the text features
    # added to the hidden stream at the text positions); its unconditional model's blocks see the image alone.
    ("diffusers.models.transformers.transformer_ideogram4", "Ideogram4TransformerBlock", HIDDEN_ONLY),
    # ERNIE-Image: one [image, text] sequence, sequence-first (S, B, H), in the argument `x`.
    ("diffusers.models.transformers.transformer_ernie_image", "ErnieImageSharedAdaLNBlock",
     BlockSpec(returns=(HIDDEN,), hidden_arg="x")),
    # Bria FIBO 2: Z-Image-style blocks over [gist (the Perceiver's text tokens), image, context images].
    ("diffusers.models.transformers.transformer_bria_fibo2", "BriaFibo2TransformerBlock",
     BlockSpec(returns=(HIDDEN,), hidden_arg="x")),
    # Kandinsky 6's fused blocks: forward(vis, aud, ...) -> (vis, aud), the audio stream where others carry text
    # (None without audio).
    ("diffusers.models.transformers.transformer_kandinsky6", "Kandinsky6FusedTransformerDecoderBlock",
     BlockSpec(returns=(HIDDEN, ENCODER), hidden_arg="vis", encoder_arg="aud")),
    # Helios: one tensor [history tokens, current chunk tokens] in and out.
    ("diffusers.models.transformers.transformer_helios", "HeliosTransformerBlock", HIDDEN_ONLY),
    ("diffusers.models.transformers.transformer_anyflow", "AnyFlowTransformerBlock", HIDDEN_ONLY),
    # ChronoEdit keeps its own copy of Wan's block class.
    ("diffusers.models.transformers.transformer_chronoedit", "WanTransformerBlock", HIDDEN_ONLY),
    # Cosmos 3: one decoder layer list over [text (und), vision (gen)], each layer returning (und, gen).
    (
        "diffusers.models.transformers.transformer_cosmos3",
        "Cosmos3VLTextMoTDecoderLayer",
        BlockSpec(returns=(ENCODER, HIDDEN), hidden_arg="gen_seq", encoder_arg="und_seq"),
    ),
    # GLM-Image: CogView4-style blocks (joint attention over [glyph text, image]) returning (hidden, encoder).
    ("diffusers.models.transformers.transformer_glm_image", "GlmImageTransformerBlock", HIDDEN_THEN_ENCODER),
    # NucleusMoE-Image: image-only blocks (text as extra keys/values, projected inside each block).
    ("diffusers.models.transformers.transformer_nucleusmoe_image", "NucleusMoEImageTransformerBlock", HIDDEN_ONLY),
    # PRX: image-only blocks (text as extra keys/values).
    ("diffusers.models.transformers.transformer_prx", "PRXBlock", HIDDEN_ONLY),
    ("diffusers.models.transformers.transformer_cogview3plus", "CogView3PlusTransformerBlock", HIDDEN_THEN_ENCODER),
    # SANA-WM's blocks take (x, y, t, ...) positionally and return x.
    ("diffusers.models.transformers.transformer_sana_wm", "SanaVideoMSCamCtrlBlock",
     BlockSpec(returns=(HIDDEN,), hidden_arg="x")),
    # Wan Animate keeps its own copy of Wan's block class.
    ("diffusers.models.transformers.transformer_wan_animate", "WanTransformerBlock", HIDDEN_ONLY),
    # MiniMax H3: one packed [text, audio, video] sequence (scattered by index, in the layout's order) in and out.
    ("diffusers.models.transformers.transformer_minimax_h3", "MiniMaxH3TransformerBlock", HIDDEN_ONLY),
    ("diffusers.models.transformers.transformer_kandinsky6_sr", "Kandinsky6SRTransformerBlock", HIDDEN_ONLY),
    ("diffusers.models.transformers.transformer_wan_animate_2", "WanAnimate2TransformerBlock", HIDDEN_ONLY),
]

# (module path, wrapper class name, attribute holding the described block)
WRAPPER_ROWS: list[tuple[str, str, str]] = [
    ("diffusers.models.transformers.transformer_hidream_image", "HiDreamBlock", "block"),
]

# (module path, denoiser class name) -> adapter
FAMILY_ROWS: list[tuple[str, str, FamilyAdapter]] = [
    (
        "diffusers",
        "PixArtTransformer2DModel",
        FamilyAdapter(name="pixart", block_lists=("transformer_blocks",), latent_layout="BCHW", cfg_layout="batched"),
    ),
    (
        "diffusers",
        "SD3Transformer2DModel",
        FamilyAdapter(
            name="sd3", block_lists=("transformer_blocks",), latent_layout="BCHW", cfg_layout="batched", joint_text="suffix"
        ),
    ),
    (
        "diffusers",
        "FluxTransformer2DModel",
        FamilyAdapter(
            name="flux",
            pipeline_latents="packed2x2",
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            latent_layout="BSC",
            cfg_layout="separate",
            notes="true CFG (true_cfg_scale > 1) runs cond and uncond as separate calls",
            joint_text="prefix",
        ),
    ),
    (
        "diffusers",
        "SanaTransformer2DModel",
        FamilyAdapter(name="sana", block_lists=("transformer_blocks",), latent_layout="BCHW", cfg_layout="batched"),
    ),
    (
        "diffusers",
        "QwenImageTransformer2DModel",
        FamilyAdapter(
            name="qwenimage",
            pipeline_latents="packed2x2",
            block_lists=("transformer_blocks",),
            latent_layout="BSC",
            cfg_layout="separate",
            joint_text="prefix",
        ),
    ),
    (
        "diffusers",
        "WanTransformer3DModel",
        FamilyAdapter(
            name="wan", block_lists=("blocks",), latent_layout="BCFHW", cfg_layout="separate", is_video=True
        ),
    ),
    (
        "diffusers",
        "SkyReelsV2Transformer3DModel",
        FamilyAdapter(
            name="skyreels_v2", block_lists=("blocks",), latent_layout="BCFHW", cfg_layout="separate", is_video=True
        ),
    ),
    (
        "diffusers",
        "WanVACETransformer3DModel",
        FamilyAdapter(
            name="wan_vace",
            block_lists=("blocks",),
            latent_layout="BCFHW",
            cfg_layout="separate",
            is_video=True,
            notes="the main blocks are cached; the VACE blocks always run, and the hints they make are added "
                  "between the main blocks, outside a cached span's residual",
        ),
    ),
    (
        "diffusers",
        "CogVideoXTransformer3DModel",
        FamilyAdapter(
            name="cogvideox",
            block_lists=("transformer_blocks",),
            latent_layout="BFCHW",
            cfg_layout="batched",
            is_video=True,
            joint_text="prefix",
        ),
    ),
    (
        "diffusers",
        "HunyuanVideoTransformer3DModel",
        FamilyAdapter(
            name="hunyuan_video",
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            latent_layout="BCFHW",
            cfg_layout="separate",
            is_video=True,
            joint_text="suffix",
        ),
    ),
    (
        "diffusers",
        "HunyuanVideo15Transformer3DModel",
        FamilyAdapter(
            name="hunyuan_video15",
            block_lists=("transformer_blocks",),
            latent_layout="BCFHW",
            cfg_layout="separate",
            is_video=True,
            joint_text="suffix",
            notes="its pipeline runs CFG through a diffusers guider (cache contexts pred_cond / pred_uncond)",
        ),
    ),
    (
        "diffusers",
        "LTXVideoTransformer3DModel",
        FamilyAdapter(
            name="ltx",
            block_lists=("transformer_blocks",),
            latent_layout="BSC",
            cfg_layout="batched",
            is_video=True,
            pipeline_latents="packed_video",
        ),
    ),
    (
        "diffusers",
        "HunyuanImageTransformer2DModel",
        FamilyAdapter(
            name="hunyuan_image",
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            latent_layout="BCHW",
            cfg_layout="separate",
            joint_text="suffix",
            notes="HunyuanImage 2.1: CFG through a diffusers guider (adaptive projected guidance), contexts "
                  "pred_cond / pred_uncond",
        ),
    ),
    (
        "diffusers",
        "LTX2VideoTransformer3DModel",
        FamilyAdapter(
            name="ltx2",
            pipeline_latents="BCFHW",
            block_lists=("transformer_blocks",),
            latent_layout="BSC",
            cfg_layout="batched",
            is_video=True,
            notes="video and audio in one model: the block cache replays both streams' residuals; where adaptive "
                  "guidance skips the unconditional half, the audio takes its conditional prediction too",
        ),
    ),
    (
        "diffusers",
        "CogView4Transformer2DModel",
        FamilyAdapter(
            name="cogview4",
            block_lists=("transformer_blocks",),
            latent_layout="BCHW",
            cfg_layout="separate",
            notes="the embedded reference image model's family",
            joint_text="prefix",
        ),
    ),
    (
        "diffusers",
        "Flux2Transformer2DModel",
        FamilyAdapter(
            name="flux2",
            pipeline_latents="patchified2x2",
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            latent_layout="BSC",
            cfg_layout="separate",
            notes="FLUX.2 [klein] base runs CFG as separate calls; [dev] and distilled [klein] embed guidance",
            joint_text="prefix",
        ),
    ),
    (
        "diffusers",
        "ChromaTransformer2DModel",
        FamilyAdapter(
            name="chroma",
            pipeline_latents="packed2x2",
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            latent_layout="BSC",
            cfg_layout="separate",
            notes="its pipeline runs cond then uncond without a cache context: branches by call order",
            joint_text="prefix",
        ),
    ),
    (
        "diffusers",
        "Lumina2Transformer2DModel",
        FamilyAdapter(
            name="lumina2",
            block_lists=("layers",),
            latent_layout="BCHW",
            cfg_layout="separate",
            notes="the joint layers are cached; the noise and context refiners always run. Its pipeline runs "
                  "cond then uncond without a cache context: branches by call order",
            joint_text="prefix",
        ),
    ),
    (
        "diffusers",
        "ZImageTransformer2DModel",
        FamilyAdapter(
            name="z_image",
            block_lists=("layers",),
            latent_layout="CFHW_LIST",
            cfg_layout="batched",
            timestep_arg="t",
            hidden_arg="x",
            joint_text="suffix",
            cfg_batch_order=("cond", "uncond"),
            pipeline_latents="BCHW",
            notes="the main layers are cached; the noise and context refiners always run. Its CFG batch is a list "
                  "of per-image latents, conditional first, which adaptive guidance and CFG parallel do not split",
        ),
    ),
    (
        "diffusers",
        "QwenImage21Transformer2DModel",
        FamilyAdapter(
            name="qwenimage21",
            pipeline_latents="flat_tokens",
            block_lists=("transformer_blocks",),
            latent_layout="BSC",
            cfg_layout="separate",
            joint_text="prefix",
            notes="one joined [text, image] sequence; its KV cache (the pipeline's default) prefills the text at the "
                  "first step, whose output carries the text tokens too, and later steps run the image tokens only",
        ),
    ),
    (
        "diffusers",
        "AuraFlowTransformer2DModel",
        FamilyAdapter(
            name="aura_flow",
            block_lists=("joint_transformer_blocks", "single_transformer_blocks"),
            latent_layout="BCHW",
            cfg_layout="batched",
            joint_text="prefix",
            notes="its single blocks take [text, image] joined (8 register tokens lead the text); split at the "
                  "patchified latent grid's token count",
        ),
    ),
    (
        "diffusers",
        "Kandinsky5Transformer3DModel",
        FamilyAdapter(
            name="kandinsky5",
            block_lists=("visual_transformer_blocks",),
            latent_layout="BFHWC",
            cfg_layout="separate",
            is_video=True,
            notes="channels-last latents; the visual blocks are cached, the text blocks always run; its pipelines "
                  "call cond then uncond without a cache context (branches by call order)",
        ),
    ),
    (
        "diffusers",
        "HiDreamImageTransformer2DModel",
        FamilyAdapter(
            name="hidream_image",
            block_lists=("double_stream_blocks", "single_stream_blocks"),
            latent_layout="BCHW",
            cfg_layout="batched",
            timestep_arg="timesteps",
            joint_text="suffix",
            padded_latent_tokens="max_seq",
            notes="every block gets its own Llama layer's tokens beside the text, which the model trims after it: "
                  "what that changes between blocks stays out of a cached span's residual",
        ),
    ),
    (
        "diffusers",
        "BriaFiboTransformer2DModel",
        FamilyAdapter(
            name="bria_fibo",
            pipeline_latents="flat_tokens",
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            latent_layout="BSC",
            cfg_layout="batched",
            joint_text="prefix",
            notes="the text channels the model rewrites between blocks (from its SmolLM3 layers) stay out of a "
                  "cached span's residual",
        ),
    ),
    (
        "diffusers",
        "MotifVideoTransformer3DModel",
        FamilyAdapter(
            name="motif_video",
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            uncached_tail=(("single_transformer_blocks", "num_decoder_layers"),),
            latent_layout="BCFHW",
            cfg_layout="separate",
            is_video=True,
            joint_text="suffix",
            notes="its last num_decoder_layers single blocks decode from the embedded input and always run; CFG "
                  "through a diffusers guider (contexts pred_cond / pred_uncond)",
        ),
    ),
    (
        "diffusers",
        "LatteTransformer3DModel",
        FamilyAdapter(
            name="latte",
            block_lists=("transformer_blocks",),
            latent_layout="BCFHW",
            cfg_layout="batched",
            is_video=True,
            notes="the spatial blocks are cached; the temporal blocks run between them, interleaved and over "
                  "re-laid tokens, always: what they add stays out of a cached span's residual",
        ),
    ),
    (
        "diffusers",
        "LongCatImageTransformer2DModel",
        FamilyAdapter(
            name="longcat_image",
            pipeline_latents="packed2x2",
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            latent_layout="BSC",
            cfg_layout="separate",
            joint_text="prefix",
            notes="FLUX.1-style blocks; CFG as two calls in cache contexts, then CFG renormalisation",
        ),
    ),
    (
        "diffusers",
        "OvisImageTransformer2DModel",
        FamilyAdapter(
            name="ovis_image",
            pipeline_latents="packed2x2",
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            latent_layout="BSC",
            cfg_layout="separate",
            joint_text="prefix",
        ),
    ),
    (
        "diffusers",
        "HunyuanDiT2DModel",
        FamilyAdapter(
            name="hunyuandit",
            block_lists=("blocks",),
            latent_layout="BCHW",
            cfg_layout="batched",
            notes="U-Net-style long skips: block l > N/2 takes block N-1-l's output, a skipped block's replayed one "
                  "under the cache; DDPM scheduler, so no bottleneck",
        ),
    ),
    (
        "diffusers",
        "MochiTransformer3DModel",
        FamilyAdapter(
            name="mochi",
            block_lists=("transformer_blocks",),
            latent_layout="BCFHW",
            cfg_layout="batched",
            is_video=True,
            joint_text="suffix",
            notes="its scheduler inverts the sigmas: the denoiser sees timesteps rising from 0",
        ),
    ),
    (
        "diffusers",
        "SanaVideoTransformer3DModel",
        FamilyAdapter(name="sana_video", block_lists=("transformer_blocks",), latent_layout="BCFHW",
                      cfg_layout="batched", is_video=True),
    ),
    (
        "diffusers",
        "EasyAnimateTransformer3DModel",
        FamilyAdapter(name="easyanimate", block_lists=("transformer_blocks",), latent_layout="BCFHW",
                      cfg_layout="batched", is_video=True, joint_text="prefix"),
    ),
    (
        "diffusers",
        "AllegroTransformer3DModel",
        FamilyAdapter(name="allegro", block_lists=("transformer_blocks",), latent_layout="BCFHW",
                      cfg_layout="batched", is_video=True),
    ),
    (
        "diffusers",
        "CosmosTransformer3DModel",
        FamilyAdapter(
            name="cosmos",
            block_lists=("transformer_blocks",),
            latent_layout="BCFHW",
            cfg_layout="separate",
            is_video=True,
            notes="its pipelines run cond then uncond without a cache context (branches by call order) and guide "
                  "as cond + s·(cond − uncond); the latents carry a condition-mask channel",
        ),
    ),
    (
        "diffusers",
        "Flux3Transformer2DModel",
        FamilyAdapter(
            name="flux3",
            block_lists=("single_transformer_blocks",),
            latent_layout="BSC",
            cfg_layout="separate",
            joint_text="prefix",
            pipeline_latents="patchified2x2",
            notes="the joint single blocks are cached; the per-mode blocks (text, image, reference image) before "
                  "them always run. Modular pipelines: CFG through the guider, cond then uncond calls without a "
                  "cache context (branches by call order)",
        ),
    ),
    (
        "diffusers",
        "Krea2Transformer2DModel",
        FamilyAdapter(
            name="krea2",
            block_lists=("transformer_blocks",),
            latent_layout="BSC",
            cfg_layout="separate",
            joint_text="prefix",
            pipeline_latents="packed2x2",
            notes="one joined [text, image] sequence; its pipeline runs cond then uncond without a cache context "
                  "(branches by call order) and guides as cond + s·(cond − uncond), unguided at guidance_scale 0",
        ),
    ),
    (
        "diffusers",
        "Ideogram4Transformer2DModel",
        FamilyAdapter(
            name="ideogram4",
            block_lists=("layers",),
            latent_layout="BSC",
            cfg_layout="separate",
            joint_text="prefix",
            notes="asymmetric CFG: `transformer` runs the conditional branch over [text, image], a second model, "
                  "`unconditional_transformer`, the unconditional one over the image alone, each a runtime of its "
                  "own (guidance methods and parallelism are refused); 2x2 patches with the channels last, which the "
                  "bottleneck does not resize",
        ),
    ),
    (
        "diffusers",
        "ErnieImageTransformer2DModel",
        FamilyAdapter(
            name="ernie_image",
            block_lists=("layers",),
            latent_layout="BCHW",
            cfg_layout="batched",
            joint_text="suffix",
            notes="one [image, text] sequence, sequence-first inside the blocks; 2x2-patchified latents (the "
                  "pipeline's vae_scale_factor includes the patch); CFG as one doubled batch, unconditional first",
        ),
    ),
    (
        "diffusers",
        "BriaFibo2Transformer2DModel",
        FamilyAdapter(
            name="bria_fibo2",
            block_lists=("layers",),
            latent_layout="BCHW",
            cfg_layout="separate",
            joint_text="prefix",
            notes="the main layers are cached; the noise refiner always runs. One sequence [gist (the Perceiver's "
                  "text tokens), image, context images]; its pipeline runs cond then uncond without a cache context "
                  "(branches by call order)",
        ),
    ),
    (
        "diffusers",
        "Kandinsky6Transformer3DModel",
        FamilyAdapter(
            name="kandinsky6",
            block_lists=("visual_transformer_blocks",),
            latent_layout="BFHWC",
            cfg_layout="separate",
            is_video=True,
            pipeline_latents="BCFHW",
            notes="video and audio in one model: the fused blocks carry the audio stream where others carry text, and "
                  "the block cache replays both; the text blocks always run. CFG in cache contexts, cond first; a "
                  "skipped uncond call returns the cond call's (video, audio) pair",
        ),
    ),
    (
        "diffusers",
        "HeliosTransformer3DModel",
        FamilyAdapter(
            name="helios",
            block_lists=("blocks",),
            latent_layout="BCFHW",
            cfg_layout="separate",
            is_video=True,
            # Not text: the history tokens lead the blocks' self-attention sequence. Block-sparse attention keeps
            # them, as it keeps a text prefix, and tiles the chunk's grid.
            joint_text="prefix",
            notes="autoregressive chunks, one scheduler schedule each, so caches start clean per chunk (and per "
                  "resolution stage in the pyramid pipeline); the blocks run over [history tokens, chunk tokens]",
        ),
    ),
    (
        "diffusers",
        "AnyFlowTransformer3DModel",
        FamilyAdapter(
            name="anyflow",
            block_lists=("blocks",),
            latent_layout="BFCHW",
            cfg_layout="batched",
            is_video=True,
            pipeline_latents="BCFHW",
            notes="flow-map model: each forward takes the source timestep and the target r_timestep (per frame); "
                  "CFG is folded into the released weights (guidance_scale=1), a doubled batch when a scale is set",
        ),
    ),
    (
        "diffusers",
        "ChronoEditTransformer3DModel",
        FamilyAdapter(
            name="chronoedit",
            block_lists=("blocks",),
            latent_layout="BCFHW",
            cfg_layout="separate",
            is_video=True,
            notes="image editing through a Wan 2.1 I2V video model; its pipeline runs cond then uncond without a cache "
                  "context (branches by call order); temporal reasoning drops frames mid-call (state resets there)",
        ),
    ),
    (
        "diffusers",
        "Cosmos3OmniTransformer",
        FamilyAdapter(
            name="cosmos3_omni",
            block_lists=("layers",),
            latent_layout="CFHW_LIST",
            cfg_layout="separate",
            timestep_arg="vision_timesteps",
            hidden_arg="vision_tokens",
            is_video=True,
            joint_text="prefix",
            pipeline_latents="BCFHW",
            notes="one joint sequence without a batch axis: the layers take the text (causal, independent of the "
                  "latents) and the vision tokens as two (tokens, D) tensors; latents are a list of one "
                  "(1, C, T, H, W) tensor; CFG as two calls in cache contexts cond / uncond",
        ),
    ),
    (
        "diffusers",
        "GlmImageTransformer2DModel",
        FamilyAdapter(
            name="glm_image",
            block_lists=("transformer_blocks",),
            latent_layout="BCHW",
            cfg_layout="separate",
            joint_text="prefix",
            notes="an AR model samples prior image tokens that the DiT adds to its image tokens (so no bottleneck: "
                  "each stage would sample anew); its pipeline runs cond then uncond without a cache context "
                  "(branches by call order)",
        ),
    ),
    (
        "diffusers",
        "NucleusMoEImageTransformer2DModel",
        FamilyAdapter(
            name="nucleusmoe_image",
            pipeline_latents="packed2x2",
            block_lists=("transformer_blocks",),
            latent_layout="BSC",
            cfg_layout="separate",
            notes="image-only blocks with text as extra keys/values and expert-choice MoE MLPs; its pipeline runs "
                  "cond then uncond without a cache context (branches by call order) and rescales the guided "
                  "prediction to the conditional one's norm",
        ),
    ),
    (
        "diffusers",
        "PRXTransformer2DModel",
        FamilyAdapter(
            name="prx",
            block_lists=("blocks",),
            latent_layout="BCHW",
            cfg_layout="batched",
            notes="image-only blocks with text as extra keys/values; CFG as one doubled batch. The pixel-space "
                  "pipeline (PRXPixelPipeline) uses the same class on RGB pixels and predicts x0",
        ),
    ),
    (
        "diffusers",
        "CogView3PlusTransformer2DModel",
        FamilyAdapter(
            name="cogview3plus",
            block_lists=("transformer_blocks",),
            latent_layout="BCHW",
            cfg_layout="batched",
            joint_text="prefix",
            notes="CogView4-style blocks; CFG as one doubled batch; CogVideoX DDIM scheduler (v-prediction), so "
                  "no bottleneck",
        ),
    ),
    (
        "diffusers",
        "HunyuanVideoFramepackTransformer3DModel",
        FamilyAdapter(
            name="framepack",
            block_lists=("transformer_blocks", "single_transformer_blocks"),
            latent_layout="BCFHW",
            cfg_layout="separate",
            is_video=True,
            # Neither "prefix" nor "suffix": the blocks attend over [history tokens, window tokens, text], and
            # block-sparse attention would take everything but the window's grid as text at one end. "none" makes it
            # run dense (it finds no layout for the sequence).
            joint_text="none",
            notes="HunyuanVideo blocks over [history 4x, 2x, clean (image + 1x history), window] tokens packed by the "
                  "model; sections of latent_window_size frames, one scheduler schedule each, so caches and guidance "
                  "restart per section; true CFG as cond then uncond calls without a cache context (branches by "
                  "call order); no latents=, so no bottleneck",
        ),
    ),
    (
        "diffusers",
        "SanaWMTransformer3DModel",
        FamilyAdapter(
            name="sana_wm",
            block_lists=("blocks",),
            latent_layout="BCFHW",
            cfg_layout="batched",
            is_video=True,
            notes="camera-controlled image-to-video (SANA-WM stage 1): linear (Gated DeltaNet) and softmax camera "
                  "attention blocks called positionally; per-frame timesteps with the image frame pinned at 0; CFG "
                  "as one doubled batch, unconditional first; its pipeline takes no latents=, so no bottleneck",
        ),
    ),
    (
        "diffusers",
        "WanAnimateTransformer3DModel",
        FamilyAdapter(
            name="wan_animate",
            block_lists=("blocks",),
            latent_layout="BCFHW",
            cfg_layout="separate",
            is_video=True,
            notes="character animation (reference image + pose and face videos) through Wan 2.1 I2V-style blocks; "
                  "the face adapter's output is added between blocks, outside a cached span's residual. Made in "
                  "segments, each its own denoising loop (set_timesteps per segment); CFG in cache contexts "
                  "cond / uncond",
        ),
    ),
    (
        "diffusers",
        "MiniMaxH3Transformer3DModel",
        FamilyAdapter(
            name="minimax_h3",
            block_lists=("transformer_blocks",),
            latent_layout="BSC",
            cfg_layout="separate",
            is_video=True,
            notes="joint video + audio: the blocks run one packed sequence of text, audio and video rows (the model "
                  "scatters them by index); guidance-distilled, one forward per step and no CFG. Modular pipeline "
                  "only, whose call takes no latents=, so no bottleneck",
        ),
    ),
    (
        "diffusers",
        "Kandinsky6SRTransformer3DModel",
        FamilyAdapter(
            name="kandinsky6_sr",
            block_lists=("visual_transformer_blocks",),
            latent_layout="BFHWC",
            cfg_layout="separate",
            is_video=True,
            notes="video super-resolution, text-free and without CFG (one forward per step); the tiles are denoised "
                  "chunk by chunk, each chunk its own loop (set_timesteps per chunk); tokens regrouped into 8x8 "
                  "spatial patches inside the model, NABLA sparse self-attention through a flex BlockMask (so "
                  "block-sparse attention cannot replace it); its call takes no latents=, so no bottleneck",
        ),
    ),
    (
        "diffusers",
        "WanAnimate2Transformer3DModel",
        FamilyAdapter(
            name="wan_animate_2",
            block_lists=("blocks",),
            latent_layout="CFHW_LIST",
            cfg_layout="separate",
            is_video=True,
            auxiliary_forward=("kv_cache_mode", "extract"),
            notes="character animation (modular pipelines): per segment, one reference-extraction forward "
                  "(kv_cache_mode='extract') writes every layer's K/V of the driving video into a KV cache, run "
                  "unaccelerated and outside the step count; CFG through the guider, cond then uncond without a "
                  "cache context; latents as a list of (C, F, H, W) tensors",
        ),
    ),
    (
        "diffusers",
        "UNet2DConditionModel",
        FamilyAdapter(
            name="unet",
            block_lists=("down_blocks", "up_blocks"),
            latent_layout="BCHW",
            cfg_layout="batched",
            hidden_arg="sample",
            block_cache=False,
            notes="UNets have no flat block list: the residual block cache does not apply",
        ),
    ),
]


# Denoiser classes examined and left unsupported -> why (the unsupported-model error says it).
UNSUPPORTED_ROWS: dict[str, str] = {
    "JoyImageEditTransformer3DModel": "its latents are six-dimensional, (batch, items, channels, frames, height, "
                                      "width), a layout no row of this version describes",
    "AnyFlowFARTransformer3DModel": "after each chunk its pipeline makes an extra forward that writes the chunk's "
                                    "keys and values into a KV cache, which a skipped block would leave empty",
}


def _resolve(module_path: str, name: str):
    try:
        return getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError):
        logger.debug("diffaccel: %s.%s is not in the installed diffusers; its row is skipped", module_path, name)
        return None


def register_builtin_families() -> None:
    for module_path, name, spec in BLOCK_ROWS:
        cls = _resolve(module_path, name)
        if cls is not None:
            register_block_spec(cls, spec)
    for module_path, name, inner in WRAPPER_ROWS:
        cls = _resolve(module_path, name)
        if cls is not None:
            register_block_wrapper(cls, inner)
    for module_path, name, adapter in FAMILY_ROWS:
        cls = _resolve(module_path, name)
        if cls is not None:
            register_adapter(cls, adapter)
    for name, why in UNSUPPORTED_ROWS.items():
        register_unsupported(name, why)
