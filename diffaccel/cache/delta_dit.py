"""Δ-DiT (Chen et al., "Δ-DiT: A Training-Free Acceleration Method Tailored for Diffusion Transformers",
arXiv 2406.01125, 2024).

DiT has no long skip connections, so replacing a block span's *output* with last step's drops the current
step's input. Δ-Cache instead stores the span's *deviation* ``Δ = F_span(h) - h`` (hidden stream, and the
encoder stream where the blocks carry one) at a full step, and on cached steps sets the span's output to
``h_now + Δ``, where ``h_now`` is the span's fresh input at this step.

Stage-adaptive: the front blocks shape the outline and the rear blocks the detail, and sampling runs an
outline stage before a detail stage. So before the boundary step ``b`` the **rear** ``N_c`` blocks are
Δ-cached (the front ones always run), from ``b`` on the **front** ``N_c`` blocks are (the rear ones always
run). Within each stage a full step refreshes Δ every ``N`` steps; the first step of each stage is always
full, because the Δ in hand belongs to the other span. State is per CFG branch and per call.

No official code exists; ``b``, ``N`` and ``N_c`` have no published defaults (see the defaults below).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from diffusers.hooks.hooks import ModelHook

from diffaccel.config import MethodConfig, check_float, check_int, register_config
from diffaccel.pipelines.adapters import BoundBlock
from diffaccel.registry import AccelTarget, register_method

from .block_cache import SpanResidual
from .calibrators import StreamForecast, check_calibrator

logger = logging.getLogger("diffaccel")

DELTA_DIT_HOOK = "diffaccel.delta_dit"

OUTLINE = "outline"  # before the boundary: the rear span is Δ-cached
DETAIL = "detail"  # from the boundary on: the front span is Δ-cached


@register_config
@dataclass(frozen=True)
class DeltaDiTConfig(MethodConfig):
    """Δ-Cache a span of blocks: the rear ones in the outline stage, the front ones in the detail stage.

    Args:
        cache_interval: N; one full step, then N-1 steps that reuse Δ, restarting at each stage's first
            step. 1 computes every step (off, bit-identical). No published value; 2, the shortest reuse
            interval, matches the 1.08x reported at 4 steps with b=2, N_c=4 of 28 blocks.
        cached_blocks: N_c; how many blocks the span holds (the last N_c before the boundary, the first
            N_c after it). At most the model's number of blocks. 4 is the one value reported (4-step
            PixArt-α-LCM, from a secondary source); larger is faster and less faithful.
        boundary_fraction: b as a fraction of the call's steps: steps before ``round(b * steps)`` are the
            outline stage. 0.6 is the paper's b=12 of 20 steps on PixArt-α (as a reviewer quotes it).
            0 caches the front span throughout, 1 the rear span throughout.
        calibrator: None adds the stored Δ as it is; "taylorseer" forecasts Δ from the Δs of the stage's
            last full steps (Taylor expansion in the step index).
        calibrator_order: order of the Taylor expansion, 1 or 2.
    """

    slot = "cache"
    method = "delta_dit"

    cache_interval: int = 2
    cached_blocks: int = 4
    boundary_fraction: float = 0.6
    calibrator: str | None = None
    calibrator_order: int = 1

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_calibrator(name, self.calibrator, self.calibrator_order)
        check_int(name, "cache_interval", self.cache_interval, minimum=1)
        check_int(name, "cached_blocks", self.cached_blocks, minimum=1)
        check_float(name, "boundary_fraction", self.boundary_fraction, minimum=0.0, maximum=1.0)


def boundary_step(boundary_fraction: float, num_steps: int) -> int:
    """Δ-DiT's boundary b in steps: the fraction of the call's steps, halves rounded up."""
    return math.floor(boundary_fraction * num_steps + 0.5)


def delta_dit_schedule(
    step_index: int, num_steps: int | None, boundary_fraction: float, cache_interval: int
) -> tuple[str, bool]:
    """Δ-DiT's stage-adaptive schedule (arXiv 2406.01125): (stage, full step?) for a step.

    Steps before b are the outline stage (rear span cached), the rest the detail stage (front span
    cached); each stage refreshes Δ on its first step and every ``cache_interval`` steps after. Without
    a step count the whole call is the stage that covers most of it (outline iff b >= 0.5).
    """
    if num_steps is None:
        stage, stage_start = (OUTLINE if boundary_fraction >= 0.5 else DETAIL), 0
    else:
        boundary = boundary_step(boundary_fraction, num_steps)
        stage, stage_start = (OUTLINE, 0) if step_index < boundary else (DETAIL, boundary)
    return stage, (step_index - stage_start) % cache_interval == 0


def span_of(stage: str, num_blocks: int, cached_blocks: int) -> tuple[int, int]:
    """First and last block index of the Δ-cached span: rear blocks in the outline stage, front ones after."""
    if stage == OUTLINE:
        return num_blocks - cached_blocks, num_blocks - 1
    return 0, cached_blocks - 1


class DeltaDiTState:
    """What one CFG branch remembers between forwards of a call."""

    def __init__(self, calibrator: str | None = None, order: int = 1) -> None:
        self.stage: str | None = None  # stage whose span the stored Δ belongs to
        self.delta_hidden: torch.Tensor | None = None
        self.delta_encoder: torch.Tensor | None = None
        self.encoder_output_is_none = False  # the span's last block drops the encoder stream (SD3)
        self.forecast = StreamForecast(calibrator, order)  # Δ within the current stage, forecast when calibrated
        # Set for the forward now running:
        self.plan_stage: str | None = None
        self.plan_full = True
        self.span: tuple[int, int] = (0, -1)
        self.replay = False
        self.span_residual: SpanResidual | None = None  # the span's residual, summed while it computes


class _Active:
    """The branch state of the denoiser forward now running; None outside one (blocks then just compute)."""

    def __init__(self) -> None:
        self.state: DeltaDiTState | None = None
        self.warned_no_step_count = False



class DeltaDiTDenoiserHook(ModelHook):
    """On the denoiser: plans this forward (stage, span, full or cached) for its CFG branch."""

    _is_stateful = False  # state lives in the runtime's BranchStates, reset there

    def __init__(self, config: DeltaDiTConfig, runtime, states, active: _Active, num_blocks: int) -> None:
        super().__init__()
        self.config = config
        self.runtime = runtime
        self.states = states
        self.active = active
        self.num_blocks = num_blocks

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.active.state = self._plan()
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.active.state.span_residual = None
            self.active.state = None

    @torch.compiler.disable
    def _plan(self) -> DeltaDiTState:
        ctx = self.runtime.clock.current
        config = self.config
        if ctx.num_steps is None and not self.active.warned_no_step_count:
            self.active.warned_no_step_count = True
            logger.warning(
                "diffaccel: cache='delta_dit' does not know this call's number of steps (the scheduler's "
                "set_timesteps was not seen), so it cannot place the boundary at boundary_fraction=%s; the whole "
                "call is treated as the %s stage.",
                config.boundary_fraction,
                OUTLINE if config.boundary_fraction >= 0.5 else DETAIL,
            )
        state: DeltaDiTState = self.states.get(ctx.branch)
        stage, full = delta_dit_schedule(ctx.step_index, ctx.num_steps, config.boundary_fraction, config.cache_interval)
        state.plan_stage = stage
        state.plan_full = full
        state.span = span_of(stage, self.num_blocks, config.cached_blocks)
        state.replay = False
        state.span_residual = None
        return state


class DeltaDiTBlockHook(ModelHook):
    """On each block that some stage's span holds: capture, store or replay the span's deviation."""

    _is_stateful = False

    def __init__(self, runtime, active: _Active, block: BoundBlock, position: int, cached_blocks: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.active = active
        self.block = block
        self.position = position  # index in the flattened block list
        self.cached_blocks = cached_blocks

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.active.state
        if state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        start, end = state.span
        if not start <= self.position <= end:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.position == start:
            self._begin_span(state, self.block.stream_inputs(args, kwargs))
        if state.replay:
            return self._replay(state, args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if state.span_residual is not None:
            state.span_residual.add(self.block, args, kwargs, output)
        if self.position == end:
            self._store_delta(state)
        return output

    @torch.compiler.disable
    def _begin_span(self, state: DeltaDiTState, inputs: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Replay only on a cached step holding a Δ of this stage's span that fits the current input."""
        hidden, encoder = inputs
        state.replay = (
            not state.plan_full
            and state.stage == state.plan_stage
            and state.delta_hidden is not None
            and state.delta_hidden.shape == hidden.shape
            and (state.delta_encoder is None or (encoder is not None and state.delta_encoder.shape == encoder.shape))
        )
        if state.replay:
            self.runtime.count("cache_hits")
            self.runtime.count_skipped_blocks(self.cached_blocks)
        else:
            state.span_residual = SpanResidual()
            self.runtime.count("cache_misses")

    def _replay(self, state: DeltaDiTState, args: tuple, kwargs: dict):
        """Skipped block: pass the streams through; the span's first block adds Δ to the fresh input."""
        hidden, encoder = self.block.stream_inputs(args, kwargs)
        start, end = state.span
        if self.position == start:
            step = self.runtime.clock.current.step_index
            hidden = hidden + state.forecast.hidden_at(state.delta_hidden, step)
            if encoder is not None and state.delta_encoder is not None:
                encoder = encoder + state.forecast.encoder_at(state.delta_encoder, step)
        if self.position == end and state.encoder_output_is_none:
            encoder = None
        return self.block.join_output(hidden, encoder)

    @torch.compiler.disable
    def _store_delta(self, state: DeltaDiTState) -> None:
        """Full step: Δ = what the span's blocks added (span output - span input, less what the model adds
        between them), for each stream the span carries."""
        span, state.span_residual = state.span_residual, None
        hidden, encoder, encoder_dropped = span.residuals() if span is not None else (None, None, False)
        if hidden is None:
            return
        state.delta_hidden, state.delta_encoder, state.encoder_output_is_none = hidden, encoder, encoder_dropped
        if state.stage != state.plan_stage:  # a new span: its Δ history starts here
            state.forecast.reset()
        state.forecast.update(state.delta_hidden, state.delta_encoder, self.runtime.clock.current.step_index)
        state.stage = state.plan_stage


