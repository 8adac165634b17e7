"""DeepCache for UNets (Ma, Fang, Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024).

Adjacent denoising steps share nearly identical *deep* UNet features. On a full step the whole UNet
runs and the outputs of its deep blocks are stored; on the retrieval steps in between, only the
shallow skip branch runs (conv_in, the time embedding, ``down_blocks[0..b]``, the mirrored up
blocks ``up_blocks[D-1-b..D-1]`` and conv_out) and the deep blocks return their stored outputs.

Mirrored index: with ``D`` down blocks, ``up_blocks[D-1-i]`` works at the resolution of
``down_blocks[i]`` and consumes exactly the skip tensors made by ``down_blocks[i]``'s resnets plus the
one that entered it (``down_blocks[i-1]``'s downsampler output, or conv_in's output for ``i == 0``).
So for branch ``b`` the fresh up blocks read only fresh skips, and ``down_blocks[b]``'s downsampler,
whose output feeds only deep (cached) consumers, is cached too.

Granularity is the block (plus that downsampler); the official helper can also cut inside a block
(``cache_branch_id = 3 * block + layer``), so its branch 0 keeps less fresh than ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook

from diffaccel.config import MethodConfig, check_int, register_config
from diffaccel.registry import AccelTarget, register_method

DEEP_CACHE_HOOK = "diffaccel.deep_cache"


@register_config
@dataclass(frozen=True)
class DeepCacheConfig(MethodConfig):
    """Reuse a UNet's deep features between full steps (uniform 1:N schedule of DeepCache).

    Args:
        cache_interval: N; a full UNet step every N denoising steps, the N-1 steps between reuse the
            deep features. 1 computes every step (off, bit-identical); the DeepCache README uses 3.
        cache_branch: b; ``down_blocks[0..b]`` and the mirrored ``up_blocks[D-1-b..D-1]`` stay fresh,
            every deeper block and the mid block are reused. 0 is the shallowest branch: fastest,
            least faithful. Must be below the model's number of down blocks D.
    """

    slot = "cache"
    method = "deep"

    cache_interval: int = 3
    cache_branch: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_int(name, "cache_interval", self.cache_interval, minimum=1)
        check_int(name, "cache_branch", self.cache_branch, minimum=0)


def is_full_step(step_index: int, cache_interval: int) -> bool:
    """DeepCache's uniform 1:N inference (Ma et al., arXiv 2312.00858): full iff step % N == 0."""
    return step_index % cache_interval == 0


class DeepCacheState:
    """One CFG branch's stored deep outputs, from its last full step of the current call."""

    def __init__(self) -> None:
        self.outputs: dict[str, Any] = {}  # cache key -> exactly what the module returned
        self.mode: str | None = None  # "full" or "retrieve" while a UNet forward runs, else None


class _Active:
    """Which branch state the UNet forward now running uses; None outside a UNet forward.

    Block hooks read it instead of the clock, so a block called on its own (outside the UNet) just
    computes and never touches a cache.
    """

    def __init__(self) -> None:
        self.state: DeepCacheState | None = None


class DeepCacheUNetHook(ModelHook):
    """On the UNet: picks full or retrieval for this forward and keeps the statistics."""

    _is_stateful = False  # state lives in the runtime's BranchStates, reset there

    def __init__(self, config: DeepCacheConfig, runtime, states, active: _Active, keys: frozenset[str], skipped: int):
        super().__init__()
        self.config = config
        self.runtime = runtime
        self.states = states
        self.active = active
        self.keys = keys
        self.skipped = skipped

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        _reject_adapter_residuals(kwargs)
        state = self._begin()
        self.active.state = state
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            state.mode = None
            self.active.state = None

    @torch.compiler.disable
    def _begin(self) -> DeepCacheState:
        ctx = self.runtime.clock.current
        state: DeepCacheState = self.states.get(ctx.branch)
        # A fresh state (new call, new branch, or a shape change the runtime dropped) has nothing to reuse.
        retrieve = not is_full_step(ctx.step_index, self.config.cache_interval) and self.keys <= state.outputs.keys()
        if retrieve:
            state.mode = "retrieve"
            self.runtime.count("cache_hits")
            self.runtime.count_skipped_blocks(self.skipped)
        else:
            state.mode = "full"
            state.outputs = {}  # an interrupted full step then leaves an incomplete cache: never reused
            self.runtime.count("cache_misses")
        return state


def _reject_adapter_residuals(kwargs: dict) -> None:
    """T2I-Adapter residuals are added in place to deep block outputs, which would corrupt the cache."""
    legacy_adapter = kwargs.get("down_block_additional_residuals") is not None and kwargs.get(
        "mid_block_additional_residual"
    ) is None
    if kwargs.get("down_intrablock_additional_residuals") is not None or legacy_adapter:
        raise ValueError(
            "DeepCacheConfig (cache='deep') cannot run with T2I-Adapter residuals: the UNet adds them in place to "
            "the cached deep features. Call diffaccel.remove(pipe) to run adapter pipelines without DeepCache."
        )


