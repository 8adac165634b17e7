"""Trajectory distribution matching (TDM, Luo et al. 2025): a data-free few-step student of a flow teacher.

Three roles share one transformer through LoRA adapters (peft): the student, the "fake score" that tracks
the distribution of the student's trajectory, and the teacher (adapters off) with CFG. No images are
used, only captions. One iteration:

1. roll the student out from pure noise to a random stage k (no gradient);
2. the student's x0 estimate at stage k, re-noised to the next stage and diffused further to a level t
   in the stage's interval [σ_{k+1}, σ_k), trains the fake score (flow matching towards that estimate);
3. on another such noisy point the teacher's CFG x0 and the fake score's x0 disagree by the score
   difference of the two distributions; the student's estimate is pulled along x0_real − x0_fake
   (reverse-KL / distribution-matching gradient; pseudo-Huber divided by the distance to the teacher).

Matching each stage only at levels inside its own interval is TDM's sampling-steps-aware decoupling:
the student's stage k answers only for the noise levels it is responsible for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import TDMConfig
from .consistency import expand_like, x0_from_velocity
from .data import DataSource
from .lcd import add_lora, average_gradients, bind_trainer, stream_index, use_size
from .teacher import FlowTeacher

STUDENT = "tdm_student"
FAKE = "tdm_fake"


def renoise(x0: torch.Tensor, noise_estimate: torch.Tensor, fresh: torch.Tensor, sigma: torch.Tensor,
            eta: float) -> torch.Tensor:
    """The next stage's point: (1 − σ)·x̂0 + σ·(η·ε̂ + √(1 − η²)·z). η = 1 is the flow's Euler step (DDIM);
    η = 0 draws fresh noise as LCM sampling does."""
    noise = eta * noise_estimate + (1.0 - eta**2) ** 0.5 * fresh
    s = expand_like(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def noise_estimate(sample: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """ε̂ = (x_σ − (1 − σ)·x̂0) / σ, the noise the sample holds given an x0 estimate."""
    s = expand_like(sigma, sample)
    return (sample - (1.0 - s) * x0) / s


def diffuse(sample: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward-noise x at level a to level b ≥ a exactly: x_b = (1 − b)/(1 − a)·x_a + √(b² − ((1 − b)·a/(1 − a))²)·z,
    so that x_a = (1 − a)·x0 + a·ε becomes (1 − b)·x0 + b·ε' with ε' standard normal."""
    a, b = expand_like(sigma_from, sample), expand_like(sigma_to, sample)
    scale = (1.0 - b) / (1.0 - a)
    std = (b**2 - (scale * a) ** 2).clamp(min=0.0).sqrt()
    return scale * sample + std * noise


def matching_loss(x0: torch.Tensor, target: torch.Tensor, real_x0: torch.Tensor, c: float) -> torch.Tensor:
    """Per sample: mean over elements of (sqrt((x̂0 − target)² + c'²) − c') / w, w = mean|x̂0 − x0_real| (no
    gradient), as the official TDM code; c' = c·√(dim / (64·64·4)) scales c to the latent size (Video-BLADE).
    Dividing by w keeps the step size independent of how far the student is from the teacher (DMD)."""
    diff = (x0.float() - target.float()).flatten(1)
    scaled = c * (diff.shape[1] / (64 * 64 * 4)) ** 0.5
    weight = (x0.float() - real_x0.float()).abs().flatten(1).mean(dim=1).detach().clamp(min=1e-6)
    return (torch.sqrt(diff.pow(2) + scaled**2) - scaled).mean(dim=1) / weight


def min_snr_x0_loss(noisy: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, fake_velocity: torch.Tensor,
                    diffusion_noise: torch.Tensor, snr_cap: float = 5.0) -> torch.Tensor:
    """The official TDM DDPM demo's fake-score loss in flow form: per sample, mean (x0_fake − x̂0)² times
    min(SNR, 5), SNR = ((1 − t)/t)², times the importance weight exp(−½·mean ε_eff²) / exp(−½·mean z²) (no
    gradient), ε_eff = (x_t − (1 − t)·x̂0)/t the noise x_t holds and z the fresh noise that diffused it."""
    fake_x0 = x0_from_velocity(noisy.float(), t, fake_velocity.float())
    per_sample = (fake_x0 - x0.float()).pow(2).flatten(1).mean(dim=1)
    snr = ((1.0 - t.float()) / t.float()).pow(2).clamp(max=snr_cap)
    with torch.no_grad():
        effective = noise_estimate(noisy.float(), t.float(), x0.float()).pow(2).flatten(1).mean(dim=1)
        fresh = diffusion_noise.float().pow(2).flatten(1).mean(dim=1)
        importance = torch.exp(-0.5 * (effective - fresh))
    return (per_sample * snr * importance).mean()


