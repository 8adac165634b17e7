"""Bottleneck sampling (Tian, Xia et al., "Training-free Diffusion Acceleration with Bottleneck
Sampling", arXiv 2503.18940): high -> low -> high resolution across the denoising steps.

A call runs in stages, each one call of the underlying diffusers pipeline (prompts encoded once and
passed as ``prompt_embeds``; ``output_type="latent"`` until the last stage): the first at full size
(layout), the middle at a lower size (cheap: a quarter of the tokens at scale 0.5), the last at full
size again (detail). Each stage denoises down to sigma 0, so it ends on a clean latent estimate; at a
transition that estimate is resized in latent space (bicubic; the paper's Lanczos is not in torch and
third-party ablations find the difference small) and re-noised along the flow, ``x = (1-s)·x0 + s·ε``,
to the next stage's start level ``s`` (its strength). Each stage's schedule is the scheduler's own for
that stage's size (so dynamic shifting is recomputed per resolution): an unshifted ramp from the level
whose shifted value is ``s`` down to the stage's last step, shifted by the scheduler as usual.

Caches and guidance keep working inside stages and reset at each transition: every stage is a new
pipeline call to the step runtime. Supported: flow-matching pipelines (``FlowMatchEulerDiscreteScheduler``, or
a solver on flow sigmas that takes a sigma schedule: ``UniPCMultistepScheduler(use_flow_sigmas=True)``)
whose latents are images or videos (CogView4, SD3, Sana, Wan, HunyuanVideo, the reference models), 2x2-packed
tokens (Flux, Chroma, Qwen-Image), 2x2-patchified latents (FLUX.2), flat latent tokens (Qwen-Image 2.1) or
video patch tokens (LTX). LTX-2 takes its de-normalised video latents back with the stage's audio latents and
re-noises both itself (``noise_scale``); its audio scheduler, a copy of the video one, runs the
same stage schedule. Other packings and other schedulers are refused with the reason.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffaccel.config import MethodConfig, check_choice, check_float, check_int, register_config
from diffaccel.registry import AccelTarget, register_method

from .wrapper import call_kwargs, wrap_pipeline_call

logger = logging.getLogger("diffaccel")

# Steps per stage follow RALU's re-run of the paper's settings (SD3: 6/18/7 of 31, FLUX: 4/12/5 of 21),
# rescaled to the call's step count; strengths are the third-party port's 1.0/0.8/0.6.
DEFAULT_SCALES = (1.0, 0.5, 1.0)
DEFAULT_FRACTIONS = (0.2, 0.55, 0.25)
DEFAULT_STRENGTHS = (1.0, 0.8, 0.6)


@register_config
@dataclass(frozen=True)
class BottleneckConfig(MethodConfig):
    """Stages of (spatial scale, share of the steps, start noise level).

    Args:
        scales: spatial scale of each stage (1 = the requested size); the first and last must be 1.
        step_fractions: share of the call's ``num_inference_steps`` each stage runs (sum 1; each stage
            gets at least one step).
        strengths: noise level each stage starts from; the first must be 1 (pure noise).
        resample: latent resampling at transitions, "bicubic" (default), "bilinear" or "nearest".
        stage_steps: steps of each stage as counts, the paper's (N1, N2, N3) form (RALU's FLUX re-run:
            4/12/5 against the 50-step baseline). When set it replaces ``step_fractions`` and the call's
            ``num_inference_steps``: the point of the method is a cheaper trajectory, not the same one.
        steps_ratio: the share of the call's ``num_inference_steps`` the stages run together, split by
            ``step_fractions`` (the counts form scaled to any call: 0.65 with fractions 1/13, 10/13, 2/13 is
            1/10/2 steps at 20). 1 keeps the call's count. Not used with ``stage_steps``.
        min_stage_tokens: latent tokens per frame the smallest stage must keep; a call whose size would go
            below it runs at full resolution instead, with a warning (a stage far below the sizes a model was
            trained at costs more than it saves: the reference models' 64 px calls would run the middle stage
            at 32 px, 4x4 tokens). 0: never fall back.
    """

    slot = "sampling"
    method = "bottleneck"

    scales: tuple[float, ...] = DEFAULT_SCALES
    step_fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    resample: str = "bicubic"
    stage_steps: tuple[int, ...] | None = None
    steps_ratio: float = 1.0
    min_stage_tokens: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        lengths = {len(self.scales), len(self.step_fractions), len(self.strengths)}
        if len(lengths) != 1 or len(self.scales) < 1:
            raise ValueError(f"{name}: scales, step_fractions and strengths need one entry per stage (at least 1), "
                             f"got {len(self.scales)}, {len(self.step_fractions)}, {len(self.strengths)}.")
        if any(not 0.0 < s <= 1.0 for s in self.scales) or self.scales[0] != 1.0 or self.scales[-1] != 1.0:
            raise ValueError(f"{name}.scales must lie in (0, 1] and start and end at 1.0, got {self.scales}.")
        if any(f <= 0 for f in self.step_fractions) or not math.isclose(sum(self.step_fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"{name}.step_fractions must be positive and sum to 1, got {self.step_fractions}.")
        if self.strengths[0] != 1.0 or any(not 0.0 < s <= 1.0 for s in self.strengths):
            raise ValueError(f"{name}.strengths must lie in (0, 1] and start at 1.0, got {self.strengths}.")
        check_choice(name, "resample", self.resample, ("bicubic", "bilinear", "nearest"))
        if self.stage_steps is not None:
            if len(self.stage_steps) != len(self.scales) or any(
                    isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.stage_steps):
                raise ValueError(f"{name}.stage_steps needs one whole number >= 1 per stage ({len(self.scales)} "
                                 f"stages), got {self.stage_steps}.")
        check_float(name, "steps_ratio", self.steps_ratio, minimum=0.0, maximum=1.0)
        if self.steps_ratio <= 0.0:
            raise ValueError(f"{name}.steps_ratio must be > 0 (a share of the call's steps), got {self.steps_ratio}.")
        if self.stage_steps is not None and self.steps_ratio != 1.0:
            raise ValueError(f"{name}.steps_ratio does nothing with stage_steps (the counts are the steps); "
                             f"set one of them.")
        check_int(name, "min_stage_tokens", self.min_stage_tokens, minimum=0)


# ------------------------------------------------------------------------------------------ maths


def stage_steps(fractions: tuple[float, ...], num_steps: int) -> list[int]:
    """Steps per stage: the fractions of ``num_steps``, rounded, at least one each, summing to it."""
    if num_steps < len(fractions):
        raise ValueError(f"bottleneck sampling needs at least {len(fractions)} steps (one per stage), got {num_steps}.")
    steps = [max(1, round(f * num_steps)) for f in fractions]
    while sum(steps) > num_steps:
        steps[steps.index(max(steps))] -= 1
    while sum(steps) < num_steps:
        steps[fractions.index(max(fractions))] += 1
    return steps


def stage_sizes(scales: tuple[float, ...], height: int, width: int, multiple: int) -> list[tuple[int, int]]:
    """(height, width) of each stage; a ValueError naming the size when one is not a whole number of
    ``multiple``-pixel cells (latent cell x patch), rather than a silently changed scale."""

    def side(name: str, full: int, scale: float) -> int:
        exact = full * scale
        pixels = round(exact)
        if abs(exact - pixels) <= 1e-6 and pixels >= multiple and pixels % multiple == 0:
            return pixels
        periods = [multiple / sc for sc in scales]  # a full size every stage divides is a multiple of each
        hint = (f"; e.g. a {name} that is a multiple of {math.lcm(*map(int, periods))} px"
                if all(float(q).is_integer() for q in periods) else "")
        raise ValueError(
            f"sampling='bottleneck': {name} {full} at stage scale {scale:g} gives {exact:g} px, not a multiple "
            f"of {multiple} px (this pipeline's latent cell times its patch size). Choose a size that every "
            f"stage of scales {tuple(scales)} divides{hint}.")

    return [(side("height", height, scale), side("width", width, scale)) for scale in scales]


def unshift(level: float, scheduler, mu: float | None) -> float:
    """The unshifted sigma that ``scheduler``'s shift maps to ``level`` (inverse of its time shift)."""
    if level >= 1.0:
        return 1.0
    config = scheduler.config
    odds = 1.0 / level - 1.0
    if config.get("use_dynamic_shifting"):
        if config.get("time_shift_type", "exponential") == "linear":
            return 1.0 / (1.0 + mu * odds)
        return 1.0 / (1.0 + math.exp(mu) * odds)
    # FlowMatchEuler's shift; a multistep solver's flow_shift (UniPC with use_flow_sigmas)
    shift = float(getattr(scheduler, "shift", None) or config.get("shift") or config.get("flow_shift") or 1.0)
    return level / (shift - (shift - 1.0) * level)


