"""The pure formulas of latent consistency distillation for flow-matching teachers.

Convention (diffusers' FlowMatchEulerDiscreteScheduler): x_σ = (1 − σ)·x0 + σ·ε, the network predicts the
velocity v = ε − x0 at timestep t = 1000·σ, so x0 = x_σ − σ·v.
"""

from __future__ import annotations

import torch

SIGMA_DATA = 0.5  # σ_d of the consistency parameterisation (LCM, Song et al.)
TIMESTEP_SCALING = 10.0  # LCD's `timestep_scaling_factor`: c_skip ≈ 0 already at t ≈ 1


def boundary_scalings(timestep: torch.Tensor, sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) of LCM (its eq. 5, discrete form): c_skip(0) = 1 and c_out(0) = 0, so the
    consistency function is the identity at the data end; for t ≳ 1 it is the network's own x0 estimate."""
    scaled = timestep_scaling * timestep
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def expand_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample value (n,) shaped to broadcast over ``like`` (n, ...)."""
    return value.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def x0_from_velocity(sample: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x0 = x_σ − σ·v (the flow-matching interpolation solved for the data end)."""
    return sample - expand_like(sigma, sample) * velocity


def consistency_function(sample: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """f(x_σ, σ) = c_skip(t)·x_σ + c_out(t)·x̂0 with t = 1000·σ: the student's (and target's) output."""
    c_skip, c_out = boundary_scalings(sigma * 1000.0)
    return expand_like(c_skip, sample) * sample + expand_like(c_out, sample) * x0_from_velocity(sample, sigma, velocity)


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance as the diffusers flow pipelines write it: v_∅ + g·(v_c − v_∅)."""
    if isinstance(guidance_scale, torch.Tensor):
        guidance_scale = expand_like(guidance_scale, cond)
    return uncond + guidance_scale * (cond - uncond)


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma_from: torch.Tensor,
               sigma_to: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dσ = v from σ_from to σ_to (the teacher's solver;
    LCD's DDIM step, for flow models)."""
    return sample + expand_like(sigma_to - sigma_from, sample) * velocity


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """Per-sample pseudo-Huber distance: the mean over elements of sqrt((a − b)² + c²) − c, as LCD's
    `huber` loss (c = 0.001); quadratic for tiny errors, linear for large ones."""
    diff = (a.float() - b.float()).flatten(1)
    return (torch.sqrt(diff.pow(2) + c * c) - c).mean(dim=1)
