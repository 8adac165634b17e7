"""Latent consistency distillation (LCD) of a flow-matching teacher into a few-step student.

One step (LCM, Luo et al. 2023, ported to flow matching): noise a data latent to σ_n on the teacher's
``solver_steps`` grid; the teacher, with CFG at the baked scale, takes one Euler step to σ_{n+skip}; the
student's consistency output at σ_n must match the target's at σ_{n+skip} (pseudo-Huber). The target
is an EMA copy of the student (full student) or the student itself without gradient (LoRA student,
whose teacher is the same transformer with its adapters switched off).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .config import LCDConfig
from .consistency import consistency_function, euler_step, pseudo_huber
from .data import DataSource, require_images
from .adapters import with_adapter_support
from .guidance_embedding import add_guidance_embedding, guidance_projection, projection_key
from .teacher import FlowTeacher

ADAPTER_NAME = "lcd"


@dataclass
class LCDBatch:
    latents: torch.Tensor  # the data latents z0
    captions: list[str]
    prompt_embeds: torch.Tensor
    prediction: torch.Tensor  # the student's consistency output at σ_n (its one-step x0 estimate), with gradient
    target: torch.Tensor  # the target's output at σ_{n+skip} after the teacher's step
    distill_loss: torch.Tensor


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float | None, seed: int,
             adapter_name: str = ADAPTER_NAME, targets: tuple[str, ...] = FlowTeacher.lora_targets) -> None:
    """Attach trainable LoRA adapters (peft) to ``transformer``'s linear layers named ``targets`` (the
    teacher family's ``lora_targets``); the base weights stay frozen. B starts at zero, so the adapted
    model starts as the base model."""
    try:
        from peft import LoraConfig
    except ImportError as error:  # pragma: no cover - peft is a dependency
        raise ImportError("A LoRA student needs peft: pip install peft") from error
    with_adapter_support(transformer)  # PixArt's transformer has no adapter methods in diffusers
    transformer.requires_grad_(False)
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # a second adapter, on purpose
        torch.manual_seed(seed)
        transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets)),
            adapter_name=adapter_name,
        )
    # trainable weights in float32 over a teacher in half precision (diffusers' cast_training_params);
    # peft casts each layer's input to its adapter's dtype and the sum back to the layer's
    for name, param in transformer.named_parameters():
        if f".{adapter_name}." in name:
            param.data = param.data.float()


def bind_trainer(trainer: Any, teacher: FlowTeacher, config: Any, data: DataSource | None,
                 accelerator: Any) -> None:
    """What every trainer holds: the teacher, its config, the caption/image source, the CFG scale it
    distils (required: ``distill()`` fills in the teacher's default) and the ``Accelerator``. With several
    processes each draws its own batches and noise (``stream_index``): data parallel, gradients averaged."""
    from accelerate import Accelerator

    if config.guidance_scale is None:
        raise ValueError(f"{type(trainer).__name__} needs the teacher's CFG scale: set "
                         f"{type(config).__name__}.guidance_scale (diffaccel.distill.distill() takes the teacher's default).")
    from .sizes import SizeCycle

    if teacher.guidance_distilled and teacher.embedded_guidance != float(config.guidance_scale):
        raise ValueError(f"The {type(teacher.pipe).__name__} teacher is told guidance {teacher.embedded_guidance} through "
                         f"its embedding, and this config distils {config.guidance_scale}; make them one (teacher_for(..., "
                         f"guidance_scale=...)).")
    if teacher.guidance_distilled and getattr(config, "guidance_range", None) is not None:
        raise ValueError(f"guidance_range: a {type(teacher.pipe).__name__} is guidance-distilled (its scale is already "
                         f"an input of the model); distil one scale (guidance_scale).")
    trainer.teacher, trainer.config = teacher, config
    trainer.sizes = SizeCycle(teacher, config, data)
    trainer.data = trainer.sizes.data[trainer.sizes.sizes[0]]
    trainer.guidance_scale = float(config.guidance_scale)
    trainer.accelerator = accelerator or Accelerator(cpu=teacher.transformer.device.type == "cpu")


def stream_index(trainer: Any, step: int) -> int:
    """Which batch and noise draw iteration ``step`` takes in this process: ``step`` alone in one process,
    ``step · n + rank`` among n, so the processes never see the same batch and a run resumes exactly."""
    accelerator = trainer.accelerator
    return step * accelerator.num_processes + accelerator.process_index


def average_gradients(trainer: Any, params: list[torch.nn.Parameter]) -> None:
    """Data parallel without a DDP wrapper: replace each gradient of ``params`` by its mean over the
    processes (one all-reduce of the flattened gradients). For trainers whose models a DDP wrapper cannot
    hold (TDM's adapter switching on one shared transformer, RG-LCD's proxy trained outside the student's
    backward); call it after ``backward`` and before clipping, so every process takes the same step."""
    processes = trainer.accelerator.num_processes
    if processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= processes
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset:offset + grad.numel()].view_as(grad).to(grad.dtype)
        offset += grad.numel()


def use_size(trainer: Any, step: int) -> tuple[int, int]:
    """Point ``trainer.teacher`` and ``trainer.data`` at iteration ``step``'s size; returns it."""
    size = trainer.sizes.size_at(step)
    trainer.teacher, trainer.data = trainer.sizes.teachers[size], trainer.sizes.data[size]
    return size


class LCDTrainer:
    """Holds the student, its target and optimiser; ``train_step`` makes one update and returns the loss.

    The state (``state_dict``) is everything a resumed run needs to continue bit-for-bit: trainable
    weights, the EMA target, the optimiser and the step counter (batches and noise derive from
    (seed, step)).
    """

    def __init__(self, teacher: FlowTeacher, config: LCDConfig, data: DataSource | None = None,
                 accelerator: Any = None) -> None:
        require_images(data, "lcd")
        bind_trainer(self, teacher, config, data, accelerator)
        self.grids = {size: view.sigma_grid(config.solver_steps) for size, view in self.sizes.teachers.items()}
        base = teacher.transformer
        base.requires_grad_(False).eval()
        if config.lora_rank:
            add_lora(base, config.lora_rank, config.lora_alpha, config.seed, targets=teacher.lora_targets)
            if config.init_student:
                from .sizes import warm_start

                warm_start(base, ADAPTER_NAME, config, "lcd", type(teacher.pipe).__name__)
            self.student = base
            self.target = None
            self.frozen_teacher = None
        else:
            if teacher.compute_dtype != torch.float32:
                raise ValueError(f"A full student (lora_rank 0) trains every weight of the teacher's copy, which is in "
                                 f"{teacher.compute_dtype}; train a LoRA student (lora_rank > 0) over it, or load the "
                                 f"teacher in float32.")
            self.frozen_teacher = base
            self.student = copy.deepcopy(base).requires_grad_(True)
            self.target = copy.deepcopy(base).requires_grad_(False)
        # The guidance embedding (LCM's w-embedding): the student's and the target's own hook, each on its
        # own transformer; a LoRA student's is switched off (scale None) whenever the base plays teacher.
        self.guidance_hooks: list = []
        if config.guidance_range is not None:
            for model in (self.student, self.target):
                if model is not None:
                    self.guidance_hooks.append(add_guidance_embedding(model, config.guidance_embedding_dim))
            # trained in float32 over a half-precision teacher, like the LoRA adapters beside it
            guidance_projection(self.student).float().requires_grad_(True)
            if self.target is not None:
                guidance_projection(self.target).requires_grad_(False)
        self.student.train()
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
        self.student, self.optimizer = self.accelerator.prepare(self.student, optimizer)
        self.step = 0

    # -- the pieces of one step -------------------------------------------------------------------

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)

    def _teacher_guided(self, sample: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond: Any,
                        scale: float | torch.Tensor) -> torch.Tensor:
        """The teacher's guided velocity (the base weights: a LoRA student's adapters switched off)."""
        if self.frozen_teacher is not None:
            return self.teacher.guided_velocity(self.frozen_teacher, sample, sigma, cond, uncond, scale)
        model = self.accelerator.unwrap_model(self.student)
        model.disable_adapters()
        with self._guidance_scales(None):
            try:
                return self.teacher.guided_velocity(model, sample, sigma, cond, uncond, scale)
            finally:
                model.enable_adapters()

    @contextlib.contextmanager
    def _guidance_scales(self, scales: torch.Tensor | None):
        """The CFG scales the student and target embed while inside (None: no embedding, the teacher)."""
        before = [hook.scale for hook in self.guidance_hooks]
        for hook in self.guidance_hooks:
            hook.scale = scales
        try:
            yield
        finally:
            for hook, scale in zip(self.guidance_hooks, before):
                hook.scale = scale

    def _draw_scales(self, gen: torch.Generator, n: int) -> torch.Tensor | None:
        """Per-example CFG scales, uniform in ``guidance_range`` (LCM's w ~ U[w_min, w_max]); None: the
        baked scale. Drawn after the noise, so runs without the embedding keep their random stream."""
        if self.config.guidance_range is None:
            return None
        low, high = self.config.guidance_range
        return low + (high - low) * torch.rand(n, generator=gen)

    def _target_model(self) -> torch.nn.Module:
        return self.target if self.target is not None else self.accelerator.unwrap_model(self.student)

    def forward_batch(self, step: int) -> "LCDBatch":
        """Batch ``step`` through teacher, student and target: the student's consistency output (with
        gradient), its target, and what a reward term needs (the data latents, captions, embeddings)."""
        cfg = self.config
        grid = self.grids[use_size(self, step)]
        draw = stream_index(self, step)
        pixels, captions = self.data.batch(cfg.seed, draw, cfg.batch_size)
        device = self.teacher.transformer.device
        latents = self.teacher.encode_images(pixels.to(device))
        cond, uncond = self.teacher.encode(captions)
        gen = self._generator(draw)
        n = len(captions)
        index = torch.randint(0, cfg.solver_steps - cfg.skip + 1, (n,), generator=gen)
        sigma_from = grid[index].to(device)
        sigma_to = grid[(index + cfg.skip).clamp(max=cfg.solver_steps)].to(device)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        scales = self._draw_scales(gen, n)
        s = sigma_from.reshape(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - s) * latents + s * noise

        with self._guidance_scales(scales):
            velocity = self.teacher.velocity(self.student, noisy, sigma_from, cond)
            prediction = consistency_function(noisy, sigma_from, velocity)
            with torch.no_grad():
                scale = self.guidance_scale if scales is None else scales.to(device)
                guided = self._teacher_guided(noisy, sigma_from, cond, uncond, scale)
                stepped = euler_step(noisy, guided, sigma_from, sigma_to)
                target_velocity = self.teacher.velocity(self._target_model(), stepped, sigma_to, cond)
                target = consistency_function(stepped, sigma_to, target_velocity)
        return LCDBatch(latents, captions, cond, prediction, target, pseudo_huber(prediction, target, cfg.huber_c).mean())

    def loss_at(self, step: int) -> torch.Tensor:
        """The training loss of batch ``step`` under the current weights (with gradient into the student)."""
        return self.objective(self.forward_batch(step))

    def objective(self, batch: "LCDBatch") -> torch.Tensor:
        return batch.distill_loss

    def after_update(self, batch: "LCDBatch") -> None:
        """Called after each optimiser step (RG-LCD trains its reward proxy here)."""

    def _learning_rate(self) -> float:
        warmup = self.config.warmup_steps
        return self.config.learning_rate * min(1.0, (self.step + 1) / warmup) if warmup else self.config.learning_rate

    def train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate()
        batch = self.forward_batch(self.step)
        loss = self.objective(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.accelerator.clip_grad_norm_(params, self.config.grad_clip)
        self.optimizer.step()
        if self.target is not None:
            self._update_ema()
        self.after_update(batch)
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.ema_decay
        student = self.accelerator.unwrap_model(self.student)
        for target, online in zip(self.target.parameters(), student.parameters()):
            target.lerp_(online.detach(), 1.0 - decay)

    # -- what a checkpoint holds --------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """LoRA: the adapter weights (peft names). Full: every weight, the guidance projection included."""
        student = self.accelerator.unwrap_model(self.student)
        if self.config.lora_rank:
            from peft.utils import get_peft_model_state_dict

            return {k: v.detach().clone() for k, v in get_peft_model_state_dict(student, adapter_name=ADAPTER_NAME).items()}
        return {k: v.detach().clone() for k, v in student.state_dict().items()}

    def _exported_model(self) -> torch.nn.Module:
        return self.target if self.target is not None else self.accelerator.unwrap_model(self.student)

    def student_for_export(self) -> dict[str, torch.Tensor]:
        """LoRA: the adapter weights (peft names). Full: the EMA target's weights, the smoother of the two,
        without the guidance projection (``guidance_embedding_for_export``), so they load into the teacher's
        class as it is."""
        if self.target is None:
            return self.trainable_state()
        weights = {k: v.detach().clone() for k, v in self.target.state_dict().items()}
        if self.guidance_hooks:
            weights.pop(projection_key(self.target))
        return weights

    def guidance_embedding_for_export(self) -> dict[str, torch.Tensor] | None:
        """The guidance projection's weight (of the EMA target for a full student), or None without one."""
        if not self.guidance_hooks:
            return None
        return {"weight": guidance_projection(self._exported_model()).weight.detach().clone()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "trainable": self.trainable_state(),
            "target": None if self.target is None else self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "extra": self.extra_state(),
            # a LoRA student's projection is not in the peft state (a full student's is in "trainable")
            "guidance_embedding": self.guidance_embedding_for_export() if self.config.lora_rank else None,
        }

    def extra_state(self) -> dict[str, Any]:
        """What a subclass adds to checkpoints (RG-LCD: its reward proxy)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = LCDConfig.from_dict(state["config"])
        if saved != self.config:
            raise ValueError(f"The checkpoint was made with another LCD config ({saved}), not {self.config}.")
        student = self.accelerator.unwrap_model(self.student)
        if self.config.lora_rank:
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(student, state["trainable"], adapter_name=ADAPTER_NAME)
            if self.guidance_hooks:
                with torch.no_grad():
                    guidance_projection(student).weight.copy_(state["guidance_embedding"]["weight"])
        else:
            student.load_state_dict(state["trainable"])
            self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_extra_state(state.get("extra", {}))
        self.step = int(state["step"])