def stage_sigmas(start: float, steps: int) -> list[float]:
    """An unshifted linear ramp of ``steps`` sigmas from ``start``; the scheduler appends the final 0."""
    return [start * (1.0 - i / steps) for i in range(steps)]


def renoise(x0: torch.Tensor, level: float, generator) -> torch.Tensor:
    """Flow-matching forward process to ``level``: (1 - s)·x0 + s·ε."""
    if isinstance(generator, (list, tuple)):
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=torch.float32) for g in generator])
    else:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    return (1.0 - level) * x0 + level * noise


def resize_latents(latents: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (B, C, H, W) or (B, C, F, H, W) latents spatially (frames untouched)."""
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    if latents.dim() == 4:
        return F.interpolate(latents.float(), size=size, mode=mode, **kwargs).to(latents.dtype)
    b, c, f, h, w = latents.shape
    flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).float()
    out = F.interpolate(flat, size=size, mode=mode, **kwargs).to(latents.dtype)
    return out.reshape(b, f, c, *size).permute(0, 2, 1, 3, 4)


def unpack_2x2(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2·w/2, 4C) tokens of 2x2 latent patches (Flux's packing) back to (B, C, h, w) latents."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def patchify_2x2(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents to (B, 4C, h/2, w/2): each 2x2 patch's cells as channels, channel-major (FLUX.2)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents to (B, h/2·w/2, 4C) tokens of 2x2 patches, channel-major within a patch (Flux)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def pack_video_tokens(latents: torch.Tensor, patch: int, patch_t: int) -> torch.Tensor:
    """(B, C, F, H, W) latents to (B, F/pt·H/p·W/p, C·pt·p·p) tokens of pt x p x p patches, frame-major (LTX)."""
    b, c, f, h, w = latents.shape
    x = latents.reshape(b, c, f // patch_t, patch_t, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (f // patch_t) * (h // patch) * (w // patch), c * patch_t * patch * patch)


def unpack_video_tokens(tokens: torch.Tensor, height: int, width: int, patch: int, patch_t: int) -> torch.Tensor:
    """The inverse of :func:`pack_video_tokens` for latents of ``height`` x ``width`` cells (frames follow)."""
    b, s, d = tokens.shape
    grid_h, grid_w = height // patch, width // patch
    groups, channels = s // (grid_h * grid_w), d // (patch_t * patch * patch)
    x = tokens.reshape(b, groups, grid_h, grid_w, channels, patch_t, patch, patch).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, channels, groups * patch_t, height, width)


# ------------------------------------------------------------------------------------------ the wrapper

# Pipelines a stage cannot serve, and why. HiDream-I1 rescales every call to the area of its default size, and
# Kandinsky 5's image pipeline takes a fixed list of sizes; Helios generates chunk by chunk, each chunk from noise of
# its own, and ignores ``latents=``; GLM-Image's AR model samples new prior tokens at each call's grid; PRX's pixel
# pipeline starts from noise of std ``noise_scale`` (2), where the stages re-noise with unit noise.
_FIXED_AREA = ("it rescales every call to the area of its default size (keeping the aspect ratio) or to a fixed list "
               "of sizes, so a stage cannot run at a lower resolution")
_CHUNKED = ("it generates the video chunk by chunk, each chunk from noise of its own, and does not take latents= to "
            "start a stage from")
REFUSED_PIPELINES: dict[str, str] = {
    "HiDreamImagePipeline": _FIXED_AREA,
    "Kandinsky5T2IPipeline": _FIXED_AREA,
    "HeliosPipeline": _CHUNKED,
    "HeliosPyramidPipeline": _CHUNKED,
    "GlmImagePipeline": "its AR model samples the prior image tokens afresh for each call's grid, so every stage "
                        "would follow another sample",
    "PRXPixelPipeline": "it samples in pixel space from noise of std noise_scale, where the re-noising between "
                        "stages draws unit noise",
}

# Call arguments that condition on an image or video; such calls run at full resolution.
CONDITION_ARGS = ("image", "video", "conditions", "control_image", "mask_image", "image_latents", "last_image",
                  "reference_images", "control_video")

PIPELINE_LAYOUTS = ("BCHW", "BCFHW", "BFHWC", "packed2x2", "patchified2x2", "packed_video", "flat_tokens")


@dataclass
class _Geometry:
    spatial_factor: int  # pixels per latent cell
    multiple: int  # stage sizes must be multiples of this many pixels (latent cell x patch)
    layout: str = "BCHW"  # of the pipeline's latents (PIPELINE_LAYOUTS)
    patch: int = 1  # the transformer's spatial patch (packed_video tokens)
    patch_t: int = 1  # and temporal patch


def pipeline_layout(adapter) -> str:
    """How the pipeline hands latents in and out: the adapter's ``pipeline_latents`` or its denoiser's layout."""
    return adapter.pipeline_latents or adapter.latent_layout


def _geometry(pipe, layout: str = "BCHW") -> _Geometry:
    factor = int(getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
                 or getattr(pipe, "vae_spatial_compression_ratio", None) or 8)
    config = pipe.transformer.config
    patch = getattr(config, "patch_size", None) or getattr(config, "all_patch_size", None) or 1
    patch = patch[-1] if isinstance(patch, (tuple, list)) else (patch or 1)
    if layout == "flat_tokens":  # its pipeline rounds the latent size down to an even number of cells
        return _Geometry(factor, factor * 2 * int(patch), layout)
    if layout == "packed_video":
        return _Geometry(factor, factor * int(patch), layout, int(patch), int(getattr(config, "patch_size_t", 1) or 1))
    if layout == "packed2x2":  # the pipeline packs 2x2 latent cells into one token, then the transformer patches
        patch = 2 * int(patch)
    if layout == "patchified2x2":  # the latents handed over hold one cell per 2x2 patch of the VAE's latent
        factor *= 2
    return _Geometry(factor, factor * int(patch), layout)


def flux2_stage_latents(pipe, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A FLUX.2 stage's ``output_type="latent"`` as its ``latents=`` takes it: (B, 4C, h, w) 2x2-patchified
    latents normalised by the VAE's batch-norm statistics. [dev] returns them packed into (B, h·w, 4C) tokens;
    [klein] unpatchified and de-normalised, (B, C, 2h, 2w), ready for its VAE."""
    if latents.dim() == 3:
        b, _, channels = latents.shape
        return latents.permute(0, 2, 1).reshape(b, channels, *size)
    expected = pipe.transformer.config.in_channels
    if latents.dim() != 4 or latents.shape[1] * 4 != expected:
        raise ValueError(f"bottleneck sampling: {type(pipe).__name__} returned latents of shape "
                         f"{tuple(latents.shape)}, neither (B, h·w, {expected}) tokens nor (B, {expected // 4}, 2h, 2w) latents.")
    patched = patchify_2x2(latents)
    bn = pipe.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(patched)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(patched)
    return (patched - mean) / std


def stage_latents(pipe, geometry: _Geometry, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A stage's latent output in the layout the pipeline's ``latents=`` takes (``size``: its latent size)."""
    if geometry.layout == "patchified2x2":
        return flux2_stage_latents(pipe, latents, size)
    return latents


def resize_pipeline_latents(latents: torch.Tensor, geometry: _Geometry, current: tuple[int, int],
                            size: tuple[int, int], mode: str) -> torch.Tensor:
    """A stage's latents, in the pipeline's own layout, resized from latent size ``current`` to ``size``."""
    if geometry.layout == "packed2x2":
        return pack_2x2(resize_latents(unpack_2x2(latents, *current), size, mode))
    if geometry.layout == "flat_tokens":
        b, _, channels = latents.shape
        image = latents.transpose(1, 2).reshape(b, channels, *current)
        return resize_latents(image, size, mode).reshape(b, channels, size[0] * size[1]).transpose(1, 2)
    if geometry.layout == "BFHWC":  # channels last (Kandinsky 5)
        return resize_latents(latents.permute(0, 4, 1, 2, 3), size, mode).permute(0, 2, 3, 4, 1).contiguous()
    if geometry.layout == "packed_video":
        video = unpack_video_tokens(latents, *current, geometry.patch, geometry.patch_t)
        return pack_video_tokens(resize_latents(video, size, mode), geometry.patch, geometry.patch_t)
    if tuple(latents.shape[-2:]) == size:
        return latents
    return resize_latents(latents, size, mode)


def _encode_once(pipe, kwargs: dict) -> dict:
    """Prompt embeddings computed once, as the pipeline's own ``encode_prompt`` makes them."""
    call_params = inspect.signature(type(pipe).__call__).parameters
    if "prompt_embeds" not in call_params or kwargs.get("prompt_embeds") is not None or kwargs.get("prompt") is None:
        return kwargs
    encode = pipe.encode_prompt
    params = inspect.signature(encode).parameters
    if "negative_prompt" not in params:  # its two outputs are not (positive, negative), e.g. Qwen-Image's (embeds, mask)
        return kwargs
    guidance = kwargs.get("guidance_scale", call_params["guidance_scale"].default if "guidance_scale" in call_params else 1.0)
    request = {"prompt": kwargs["prompt"]}
    if "do_classifier_free_guidance" in params:  # HunyuanVideo's encoder has no such switch
        request["do_classifier_free_guidance"] = guidance > 1.0
    for name in ("negative_prompt", "max_sequence_length", "num_images_per_prompt", "num_videos_per_prompt"):
        if name in params and kwargs.get(name) is not None:
            request[name] = kwargs[name]
    if "device" in params:
        request["device"] = pipe._execution_device
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in request
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:  # an encoder with more inputs (SD3's three prompts): let each stage encode
        logger.debug("bottleneck: %s.encode_prompt needs %s; each stage encodes the prompt", type(pipe).__name__, required)
        return kwargs
    outputs = encode(**request)
    if not isinstance(outputs, tuple) or len(outputs) != 2:
        return kwargs  # an encoder with more outputs (pooled embeddings...): let each stage encode
    out = dict(kwargs)
    out.pop("prompt")
    out.pop("negative_prompt", None)
    out["prompt_embeds"], out["negative_prompt_embeds"] = outputs
    return out


def _stage_schedule(scheduler, current, start: float, steps: int):
    """``scheduler.set_timesteps`` (``current``) made to run this stage's ramp. A deep copy of the scheduler
    made during the stage (LTX-2's audio scheduler) runs the same ramp (``for_copy``)."""

    def set_timesteps(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None, **extra):
        ramp = stage_sigmas(unshift(start, scheduler, mu), steps)
        if timesteps is not None:  # pipelines that pass both (CogView4) feed the unshifted values to the model
            extra["timesteps"] = [s * scheduler.config.num_train_timesteps for s in ramp]
        # an array: multistep solvers on flow sigmas (UniPC) compute with it directly
        return current(device=device, sigmas=np.asarray(ramp, dtype=np.float64), mu=mu, **extra)

    wrapper = functools.update_wrapper(set_timesteps, current)
    wrapper.for_copy = lambda duplicate: _stage_schedule(duplicate, duplicate.set_timesteps, start, steps)
    return wrapper


def _set_stage_schedule(scheduler, start: float, steps: int):
    """Make the pipeline's next ``set_timesteps`` use this stage's ramp; returns an undo function."""
    current = scheduler.set_timesteps
    scheduler.set_timesteps = _stage_schedule(scheduler, current, start, steps)

    def undo() -> None:
        scheduler.set_timesteps = current

    return undo


def with_visual_condition(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Kandinsky 5's ``latents=`` with its visual-condition channels: a model built with ``visual_cond`` takes
    [latents, condition, mask] channels-last, which its latent output leaves out; text-to-video has them zero."""
    if getattr(pipe.transformer, "visual_cond", False):
        zeros = torch.zeros_like(latents)
        return torch.cat([latents, zeros, zeros[..., :1]], dim=-1)
    return latents


def _renoises_itself(pipe, geometry: _Geometry) -> bool:
    """Pipelines whose ``noise_scale`` re-noises given latents in their own normalised space: LTX-2, whose
    ``latents=`` and latent output are de-normalised (B, C, F, H, W) video latents, with audio latents beside.
    (LTX-Video's condition pipeline also takes a ``noise_scale``, over its packed tokens: re-noised here.)"""
    return geometry.layout == "BCFHW" and "noise_scale" in inspect.signature(type(pipe).__call__).parameters


def _latents_of(output) -> torch.Tensor:
    for name in ("frames", "images", "video"):  # Cosmos 3: one video, its latent output (1, C, T, H, W)
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError("bottleneck sampling: the pipeline returned no latent tensor for output_type='latent'.")


def bottleneck_call(pipe, original_call, config: BottleneckConfig, args: tuple, kwargs: dict):
    """One accelerated pipeline call: the stages, each an ordinary call of the pipeline."""
    kwargs = call_kwargs(original_call, args, kwargs)
    call_params = inspect.signature(original_call).parameters
    defaults = {name: p.default for name, p in call_params.items() if p.default is not inspect.Parameter.empty}
    num_steps = kwargs.get("num_inference_steps", defaults.get("num_inference_steps"))
    runtime = getattr(pipe, "_diffaccel_runtime", None)
    geometry = _geometry(pipe, pipeline_layout(runtime.adapter) if runtime is not None else "BCHW")
    height = kwargs.get("height") or defaults.get("height") or pipe.default_sample_size * geometry.spatial_factor
    width = kwargs.get("width") or defaults.get("width") or pipe.default_sample_size * geometry.spatial_factor
    output_type = kwargs.get("output_type", defaults.get("output_type", "pil"))
    return_dict = kwargs.get("return_dict", True)
    generator = kwargs.get("generator")
    if config.stage_steps is not None:
        steps = list(config.stage_steps)
        if "num_inference_steps" in kwargs and int(num_steps) != sum(steps):
            logger.info("bottleneck: stage_steps %s (%d steps) replace num_inference_steps=%s",
                        steps, sum(steps), num_steps)
    else:
        budget = max(len(config.scales), round(config.steps_ratio * int(num_steps)))
        steps = stage_steps(config.step_fractions, budget)
    sizes = stage_sizes(config.scales, int(height), int(width), geometry.multiple)
    tokens = min((h // geometry.multiple) * (w // geometry.multiple) for h, w in sizes)
    conditions = [name for name in CONDITION_ARGS if kwargs.get(name) is not None]
    reason = None
    if conditions:
        reason = (f"a call of {type(pipe).__name__} given {', '.join(conditions)} runs at full resolution: an image "
                  f"or video condition is held at the call's size (LTX's and HunyuanVideo's pinned first frame, "
                  f"img2img's start) or keeps its own token positions (Flux Kontext, FLUX.2 references), which "
                  f"a half-size stage would mismatch (caches and guidance still apply)")
    elif tokens < config.min_stage_tokens:
        reason = (f"a {int(height)}x{int(width)} call's smallest stage would keep {tokens} latent tokens per frame, "
                  f"fewer than min_stage_tokens={config.min_stage_tokens}; calls of this size run at full "
                  f"resolution (caches and guidance still apply)")
    if reason is not None:
        _warn_once(runtime, reason)
        output = original_call(pipe, **kwargs)
        if runtime is not None:
            runtime.count("bottleneck_full_resolution_calls", 1)
        return output
    kwargs = _encode_once(pipe, dict(kwargs))
    total_stats = None
    latents = kwargs.pop("latents", None)
    audio = None
    output = None
    for k, ((stage_h, stage_w), n, strength) in enumerate(zip(sizes, steps, config.strengths)):
        last = k == len(steps) - 1
        extra = {}
        if latents is not None and k > 0:
            size = (stage_h // geometry.spatial_factor, stage_w // geometry.spatial_factor)
            previous = (sizes[k - 1][0] // geometry.spatial_factor, sizes[k - 1][1] // geometry.spatial_factor)
            latents = resize_pipeline_latents(latents, geometry, previous, size, config.resample)
            if _renoises_itself(pipe, geometry):  # and its audio latents, to the same level
                extra = {"noise_scale": strength}
                if audio is not None:
                    extra["audio_latents"] = audio
            else:
                latents = renoise(latents, strength, generator)
                if audio is not None and "audio_latents" in call_params:  # Kandinsky 6: its audio to the same level
                    extra["audio_latents"] = renoise(audio, strength, generator)
        stage_input = latents
        if latents is not None and k > 0 and geometry.layout == "BFHWC":
            stage_input = with_visual_condition(pipe, latents)
        stage = dict(kwargs, height=stage_h, width=stage_w, num_inference_steps=n, latents=stage_input,
                     output_type=output_type if last else "latent", return_dict=True if not last else return_dict,
                     **extra)
        # One stage has nothing to line up with: it runs the pipeline's own schedule (the plain call).
        undo = _set_stage_schedule(pipe.scheduler, strength, n) if len(steps) > 1 else (lambda: None)
        try:
            output = original_call(pipe, **stage)
        finally:
            undo()
        if runtime is not None:  # each stage is a call of its own to the runtime: sum them into one
            total_stats = runtime.add_call_to(total_stats)
        if not last:
            size = (stage_h // geometry.spatial_factor, stage_w // geometry.spatial_factor)
            latents = stage_latents(pipe, geometry, _latents_of(output), size)
            audio = getattr(output, "audio", None)
            audio = audio if isinstance(audio, torch.Tensor) else None
    if runtime is not None and total_stats is not None:
        runtime.set_call_stats(total_stats)
        runtime.count("bottleneck_stages", len(steps))
    return output


def _warn_once(runtime, reason: str) -> None:
    """Say once per reason and acceleration why calls run without the bottleneck."""
    warned = getattr(runtime, "_bottleneck_warned", None)
    if warned is None:
        warned = set()
        if runtime is not None:
            runtime._bottleneck_warned = warned
    if reason not in warned:
        warned.add(reason)
        logger.warning("bottleneck: %s", reason)


@register_method(BottleneckConfig)
class BottleneckHandler:
    def validate(self, config: BottleneckConfig, target: AccelTarget) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe = target.pipe
        name = type(pipe).__name__
        scheduler = getattr(pipe, "scheduler", None)
        flow_solver = (scheduler is not None and scheduler.config.get("use_flow_sigmas")
                       and "sigmas" in inspect.signature(scheduler.set_timesteps).parameters)
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and not flow_solver:
            raise ValueError(
                f"sampling='bottleneck' cannot serve {name}: its scheduler is {type(scheduler).__name__}, and the "
                f"re-noising between stages is defined for flow matching (FlowMatchEulerDiscreteScheduler, or a "
                f"solver on flow sigmas that takes a sigma schedule, as UniPCMultistepScheduler(use_flow_sigmas=True))."
            )
        config_of = scheduler.config
        if config_of.get("shift_terminal") or config_of.get("use_karras_sigmas") or config_of.get("use_exponential_sigmas") \
                or config_of.get("use_beta_sigmas") or config_of.get("invert_sigmas"):
            raise ValueError(f"sampling='bottleneck' cannot serve {name}: its scheduler reshapes sigmas "
                             f"(shift_terminal / karras / exponential / beta / inverted, as Mochi's), so a stage's "
                             f"start level is not defined.")
        layout = pipeline_layout(target.adapter)
        if layout not in PIPELINE_LAYOUTS:
            forms = {"CFHW_LIST": "a list of per-image tensors", "BFHWC": "channels-last latents"}
            form = forms.get(layout, "packed tokens")
            raise ValueError(
                f"sampling='bottleneck' cannot serve {name} yet: it hands its latents over as {form} "
                f"({layout}) in a packing this version does not resize (it resizes {', '.join(PIPELINE_LAYOUTS)})."
            )
        refusal = next((REFUSED_PIPELINES[c.__name__] for c in type(pipe).__mro__ if c.__name__ in REFUSED_PIPELINES), None)
        if refusal is not None:
            raise ValueError(f"sampling='bottleneck' cannot serve {name}: {refusal}.")
        params = inspect.signature(type(pipe).__call__).parameters
        missing = [p for p in ("latents", "height", "width", "output_type", "num_inference_steps") if p not in params]
        if missing:
            raise ValueError(f"sampling='bottleneck' cannot serve {name}: its __call__ takes no {missing}.")

    def apply(self, config: BottleneckConfig, target: AccelTarget, runtime) -> None:
        wrap_pipeline_call(target.pipe, runtime.add_cleanup)

    def call(self, pipe, original_call, config: BottleneckConfig, args: tuple, kwargs: dict):
        return bottleneck_call(pipe, original_call, config, args, kwargs)
