"""``ResShiftPipeline``: few-step super-resolution of images and video frames by residual shifting.

    from diffaccel.pipelines import reference
    pipe = reference.load("upscale")            # the shipped x2 model, T = 4 (journal settings)
    pipe = reference.load("upscale15")          # the T = 15 model (NeurIPS settings)
    out = pipe(image=pil_or_tensor_or_list, generator=torch.Generator().manual_seed(0))
    out.images                                  # upscaled by pipe.config.scale_factor
    out = pipe(frames=[frame0, frame1, ...])    # one clip: the same noise on every frame (less flicker)
    out.frames                                  # shaped like the input; out.images: every frame

Registered modules: ``unet`` (a ``UNet2DModel``, see ``models``) and ``scheduler``
(``diffaccel.sampling.ResShiftScheduler``). Saves and loads with ``save_pretrained`` /
``ResShiftPipeline.from_pretrained(folder)``; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from diffaccel.sampling.resshift import ResShiftScheduler

from .models import condition, size_multiple, sr_forward

MIN_LR_SIZE = 8  # px; smaller inputs carry too little to upscale (and reflect padding needs room)


@dataclass
class ResShiftPipelineOutput(BaseOutput):
    """images: every output image (frames flattened in order), as PIL list / (N, H, W, 3) array in
    [0, 1] / (N, 3, H, W) tensor in [0, 1]; frames: for ``frames=`` input, the clips shaped like the
    input (a list for a list, (B, F, ...) for a 5-D tensor); else None."""

    images: Any
    frames: Any = None


# ------------------------------------------------------------------------------------------ inputs


def _pil_to_tensor(img) -> torch.Tensor:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def _array_to_tensor(x, what: str) -> torch.Tensor:
    """numpy / torch, (3, H, W) / (H, W, 3) / (N, ...) -> float (N, 3, H, W) in [0, 1]."""
    t = torch.from_numpy(np.array(x)) if not isinstance(x, torch.Tensor) else x.detach()
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif not t.is_floating_point():
        raise ValueError(f"{what} must be float in [0, 1] or uint8, got dtype {t.dtype}.")
    t = t.float().cpu()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"{what} must be (3, H, W), (H, W, 3) or a batch (N, 3, H, W) / (N, H, W, 3); got shape {tuple(t.shape)}.")
    channels_first = t.shape[1] == 3
    channels_last = t.shape[-1] == 3
    is_tensor = isinstance(x, torch.Tensor)  # tensors are read channels-first, arrays channels-last, first
    if channels_last and (not is_tensor or not channels_first):
        t = t.permute(0, 3, 1, 2)
    elif not channels_first:
        channels = t.shape[1] if is_tensor else t.shape[-1]
        raise ValueError(
            f"{what} must have 3 color channels (RGB), got {channels} in shape {tuple(t.shape)}: "
            "the super-resolution model is trained on RGB (convert grayscale/RGBA to RGB first)."
        )
    if t.numel() and (t.min() < -1e-3 or t.max() > 1 + 1e-3):
        raise ValueError(
            f"{what} values must lie in [0, 1] (got [{t.min():.3f}, {t.max():.3f}]); "
            "convert from [-1, 1] with (x + 1) / 2 or pass uint8."
        )
    return t.clamp(0, 1).contiguous()


def _to_batch(items, what: str) -> torch.Tensor:
    """One image, a list of images (PIL / arrays / tensors, same size), or a batch -> (N, 3, h, w)."""
    from PIL import Image

    if isinstance(items, Image.Image):
        return _pil_to_tensor(items).unsqueeze(0)
    if isinstance(items, (list, tuple)):
        if not items:
            raise ValueError(f"{what} is an empty list.")
        parts = [_to_batch(it, f"{what}[{i}]") for i, it in enumerate(items)]
        sizes = {tuple(p.shape[-2:]) for p in parts}
        if len(sizes) > 1:
            raise ValueError(f"Every item of {what} must have the same size to be batched, got {sorted(sizes)}.")
        return torch.cat(parts)
    return _array_to_tensor(items, what)


# ------------------------------------------------------------------------------------------ pipeline


class ResShiftPipeline(DiffusionPipeline):
    """Super-resolution by residual shifting (ResShift, Yue et al. 2023): start from the upsampled LR
    image plus noise, take the scheduler's few exact posterior steps with the UNet's x0 estimate.

    Args:
        unet: ``UNet2DModel`` taking x_t ⊕ y (space-to-depth, see ``models.sr_forward``).
        scheduler: ``ResShiftScheduler`` (its T is the most steps a call may take).
        scale_factor: upscaling factor the model is trained for (LR -> HR size).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler: ResShiftScheduler, scale_factor: int = 2):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(scale_factor=int(scale_factor))

    @property
    def scale_factor(self) -> int:
        return int(self.config.scale_factor)

    def _check_size(self, lr: torch.Tensor, what: str) -> None:
        h, w = lr.shape[-2:]
        if min(h, w) < MIN_LR_SIZE:
            raise ValueError(
                f"{what} is {w}x{h} px; this x{self.scale_factor} model needs at least "
                f"{MIN_LR_SIZE}x{MIN_LR_SIZE} px (smaller images carry too little to upscale and the UNet "
                f"downsamples by {size_multiple(self.unet)} at the output size)."
            )

    def _pad(self, lr: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Reflect-pad the LR batch so that the HR size is a multiple of the UNet's; returns the HR crop size."""
        h, w = lr.shape[-2:]
        m = max(1, size_multiple(self.unet) // self.scale_factor)
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            lr = F.pad(lr, (0, pw, 0, ph), mode="reflect")
        return lr, (h * self.scale_factor, w * self.scale_factor)

    @staticmethod
    def _generators(generator, groups: int) -> list:
        if isinstance(generator, (list, tuple)):
            if len(generator) != groups:
                raise ValueError(
                    f"Got {len(generator)} generators for {groups} images/clips; pass one per image (per clip "
                    "for frames=), or a single generator."
                )
            return list(generator)
        return [generator] * groups

    @staticmethod
    def _noise(gens: list, group_of: torch.Tensor, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
        """Standard normal noise (N, *shape): one draw per group (images / clips), shared inside a group."""
        draws = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        return draws[group_of].to(device=device, dtype=dtype)

    @torch.no_grad()
    def upscale_tensor(
        self,
        lr: torch.Tensor,
        num_inference_steps: int | None = None,
        generator=None,
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, 3, h, w) in [0, 1] -> (N, 3, s h, s w) in [0, 1]; ``groups`` (N,) ints share noise."""
        self._check_size(lr, "The input image")
        n = lr.shape[0]
        groups = torch.arange(n) if groups is None else torch.as_tensor(groups).long()
        _, unique = torch.unique(groups, return_inverse=True)
        num_groups = int(unique.max()) + 1 if n else 0
        gens = self._generators(generator, num_groups)
        self.scheduler.set_timesteps(num_inference_steps)  # ValueError above T
        device = self._execution_device
        dtype = self.unet.dtype
        padded, (H, W) = self._pad(lr)
        y = condition(padded.to(device=device, dtype=dtype), self.scale_factor)
        shape = tuple(y.shape[1:])
        x = self.scheduler.init_noise(y, self._noise(gens, unique, shape, device, dtype))
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(self.progress_bar(timesteps)):
            t_batch = torch.full((n,), int(t), device=device, dtype=torch.long)
            model_in = self.scheduler.scale_model_input(x, t_batch)
            out = sr_forward(self.unet, model_in, y, t_batch)
            last = i == len(timesteps) - 1
            noise = None if last else self._noise(gens, unique, shape, device, dtype)
            x = self.scheduler.step(out, int(t), x, y=y, noise=noise).prev_sample
        return ((x[..., :H, :W].float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()

    @staticmethod
    def _format(x: torch.Tensor, output_type: str):
        if output_type == "pt":
            return x
        arr = x.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return arr
        from PIL import Image

        return [Image.fromarray((a * 255.0 + 0.5).astype(np.uint8)) for a in arr]

    def __call__(
        self,
        image=None,
        frames=None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        share_noise_across_frames: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Upscale ``image`` (PIL image, (3, h, w) / (h, w, 3) array or tensor, an (N, ...) batch, or a
        list of those) or ``frames`` (one clip as a list of frames or an (F, ...) batch, or clips as a
        5-D (B, F, 3, h, w) / (B, F, h, w, 3) tensor). Pixels in [0, 1] (or uint8).

        num_inference_steps: at most the scheduler's T (default T). generator: one, or a list with one
        per image / per clip. share_noise_across_frames: frames of a clip get the same noise (default;
        limits flicker). output_type: "pil", "np" or "pt".
        """
        if (image is None) == (frames is None):
            raise ValueError("Pass exactly one of image= or frames=.")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        clips_shape = None
        if image is not None:
            lr = _to_batch(image, "image")
            groups = None
        else:
            if isinstance(frames, (torch.Tensor, np.ndarray)) and np.ndim(frames) == 5:
                t5 = torch.as_tensor(np.asarray(frames)) if isinstance(frames, np.ndarray) else frames
                b, f = t5.shape[:2]
                lr = _to_batch(t5.reshape(b * f, *t5.shape[2:]) if isinstance(frames, torch.Tensor)
                               else np.asarray(frames).reshape(b * f, *frames.shape[2:]), "frames")
                clips_shape = (b, f)
            else:
                lr = _to_batch(frames, "frames")
                b, f = 1, lr.shape[0]
            groups = torch.arange(b).repeat_interleave(f) if share_noise_across_frames else None
        x = self.upscale_tensor(lr, num_inference_steps, generator, groups)
        images = self._format(x, output_type)
        clips = None
        if frames is not None:
            if clips_shape is None:
                clips = images
            elif output_type == "pil":
                b, f = clips_shape
                clips = [images[i * f : (i + 1) * f] for i in range(b)]
            else:
                clips = images.reshape(*clips_shape, *images.shape[1:])
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, clips)
        return ResShiftPipelineOutput(images=images, frames=clips)
