"""Learned cache schedule (HarmoniCa: Huang et al., "Harmonizing Training and Inference for Better
Feature Cache in Diffusion Transformer Acceleration", arXiv 2410.01723).

Inference: a static per-(step, block) mask. A block marked "0" at a step returns its input plus the
residual (output minus input, per stream) it produced at the last step it computed; "1" computes and
refreshes that residual. HarmoniCa caches the attention and MLP outputs before the adaLN gate; we cache
whole-block residuals, which needs no knowledge of a block's insides and so serves every family.

Training (``train_schedule``): one router logit per (step, block). Step-Wise Denoising Training: the
pipeline samples along the *student's* own trajectory, so the router sees the cache state its earlier
decisions created; at each step the same denoiser without caching is the teacher (from the same input),
and the loss is λ_t · MSE(student, teacher) + β · Σ sigmoid(logits_t). Forward decisions are hard
(score > τ, straight-through gradient through the soft blend), as in the official code. The
Image-Error-Proxy λ_t (IEPO) is the increase of the final latent's error when step t's decisions are
added to the earlier steps' (recomputed every ``proxy_every`` iterations, as ``get_lambda`` does).
Only the logits train; the model is frozen.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import HookRegistry, ModelHook

from diffaccel.config import MethodConfig, register_config
from diffaccel.guidance.layout import prediction_of
from diffaccel.pipelines.adapters import BoundBlock
from diffaccel.registry import AccelTarget, register_method
from diffaccel.runtime import remove_hook

logger = logging.getLogger("diffaccel")

LEARNED_CACHE_HOOK = "diffaccel.learned_cache"
TRAINER_HOOK = "diffaccel.learned_cache_trainer"


@register_config
@dataclass(frozen=True)
class LearnedCacheConfig(MethodConfig):
    """A per-step, per-block compute mask trained for one model and step count.

    Args:
        schedule: one string per denoising step, one character per block: "1" computes the block,
            "0" reuses its cached residual. Made by ``diffaccel tune cache --method learned`` (or
            ``train_schedule``); a call with another step count uses the nearest step's row.
        trained_for: what the schedule was trained on (model, steps, β); informational.
    """

    slot = "cache"
    method = "learned"

    schedule: tuple[str, ...] = ()
    trained_for: str = ""

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.schedule, tuple) or not all(isinstance(row, str) for row in self.schedule):
            raise ValueError(f"{name}.schedule must be a tuple of strings of '0'/'1', got {self.schedule!r}.")
        lengths = {len(row) for row in self.schedule}
        if len(lengths) > 1 or any(set(row) - {"0", "1"} for row in self.schedule):
            raise ValueError(f"{name}.schedule rows must be equally long strings of '0' and '1'.")

    @property
    def num_blocks(self) -> int:
        return len(self.schedule[0]) if self.schedule else 0

    @property
    def compute_fraction(self) -> float:
        total = sum(len(row) for row in self.schedule)
        return sum(row.count("1") for row in self.schedule) / total if total else 1.0


def schedule_row(schedule: Sequence[str], step_index: int, num_steps: int | None) -> str:
    """The mask row for a step; a call with another step count maps steps by relative position."""
    rows = len(schedule)
    if num_steps is None or num_steps == rows:
        return schedule[min(step_index, rows - 1)]
    position = round(step_index * (rows - 1) / max(num_steps - 1, 1))
    return schedule[min(max(position, 0), rows - 1)]


def mask_to_schedule(mask: torch.Tensor) -> tuple[str, ...]:
    """(steps, blocks) bool tensor -> schedule strings (step 0 always computes)."""
    mask = mask.clone().bool()
    mask[0] = True
    return tuple("".join("1" if v else "0" for v in row.tolist()) for row in mask)


# ------------------------------------------------------------------------------------------ gates


class MaskGates:
    """Inference: hard decisions from a schedule."""

    training = False

    def __init__(self, schedule: Sequence[str]) -> None:
        self.schedule = tuple(schedule)

    def gate(self, step_index: int, num_steps: int | None, block: int) -> bool:
        return schedule_row(self.schedule, step_index, num_steps)[block] == "1"


class RouterGates(torch.nn.Module):
    """Training: one logit per (step, block); hard forward decision, straight-through gradient.

    Mode "teacher" computes every block without touching the caches; "student" routes.
    """

    training_gates = True

    def __init__(self, num_steps: int, num_blocks: int, threshold: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # Start near "compute everything" so the first trajectories stay close to the teacher's.
        self.logits = torch.nn.Parameter(2.0 + 0.1 * torch.randn(num_steps, num_blocks, generator=generator))
        self.threshold = threshold
        self.mode = "student"

    def scores(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def gate(self, step_index: int, num_steps: int | None, block: int):
        if self.mode == "teacher" or step_index == 0:
            return True
        score = torch.sigmoid(self.logits[min(step_index, self.logits.shape[0] - 1), block])
        hard = (score > self.threshold).to(score.dtype)
        return hard + score - score.detach()

    def mask(self, threshold: float | None = None) -> torch.Tensor:
        mask = self.scores().detach() > (self.threshold if threshold is None else threshold)
        mask[0] = True
        return mask


class GateHolder:
    """Indirection so a trainer can swap the gates of installed hooks."""

    def __init__(self, gates) -> None:
        self.gates = gates


# ------------------------------------------------------------------------------------------ hooks


class LearnedCacheState:
    def __init__(self) -> None:
        # block index -> (hidden residual, encoder residual or None, block drops the encoder stream)
        self.residuals: dict[int, tuple[torch.Tensor, torch.Tensor | None, bool]] = {}


class LearnedCacheHook(ModelHook):
    """On each block: compute and refresh its residual, or replay it, as the gate says."""

    _is_stateful = False

    def __init__(self, runtime, states, holder: GateHolder, block: BoundBlock, index: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.states = states
        self.holder = holder
        self.block = block
        self.index = index

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        ctx = self.runtime.clock.current
        gates = self.holder.gates
        state: LearnedCacheState = self.states.get(ctx.branch)
        gate = gates.gate(ctx.step_index, ctx.num_steps, self.index)
        hidden_in, encoder_in = self.block.stream_inputs(args, kwargs)
        cached = self._cached(state, hidden_in, encoder_in)
        if gate is False and cached is not None:
            self.runtime.count_skipped_blocks()
            return self.block.join_output(*cached)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if isinstance(gate, torch.Tensor):  # training: blend toward the cached output, straight through
            hard = bool(gate.detach() > 0.5)
            if cached is not None:
                output = self._blend(output, cached, gate)
            if hard or cached is None:
                self._store(state, hidden_in, encoder_in, output)
            return output
        if getattr(gates, "mode", "student") != "teacher":
            self._store(state, hidden_in, encoder_in, output)
        return output

    def _cached(self, state: LearnedCacheState, hidden_in, encoder_in):
        entry = state.residuals.get(self.index)
        if entry is None or entry[0].shape != hidden_in.shape:
            return None
        hidden_residual, encoder_residual, drops_encoder = entry
        encoder = encoder_in
        if encoder_in is not None and encoder_residual is not None:
            if encoder_residual.shape != encoder_in.shape:
                return None
            encoder = encoder_in + encoder_residual
        if drops_encoder:
            encoder = None
        return hidden_in + hidden_residual, encoder

    def _blend(self, output, cached, gate: torch.Tensor):
        hidden, encoder = self.block.split_output(output)
        cached_hidden, cached_encoder = cached
        hidden = cached_hidden + (hidden - cached_hidden) * gate
        if encoder is not None and cached_encoder is not None:
            encoder = cached_encoder + (encoder - cached_encoder) * gate
        return self.block.join_output(hidden, encoder)

    @torch.compiler.disable
    def _store(self, state: LearnedCacheState, hidden_in, encoder_in, output) -> None:
        hidden, encoder = self.block.split_output(output)
        encoder_residual = None
        if encoder is not None and encoder_in is not None and encoder.shape == encoder_in.shape:
            encoder_residual = (encoder - encoder_in).detach()
        drops_encoder = encoder is None and encoder_in is not None
        state.residuals[self.index] = ((hidden - hidden_in).detach(), encoder_residual, drops_encoder)


@register_method(LearnedCacheConfig)
class LearnedCacheHandler:
    def validate(self, config: LearnedCacheConfig, target: AccelTarget) -> None:
        if not target.adapter.block_cache:
            raise ValueError(
                f"cache='learned' cannot apply to {target.denoiser_name}: {target.adapter.notes or 'no flat block list'}; "
                f"for UNets use cache='deep' (DeepCacheConfig)."
            )
        if not config.schedule:
            raise ValueError(
                "cache='learned' needs a schedule trained for this model: run `diffaccel tune cache --method learned "
                "--model MODEL --out cache.json` (or diffaccel.cache.learned.train_schedule) and pass the file."
            )
        if config.num_blocks != len(target.blocks):
            raise ValueError(
                f"LearnedCacheConfig.schedule has {config.num_blocks} blocks per step, but {target.denoiser_name} has "
                f"{len(target.blocks)}; it was trained for another model ({config.trained_for or 'unknown'})."
            )

    def apply(self, config: LearnedCacheConfig, target: AccelTarget, runtime) -> None:
        states = runtime.new_branch_states(LearnedCacheState)
        holder = GateHolder(MaskGates(config.schedule))
        runtime.learned_cache_gates = holder  # the trainer swaps the gates through this
        for index, block in enumerate(target.blocks):
            runtime.register_hook(block.module, LearnedCacheHook(runtime, states, holder, block, index), LEARNED_CACHE_HOOK)


# ------------------------------------------------------------------------------------------ training


class _TrainerHook(ModelHook):
    """Outermost on the denoiser during training: teacher and student from the same input, a loss per
    forward, backward at once (the graph never spans steps); the pipeline continues from the student."""

    def __init__(self, runtime, router: RouterGates, weights: Callable[[int], float], beta: float) -> None:
        super().__init__()
        self.runtime = runtime
        self.router = router
        self.weights = weights
        self.beta = beta
        self.losses: list[float] = []

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        router = self.router
        if self.runtime.learned_cache_gates.gates is not router:  # a proxy pass with a fixed mask
            return self.fn_ref.original_forward(*args, **kwargs)
        router.mode = "teacher"
        with torch.no_grad():
            teacher = prediction_of(self.fn_ref.original_forward(*args, **kwargs)).detach()
        router.mode = "student"
        with torch.enable_grad():
            output = self.fn_ref.original_forward(*args, **kwargs)
            student = prediction_of(output)
            step = self.runtime.clock.current.step_index
            loss = self.weights(step) * F.mse_loss(student.float(), teacher.float())
            if step > 0:
                loss = loss + self.beta * router.scores()[min(step, router.logits.shape[0] - 1)].sum()
            if loss.requires_grad:
                loss.backward()
        self.losses.append(float(loss))
        if isinstance(output, torch.Tensor):
            return output.detach()
        if isinstance(output, (tuple, list)):
            return type(output)(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
        output.sample = output.sample.detach()
        return output


def _final_latent(pipe: Any, call: dict) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(call.get("seed", 0))
    kwargs = {k: v for k, v in call.items() if k not in ("seed", "output_type", "generator")}
    out = pipe(generator=generator, output_type="latent", **kwargs)
    latents = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(latents).float()


def image_error_proxy(pipe: Any, holder: GateHolder, mask: torch.Tensor, call: dict) -> torch.Tensor:
    """IEPO's λ_t: the final latent's extra error when step t's decisions join those of steps < t."""
    steps = mask.shape[0]
    rows = torch.ones_like(mask)
    previous_gates = holder.gates
    try:
        holder.gates = MaskGates(mask_to_schedule(rows))
        reference = _final_latent(pipe, call)
        errors = [0.0]
        last = 0.0
        for t in range(1, steps):
            rows[t] = mask[t]
            holder.gates = MaskGates(mask_to_schedule(rows))
            error = float(F.mse_loss(_final_latent(pipe, call), reference))
            errors.append(max(error - last, 0.0))
            last = error
    finally:
        holder.gates = previous_gates
    weights = torch.tensor(errors)
    if weights[1:].sum() <= 0:
        return torch.ones(steps)
    weights = weights / weights[1:].mean()
    return weights.clamp(min=0.05)


