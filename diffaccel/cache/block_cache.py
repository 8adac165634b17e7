"""Block residual cache (first-block / DBCache family).

Per forward: always run the first ``compute_first_blocks`` blocks (F); compare their residual with
the one stored at the last *computed* step by relative L1, ``mean|R - R_ref| / mean|R_ref|``; below
``threshold`` skip the middle blocks (M) by adding the cached residual of the middle span (what its
blocks added, for the hidden and, where the blocks carry one, the encoder stream: the sum of the
blocks' own residuals, so additions the model makes between blocks, e.g. ControlNet's, are not
replayed on top of their fresh values); always run the last ``compute_last_blocks`` blocks (B).
State is per CFG branch and per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook

from diffaccel.config import MethodConfig, check_float, check_int, register_config
from diffaccel.pipelines.adapters import BoundBlock
from diffaccel.registry import AccelTarget, register_method

from .calibrators import StreamForecast, check_calibrator

BLOCK_CACHE_HOOK = "diffaccel.block_cache"


@register_config
@dataclass(frozen=True)
class BlockCacheConfig(MethodConfig):
    """Skip the middle blocks while the front blocks' residual barely changes.

    Args:
        threshold: relative L1 change of the front residual below which the middle span is reused.
            0 never reuses; larger is faster and less faithful (cache-dit's default is 0.08).
        compute_first_blocks: blocks always computed at the front (Fn); their residual drives the decision.
        compute_last_blocks: blocks always computed at the back (Bn); they refine a reused span.
        warmup_steps: first denoising steps of each call that always compute (layout forms there).
        max_consecutive: most reuses in a row before a forced compute; None for no limit.
        calibrator: None reuses the stored middle residual as it is; "taylorseer" forecasts it from the
            residuals of the last computed steps (Taylor expansion in the step index), which keeps
            longer runs of reuse faithful (cache-dit's recommended FnB0 + TaylorSeer).
        calibrator_order: order of the Taylor expansion, 1 or 2 (TaylorSeer's FLUX preset uses 1).
    """

    slot = "cache"
    method = "block"

    threshold: float = 0.08
    compute_first_blocks: int = 1
    compute_last_blocks: int = 0
    warmup_steps: int = 2
    max_consecutive: int | None = 3
    calibrator: str | None = None
    calibrator_order: int = 1

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_calibrator(name, self.calibrator, self.calibrator_order)
        check_float(name, "threshold", self.threshold, minimum=0.0)
        check_int(name, "compute_first_blocks", self.compute_first_blocks, minimum=1)
        check_int(name, "compute_last_blocks", self.compute_last_blocks, minimum=0)
        check_int(name, "warmup_steps", self.warmup_steps, minimum=0)
        if self.max_consecutive is not None:
            check_int(name, "max_consecutive", self.max_consecutive, minimum=1)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor, or views of the same memory (a joined block's split stream is a fresh view each time)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype)


class SpanResidual:
    """What a span of blocks added to each stream in one forward, fed block by block while it computes.

    It is the span's output minus its input, less anything the model added *between* its blocks
    (ControlNet residuals after each Flux block, VACE hints): a replayed span then adds only what its
    blocks would have, and the model's own additions come fresh on the replayed step instead of twice.
    Where nothing comes between the blocks (each block gets the tensor the previous one returned), this is
    exactly output minus input."""

    def __init__(self) -> None:
        self.first: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the span's input streams
        self.last: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the last block's output streams
        self.between: list[torch.Tensor | None] = [None, None]  # what was added between blocks, per stream

    @torch.compiler.disable
    def add(self, block: BoundBlock, args: tuple, kwargs: dict, output: Any) -> None:
        """Feed one computed block of the span, in order."""
        streams_in = block.stream_inputs(args, kwargs)
        if self.first is None:
            self.first = streams_in
        else:
            for i, (now, before) in enumerate(zip(streams_in, self.last)):
                if now is not None and before is not None and now.shape == before.shape and not _same_memory(now, before):
                    gap = now - before
                    self.between[i] = gap if self.between[i] is None else self.between[i] + gap
        self.last = block.split_output(output)

    def residuals(self) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """(hidden residual, encoder residual or None, whether the last block returned no encoder stream)."""
        if self.first is None:
            return None, None, False
        out = []
        for i in (0, 1):
            start, end = self.first[i], self.last[i]
            if start is None or end is None or start.shape != end.shape:
                out.append(None)
                continue
            delta = end - start
            out.append(delta if self.between[i] is None else delta - self.between[i])
        return out[0], out[1], self.last[1] is None and self.first[1] is not None


def stream_layout(hidden: torch.Tensor, encoder: torch.Tensor | None) -> tuple:
    """The two streams' shapes: a stored residual fits only a forward whose streams have the same token counts
    (Qwen-Image 2.1's first step also carries the text, which its KV cache leaves out of the later ones)."""
    return tuple(hidden.shape), None if encoder is None else tuple(encoder.shape)


def finished_span(span: SpanResidual | None, forecast, step: int) -> tuple | None:
    """(hidden residual, encoder residual, encoder dropped) a span summed while it computed, handed to its
    forecast as well; None where it summed none."""
    hidden, encoder, encoder_dropped = span.residuals() if span is not None else (None, None, False)
    if hidden is None:
        return None
    forecast.update(hidden, encoder, step)
    return hidden, encoder, encoder_dropped


class BlockCacheState:
    """What one CFG branch remembers between forwards of a call."""

    def __init__(self, calibrator: str | None = None, order: int = 1) -> None:
        self.span_input: torch.Tensor | None = None  # hidden input of block 0, this forward
        self.reference_residual: torch.Tensor | None = None  # front residual at the last computed step
        self.reference_layout: tuple | None = None  # the front output's stream shapes at that step
        self.middle: SpanResidual | None = None  # the middle span's residual, summed while it computes
        self.cached_hidden_residual: torch.Tensor | None = None
        self.cached_encoder_residual: torch.Tensor | None = None
        self.encoder_output_is_none = False
        self.reuse = False
        self.consecutive_reuses = 0
        self.forecast = StreamForecast(calibrator, order)  # the middle residual, forecast when calibrated


def relative_l1(current: torch.Tensor, reference: torch.Tensor, group=None) -> float:
    """mean|current - reference| / mean|reference| (FBCache / DBCache similarity).

    With a process ``group`` (context parallel: every rank holds a shard of the sequence) the sums are
    all-reduced first, so every rank computes the same value and takes the same cache decision.
    """
    if group is not None:
        import torch.distributed as dist

        sums = torch.stack([(current - reference).abs().sum(), reference.abs().sum()]).double()
        dist.all_reduce(sums, group=group)
        return float("inf") if sums[1] == 0 else float(sums[0] / sums[1])
    denominator = reference.abs().mean()
    if denominator == 0:
        return float("inf")
    return float((current - reference).abs().mean() / denominator)



class BlockCacheHook(ModelHook):
    """One per block; its role (front start, decider, middle, back) decides what it does."""

    _is_stateful = False  # state lives in the runtime's BranchStates, reset there

    def __init__(self, config: BlockCacheConfig, runtime, states, block: BoundBlock, roles: set[str]) -> None:
        super().__init__()
        self.config = config
        self.runtime = runtime
        self.states = states
        self.block = block
        self.roles = roles

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state: BlockCacheState = self.states.get(self.runtime.clock.current.branch)
        if "start" in self.roles:
            state.span_input = self.block.stream_inputs(args, kwargs)[0]
        if "middle" in self.roles and state.reuse:
            return self._replay(state, args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if "decide" in self.roles:
            self._decide(state, output)
        if "middle" in self.roles and state.middle is not None:
            state.middle.add(self.block, args, kwargs, output)
        if "middle_end" in self.roles:
            self._store_middle_residual(state)
        return output

    def _replay(self, state: BlockCacheState, args: tuple, kwargs: dict):
        """Skipped block: pass the streams through; the span's first block adds the cached residual."""
        hidden, encoder = self.block.stream_inputs(args, kwargs)
        if "middle_start" in self.roles:
            step = self.runtime.clock.current.step_index
            hidden = hidden + state.forecast.hidden_at(state.cached_hidden_residual, step)
            if encoder is not None and state.cached_encoder_residual is not None:
                encoder = encoder + state.forecast.encoder_at(state.cached_encoder_residual, step)
        if "middle_end" in self.roles and state.encoder_output_is_none:
            encoder = None
        self.runtime.count_skipped_blocks()
        return self.block.join_output(hidden, encoder)

    @torch.compiler.disable
    def _decide(self, state: BlockCacheState, output: Any) -> None:
        ctx = self.runtime.clock.current
        hidden, encoder = self.block.split_output(output)
        residual = hidden - state.span_input
        reference = state.reference_residual
        layout = stream_layout(hidden, encoder)
        limit = self.config.max_consecutive
        reuse = (
            ctx.step_index >= self.config.warmup_steps
            and reference is not None
            and state.reference_layout == layout
            and state.cached_hidden_residual is not None
            and (limit is None or state.consecutive_reuses < limit)
            and relative_l1(residual, reference, self.runtime.decision_group) < self.config.threshold
        )
        state.reuse = reuse
        if reuse:
            state.consecutive_reuses += 1
            self.runtime.count("cache_hits")
        else:
            state.consecutive_reuses = 0
            state.reference_residual = residual
            state.reference_layout = layout
            state.middle = SpanResidual()
            self.runtime.count("cache_misses")
        state.span_input = None

    @torch.compiler.disable
    def _store_middle_residual(self, state: BlockCacheState) -> None:
        middle, state.middle = state.middle, None
        done = finished_span(middle, state.forecast, self.runtime.clock.current.step_index)
        if done is not None:
            state.cached_hidden_residual, state.cached_encoder_residual, state.encoder_output_is_none = done


def block_roles(index: int, num_blocks: int, first: int, last: int) -> set[str]:
    """Roles of block ``index`` for a split into ``first`` front, middle, and ``last`` back blocks."""
    roles: set[str] = set()
    middle_start, middle_end = first, num_blocks - last - 1
    if index == 0:
        roles.add("start")
    if index == first - 1:
        roles.add("decide")
    if middle_start <= index <= middle_end:
        roles.add("middle")
        if index == middle_start:
            roles.add("middle_start")
        if index == middle_end:
            roles.add("middle_end")
    return roles


@register_method(BlockCacheConfig)
class BlockCacheHandler:
    def validate(self, config: BlockCacheConfig, target: AccelTarget) -> None:
        if not target.adapter.block_cache:
            raise ValueError(
                f"cache='block' cannot apply to {target.denoiser_name}: {target.adapter.notes or 'no flat block list'}; "
                f"for UNets use cache='deep' (DeepCacheConfig)."
            )
        num_blocks = len(target.blocks)
        spared = config.compute_first_blocks + config.compute_last_blocks
        if spared >= num_blocks:
            raise ValueError(
                f"BlockCacheConfig: compute_first_blocks + compute_last_blocks = {spared} leaves no middle block to "
                f"skip in {target.denoiser_name}, which has {num_blocks} blocks; use a sum below {num_blocks}."
            )

    def apply(self, config: BlockCacheConfig, target: AccelTarget, runtime) -> None:
        states = runtime.new_branch_states(
            lambda: BlockCacheState(config.calibrator, config.calibrator_order)
        )
        blocks = target.blocks
        for index, block in enumerate(blocks):
            roles = block_roles(index, len(blocks), config.compute_first_blocks, config.compute_last_blocks)
            if roles:
                hook = BlockCacheHook(config, runtime, states, block, roles)
                runtime.register_hook(block.module, hook, BLOCK_CACHE_HOOK)