class DeepCacheModuleHook(ModelHook):
    """On a deep module: store its output on a full step, return the stored one on a retrieval step.

    ``boundary`` marks the one cached output a fresh module consumes (the input of the first fresh up
    block). It is kept as a copy both ways, because up blocks may edit their input in place (FreeU
    scales ``hidden_states[:, :C/2]``), which would otherwise change the cache.
    """

    _is_stateful = False

    def __init__(self, active: _Active, key: str, boundary: bool = False) -> None:
        super().__init__()
        self.active = active
        self.key = key
        self.boundary = boundary

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.active.state
        if state is not None and state.mode == "retrieve":
            cached = state.outputs[self.key]
            return _copy(cached) if self.boundary else cached
        output = self.fn_ref.original_forward(*args, **kwargs)
        if state is not None and state.mode == "full":
            state.outputs[self.key] = _copy(output) if self.boundary else output
        return output


def _copy(output: Any) -> Any:
    return output.clone() if isinstance(output, torch.Tensor) else output


def _num_resnets(block: torch.nn.Module) -> int:
    return len(getattr(block, "resnets", None) or ())


def _check_unet(target: AccelTarget) -> tuple[torch.nn.ModuleList, torch.nn.ModuleList]:
    denoiser = target.denoiser
    down = getattr(denoiser, "down_blocks", None)
    up = getattr(denoiser, "up_blocks", None)
    if not isinstance(down, torch.nn.ModuleList) or not isinstance(up, torch.nn.ModuleList) or not hasattr(
        denoiser, "mid_block"
    ):
        raise ValueError(
            f"DeepCacheConfig (cache='deep') needs a UNet with down_blocks, mid_block and up_blocks "
            f"(UNet2DConditionModel, as in SD 1.5 / SDXL); {target.denoiser_name} has none. "
            f"For transformer models use cache='block'."
        )
    if len(down) == 0 or len(down) != len(up):
        raise ValueError(
            f"DeepCacheConfig (cache='deep'): {target.denoiser_name} has {len(down)} down blocks and {len(up)} up "
            f"blocks; DeepCache needs a mirrored UNet with as many of each (at least one)."
        )
    return down, up


def _check_mirrored_skips(target: AccelTarget, down, up, branch: int) -> None:
    """The fresh up blocks must read only skips made by conv_in and the fresh down blocks."""
    depth = len(down)
    # conv_in's output, one skip per fresh down resnet, one per downsampler that feeds a fresh down block.
    made = 1 + sum(_num_resnets(block) for block in down[: branch + 1])
    made += sum(1 for block in down[:branch] if getattr(block, "downsamplers", None))
    needed = sum(_num_resnets(block) for block in up[depth - 1 - branch :])
    if needed != made:
        raise ValueError(
            f"DeepCacheConfig: {target.denoiser_name}'s up_blocks[{depth - 1 - branch}:] read {needed} skip tensors, "
            f"but conv_in and down_blocks[:{branch + 1}] make {made}; the UNet is not mirrored the way DeepCache "
            f"needs, so cache_branch={branch} cannot be cached here. Try another cache_branch."
        )


@register_method(DeepCacheConfig)
class DeepCacheHandler:
    def validate(self, config: DeepCacheConfig, target: AccelTarget) -> None:
        down, up = _check_unet(target)
        depth = len(down)
        if config.cache_branch >= depth:
            raise ValueError(
                f"DeepCacheConfig.cache_branch={config.cache_branch} is out of range: {target.denoiser_name} has "
                f"{depth} down blocks, so cache_branch must be between 0 and {depth - 1} (0 is the fastest)."
            )
        _check_mirrored_skips(target, down, up, config.cache_branch)

    def apply(self, config: DeepCacheConfig, target: AccelTarget, runtime) -> None:
        unet = target.denoiser
        down, up = unet.down_blocks, unet.up_blocks
        depth, branch = len(down), config.cache_branch
        first_fresh_up = depth - 1 - branch
        states = runtime.new_branch_states(DeepCacheState)
        active = _Active()
        keys: list[str] = []

        def cache(module: torch.nn.Module, key: str, boundary: bool = False) -> None:
            runtime.register_hook(module, DeepCacheModuleHook(active, key, boundary), DEEP_CACHE_HOOK)
            keys.append(key)

        # down_blocks[b]'s downsampler output only feeds down_blocks[b+1] and an up block deeper than the
        # mirror, both cached; its resnet skips feed the fresh mirrored up block.
        for index, downsampler in enumerate(getattr(down[branch], "downsamplers", None) or ()):
            cache(downsampler, f"down_blocks.{branch}.downsamplers.{index}")
        for index in range(branch + 1, depth):
            cache(down[index], f"down_blocks.{index}")
        if unet.mid_block is not None:
            cache(unet.mid_block, "mid_block", boundary=first_fresh_up == 0)
        for index in range(first_fresh_up):
            cache(up[index], f"up_blocks.{index}", boundary=index == first_fresh_up - 1)

        skipped = 2 * (depth - 1 - branch)  # deep down blocks + as many up blocks; the mid block is not counted
        hook = DeepCacheUNetHook(config, runtime, states, active, frozenset(keys), skipped)
        runtime.register_hook(unet, hook, DEEP_CACHE_HOOK)