@register_method(DeltaDiTConfig)
class DeltaDiTHandler:
    def validate(self, config: DeltaDiTConfig, target: AccelTarget) -> None:
        if not target.adapter.block_cache:
            raise ValueError(
                f"cache='delta_dit' cannot apply to {target.denoiser_name}: Δ-DiT needs a diffusion transformer's "
                f"flat block list ({target.adapter.notes or 'this model has none'}); for UNets use cache='deep' "
                f"(DeepCacheConfig)."
            )
        num_blocks = len(target.blocks)
        if config.cached_blocks > num_blocks:
            raise ValueError(
                f"DeltaDiTConfig.cached_blocks={config.cached_blocks} is more than {target.denoiser_name}'s "
                f"{num_blocks} blocks; use cached_blocks between 1 and {num_blocks}."
            )

    def apply(self, config: DeltaDiTConfig, target: AccelTarget, runtime) -> None:
        states = runtime.new_branch_states(lambda: DeltaDiTState(config.calibrator, config.calibrator_order))
        active = _Active()
        blocks = target.blocks
        num_blocks = len(blocks)
        front = set(range(*_bounds(span_of(DETAIL, num_blocks, config.cached_blocks))))
        rear = set(range(*_bounds(span_of(OUTLINE, num_blocks, config.cached_blocks))))
        for position in sorted(front | rear):
            hook = DeltaDiTBlockHook(runtime, active, blocks[position], position, config.cached_blocks)
            runtime.register_hook(blocks[position].module, hook, DELTA_DIT_HOOK)
        runtime.register_hook(
            target.denoiser, DeltaDiTDenoiserHook(config, runtime, states, active, num_blocks), DELTA_DIT_HOOK
        )


def _bounds(span: tuple[int, int]) -> tuple[int, int]:
    return span[0], span[1] + 1
