"""Residual shifting (ResShift): a diffusion chain between the HR image and its (upsampled) LR copy.

Yue, Wang, Loy, "ResShift: Efficient Diffusion Model for Image Super-resolution by Residual
Shifting", NeurIPS 2023 (arXiv 2307.12348), Sec. 2; the 4-step settings are from the journal version
"Efficient Diffusion Model for Image Restoration by Residual Shifting", TPAMI 2024 (arXiv 2403.07319).
Written from the paper's equations (the official code's license does not allow copying it).

Notation: x0 = HR target, y = LR image upsampled to the HR size, e0 = y - x0 (the residual), a
shifting sequence 0 < eta_1 < ... < eta_T ~ 1 and a noise scale kappa. Timesteps are indices
t = 0 .. T-1 (index t stands for the paper's step t+1, as in the official code). Sampling starts
from ``y + kappa * sqrt(eta_T) * noise`` — the LR image plus noise, not pure noise — and takes T (or
fewer, evenly spaced) exact posterior steps.

Every formula is a small pure function below; ``ResShiftScheduler`` only keeps the tables and the
current step. It is a diffusers ``SchedulerMixin`` + ``ConfigMixin``, so it saves and loads like any
scheduler (``save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

PREDICTION_TYPES = ("sample", "residual")
INPUT_NORMALIZATIONS = ("latent", "pixel", "none")

# ------------------------------------------------------------------------------------------ the maths


def sqrt_eta_schedule(num_steps: int, kappa: float, p: float, min_noise_level: float, etas_end: float) -> np.ndarray:
    """sqrt(eta_t), t = 1..T: the paper's shifting schedule (Sec. 2.2, "Noise schedule"),
    sqrt(eta_t) = sqrt(eta_1) * b0 ** beta_t, beta_t = ((t-1)/(T-1))**p * (T-1),
    b0 = exp(log(eta_T / eta_1) / (2 (T-1))), with sqrt(eta_1) = min(min_noise_level / kappa,
    min_noise_level) and sqrt(eta_T) = etas_end (the official configs' parameterisation)."""
    if num_steps < 2:
        raise ValueError(f"ResShift needs num_train_timesteps >= 2, got {num_steps}.")
    sqrt_eta_1 = min(min_noise_level / kappa, min_noise_level)
    sqrt_eta_T = etas_end
    if not 0 < sqrt_eta_1 < sqrt_eta_T <= 1:
        raise ValueError(
            f"Need 0 < sqrt(eta_1) = min(min_noise_level/kappa, min_noise_level) = {sqrt_eta_1:g} "
            f"< sqrt(eta_T) = etas_end = {sqrt_eta_T:g} <= 1; change min_noise_level, kappa or etas_end."
        )
    T = num_steps
    log_b0 = math.log(sqrt_eta_T**2 / sqrt_eta_1**2) / (2 * (T - 1))
    beta = (np.arange(T, dtype=np.float64) / (T - 1)) ** p * (T - 1)
    return sqrt_eta_1 * np.exp(log_b0 * beta)


def alphas_from_etas(etas: np.ndarray) -> np.ndarray:
    """alpha_t = eta_t - eta_{t-1}, alpha_1 = eta_1 (paper Sec. 2.1, the transition's shift)."""
    return np.diff(etas, prepend=0.0)


def shift_forward(x0: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, eta, kappa: float) -> torch.Tensor:
    """Sample of the marginal q(x_t | x0, y) = N(x0 + eta_t (y - x0), kappa^2 eta_t I) (paper Sec. 2.1)."""
    return x0 + eta * (y - x0) + kappa * torch.sqrt(torch.as_tensor(eta, dtype=x0.dtype)) * noise


def prior_sample(y: torch.Tensor, noise: torch.Tensor, sqrt_eta_T: float, kappa: float) -> torch.Tensor:
    """The start of sampling, x_T ~ N(y, kappa^2 eta_T I) (paper Sec. 2.1, q(x_T | y) since eta_T ~ 1)."""
    return y + kappa * sqrt_eta_T * noise


def posterior_coefficients(eta_t, eta_prev, kappa: float):
    """q(x_{t-1} | x_t, x0, y) = N(c1 x_t + c2 x0, var I) with c1 = eta_{t-1}/eta_t,
    c2 = alpha_t/eta_t, var = kappa^2 (eta_{t-1}/eta_t) alpha_t, alpha_t = eta_t - eta_{t-1}
    (paper Sec. 2.1, the reverse posterior). eta_prev = 0 at the last step: c1 = 0, c2 = 1, var = 0."""
    alpha = eta_t - eta_prev
    return eta_prev / eta_t, alpha / eta_t, kappa**2 * eta_prev / eta_t * alpha


def posterior_mean(x_t: torch.Tensor, x0: torch.Tensor, eta_t, eta_prev, kappa: float) -> torch.Tensor:
    """Mean of q(x_{t-1} | x_t, x0, y): (eta_{t-1}/eta_t) x_t + (alpha_t/eta_t) x0 (paper Sec. 2.1;
    y enters through x_t only)."""
    c1, c2, _ = posterior_coefficients(eta_t, eta_prev, kappa)
    return c1 * x_t + c2 * x0


def x0_from_residual(residual: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x0 = y - r for a network that predicts the residual r = e0 = y - x0 (the official code's
    ``residual`` prediction type: an x0-prediction that outputs the bicubic upsample at initialisation)."""
    return y - residual


def input_scale(eta, kappa: float, mode: str) -> float | torch.Tensor:
    """Divisor of the network input (official code, ``normalize_input``): latent inputs by
    sqrt(kappa^2 eta_t + 1) (their variance ~ 1 + kappa^2 eta_t), pixel inputs in [-1, 1] by
    3 kappa sqrt(eta_t) + 1 (their range); "none" by 1."""
    if mode == "latent":
        return (kappa**2 * eta + 1) ** 0.5
    if mode == "pixel":
        return 3 * kappa * eta**0.5 + 1
    return 1.0


# ------------------------------------------------------------------------------------------ scheduler


@dataclass
class ResShiftSchedulerOutput(BaseOutput):
    """prev_sample: x_{t-1}; pred_original_sample: the model's x0 estimate (clipped if configured)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class ResShiftScheduler(SchedulerMixin, ConfigMixin):
    """The ResShift chain (see the module docstring).

    Args:
        num_train_timesteps (T): chain length the model is trained with (15 in the NeurIPS paper, 4 in
            the journal version). Sampling uses T steps, or fewer evenly spaced ones (exact posterior
            between the kept indices); never more.
        kappa: noise scale (paper: 2.0).
        p: shifting speed of the schedule (paper: 0.3; smaller front-loads the shift).
        min_noise_level: sets sqrt(eta_1) = min(min_noise_level / kappa, min_noise_level)
            (paper: 0.04 for T=15, 0.2 for T=4).
        etas_end: sqrt(eta_T) (paper's code: 0.99).
        prediction_type: "sample" (the model outputs x0, the paper) or "residual" (it outputs
            y - x0; x0 = y - output). Both train with the same x0 loss.
        input_normalization: "latent" (x_t / sqrt(kappa^2 eta_t + 1), the paper's latent models),
            "pixel" (x_t / (3 kappa sqrt(eta_t) + 1), its pixel-space option) or "none".
        clip_sample: clamp the x0 estimate to [-clip_sample_range, clip_sample_range] (the official
            ``clip_denoised``; use it for pixels in [-1, 1]).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 15,
        kappa: float = 2.0,
        p: float = 0.3,
        min_noise_level: float = 0.04,
        etas_end: float = 0.99,
        prediction_type: str = "sample",
        input_normalization: str = "latent",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if input_normalization not in INPUT_NORMALIZATIONS:
            raise ValueError(
                f"input_normalization must be one of {INPUT_NORMALIZATIONS}, got {input_normalization!r}."
            )
        if kappa <= 0:
            raise ValueError(f"kappa must be > 0, got {kappa}.")
        self.sqrt_etas = sqrt_eta_schedule(num_train_timesteps, kappa, p, min_noise_level, etas_end)
        self.etas = self.sqrt_etas**2
        self.alphas = alphas_from_etas(self.etas)
        self.init_noise_sigma = float(kappa * self.sqrt_etas[-1])
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self._prev = {int(t): int(t) - 1 for t in self.timesteps}

    # ---------------------------------------------------------------- tables

    def eta(self, t: int) -> float:
        """eta at index t (0..T-1); 0 for t = -1 (before the chain)."""
        return 0.0 if t < 0 else float(self.etas[t])

    def _eta_like(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device="cpu").long().reshape(-1)
        T = self.config.num_train_timesteps
        if ((t < 0) | (t >= T)).any():
            raise ValueError(f"timesteps must be indices in 0..{T - 1}, got {t.tolist()}.")
        eta = torch.from_numpy(self.etas)[t].to(device=like.device, dtype=like.dtype)
        return eta.reshape(-1, *([1] * (like.ndim - 1)))

    # ---------------------------------------------------------------- sampling

    def set_timesteps(self, num_inference_steps: int | None = None, device=None) -> None:
        """T-1, ..., 0 (all T steps), or num_inference_steps < T evenly spaced indices from T-1 down to 0."""
        T = self.config.num_train_timesteps
        n = T if num_inference_steps is None else int(num_inference_steps)
        if n > T:
            raise ValueError(
                f"num_inference_steps={n} is above this ResShift model's chain length T={T}: a ResShift "
                f"model samples with at most the T steps it was trained with. Use num_inference_steps <= {T}."
            )
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}.")
        idx = np.unique(np.round(np.linspace(0, T - 1, n)).astype(np.int64))[::-1].copy() if n > 1 else np.array([T - 1])
        self.num_inference_steps = len(idx)
        self.timesteps = torch.from_numpy(idx).to(device)
        self._prev = {int(a): (int(b) if b is not None else -1) for a, b in zip(idx, list(idx[1:]) + [None])}

    def previous_timestep(self, timestep) -> int:
        t = int(timestep)
        if t not in self._prev:
            raise ValueError(f"timestep {t} is not in the current schedule {self.timesteps.tolist()}.")
        return self._prev[t]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network input x_t / scale(eta_t) (see ``input_scale``); timestep an index or a (B,) tensor."""
        if timestep is None:
            raise ValueError("ResShiftScheduler.scale_model_input needs the timestep index.")
        t = torch.as_tensor(timestep).long()
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        eta = self._eta_like(t, sample)
        return sample / input_scale(eta, self.config.kappa, self.config.input_normalization)

    def init_noise(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_T = y + kappa sqrt(eta_T) noise."""
        return prior_sample(y, noise, float(self.sqrt_etas[-1]), self.config.kappa)

    def predict_original(self, model_output: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The x0 estimate from the model output (per ``prediction_type``), clipped if configured."""
        if self.config.prediction_type == "residual":
            if y is None:
                raise ValueError("prediction_type='residual' needs y (the upsampled LR image) in step(..., y=...).")
            x0 = x0_from_residual(model_output, y)
        else:
            x0 = model_output
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, timestep: int, prev_timestep: int | None = None):
        """(mean, variance) of q(x_prev | x_t, x0, y) between index ``timestep`` and ``prev_timestep``
        (default t-1; -1 = the end of the chain)."""
        t = int(timestep)
        prev = t - 1 if prev_timestep is None else int(prev_timestep)
        eta_t, eta_prev = self.eta(t), self.eta(prev)
        _, _, var = posterior_coefficients(eta_t, eta_prev, self.config.kappa)
        return posterior_mean(x_t, x0, eta_t, eta_prev, self.config.kappa), var

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        y: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """One ancestral step x_t -> x_prev: the exact posterior mean with the model's x0, plus
        sqrt(var) * noise (none at the last step). ``noise`` overrides drawing from ``generator``
        (the pipeline shares it across the frames of a video)."""
        t = int(timestep)
        prev = self.previous_timestep(t) if self.num_inference_steps is not None else t - 1
        x0 = self.predict_original(model_output, y)
        mean, var = self.posterior(x0, sample, t, prev)
        if prev >= 0 and var > 0:
            if noise is None:
                noise = torch.randn(sample.shape, generator=generator, device="cpu", dtype=torch.float32)
            mean = mean + math.sqrt(var) * noise.to(device=sample.device, dtype=sample.dtype)
        if not return_dict:
            return (mean, x0)
        return ResShiftSchedulerOutput(prev_sample=mean, pred_original_sample=x0)

    # ---------------------------------------------------------------- training

    def add_noise(self, original_samples: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = x0 + eta_t (y - x0) + kappa sqrt(eta_t) noise for index tensors t in 0..T-1."""
        t = torch.as_tensor(timesteps).long()
        if t.ndim == 0:
            t = t.expand(original_samples.shape[0])
        eta = self._eta_like(t, original_samples)
        return shift_forward(original_samples, y, noise, eta, self.config.kappa)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