@dataclass
class TDMBatch:
    cond: torch.Tensor
    uncond: torch.Tensor
    stages: torch.Tensor  # the student stage k of each sample
    sample: torch.Tensor  # the student's trajectory point at σ_k (no gradient)
    generator: torch.Generator  # the iteration's noise source (continues after the rollout)


class TDMTrainer:
    """Holds the shared transformer with its two adapters and their optimisers; ``train_step`` makes one
    iteration (``fake_updates`` fake-score steps, one student step) and returns the student's loss.
    Statistics of the last step are in ``last_rewards`` (shown next to the loss)."""

    def __init__(self, teacher: FlowTeacher, config: TDMConfig, data: DataSource | None = None,
                 accelerator: Any = None) -> None:
        bind_trainer(self, teacher, config, data, accelerator)
        # each size's stages: CogView4 shifts the noise levels by the token count
        # the stages the student's sampler runs (a DDPM teacher's: DDIM's trailing steps for η = 1, LCM's for 0)
        sampler = "DDIMScheduler" if config.eta == 1.0 else "LCMScheduler"
        self.grids = {size: view.student_grid(config.student_steps, sampler) for size, view in self.sizes.teachers.items()}
        self.timesteps, self.sigmas = self.grids[self.sizes.sizes[0]]
        model = teacher.transformer
        model.requires_grad_(False).eval()
        add_lora(model, config.lora_rank, config.lora_alpha, config.seed, adapter_name=STUDENT, targets=teacher.lora_targets)
        if config.init_student:
            from .sizes import warm_start

            warm_start(model, STUDENT, config, "tdm", type(teacher.pipe).__name__)
        add_lora(model, config.fake_rank or config.lora_rank, config.lora_alpha, config.seed + 1, adapter_name=FAKE,
                 targets=teacher.lora_targets)
        self.model = model
        self._params: dict[str, list[torch.nn.Parameter]] = {}
        self.frozen_teacher = None  # the base weights stay in ``model``; nothing else to export
        betas = (0.0, 0.95)  # TDM / DMD: no first moment, the matching direction changes every step
        self.optimizer = torch.optim.AdamW(self._params_of(STUDENT), lr=config.learning_rate, betas=betas,
                                           weight_decay=1e-2)
        self.fake_optimizer = torch.optim.AdamW(self._params_of(FAKE), lr=config.fake_learning_rate,
                                                betas=betas, weight_decay=1e-2)
        self.model.set_adapter(STUDENT)
        self._route: str | None = STUDENT
        # sparsity-aware (Video-BLADE): block-sparse attention on the shared transformer, on for the student
        self.sparse_pipe = None
        if config.sparse_attention is not None:
            import diffaccel

            from .config import sparse_attention_config

            self.sparse_pipe = diffaccel.accelerate(teacher.pipe, attention=sparse_attention_config(config.sparse_attention))
        self.step = 0
        self.fake_skipped = 0  # fake-score steps skipped by fake_loss_limit
        self.last_rewards: dict[str, float] = {}

    # -- the three roles --------------------------------------------------------------------------

    def _use(self, adapter: str | None) -> None:
        """Route the shared transformer: an adapter name, or None for the teacher (adapters off)."""
        if adapter == self._route:
            return
        if self.sparse_pipe is not None:  # the student attends sparsely; teacher and fake score densely
            from diffaccel.attention import set_sparse_attention

            set_sparse_attention(self.sparse_pipe, adapter == STUDENT)
        if adapter is None:
            self.model.disable_adapters()
        else:
            self.model.enable_adapters()
            self.model.set_adapter(adapter)
            for name in (STUDENT, FAKE):  # peft freezes inactive adapters; both stay trainable by their optimisers
                for p in self._params_of(name):
                    p.requires_grad_(True)
        self._route = adapter

    def _params_of(self, name: str) -> list[torch.nn.Parameter]:
        """The LoRA weights of adapter ``name`` (trainable)."""
        if name not in self._params:
            params = [p for key, p in self.model.named_parameters() if f".{name}." in key]
            if not params:
                raise RuntimeError(f"No LoRA weights of adapter {name!r} on {type(self.model).__name__}.")
            self._params[name] = [p.requires_grad_(True) for p in params]
        return self._params[name]

    def student_x0(self, sample: torch.Tensor, stage: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The student's x0 estimate at its stage ``stage`` (per sample), called as the pipeline calls it."""
        self._use(STUDENT)
        sigma = self.sigmas[stage].to(sample.device)
        velocity = self.teacher.velocity(self.model, sample, sigma, embeds, timestep=self.timesteps[stage].to(sample.device))
        return x0_from_velocity(sample, sigma, velocity)

    @torch.no_grad()
    def real_x0(self, sample: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        self._use(None)
        v = self.teacher.guided_velocity(self.model, sample, sigma, cond, uncond, self.guidance_scale)
        return x0_from_velocity(sample, sigma, v)

    def fake_velocity(self, sample: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self._use(FAKE)
        return self.teacher.velocity(self.model, sample, sigma, cond)

    # -- one iteration ------------------------------------------------------------------------------

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)

    @torch.no_grad()
    def rollout(self, noise: torch.Tensor, stages: torch.Tensor, cond: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Run the student from pure noise (σ_0 = 1) until each sample reaches its stage."""
        x = noise.clone()
        for k in range(int(stages.max())):
            fresh = torch.randn(x.shape, generator=gen).to(x.device)
            moving = (stages > k).nonzero().squeeze(1)  # the samples whose stage lies further on
            here = x[moving]
            x0 = self.student_x0(here, torch.full_like(moving, k), cond[moving])
            n = len(moving)
            x[moving] = renoise(x0, noise_estimate(here, self.sigmas[k].expand(n).to(x.device), x0), fresh[moving],
                                self.sigmas[k + 1].expand(n).to(x.device), self.config.eta)
        return x

    def matching_levels(self, stages: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ_{k+1}, t): each sample's next stage and the level it is matched at, uniform (by ``u``) in
        [max(σ_{k+1}, 0.02), σ_k − 0.01) with ``separate`` (the official TDM run, --use_separate) or up to
        ``max_sigma`` (Video-BLADE); the margins are the official code's 20 and 10 of 1000 timesteps."""
        after = self.sigmas[stages + 1]
        low = after.clamp(min=0.02)
        high = self.sigmas[stages] - 0.01 if self.config.separate else torch.full_like(after, self.config.max_sigma)
        return after, low + u * (high - low).clamp(min=0.0)

    def _noisy_view(self, x0: torch.Tensor, sample: torch.Tensor, stages: torch.Tensor,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x̂0 → the next stage's point (η re-noise) → diffused to its matching level t; returns (x_t, t, z),
        z the fresh noise of that last diffusion. Gradient reaches x_t only through x̂0."""
        device = sample.device
        here = self.sigmas[stages].to(device)
        fresh = torch.randn(sample.shape, generator=gen).to(device)
        after, t = self.matching_levels(stages, torch.rand(len(stages), generator=gen))
        after, t = after.to(device), t.to(device)
        nxt = renoise(x0, noise_estimate(sample, here, x0.detach()), fresh, after, self.config.eta)
        z = torch.randn(sample.shape, generator=gen).to(device)
        return diffuse(nxt, after, t, z), t, z

    def _learning_rate(self, base: float) -> float:
        warmup = self.config.warmup_steps
        return base * min(1.0, (self.step + 1) / warmup) if warmup else base

    def prepare(self, step: int) -> TDMBatch:
        """Iteration ``step``'s captions and the student's rollout to a random stage per sample."""
        cfg = self.config
        self.timesteps, self.sigmas = self.grids[use_size(self, step)]
        draw = stream_index(self, step)  # with several processes, each its own captions and noise
        _, captions = self.data.batch(cfg.seed, draw, cfg.batch_size)
        cond, uncond = self.teacher.encode(captions)
        gen = self._generator(draw)
        n = len(captions)
        noise = torch.randn((n, *self.teacher.latent_shape), generator=gen).to(self.model.device)
        noise = self.teacher.initial_point(noise, self.sigmas[0])  # where the pipeline starts the student
        stages = torch.randint(0, cfg.student_steps, (n,), generator=gen)
        return TDMBatch(cond, uncond, stages, self.rollout(noise, stages, cond, gen), gen)

    def fake_update(self, batch: TDMBatch, x0: torch.Tensor) -> float:
        """One flow-matching step of the fake score towards the student's estimates ``x0``; returns its
        matching loss. Above ``fake_loss_limit`` (judged on the mean over processes, so all agree) the step
        is skipped and counted."""
        noisy, t, z = self._noisy_view(x0, batch.sample, batch.stages, batch.generator)
        matching, regulariser = self.fake_losses(noisy, t, x0, batch.cond, diffusion_noise=z)
        value = matching.detach()
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value, "mean")
        value = float(value)
        limit = self.config.fake_loss_limit
        if limit is not None and value > limit:
            self.fake_skipped += 1
            return value
        total = matching if regulariser is None else matching + self.config.fake_regulariser * regulariser
        self.fake_optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(total)
        average_gradients(self, self._params_of(FAKE))
        self.accelerator.clip_grad_norm_(self._params_of(FAKE), self.config.grad_clip)
        self.fake_optimizer.step()
        return value

    def fake_loss(self, noisy: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, cond: torch.Tensor,
                  diffusion_noise: torch.Tensor | None = None) -> torch.Tensor:
        """The fake score's matching loss towards the student's x̂0 (``fake_weighting``): "velocity", the
        velocity MSE of the authors' flow-model code (Video-BLADE's Wan trainer, TDM-R1); "min_snr", their DDPM
        demo's (PixArt): per sample, the x0 MSE times min(SNR, 5) times the importance weight
        exp(−½·mean ε_eff²) / exp(−½·mean z²), ε_eff the noise x_t holds given x̂0 and z the fresh noise
        that diffused it (``diffusion_noise``, which "min_snr" needs)."""
        return self.fake_losses(noisy, t, x0, cond, regularise=False, diffusion_noise=diffusion_noise)[0]

    def fake_losses(self, noisy: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, cond: torch.Tensor,
                    regularise: bool = True, diffusion_noise: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the matching loss of ``fake_loss``, and with a ``fake_regulariser`` the MSE between the fake and
        the teacher's unguided velocity at the same point, else None)."""
        target = (noisy - x0) / expand_like(t, noisy)  # v = (x_t − x0)/t on the flow's straight path
        fake = self.fake_velocity(noisy, t, cond).float()
        if self.config.fake_weighting == "velocity":
            matching = torch.nn.functional.mse_loss(fake, target.float())
        else:
            if diffusion_noise is None:
                raise ValueError("fake_weighting 'min_snr' needs the diffusion noise of x_t for its importance weight.")
            matching = min_snr_x0_loss(noisy, t, x0, fake, diffusion_noise)
        if not (regularise and self.config.fake_regulariser > 0):
            return matching, None
        with torch.no_grad():
            self._use(None)
            real = self.teacher.velocity(self.model, noisy, t, cond).float()
        self._use(FAKE)
        return matching, torch.nn.functional.mse_loss(fake, real)

    def student_target(self, batch: TDMBatch, x0: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the student's x0 estimate with gradient (``x0`` if already computed), where it should move:
        x̂0 + x0_real − x0_fake, and the teacher's x0_real, which scales the step)."""
        if x0 is None:
            x0 = self.student_x0(batch.sample, batch.stages, batch.cond)
        noisy, t, _ = self._noisy_view(x0.detach(), batch.sample, batch.stages, batch.generator)
        with torch.no_grad():
            real = self.real_x0(noisy, t, batch.cond, batch.uncond)
            fake = x0_from_velocity(noisy, t, self.fake_velocity(noisy, t, batch.cond))
        self._use(STUDENT)
        return x0, x0.detach() + (real - fake), real

    def student_update(self, x0: torch.Tensor, target: torch.Tensor, real: torch.Tensor) -> float:
        loss = matching_loss(x0, target, real, self.config.huber_c).mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        average_gradients(self, self._params_of(STUDENT))
        self.accelerator.clip_grad_norm_(self._params_of(STUDENT), self.config.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def train_step(self) -> float:
        """One iteration: ``fake_updates`` fake-score steps, then one student step; returns the student's
        loss."""
        batch = self.prepare(self.step)
        for group in self.fake_optimizer.param_groups:
            group["lr"] = self._learning_rate(self.config.fake_learning_rate)
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate(self.config.learning_rate)
        x0 = self.student_x0(batch.sample, batch.stages, batch.cond)  # with gradient, for the student's step
        fake_losses = [self.fake_update(batch, x0.detach()) for _ in range(self.config.fake_updates)]
        loss = self.student_update(*self.student_target(batch, x0))
        self.step += 1
        self.last_rewards = {"fake_loss": sum(fake_losses) / len(fake_losses)}
        if self.config.fake_loss_limit is not None:
            self.last_rewards["fake_skipped"] = float(self.fake_skipped)
        return loss

    # -- what a checkpoint holds --------------------------------------------------------------------

    def _adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()}

    def student_for_export(self) -> dict[str, torch.Tensor]:
        """The student adapter's weights (peft names)."""
        return self._adapter_state(STUDENT)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "config": self.config.to_dict(), "trainable": self._adapter_state(STUDENT),
                "fake": self._adapter_state(FAKE), "optimizer": self.optimizer.state_dict(),
                "fake_optimizer": self.fake_optimizer.state_dict(), "fake_skipped": self.fake_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from peft.utils import set_peft_model_state_dict

        saved = TDMConfig.from_dict(state["config"])
        if saved != self.config:
            raise ValueError(f"The checkpoint was made with another TDM config ({saved}), not {self.config}.")
        set_peft_model_state_dict(self.model, state["trainable"], adapter_name=STUDENT)
        set_peft_model_state_dict(self.model, state["fake"], adapter_name=FAKE)
        self.optimizer.load_state_dict(state["optimizer"])
        self.fake_optimizer.load_state_dict(state["fake_optimizer"])
        self.step = int(state["step"])
        self.fake_skipped = int(state.get("fake_skipped", 0))  # checkpoints before the guard have none
        self._use(STUDENT)
