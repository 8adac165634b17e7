"""Training and evaluation data of the super-resolution models: HR images and their degraded LR copies.

* ``degrade(hr, factor, rng)``: the degradation the models are trained to undo — optional Gaussian
  blur, bicubic (antialiased) downsampling by ``factor``, optional Gaussian noise, clamped to [0, 1].
* ``procedural_hr(rng, n, resolution)``: procedural scenes (``reference.scenes``) rendered at HR.
* ``reference_outputs(...)``: a cache of the reference image model's own 128 px outputs (generated
  once, saved under ``work/``, not shipped), the second training source and the second test set.

Pixels here are float tensors (N, 3, H, W) in [0, 1]; the models see them in [-1, 1].
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TRAIN_SCENE_SEED = 20261202  # procedural training scenes (the evaluation sets use other seed streams)
HELDOUT_SCENE_SEED = 777  # held-out procedural test images
TRAIN_PROMPT_SEED = 4242  # captions of the cached reference-model training outputs
HELDOUT_PROMPTS_SEED = 1234  # scenes.prompt_set's default: the held-out reference-model outputs


@dataclass(frozen=True)
class Degradation:
    """Blur sigma range (HR pixels), probability of blur, noise std range ([0, 1] scale), probability of noise."""

    factor: int = 2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 1.0)
    noise_prob: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.02)


CLEAN = Degradation(blur_prob=0.0, noise_prob=0.0)  # bicubic only: the evaluation degradation


def _gaussian_kernel(sigma: float, radius: int = 3) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (reflect padding) of (N, C, H, W)."""
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic, antialiased downsampling by an integer factor."""
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(h // factor, w // factor), mode="bicubic", align_corners=False, antialias=True)


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic upsampling by an integer factor (the LR condition and the starting point of ResShift)."""
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(h * factor, w * factor), mode="bicubic", align_corners=False)


def degrade(hr: torch.Tensor, rng: np.random.Generator | None = None, spec: Degradation = CLEAN) -> torch.Tensor:
    """LR copy of HR (N, 3, H, W) in [0, 1]: per image optional blur, bicubic down, optional noise."""
    out = []
    for img in hr.split(1):
        if rng is not None and rng.random() < spec.blur_prob:
            img = blur(img, float(rng.uniform(*spec.blur_sigma)))
        img = downsample(img, spec.factor)
        if rng is not None and rng.random() < spec.noise_prob:
            std = float(rng.uniform(*spec.noise_std))
            img = img + std * torch.from_numpy(rng.standard_normal(img.shape).astype(np.float32))
        out.append(img)
    return torch.cat(out).clamp(0.0, 1.0)


def procedural_hr(rng: np.random.Generator, n: int, resolution: int = 128) -> tuple[torch.Tensor, list[str]]:
    """n procedural scenes rendered at ``resolution``: (n, 3, H, W) in [0, 1] and their captions."""
    from diffaccel.pipelines.reference import scenes

    pixels, captions, _ = scenes.sample_batch(rng, n, resolution)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions


def heldout_procedural(n: int = 200, resolution: int = 128) -> tuple[torch.Tensor, list[str]]:
    """The held-out procedural test set (its own seed stream)."""
    return procedural_hr(np.random.default_rng(HELDOUT_SCENE_SEED), n, resolution)


# ------------------------------------------------------------------------------------------ reference outputs


def reference_prompts(split: str, n: int) -> tuple[list[str], list[int]]:
    """Captions and seeds of the cached reference-model outputs: "train" or "heldout" (= the first n of
    ``scenes.prompt_set()``, seed i for prompt i, the prompts and seeds of the reference evaluation)."""
    from diffaccel.pipelines.reference import scenes

    if split == "heldout":
        return scenes.prompt_set(n, seed=HELDOUT_PROMPTS_SEED), list(range(n))
    if split == "train":
        return scenes.prompt_set(n, seed=TRAIN_PROMPT_SEED), [100_000 + i for i in range(n)]
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")


def cache_path(folder: Path, split: str, resolution: int) -> Path:
    return Path(folder) / f"reference_{split}_{resolution}.npz"


def load_cache(folder: Path, split: str, resolution: int = 128) -> tuple[torch.Tensor, list[str], list[int]]:
    """(n, 3, H, W) in [0, 1], captions, seeds of a cached split; ValueError naming the command if missing."""
    path = cache_path(folder, split, resolution)
    if not path.is_file():
        raise ValueError(
            f"No cached reference-model outputs at {path}; make them with "
            f"`python scripts/train_resshift.py cache --split {split}`."
        )
    data = np.load(path)
    pixels = torch.from_numpy(data["pixels"]).permute(0, 3, 1, 2).float() / 255.0
    return pixels, [str(c) for c in data["captions"]], [int(s) for s in data["seeds"]]


def make_cache(folder: Path, split: str, n: int, resolution: int = 128, batch_size: int = 8, log=print) -> Path:
    """Generate (or continue generating) n reference-model outputs at ``resolution`` with the model's
    default steps and guidance; saved after every batch (uint8), so an interrupted run resumes."""
    from diffaccel.pipelines import reference

    prompts, seeds = reference_prompts(split, n)
    path = cache_path(folder, split, resolution)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = np.zeros((0, resolution, resolution, 3), np.uint8)
    if path.is_file():
        done = np.load(path)["pixels"][:n]
    if len(done) >= n:
        log(f"{path}: {len(done)} outputs already cached")
        return path
    pipe = reference.load("image")
    kwargs = reference.call_defaults("image")
    kwargs["height"] = kwargs["width"] = resolution
    start = time.time()
    while len(done) < n:
        i = len(done)
        chunk = prompts[i : i + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch_size]]
        images = pipe(chunk, generator=generators, output_type="np", **kwargs).images
        done = np.concatenate([done, (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)])
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, pixels=done, captions=np.array(prompts[: len(done)]), seeds=np.array(seeds[: len(done)]))
        tmp.replace(path)
        log(f"{split}: {len(done)}/{n} cached ({(time.time() - start) / 60:.1f} min)")
    (path.with_suffix(".json")).write_text(json.dumps({"call": kwargs, "n": n, "split": split}) + "\n")
    return path
