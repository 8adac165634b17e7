"""The super-resolution network: a small diffusers ``UNet2DModel`` on space-to-depth pixels.

The models here work in *pixel* space (the official ResShift works in a VQGAN f=4 latent; the
reference models' 4x VAE blurs the small shapes of our scenes, so at 64 -> 128 px pixel space is the
honest choice). The network input is x_t concatenated with the bicubic-upsampled LR image y (6
channels at the HR size); a 2x2 space-to-depth (``pixel_unshuffle``) turns that into 24 channels at
half the HR size, the UNet runs there, and ``pixel_shuffle`` brings its 12 output channels back to 3
at the HR size (as Real-ESRGAN's x2 model does: a quarter of the cost of running at HR). The UNet's
own config says it all: ``in_channels = 6 * r**2`` gives r.

ResShift, the flow-matching baseline and the regression baseline all use this network and the same
x0 parameterisation (x0 = y - output, the official code's ``residual`` prediction type).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGE_CHANNELS = 3
DEFAULT_CHANNELS = (32, 64, 96)


def make_unet(space_to_depth: int = 2, channels: tuple[int, ...] = DEFAULT_CHANNELS, sample_size: int = 64):
    """A fresh ``UNet2DModel``: (2 * 3 * r^2) channels in, 3 * r^2 out, one ResNet block per level, no
    attention (a global operation that does not carry over from training crops to whole images), and a
    zero output layer, so that an untrained model returns the bicubic upsample (x0 = y - 0)."""
    from diffusers import UNet2DModel

    r2 = space_to_depth**2
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=2 * IMAGE_CHANNELS * r2,
        out_channels=IMAGE_CHANNELS * r2,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        norm_num_groups=8,
        add_attention=False,
    )
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    return unet


def space_to_depth_of(unet) -> int:
    """r such that the UNet takes 2 * 3 * r^2 channels (x_t and y, each 3 channels, unshuffled by r)."""
    cin, cout = int(unet.config.in_channels), int(unet.config.out_channels)
    r = math.isqrt(cin // (2 * IMAGE_CHANNELS))
    if 2 * IMAGE_CHANNELS * r * r != cin or IMAGE_CHANNELS * r * r != cout:
        raise ValueError(
            f"The super-resolution UNet must take 6*r^2 channels (x_t and the LR condition, RGB each, "
            f"space-to-depth r) and give 3*r^2; this one takes {cin} and gives {cout}."
        )
    return r


def size_multiple(unet) -> int:
    """HR height/width must be a multiple of this (space-to-depth times the UNet's downsampling)."""
    levels = len(unet.config.block_out_channels)
    return space_to_depth_of(unet) * 2 ** (levels - 1)


def sr_forward(unet, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network's output at the HR size: UNet(unshuffle(x ⊕ y), t), shuffled back. x, y: (B, 3, H, W)."""
    r = space_to_depth_of(unet)
    h = torch.cat([x, y], dim=1)
    if r > 1:
        h = F.pixel_unshuffle(h, r)
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    out = unet(h, t).sample
    return F.pixel_shuffle(out, r) if r > 1 else out


def condition(lr01: torch.Tensor, factor: int) -> torch.Tensor:
    """y: the LR image (N, 3, h, w) in [0, 1] upsampled bicubically by ``factor``, clamped, in [-1, 1]."""
    h, w = lr01.shape[-2:]
    up = F.interpolate(lr01, size=(h * factor, w * factor), mode="bicubic", align_corners=False)
    return up.clamp(0.0, 1.0) * 2.0 - 1.0


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |∇pred - ∇target| over horizontal and vertical finite differences (a weight-free edge loss)."""
    dx = (pred[..., :, 1:] - pred[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (pred[..., 1:, :] - pred[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def fft_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |FFT(pred) - FFT(target)| (orthonormal 2-D FFT): penalises missing high frequencies."""
    diff = torch.fft.rfft2(pred.float(), norm="ortho") - torch.fft.rfft2(target.float(), norm="ortho")
    return diff.abs().mean()


LOSS_WEIGHTS = {"mse": 1.0, "gradient": 0.05, "fft": 0.01}


def sr_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE + a weight-free perceptual term (gradient L1 + FFT L1; LPIPS needs downloaded weights), on x0 in [-1, 1]."""
    parts = {"mse": F.mse_loss(pred, target), "gradient": gradient_l1(pred, target), "fft": fft_l1(pred, target)}
    total = sum(LOSS_WEIGHTS[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}
