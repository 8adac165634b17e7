"""Baselines of the ResShift benchmark, on the same network (``models``) and x0 parameterisation.

* Flow matching from pure noise (conditional rectified flow, LR concatenated): x_s = (1 - s) noise +
  s x0, s in [0, 1); the network gives x0 = y - output; Euler steps of the velocity (x0_hat - x_s)/(1 - s)
  from s = 0 (pure noise) to 1 — the last step lands on x0_hat exactly. One network call per step.
* Regression: one call, x0 = y - UNet(y ⊕ y, t=0) — the lower bound of "perceptual" quality.
* Bicubic and Lanczos upsampling (PIL), no network.

All take LR (N, 3, h, w) in [0, 1] and return HR (N, 3, s h, s w) in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from .models import condition, sr_forward

FLOW_TIME_SCALE = 1000.0  # the UNet's timestep input is s * 1000 (the range its sinusoidal embedding is built for)


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) noise + s x0 (rectified flow, s = 0 noise, s = 1 data)."""
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * noise + s * x0


def flow_euler_step(x: torch.Tensor, x0_hat: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    """x_{s'} = x_s + (s' - s) (x0_hat - x_s) / (1 - s): an Euler step of the flow's velocity."""
    return x + (s_next - s) * (x0_hat - x) / (1.0 - s)


@torch.no_grad()
def flow_upscale(unet, lr: torch.Tensor, steps: int, factor: int = 2, generator=None) -> torch.Tensor:
    """``steps`` Euler steps from pure noise; ``generator``: one, or a list with one per image."""
    y = condition(lr, factor)
    if isinstance(generator, (list, tuple)):
        x = torch.stack([torch.randn(y.shape[1:], generator=g) for g in generator])
    else:
        x = torch.randn(y.shape, generator=generator)
    grid = np.linspace(0.0, 1.0, steps + 1)
    for s, s_next in zip(grid[:-1], grid[1:]):
        t = torch.full((y.shape[0],), float(s) * FLOW_TIME_SCALE)
        x0_hat = (y - sr_forward(unet, x, y, t)).clamp(-1, 1)
        x = flow_euler_step(x, x0_hat, float(s), float(s_next))
    return ((x + 1) / 2).clamp(0, 1)


@torch.no_grad()
def regression_upscale(unet, lr: torch.Tensor, factor: int = 2) -> torch.Tensor:
    y = condition(lr, factor)
    x0_hat = y - sr_forward(unet, y, y, torch.zeros(y.shape[0]))
    return ((x0_hat + 1) / 2).clamp(0, 1)


def pil_upscale(lr: torch.Tensor, factor: int = 2, method: str = "bicubic") -> torch.Tensor:
    """PIL's bicubic or Lanczos resize of every image (uint8 round trip, as a user would get)."""
    from PIL import Image

    resample = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}[method]
    out = []
    for img in lr:
        arr = (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        h, w = arr.shape[:2]
        big = Image.fromarray(arr).resize((w * factor, h * factor), resample)
        out.append(torch.from_numpy(np.asarray(big, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)
