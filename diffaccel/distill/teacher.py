"""What a distillation trainer needs from a teacher pipeline, per family: the noise levels it samples on,
its text conditioning, and one velocity evaluation of its denoiser.

Trainers work in the flow parametrisation (x_σ = (1 − σ)·x0 + σ·ε, v = ε − x0). Flow-matching families
(CogView4, SD3, Flux, Wan) are that already; DDPM families that predict ε or v (Stable Diffusion, SDXL,
PixArt) are seen through an exact change of variables (``EpsilonTeacher``). Only families listed in
``FAMILIES`` are supported; any other pipeline gets an error naming them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class FlowTeacher:
    """A flow-matching text-to-image teacher at one resolution: the CogView4 family (``SD3Teacher``
    overrides what differs for Stable Diffusion 3).

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
    frames: int | None = None  # a video teacher's clip length; None for image teachers
    # the scale a guidance-distilled family is told through its guidance embedding (Flux dev), by every
    # role alike; CFG families take their scale in ``guided_velocity`` instead and leave this None
    embedded_guidance: float | None = None
    # the dtype of the teacher's own (frozen) weights, read once (``__post_init__``)
    compute_dtype: torch.dtype = field(init=False, repr=False)
    # Linear layers a LoRA student adapts (the modulation and time-embedding layers carry the timestep,
    # which a consistency student must re-read).
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear",
                    "timestep_embedder.linear_1", "timestep_embedder.linear_2", "norm_out.linear")
    # whether the pipeline tells the transformer the timestep before its schedule shift (CogView4) or
    # 1000·σ after it (SD3): students sample on trailing steps given the same way
    tells_unshifted_timesteps = True
    makes_clips = False  # a video family: latents carry a frame axis and ``frames`` is set
    # the family's guidance scale goes into the model as an input (Flux dev) instead of combining a
    # conditional and an unconditional prediction: a student is called with it, not with guidance 1
    guidance_distilled = False
    flow_matching = True  # the model predicts a flow velocity (else ε or v on a DDPM schedule)
    denoiser_name = "transformer"  # the pipeline component the student is a LoRA (or copy) of

    @staticmethod
    def check_scheduler(scheduler: Any) -> None:
        """An error that says why, when the pipeline's scheduler is not one this family samples with."""
        flow_scheduler_config(scheduler)

    @staticmethod
    def size_factor(pipe: Any) -> int:
        """Heights and widths must be multiples of this (the VAE's downsampling × the patch size)."""
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def __post_init__(self) -> None:
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            raise ValueError(f"timestep_convention={self.timestep_convention!r}: choose from {TIMESTEP_CONVENTIONS}.")
        if self.frames is not None and not self.makes_clips:
            raise ValueError(f"frames={self.frames}: a {type(self.pipe).__name__} makes images, not clips.")
        if self.embedded_guidance is not None and not self.guidance_distilled:
            raise ValueError(f"embedded_guidance={self.embedded_guidance}: a {type(self.pipe).__name__} takes its "
                             f"guidance through classifier-free guidance, not as an input.")
        # The transformer runs in its frozen weights' dtype, whatever dtype the trainable adapters keep
        # (float32); latents, noise and losses stay float32 around it.
        self.compute_dtype = next(p.dtype for name, p in self.transformer.named_parameters()
                                  if "lora_" not in name and "cond_proj" not in name)

    @property
    def transformer(self) -> torch.nn.Module:
        """The denoiser (a transformer, or the UNet of ``EpsilonTeacher``)."""
        return getattr(self.pipe, self.denoiser_name)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        factor = self.pipe.vae_scale_factor
        return self.transformer.config.in_channels, self.height // factor, self.width // factor

    def sigma_grid(self, num_steps: int, timesteps: list[float] | None = None) -> torch.Tensor:
        """The noise levels the pipeline samples on with ``num_steps`` steps (terminal 0 included); with
        ``timesteps``, those it samples on when given them (a student's trailing spacing)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

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

    def initial_point(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The point a sampler starts a student from, for the pipeline's initial ``noise``, at its first noise
        level ``sigma`` (1 for flow models: the noise itself)."""
        return noise

    def student_grid(self, num_steps: int, sampler: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    def posterior_mean(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's posterior mean of pixels in [-1, 1], in float32."""
        vae = self.pipe.vae
        return vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> latents as the transformer sees them (VAE posterior mean × scale)."""
        return self.posterior_mean(pixels) * self.pipe.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (float32) of latents, as the pipeline decodes them: ``encode_images`` inverted."""
        vae = self.pipe.vae
        return vae.decode(self.vae_latents(latents).to(vae.dtype), return_dict=False)[0].float()

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents of the transformer's (the scale undone)."""
        return latents / self.pipe.vae.config.scaling_factor

    def velocity(self, transformer: torch.nn.Module, sample: torch.Tensor, sigma: torch.Tensor,
                 embeds: Any, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """v at noise level ``sigma`` (float32); the transformer runs in ``compute_dtype`` and is told
        ``timestep`` (default ``told_timestep(sigma)``)."""
        dtype = self.compute_dtype
        timestep = self.told_timestep(sigma) if timestep is None else timestep
        return transformer(hidden_states=sample.to(dtype), timestep=timestep.to(dtype), return_dict=False,
                           **self.conditioning_kwargs(embeds, sample, dtype))[0].float()

    def guided_velocity(self, transformer: torch.nn.Module, sample: torch.Tensor, sigma: torch.Tensor, cond: Any,
                        uncond: Any, scale: float | torch.Tensor) -> torch.Tensor:
        """The teacher's guided velocity, as its pipeline guides it: classifier-free guidance at ``scale``
        (a float, or one per example) from a conditional and an unconditional evaluation."""
        from .consistency import guided_velocity

        return guided_velocity(self.velocity(transformer, sample, sigma, cond),
                               self.velocity(transformer, sample, sigma, uncond), scale)

    def conditioning_kwargs(self, embeds: Any, sample: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        """The family's text and size arguments of a transformer call (CogView4: the size conditioning)."""
        size = torch.tensor([[self.height, self.width]], dtype=dtype, device=sample.device).repeat(sample.shape[0], 1)
        return {"encoder_hidden_states": embeds.to(dtype), "original_size": size, "target_size": size,
                "crop_coords": torch.zeros_like(size)}


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of more than one tensor (SD3, Flux: the sequence embeddings and the pooled vector;
    Flux also the text tokens' position ids, shared by every example); indexing selects the same examples of
    each, as indexing a plain embedding tensor does."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor | None = None

    def __getitem__(self, index: Any) -> "Conditioning":
        return Conditioning(self.embeds[index], self.pooled[index], self.text_ids)

    def __len__(self) -> int:
        return self.embeds.shape[0]


@dataclass
class SigmaToldTeacher(FlowTeacher):
    """Pipelines that sample on their scheduler's own spacing and tell the transformer 1000·σ after the
    schedule's shift (SD3, Wan), so both timestep conventions tell it the same."""

    tells_unshifted_timesteps = False

    @property
    def shift_mu(self) -> float | None:
        """μ of a dynamic shift at this size, or None when the scheduler shifts statically."""
        return None

    def sigma_grid(self, num_steps: int, timesteps: list[float] | None = None) -> torch.Tensor:
        """The pipeline's noise levels with ``num_steps`` steps (a copy of its own scheduler: Wan's UniPC
        spaces its flow sigmas otherwise than FlowMatchEuler); with ``timesteps``, the shifted unshifted
        fractions t / T, as the student's scheduler takes them (its trailing spacing)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        mu = {"mu": self.shift_mu} if self.shift_mu is not None else {}
        if timesteps is None:
            own = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
            own.set_timesteps(num_steps, **mu)
            return own.sigmas.float().clone()
        config = flow_scheduler_config(self.pipe.scheduler)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        sigmas = np.asarray(timesteps, dtype=np.float32) / config["num_train_timesteps"]
        scheduler.set_timesteps(num_steps, sigmas=sigmas, **mu)
        return scheduler.sigmas.float().clone()

    def told_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * 1000.0

    def student_grid(self, num_steps: int, sampler: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Trailing stages, shifted by the scheduler as the pipeline shifts them; told 1000·σ."""
        from .student import trailing_timesteps

        sigmas = self.sigma_grid(num_steps, trailing_timesteps(num_steps, int(flow_scheduler_config(self.pipe.scheduler)["num_train_timesteps"])))
        return sigmas[:-1] * 1000.0, sigmas


@dataclass
class SD3Teacher(SigmaToldTeacher):
    """Stable Diffusion 3 / 3.5: three text encoders (sequence embeddings and a pooled vector), a VAE with
    a shift factor, a static schedule shift (or SD3's own dynamic one)."""

    lora_targets = FlowTeacher.lora_targets + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                                               "ff_context.net.0.proj", "ff_context.net.2", "norm1_context.linear")

    default_max_shift = 1.16  # the pipeline's fallback when its scheduler config has no max_shift

    @property
    def token_count(self) -> int:
        """The image tokens the transformer sees at this size (the dynamic shift's sequence length)."""
        _, h, w = self.latent_shape
        return (h * w) // self.transformer.config.patch_size**2

    @property
    def shift_mu(self) -> float | None:
        """μ of the pipeline's shift for its token count, or None for a static shift."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return None
        return calculate_shift(self.token_count, config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", self.default_max_shift))

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Conditioning, Conditioning]:
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            captions, None, None, do_classifier_free_guidance=True, device=self.transformer.device)
        return Conditioning(cond, pooled), Conditioning(uncond, uncond_pooled)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents as the pipeline decodes them: (posterior mean − shift factor) × scale."""
        config = self.pipe.vae.config
        return (self.posterior_mean(pixels) - (config.shift_factor or 0.0)) * config.scaling_factor

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The scale and the shift factor undone."""
        config = self.pipe.vae.config
        return latents / config.scaling_factor + (config.shift_factor or 0.0)

    def conditioning_kwargs(self, embeds: Conditioning, sample: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        return {"encoder_hidden_states": embeds.embeds.to(dtype), "pooled_projections": embeds.pooled.to(dtype)}


@dataclass
class WanTeacher(SigmaToldTeacher):
    """Wan 2.1 text-to-video (and the reference video model): 5-D latents (n, C, F', H', W') of ``frames``
    frames, normalised by the VAE's per-channel mean and std as the pipeline decodes them; UMT5 text
    padded to 512 tokens, as the pipeline pads it."""

    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2",
                    "time_embedder.linear_1", "time_embedder.linear_2", "time_proj")

    @staticmethod
    def size_factor(pipe: Any) -> int:
        return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[-1]

    makes_clips = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.frames = 81 if self.frames is None else self.frames  # Wan's own default clip length
        temporal = self.pipe.vae_scale_factor_temporal
        if (self.frames - 1) % temporal:
            raise ValueError(f"frames={self.frames}: Wan's VAE takes 1 + {temporal}·k frames (e.g. {1 + 2 * temporal}).")
        if getattr(self.pipe.config, "expand_timesteps", False):
            raise ValueError("This Wan pipeline tells every token its own timestep (expand_timesteps, Wan 2.2 TI2V); "
                             "diffaccel distill handles Wan 2.1-style text-to-video teachers.")

    @property
    def latent_shape(self) -> tuple[int, ...]:
        spatial, temporal = self.pipe.vae_scale_factor_spatial, self.pipe.vae_scale_factor_temporal
        return (self.transformer.config.in_channels, (self.frames - 1) // temporal + 1, self.height // spatial,
                self.width // spatial)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cond, uncond = self.pipe.encode_prompt(captions, do_classifier_free_guidance=True, device=self.transformer.device,
                                               max_sequence_length=512)
        return cond, uncond

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, F, H, W) in [-1, 1] -> (posterior mean − latents_mean) / latents_std."""
        mean, config = self.posterior_mean(pixels), self.pipe.vae.config
        shape = (1, -1, 1, 1, 1)
        return ((mean - torch.tensor(config.latents_mean, device=mean.device).view(shape))
                / torch.tensor(config.latents_std, device=mean.device).view(shape))

    def conditioning_kwargs(self, embeds: torch.Tensor, sample: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        return {"encoder_hidden_states": embeds.to(dtype)}


@dataclass
class FluxTeacher(SD3Teacher):
    """FLUX.1 [dev]-style pipelines: guidance-distilled (the scale is an input of the transformer, one
    evaluation per step, no unconditional branch), latents packed into 2x2 patches with position ids,
    CLIP pooled and T5 sequence text, a VAE with a shift factor, the schedule shifted by the token count,
    the transformer told σ (the pipeline's 1000·σ over 1000). The latents stay unpacked (n, C, H/8, W/8)
    for the trainers; ``velocity`` packs them as the pipeline does and unpacks what comes back."""

    guidance_distilled = True
    lora_targets = SD3Teacher.lora_targets + ("proj_mlp", "proj_out", "norm.linear", "x_embedder", "context_embedder")

    @staticmethod
    def size_factor(pipe: Any) -> int:
        return pipe.vae_scale_factor * 2  # the VAE's downsampling × the 2x2 packing

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.transformer.config.guidance_embeds:
            raise ValueError("This Flux transformer has no guidance embedding (FLUX.1 [schnell] is already a few-step "
                             "model, distilled by its makers); diffaccel distill takes guidance-distilled Flux models "
                             "such as FLUX.1 [dev].")
        if self.embedded_guidance is None:
            raise ValueError("A Flux teacher is told its guidance scale as an input: give embedded_guidance (distill() "
                             "takes the pipeline's default, 3.5 for FLUX.1 [dev]).")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        factor = self.pipe.vae_scale_factor
        return self.transformer.config.in_channels // 4, self.height // factor, self.width // factor

    default_max_shift = 1.15

    @property
    def token_count(self) -> int:
        """Packed 2x2 latent patches."""
        _, h, w = self.latent_shape
        return (h // 2) * (w // 2)

    def sigma_grid(self, num_steps: int, timesteps: list[float] | None = None) -> torch.Tensor:
        """Flux samples on sigmas linspace(1, 1/K, K), shifted: trailing spacing is its own."""
        from .student import trailing_timesteps

        if timesteps is None:
            timesteps = trailing_timesteps(num_steps, int(self.pipe.scheduler.config.num_train_timesteps))
        return super().sigma_grid(num_steps, timesteps)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Conditioning, Conditioning]:
        """The prompt's conditioning, twice: a guidance-distilled model has no unconditional branch."""
        embeds, pooled, text_ids = self.pipe.encode_prompt(captions, None, device=self.transformer.device)
        cond = Conditioning(embeds, pooled, text_ids)
        return cond, cond

    def guided_velocity(self, transformer: torch.nn.Module, sample: torch.Tensor, sigma: torch.Tensor, cond: Any,
                        uncond: Any, scale: float | torch.Tensor) -> torch.Tensor:
        """One evaluation: the guidance is the transformer's input (``embedded_guidance``), as the pipeline
        gives it."""
        if isinstance(scale, torch.Tensor) or float(scale) != self.embedded_guidance:
            raise ValueError(f"A Flux teacher is guided through its embedding at {self.embedded_guidance}; "
                             f"guidance {scale} cannot be added on top.")
        return self.velocity(transformer, sample, sigma, cond)

    def velocity(self, transformer: torch.nn.Module, sample: torch.Tensor, sigma: torch.Tensor,
                 embeds: Conditioning, timestep: torch.Tensor | None = None) -> torch.Tensor:
        pipe, dtype, (n, channels, h, w) = self.pipe, self.compute_dtype, sample.shape
        timestep = self.told_timestep(sigma) if timestep is None else timestep
        packed = pipe._pack_latents(sample, n, channels, h, w)
        image_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, sample.device, dtype)
        guidance = torch.full((n,), float(self.embedded_guidance), device=sample.device, dtype=torch.float32)
        out = transformer(hidden_states=packed.to(dtype), timestep=(timestep / 1000.0).to(dtype), guidance=guidance,
                          pooled_projections=embeds.pooled.to(dtype), encoder_hidden_states=embeds.embeds.to(dtype),
                          txt_ids=embeds.text_ids, img_ids=image_ids, return_dict=False)[0]
        factor = pipe.vae_scale_factor
        return pipe._unpack_latents(out.float(), h * factor, w * factor, factor)


@dataclass
class EpsilonTeacher(FlowTeacher):
    """Stable Diffusion 1.x / 2.x: a UNet that predicts ε (or v) on a DDPM schedule, the teacher of LCD's
    own paper (LCM-LoRA), seen through the flow parametrisation every trainer here works in.

    At DDPM timestep t, x_t = α_t·x0 + s_t·ε (α = √ᾱ, s = √(1 − ᾱ)); divided by α_t + s_t it is the flow
    point y = (1 − σ)·x0 + σ·ε with σ = s_t / (α_t + s_t), and v = ε̂ − x̂0 is the flow velocity. Through
    this change of variables an Euler step of the flow is exactly a DDIM step, and CFG on v is CFG on ε,
    so LCD trains the student as LCD does (DDIM solver on a 50-step grid, c_skip/c_out boundary) and the
    student is an ordinary ε-UNet LoRA, sampled by diffusers' ``LCMScheduler``."""

    flow_matching = False
    denoiser_name = "unet"
    sample_arg = "sample"  # the denoiser's name for its noisy input
    # diffusers' LCM-LoRA training script's UNet layers (attention, feed-forward, ResNet convolutions and
    # time projections), plus the time embedding, which a consistency student must re-read
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
                    "time_embedding.linear_1", "time_embedding.linear_2")
    PREDICTIONS = ("epsilon", "v_prediction")

    @staticmethod
    def size_factor(pipe: Any) -> int:
        """The VAE's downsampling × the UNet's (each down block but the last halves the latents)."""
        return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)

    @staticmethod
    def check_scheduler(scheduler: Any) -> None:
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction not in EpsilonTeacher.PREDICTIONS or getattr(scheduler, "alphas_cumprod", None) is None:
            raise ValueError(f"diffaccel distill needs a teacher that predicts ε or v on a DDPM schedule, or a flow "
                             f"velocity; this pipeline's {type(scheduler).__name__} has prediction_type {prediction!r}.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timestep_convention != "pipeline":
            self.timestep_convention = "pipeline"  # a DDPM model is told its own timestep t, whatever σ is
        alpha_bar = torch.as_tensor(self.pipe.scheduler.alphas_cumprod).double()
        levels = (1.0 - alpha_bar).sqrt() / ((1.0 - alpha_bar).sqrt() + alpha_bar.sqrt())  # σ(t), increasing
        # (timesteps, ᾱ, σ) per device, so lookups run where the latents are (no host round trip per call)
        self._tables = {torch.device("cpu"): (torch.arange(len(alpha_bar), dtype=torch.float64), alpha_bar, levels)}
        self.prediction_type = self.pipe.scheduler.config.get("prediction_type", "epsilon")

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            self._tables[device] = tuple(t.to(device) for t in self._tables[torch.device("cpu")])
        return self._tables[device]

    @property
    def train_timesteps(self) -> int:
        return len(self._tables[torch.device("cpu")][0])

    def level(self, timesteps: Any) -> torch.Tensor:
        """σ of DDPM timesteps (a list or tensor; integers or not)."""
        timesteps = torch.as_tensor(timesteps).double()
        steps, _, levels = self._table(timesteps.device)
        return _interpolate(timesteps, steps, levels).float()

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """ᾱ of DDPM timesteps (float64, on their device)."""
        steps, alpha_bar, _ = self._table(timesteps.device)
        return _interpolate(timesteps.detach().double(), steps, alpha_bar)

    def told_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The DDPM timestep t whose noise level is σ (exact on the schedule's integer timesteps)."""
        steps, _, levels = self._table(sigma.device)
        return _interpolate(sigma.detach().double(), levels, steps).float()

    def sigma_grid(self, num_steps: int, timesteps: list[float] | None = None) -> torch.Tensor:
        """σ of ``timesteps`` (default LCD's DDIM solver grid: t = c·i − 1 for i = K … 1, c = T / K, the last one
        near the data end), and the terminal 0."""
        if timesteps is None:
            ratio = self.train_timesteps // num_steps
            timesteps = [ratio * i - 1 for i in range(num_steps, 0, -1)]
        return torch.cat([self.level(timesteps), torch.zeros(1)])

    def student_grid(self, num_steps: int, sampler: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The timesteps a K-step student samples on with ``sampler`` (``ddpm_student_scheduler``: LCM's from
        its 50-step origin grid, the default; DDIM's trailing ones) and their σ."""
        scheduler = ddpm_student_scheduler(self.pipe.scheduler, sampler or "LCMScheduler")
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.double()
        return timesteps.float(), torch.cat([self.level(timesteps), torch.zeros(1)])

    @property
    def shift_mu(self) -> None:
        return None

    def initial_point(self, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The pipeline starts from x_T = noise at the first timestep T (ᾱ_T > 0: not quite pure noise); its
        flow point is x_T / (α_T + s_T)."""
        alpha_bar = float(self.alpha_bar(self.told_timestep(sigma.reshape(1)))[0])
        return noise / (alpha_bar**0.5 + (1.0 - alpha_bar) ** 0.5)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cond, uncond = self.pipe.encode_prompt(captions, self.transformer.device, 1, True)
        return cond, uncond

    def velocity(self, transformer: torch.nn.Module, sample: torch.Tensor, sigma: torch.Tensor,
                 embeds: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """The flow velocity of the UNet's prediction at the flow point ``sample`` (float32): the UNet sees
        x_t = (α_t + s_t)·y at its timestep t, as its pipeline gives it."""
        from .consistency import expand_like

        timestep = self.told_timestep(sigma) if timestep is None else timestep
        alpha_bar = self.alpha_bar(timestep.to(sample.device))
        alpha, noise = (expand_like(v.float(), sample) for v in (alpha_bar.sqrt(), (1 - alpha_bar).sqrt()))
        noisy = sample * (alpha + noise)
        out = transformer(**{self.sample_arg: noisy.to(self.compute_dtype)}, timestep=timestep.float(), return_dict=False,
                          **self.conditioning_kwargs(embeds, noisy, self.compute_dtype))[0].float()
        if out.shape[1] == 2 * sample.shape[1]:  # a learned variance rides along (PixArt): the prediction is the first half
            out = out[:, : sample.shape[1]]
        if self.prediction_type == "epsilon":
            eps, x0 = out, (noisy - noise * out) / alpha
        else:  # v = α·ε − s·x0
            eps, x0 = noise * noisy + alpha * out, alpha * noisy - noise * out
        return eps - x0

    def conditioning_kwargs(self, embeds: Any, sample: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        return {"encoder_hidden_states": embeds.to(dtype)}


@dataclass
class SDXLTeacher(EpsilonTeacher):
    """Stable Diffusion XL: two text encoders (sequence embeddings and the second one's pooled vector) and
    the size conditioning of its ``time_ids`` (original size, crop (0, 0), target size: both the training
    size), passed as the pipeline passes them in ``added_cond_kwargs``."""

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Conditioning, Conditioning]:
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(captions, device=self.transformer.device,
                                                                      num_images_per_prompt=1,
                                                                      do_classifier_free_guidance=True)
        return Conditioning(cond, pooled), Conditioning(uncond, uncond_pooled)

    def conditioning_kwargs(self, embeds: Conditioning, sample: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        pipe = self.pipe
        projection = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                      else int(embeds.pooled.shape[-1]))
        size = (self.height, self.width)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection)
        return {"encoder_hidden_states": embeds.embeds.to(dtype),
                "added_cond_kwargs": {"text_embeds": embeds.pooled.to(dtype),
                                      "time_ids": time_ids.to(sample.device).repeat(sample.shape[0], 1)}}


DDPM_STUDENT_SAMPLERS = ("LCMScheduler", "DDIMScheduler")


def ddpm_student_scheduler(scheduler: Any, name: str) -> Any:
    """The diffusers scheduler a student of a DDPM teacher samples with, on the teacher's noise schedule:
    ``LCMScheduler`` (consistency students: its own spacing from a 50-step origin grid, fresh noise between
    steps) or ``DDIMScheduler`` on trailing timesteps with its last step to the clean end (TDM students: the
    deterministic DDIM step, which is the flow Euler step the trainer rolls out)."""
    import diffusers

    if name == "LCMScheduler":
        return diffusers.LCMScheduler.from_config(scheduler.config)
    if name == "DDIMScheduler":
        return diffusers.DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                                   clip_sample=False, thresholding=False)
    raise ValueError(f"A student of a DDPM teacher samples with one of {DDPM_STUDENT_SAMPLERS}, not {name!r}.")


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, xp increasing; clamped at the ends."""
    x = torch.minimum(torch.maximum(x, xp[0]), xp[-1])  # no host read: stays on the device
    right = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    left = right - 1
    weight = (x - xp[left]) / (xp[right] - xp[left])
    return fp[left] + weight * (fp[right] - fp[left])


def sequence_embeds(conditioning: Any) -> torch.Tensor:
    """The text sequence embeddings of any family's conditioning (a tensor, or a container holding them)."""
    return getattr(conditioning, "embeds", conditioning)


@dataclass(frozen=True)
class MaskedConditioning:
    """T5 text embeddings with their attention mask (PixArt); indexing selects the same examples of both."""

    embeds: torch.Tensor
    mask: torch.Tensor

    def __getitem__(self, index: Any) -> "MaskedConditioning":
        return MaskedConditioning(self.embeds[index], self.mask[index])

    def __len__(self) -> int:
        return self.embeds.shape[0]


@dataclass
class PixArtTeacher(EpsilonTeacher):
    """PixArt-α and PixArt-Σ: a DiT that predicts ε (with a learned variance, dropped as the pipeline drops
    it) on a DDPM schedule; T5 text with its attention mask; PixArt-α at 1024 px also takes the size and
    aspect ratio as the pipeline gives them. Its LCM-LoRA samples with ``LCMScheduler`` (PixArt-LCM)."""

    denoiser_name = "transformer"
    sample_arg = "hidden_states"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                    "adaln_single.linear", "timestep_embedder.linear_1", "timestep_embedder.linear_2")

    @staticmethod
    def size_factor(pipe: Any) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[MaskedConditioning, MaskedConditioning]:
        cond, mask, uncond, uncond_mask = self.pipe.encode_prompt(
            captions, do_classifier_free_guidance=True, num_images_per_prompt=1, device=self.transformer.device,
            clean_caption=False)
        return MaskedConditioning(cond, mask), MaskedConditioning(uncond, uncond_mask)

    def conditioning_kwargs(self, embeds: MaskedConditioning, sample: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        n = sample.shape[0]
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if self.transformer.config.sample_size == 128:  # PixArt-α 1024 px: its micro-conditions, as its pipeline
            added = {"resolution": torch.tensor([[self.height, self.width]], dtype=dtype, device=sample.device).repeat(n, 1),
                     "aspect_ratio": torch.tensor([[self.height / self.width]], dtype=dtype,
                                                  device=sample.device).repeat(n, 1)}
        return {"encoder_hidden_states": embeds.embeds.to(dtype), "encoder_attention_mask": embeds.mask,
                "added_cond_kwargs": added}


TIMESTEP_CONVENTIONS = ("sigma", "pipeline")
FAMILIES = {"CogView4Pipeline": FlowTeacher, "StableDiffusion3Pipeline": SD3Teacher, "WanPipeline": WanTeacher,
            "FluxPipeline": FluxTeacher, "StableDiffusionPipeline": EpsilonTeacher,
            "StableDiffusionXLPipeline": SDXLTeacher, "PixArtAlphaPipeline": PixArtTeacher,
            "PixArtSigmaPipeline": PixArtTeacher}


def denoiser_name_of(pipeline_name: str) -> str:
    """The component a student of this pipeline class replaces: "transformer", or "unet"."""
    family = FAMILIES.get(pipeline_name)
    return family.denoiser_name if family is not None else "transformer"


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


def flow_scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A flow-matching teacher's schedule as a ``FlowMatchEulerDiscreteScheduler`` config: a FlowMatch
    scheduler's own, or that of a multistep solver run on flow sigmas (Wan's UniPC with
    ``use_flow_sigmas``: its ``flow_shift`` is the static shift). An error for anything else."""
    config = dict(scheduler.config)
    if "FlowMatch" in type(scheduler).__name__:
        return config
    if config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        return {"num_train_timesteps": config.get("num_train_timesteps", 1000), "shift": config.get("flow_shift") or 1.0,
                "use_dynamic_shifting": False}
    raise ValueError(f"diffaccel distill needs a flow-matching teacher (velocity prediction); this pipeline samples with "
                     f"{type(scheduler).__name__} (prediction_type {config.get('prediction_type')!r}).")


def teacher_for(pipe: Any, height: int, width: int, timestep_convention: str = "sigma",
                frames: int | None = None, guidance_scale: float | None = None) -> FlowTeacher:
    """The teacher adapter of this pipeline (``frames``: a video teacher's clip length, default its
    pipeline's; ``guidance_scale``: the scale distilled, which a guidance-distilled family such as Flux is
    told as an input and the CFG families take per call), or an error naming the families that can be
    distilled."""
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise ValueError(
            f"diffaccel distill cannot use a {name} teacher: it needs a flow-matching or ε/v-prediction text-to-image or "
            f"text-to-video pipeline of a family it knows ({', '.join(FAMILIES)})."
        )
    family = FAMILIES[name]
    family.check_scheduler(pipe.scheduler)
    factor = family.size_factor(pipe)
    if height % factor or width % factor:
        raise ValueError(f"Distillation size {height}x{width} must be a multiple of {factor} for this {name}.")
    return family(pipe, height, width, timestep_convention, frames,
                  guidance_scale if family.guidance_distilled else None)
