"""What a distillation trainer needs from a flow-matching teacher pipeline, per family: the noise
levels it samples on, its text conditioning, and one velocity evaluation of a transformer.

Only families listed in ``FAMILIES`` are supported; any other pipeline gets an error naming them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class FlowTeacher:
    """A flow-matching text-to-image teacher (CogView4 family) at one resolution.

    ``velocity`` calls any transformer of the teacher's class (the teacher, the student or the
    target), exactly as the pipeline calls it while sampling. ``timestep_convention`` says what the
    transformer is told at noise level σ: "sigma", 1000·σ (how the reference models were trained);
    "pipeline", what the pipeline tells it there (CogView4: the timestep before its schedule shift), for
    teachers trained elsewhere.
    """

    pipe: Any
    height: int
    width: int
    timestep_convention: str = "sigma"

    def __post_init__(self) -> None:
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            raise ValueError(f"timestep_convention={self.timestep_convention!r}: choose from {TIMESTEP_CONVENTIONS}.")

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        factor = self.pipe.vae_scale_factor
        return self.transformer.config.in_channels, self.height // factor, self.width // factor

    def sigma_grid(self, num_steps: int, timesteps: list[float] | None = None) -> torch.Tensor:
        """The noise levels the pipeline samples on with ``num_steps`` steps (terminal 0 included); with
        ``timesteps``, those it samples on when given them (a student's trailing spacing)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

        config = self.pipe.scheduler.config
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        if timesteps is None:
            timesteps = np.linspace(config.num_train_timesteps, 1.0, num_steps)
        timesteps = np.asarray(timesteps).astype(np.int64).astype(np.float32)
        scheduler.set_timesteps(num_steps, sigmas=timesteps / config.num_train_timesteps, mu=self.shift_mu)
        return scheduler.sigmas.float().clone()

    @property
    def shift_mu(self) -> float:
        """μ of the schedule's resolution-dependent shift at this size (CogView4's ``calculate_shift``)."""
        from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

        config = self.pipe.scheduler.config
        _, h, w = self.latent_shape
        seq_len = (h * w) // self.transformer.config.patch_size**2
        return calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("base_shift", 0.25),
                               config.get("max_shift", 0.75))

    def told_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep the transformer is told at noise level σ (see ``timestep_convention``). For
        "pipeline" the scheduler's shift is inverted: σ = shift(s) with s = t / T, so t = T·shift⁻¹(σ)."""
        config = self.pipe.scheduler.config
        if self.timestep_convention == "sigma":
            return sigma * 1000.0
        return unshifted_fraction(sigma, config, self.shift_mu) * float(config.num_train_timesteps)

    def student_grid(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A student's stages as the pipeline runs them (``student.trailing_timesteps``): the timesteps its
        transformer is told and the noise levels it samples on (terminal 0 included). CogView4 tells the
        model the unshifted timestep, not 1000·σ; a student trained on its own stages learns that."""
        from .student import trailing_timesteps

        timesteps = trailing_timesteps(num_steps, int(self.pipe.scheduler.config.num_train_timesteps))
        return torch.tensor(timesteps), self.sigma_grid(num_steps, timesteps)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and the empty-prompt embeddings CFG pairs them with."""
        cond, uncond = self.pipe.encode_prompt(captions, do_classifier_free_guidance=True,
                                               device=self.transformer.device)
        return cond, uncond

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> latents as the transformer sees them (VAE posterior mean × scale)."""
        vae = self.pipe.vae
        return vae.encode(pixels.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor

    def velocity(self, transformer: torch.nn.Module, sample: torch.Tensor, sigma: torch.Tensor,
                 embeds: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """v at noise level ``sigma``; the transformer is told ``timestep`` (default 1000·σ, as the
        reference models were trained)."""
        n = sample.shape[0]
        timestep = self.told_timestep(sigma) if timestep is None else timestep
        size = torch.tensor([[self.height, self.width]], dtype=embeds.dtype, device=sample.device).repeat(n, 1)
        return transformer(
            hidden_states=sample, encoder_hidden_states=embeds, timestep=timestep.to(sample.dtype),
            original_size=size, target_size=size, crop_coords=torch.zeros_like(size), return_dict=False,
        )[0]


TIMESTEP_CONVENTIONS = ("sigma", "pipeline")
FAMILIES = {"CogView4Pipeline": FlowTeacher}


def unshifted_fraction(sigma: torch.Tensor, config: Any, mu: float) -> torch.Tensor:
    """s in [0, 1] with shift(s) = σ, for diffusers' flow-matching shifts: dynamic (μ; "exponential":
    σ = e^μ / (e^μ + 1/s − 1), "linear": σ = μ / (μ + 1/s − 1)) or static (σ = k·s / (1 + (k − 1)·s))."""
    if config.get("shift_terminal") or any(config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas",
                                                                      "use_beta_sigmas")):
        raise ValueError("This teacher's scheduler reshapes its sigmas (shift_terminal or Karras/exponential/beta "
                         "spacing); diffaccel distill cannot tell which timestep the pipeline gives at a noise level.")
    sigma = sigma.double().clamp(min=1e-12)
    if config.get("use_dynamic_shifting"):
        factor = torch.tensor(mu).double().exp() if config.get("time_shift_type", "exponential") == "exponential" else mu
        return (1.0 / (1.0 + factor * (1.0 / sigma - 1.0))).float()
    shift = float(config.get("shift", 1.0))
    return (sigma / (shift - (shift - 1.0) * sigma)).float()


def teacher_for(pipe: Any, height: int, width: int, timestep_convention: str = "sigma") -> FlowTeacher:
    """The teacher adapter of this pipeline, or an error naming the families that can be distilled."""
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise ValueError(
            f"diffaccel distill cannot use a {name} teacher: it needs a flow-matching text-to-image pipeline of "
            f"a family it knows ({', '.join(FAMILIES)}); WanPipeline (video) is not supported yet."
        )
    scheduler = type(pipe.scheduler).__name__
    if "FlowMatch" not in scheduler:
        raise ValueError(
            f"diffaccel distill needs a flow-matching teacher (velocity prediction); this {name} samples with "
            f"{scheduler}."
        )
    factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
    if height % factor or width % factor:
        raise ValueError(f"Distillation size {height}x{width} must be a multiple of {factor} for this {name}.")
    return FAMILIES[name](pipe, height, width, timestep_convention)