def train_schedule(
    pipe: Any,
    calls: Sequence[dict],
    *,
    beta: float = 1e-4,
    threshold: float = 0.1,
    iterations: int = 60,
    lr: float = 0.05,
    proxy_every: int = 20,
    max_minutes: float | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[LearnedCacheConfig, RouterGates]:
    """Train a HarmoniCa-style router on ``pipe``; returns the schedule (threshold τ) and the router.

    ``calls`` are keyword arguments of ``pipe(...)`` with a ``seed`` each (prompt, steps, size...); all
    must use the same ``num_inference_steps``. Each iteration samples one of them along the student's
    trajectory. ``beta`` trades cache use against error (larger caches more); the router's scores can
    be re-thresholded afterwards (``router.mask(τ)``) to hit a compute budget without retraining.
    """
    import diffaccel

    steps = {call["num_inference_steps"] for call in calls}
    if len(steps) != 1:
        raise ValueError(f"train_schedule: every call needs the same num_inference_steps, got {sorted(steps)}.")
    num_steps = steps.pop()
    denoiser = diffaccel.api.find_denoiser(pipe)
    adapter = diffaccel.pipelines.adapter_for(denoiser)
    num_blocks = len(adapter.find_blocks(denoiser))
    router = RouterGates(num_steps, num_blocks, threshold=threshold, seed=seed)
    diffaccel.accelerate(pipe, cache=LearnedCacheConfig(schedule=mask_to_schedule(torch.ones(num_steps, num_blocks))))
    runtime = diffaccel.api.runtime_of(pipe)
    holder: GateHolder = runtime.learned_cache_gates
    optimizer = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
    weights = torch.ones(num_steps)
    trainer = _TrainerHook(runtime, router, lambda t: float(weights[min(t, num_steps - 1)]), beta)
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.register_hook(trainer, TRAINER_HOOK)
    registry.invalidate_child_registries_cache()
    start = time.time()
    try:
        holder.gates = router
        for iteration in range(iterations):
            if max_minutes is not None and time.time() - start > max_minutes * 60:
                break
            call = calls[iteration % len(calls)]
            if proxy_every and iteration % proxy_every == 0 and iteration > 0:
                weights = image_error_proxy(pipe, holder, router.mask(), calls[0])
            optimizer.zero_grad(set_to_none=True)
            trainer.losses.clear()
            _final_latent(pipe, call)
            optimizer.step()
            with torch.no_grad():
                router.logits.clamp_(-5.0, 5.0)
            if progress is not None:
                mask = router.mask()
                progress(f"iteration {iteration + 1}/{iterations}: loss {sum(trainer.losses):.4g}, "
                         f"computes {mask.float().mean():.2f} of blocks")
    finally:
        remove_hook(denoiser, TRAINER_HOOK)
        registry.invalidate_child_registries_cache()
        diffaccel.remove(pipe)
    label = f"{type(denoiser).__name__}, {num_steps} steps, beta={beta:g}, tau={threshold:g}"
    return LearnedCacheConfig(schedule=mask_to_schedule(router.mask()), trained_for=label), router


def schedule_for_budget(router: RouterGates, compute_fraction: float, trained_for: str = "") -> LearnedCacheConfig:
    """Re-threshold a trained router so about ``compute_fraction`` of (step, block) pairs compute."""
    if not 0.0 < compute_fraction <= 1.0:
        raise ValueError(f"compute_fraction must be in (0, 1], got {compute_fraction}.")
    scores = router.scores().detach().clone()
    scores[0] = math.inf  # step 0 always computes
    k = max(1, round(compute_fraction * scores.numel()))
    threshold = torch.topk(scores.flatten(), k).values[-1]
    mask = scores >= threshold
    return LearnedCacheConfig(schedule=mask_to_schedule(mask), trained_for=trained_for)
