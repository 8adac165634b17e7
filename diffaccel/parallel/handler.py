"""Validate and install CFG × context parallelism for one accelerated pipeline."""

from __future__ import annotations

from diffaccel.registry import AccelTarget, register_method

from .cfg import CfgParallelHook
from .config import CfgParallelConfig, ContextParallelDegrees, ParallelConfig
from .context import (
    build_groups,
    execution_device_type,
    disable_context_parallel,
    enable_context_parallel,
    hook_names,
    require_distributed,
)

CFG_HOOK = "diffaccel.parallel.cfg"


class ParallelHandler:
    def validate(self, config: ParallelConfig, target: AccelTarget) -> None:
        label = f"{type(config).__name__} (parallel={config.method!r})"
        _, world_size = require_distributed(label)
        cfg, ring, ulysses = config.degrees(world_size)
        if ring * ulysses > 1:
            if getattr(target.denoiser, "_cp_plan", None) is None:
                raise ValueError(
                    f"{label}: {target.denoiser_name} ({target.adapter.name}) has no context-parallel plan in diffusers "
                    f"(its class sets no _cp_plan), so its sequence cannot be split; use parallel='cfg' for it."
                )
            if ring > 1 and execution_device_type(target.denoiser) == "cpu":
                raise ValueError(
                    f"{label}: ring attention needs a GPU attention backend that returns the log-sum-exp; on CPU use "
                    f"Ulysses (ring=1)."
                )

    def apply(self, config: ParallelConfig, target: AccelTarget, runtime) -> None:
        """First of all methods: the CFG hook is then the innermost denoiser hook (guidance and caches above
        it see whole CFG batches)."""
        _, world_size = require_distributed(type(config).__name__)
        denoiser = target.denoiser
        self._groups = build_groups(config.degrees(world_size), execution_device_type(denoiser))
        if self._groups.cfg > 1:
            runtime.register_hook(denoiser, CfgParallelHook(runtime, self._groups, denoiser), CFG_HOOK)

    def apply_outer(self, config: ParallelConfig, target: AccelTarget, runtime) -> None:
        """After all methods: diffusers' context-parallel split/gather hooks must wrap the block caches' hooks
        on the same blocks, so the caches see (and store) this rank's shard of the sequence."""
        groups, self._groups = self._groups, None
        if groups.context_degree > 1:
            denoiser = target.denoiser
            before = hook_names(denoiser)
            enable_context_parallel(denoiser, groups)
            runtime.add_cleanup(lambda: disable_context_parallel(denoiser, before))
            runtime.decision_group = groups.context_group


for _config_cls in (ParallelConfig, CfgParallelConfig, ContextParallelDegrees):
    register_method(_config_cls)(ParallelHandler)  # one handler instance per config class
