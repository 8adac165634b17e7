"""Block-sparse self-attention for long video (and large image) sequences.

Two configs share one mechanism:

* ``BlockSparseAttentionConfig`` (``attention="block_sparse"``): Video-BLADE's Adaptive Block-Sparse
  Attention — a content-aware block mask recomputed at every attention call from mean-pooled
  queries and keys (``masks.adaptive_block_mask``).
* ``SlidingTileAttentionConfig`` (``attention="sliding_tile"``): Sliding Tile Attention's static
  3D window of tiles, the usual baseline; no scoring.

How it is installed: a ``ModelHook`` on every self-attention module of the denoiser's blocks
(``attn1`` / ``attn``) runs the module's own processor inside a ``TorchFunctionMode`` that answers
that processor's ``scaled_dot_product_attention`` call with block-sparse attention. The processor
(whichever the family or the user set: RoPE, QK norms, joint text) stays untouched and no upstream
code is copied; cross-attention calls (key length differs from query length) pass through. A hook
on the denoiser decides per forward whether this step runs dense (first/last steps) and what the
token grid is. Everything is removed with the rest of diffaccel's hooks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import ModelHook
from torch.overrides import TorchFunctionMode

from diffaccel.config import MethodConfig, check_choice, check_float, check_int, register_config
from diffaccel.devices import execution_device
from diffaccel.kernels.block_sparse import (
    block_sparse_attention,
    drop_padding_blocks,
    num_blocks,
    resolve_implementation,
)
from diffaccel.pipelines.adapters import described_block, token_grid
from diffaccel.registry import AccelTarget, register_method

from .layout import TokenLayout, default_tile
from .masks import adaptive_block_mask, force_blocks, sliding_tile_mask, window_mask

logger = logging.getLogger("diffaccel")

STEP_HOOK = "diffaccel.sparse_attention.step"
ATTENTION_HOOK = "diffaccel.sparse_attention"
CONTROLLER_ATTRIBUTE = "_diffaccel_sparse_attention"  # on the runtime: the installed controller
# Where a block keeps its self-attention, tried in this order (the first that exists wins); a dotted name is a path
# below the block. Never a cross-attention: ``attention`` is the block's self-attention in Z-Image, Ideogram 4, PRX
# (its image queries over [text, image] keys) and Bria FIBO 2 (whose injection layers name their cross-attention
# ``cross_attention``), and every block with an ``attn1`` / ``attn`` / ``self_attention`` is matched by those first.
SELF_ATTENTION_NAMES = (
    "attn1",
    "attn",
    "self_attention",  # Kandinsky 5
    "attention",  # Z-Image, Ideogram 4, Bria FIBO 2, PRX
    "video_dec_block.self_attention",  # Kandinsky 6's fused blocks: the video stream's (its audio stream is 1D)
)

# Attention modules a block holds that are not a self-attention of the latent tokens block-sparse attention could
# cut, by class name: why it refuses such a model by name (rather than hooking calls that would all run dense).
NO_SQUARE_SELF_ATTENTION = {
    "WanAnimate2Attention": (
        "Wan Animate 2's self-attention attends, through a flex-attention BlockMask, over the block's tokens and a "
        "KV cache of the driving video that its extraction forward wrote: more keys than queries, in flex's mask"
    ),
    "Kandinsky6SRAttention": (
        "Kandinsky 6 SR's self-attention is already block-sparse: NABLA's pattern as a flex-attention BlockMask "
        "over its 8x8-patch token order, on the flex backend only"
    ),
    "BidirectionalGDNUCPESinglePathLiteLA": (
        "SANA-WM's blocks attend through a gated delta-net linear attention (a softmax one only every "
        "softmax_every_n-th block), which has no attention map to cut into blocks"
    ),
    "Cosmos3PackedMoTAttention": (
        "Cosmos 3's decoder layers attend through one packed mixture-of-transformers attention over a single "
        "[text, vision] sequence without a batch axis: the text pathway attends causally over the text alone, and "
        "the vision queries attend to [text, vision] keys (the text as extra keys, projected in every layer, with "
        "grouped-query heads), so no call is a square self-attention of the latent grid to cut into blocks"
    ),
}

@dataclass(frozen=True)
class SparseAttentionOptions(MethodConfig):
    """Options both sparse-attention methods share (not selectable by itself).

    Args:
        block_size: tokens per block (a power of two >= 16; 128 is the usual FlashAttention tile).
        keep_text: text/conditioning tokens of joint attention are always attended to, and text
            queries attend densely.
        window: each query block always keeps the key blocks within this many blocks of itself
            (in the reordered sequence): a local window.
        dense_steps: the first steps run dense attention, where the layout forms. An int counts
            steps; a float in [0, 1) is a fraction of the call's steps (STA keeps 12 of 50 dense,
            SVG about 30%).
        dense_last_steps: that many final steps run dense as well.
        dense_blocks: indices of transformer blocks (across the denoiser's block lists, in forward
            order) whose self-attention always runs dense.
        reorder: ``"tile"`` reorders latent tokens tile-major so each block is a compact 3D (or 2D)
            neighbourhood; ``"none"`` keeps the model's order.
        tile: tile shape per grid axis, e.g. ``(2, 8, 8)``; None picks one whose volume is the
            block size.
        implementation: ``"auto"`` (Triton on CUDA when installed, torch otherwise), ``"torch"``
            or ``"triton"``.
    """

    block_size: int = 128
    keep_text: bool = True
    window: int = 1
    dense_steps: int | float = 0.25
    dense_last_steps: int = 0
    dense_blocks: tuple[int, ...] = (0,)
    reorder: str = "tile"
    tile: tuple[int, ...] | None = None
    implementation: str = "auto"

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_int(name, "block_size", self.block_size, minimum=16)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"{name}.block_size must be a power of two (16, 32, 64, 128, ...), got {self.block_size}.")
        if not isinstance(self.keep_text, bool):
            raise ValueError(f"{name}.keep_text must be True or False, got {self.keep_text!r}.")
        check_int(name, "window", self.window, minimum=0)
        if isinstance(self.dense_steps, float):
            check_float(name, "dense_steps", self.dense_steps, minimum=0.0)
            if self.dense_steps >= 1.0:
                raise ValueError(
                    f"{name}.dense_steps={self.dense_steps}: a float is a fraction of the steps and must be below 1; "
                    f"pass an int to count steps."
                )
        else:
            check_int(name, "dense_steps", self.dense_steps, minimum=0)
        check_int(name, "dense_last_steps", self.dense_last_steps, minimum=0)
        if not isinstance(self.dense_blocks, tuple):
            raise ValueError(f"{name}.dense_blocks must be a tuple of block indices, got {self.dense_blocks!r}.")
        for index in self.dense_blocks:
            check_int(name, "dense_blocks[]", index, minimum=0)
        check_choice(name, "reorder", self.reorder, ("tile", "none"))
        if self.tile is not None:
            if not isinstance(self.tile, tuple) or not 1 <= len(self.tile) <= 3:
                raise ValueError(f"{name}.tile must be None or a tuple of 1-3 positive ints, got {self.tile!r}.")
            for size in self.tile:
                check_int(name, "tile[]", size, minimum=1)
        check_choice(name, "implementation", self.implementation, ("auto", "torch", "triton"))

    def dense_at(self, step_index: int, num_steps: int | None) -> bool:
        """Whether this step keeps full attention."""
        if isinstance(self.dense_steps, float):
            first = math.ceil(self.dense_steps * num_steps) if num_steps else 0
        else:
            first = self.dense_steps
        if step_index < first:
            return True
        return num_steps is not None and step_index >= num_steps - self.dense_last_steps


@register_config
@dataclass(frozen=True)
class BlockSparseAttentionConfig(SparseAttentionOptions):
    """Adaptive Block-Sparse Attention (Video-BLADE's ASA), training-free.

    Per attention call, queries and keys are mean-pooled per block and the pooled attention
    estimates each key block's share of every query block's attention mass.

    Args:
        keep: ``"mass"`` keeps the fewest key blocks whose estimated mass reaches the threshold
            (BLADE's energy mode, 0.95 there); ``"topk"`` keeps a fixed fraction of key blocks.
        ratio_or_threshold: the mass threshold (``"mass"``) or the kept fraction (``"topk"``), in (0, 1].
        min_density, max_density: the kept fraction of key blocks per query block is clamped to this
            range (BLADE clamps to 0.05-0.17 on Wan, where it also distils the model for sparsity;
            training-free, a wider budget keeps quality).
        share_cfg_mask: the CFG branches of one step use one mask: a doubled batch averages the
            branches' block scores; with per-branch calls (Wan) the later branch reuses the mask the
            first one chose at the same step and attention call. Guidance amplifies the difference of
            the branches' predictions, so independent selections (which differ where scores are
            close) turn into visible error; shared ones drop the same blocks in both.
    """

    slot = "attention"
    method = "block_sparse"

    keep: str = "mass"
    ratio_or_threshold: float = 0.9
    min_density: float = 0.05
    max_density: float = 0.35
    share_cfg_mask: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.share_cfg_mask, bool):
            raise ValueError(f"{name}.share_cfg_mask must be True or False, got {self.share_cfg_mask!r}.")
        check_choice(name, "keep", self.keep, ("topk", "mass"))
        check_float(name, "ratio_or_threshold", self.ratio_or_threshold, minimum=1e-6, maximum=1.0)
        check_float(name, "min_density", self.min_density, minimum=0.0, maximum=1.0)
        check_float(name, "max_density", self.max_density, minimum=0.0, maximum=1.0)
        if self.min_density > self.max_density:
            raise ValueError(f"{name}: min_density {self.min_density} exceeds max_density {self.max_density}.")


@register_config
@dataclass(frozen=True)
class SlidingTileAttentionConfig(SparseAttentionOptions):
    """Sliding Tile Attention: each query tile attends to a fixed window of tiles around it.

    Args:
        tile_window: window size in tiles per grid axis (odd), the last ``ndim`` entries are used for
            a grid of ``ndim`` axes (images use the last two). ``(3, 3, 3)`` is STA's example window.
    """

    slot = "attention"
    method = "sliding_tile"

    tile_window: tuple[int, ...] = (3, 3, 3)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.tile_window, tuple) or not 1 <= len(self.tile_window) <= 3:
            raise ValueError(f"{name}.tile_window must be a tuple of 1-3 odd ints, got {self.tile_window!r}.")
        for size in self.tile_window:
            check_int(name, "tile_window[]", size, minimum=1)
            if size % 2 == 0:
                raise ValueError(f"{name}.tile_window sizes must be odd (a window centred on its tile), got {self.tile_window}.")


# ------------------------------------------------------------------------------------------ grids


def key_padding_lengths(attn_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor | None:
    """Per-batch number of valid keys when ``attn_mask`` only masks a suffix of the keys
    (HunyuanVideo's text padding); None for any other mask."""
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1 or attn_mask.shape[-1] != length:
        return None
    valid = attn_mask[:, 0, 0] if attn_mask.dtype == torch.bool else attn_mask[:, 0, 0] == 0
    valid = valid.expand(batch, length)
    lengths = valid.sum(-1)
    suffix = torch.arange(length, device=valid.device)[None, :] < lengths[:, None]
    return lengths if bool((valid == suffix).all()) and bool((lengths > 0).all()) else None


# ------------------------------------------------------------------------------------------ runtime


@dataclass
class ForwardPlan:
    dense: bool
    grid: tuple[int, ...]


class SparseAttentionController:
    """Shared by the step hook and the attention hooks: the plan of the current forward, the
    mask construction, the kernel call and the statistics."""

    def __init__(self, config: SparseAttentionOptions, target: AccelTarget, runtime) -> None:
        self.config = config
        self.adapter = target.adapter
        self.denoiser = target.denoiser
        self.runtime = runtime
        self.plan: ForwardPlan | None = None
        self._static_masks: dict[tuple, torch.Tensor] = {}
        self._warned: set[str] = set()
        # CFG-shared masks of the current step: attention-call ordinal -> (branch that chose it, mask)
        self._step_masks: dict[int, tuple[str, torch.Tensor]] = {}
        self._step_key: tuple[int, int] | None = None
        self._call_ordinal = 0
        # set by the attention hook per module call: the module reads a KV cache (Qwen-Image 2.1's ``layer_cache``)
        self.reads_cache = False
        # switched off by ``set_sparse_attention`` while a forward must stay dense (a distillation
        # trainer's teacher and fake-score roles share the student's transformer)
        self.enabled = True

    # -- per forward

    def begin_forward(self, kwargs: dict) -> None:
        ctx = self.runtime.clock.current
        grid = token_grid(self.adapter, self.denoiser, ctx.grid, kwargs)
        self.plan = ForwardPlan(dense=self.config.dense_at(ctx.step_index, ctx.num_steps), grid=grid)
        if self._step_key != (ctx.call_index, ctx.step_index):
            self._step_key = (ctx.call_index, ctx.step_index)
            self._step_masks.clear()
        self._call_ordinal = 0

    def _note_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("diffaccel: %s", message)

    # -- per attention call

    def layout_for(self, length: int) -> TokenLayout | None:
        grid = self.plan.grid
        if len(grid) == 3 and length == math.prod(grid[1:]):  # attention within each frame (Latte's spatial blocks)
            grid = grid[1:]
        text = length - math.prod(grid)
        if text < 0 or (text > 0 and self.adapter.joint_text == "none"):
            return None
        tile = None
        if self.config.reorder == "tile" and len(grid) > 1:
            tile = self.config.tile or default_tile(self.config.block_size, len(grid))
            if len(tile) != len(grid):
                raise ValueError(
                    f"{type(self.config).__name__}.tile={tile} has {len(tile)} axes, but this model's token grid "
                    f"{grid} has {len(grid)}; give a tile per grid axis or tile=None."
                )
        return TokenLayout(grid=grid, text_tokens=text, text_position=self.adapter.joint_text if text else "none", tile=tile)

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """Block-sparse answer to one SDPA call (same arguments), or None to let it run dense."""
        q, k, v = query, key, value
        if q.dim() == 4 and k.dim() == 4 and k.shape[2] != q.shape[2]:
            # Inside a self-attention module: queries that attend to more keys than themselves. Either a KV cache
            # of the text made at the first step (Qwen-Image 2.1's later steps: the module reads a cache), or text
            # as extra keys projected in this very call besides the queries' own (NucleusMoE-Image and PRX at every
            # call: the image queries attend to [image, text] / [text, image] keys, the text entering every block
            # as extra keys and values and never updated; Qwen-Image 2.1's first step, whose image queries attend
            # to the [text, image] keys it is caching).
            if self.reads_cache:
                self._note_once("kv", f"self-attention of {q.shape[2]} queries over {k.shape[2]} keys (a KV cache "
                                      f"of the text) has no square block layout; such a call runs dense.")
                self.runtime.count("attention_dense_kv_cache")
            else:
                self._note_once(
                    "extra_keys",
                    f"self-attention of {q.shape[2]} queries over {k.shape[2]} keys (text as extra keys: "
                    f"{k.shape[2] - q.shape[2]} keys projected in the same call besides the queries' own, not a KV "
                    f"cache) has no square block layout; such a call runs dense."
                    if k.shape[2] > q.shape[2] else
                    f"self-attention of {q.shape[2]} queries over {k.shape[2]} keys has no square block layout; "
                    f"such a call runs dense.",
                )
                self.runtime.count("attention_dense_extra_keys")
            return None
        if (
            q.dim() != 4
            or k.shape != q.shape
            or v.shape[:3] != q.shape[:3]
            or dropout_p
            or is_causal
            or (enable_gqa and k.shape[1] != q.shape[1])
        ):
            return None  # not a self-attention call of the latent sequence (e.g. cross-attention)
        batch, heads, length, _ = q.shape
        layout = self.layout_for(length)
        if layout is None:
            self._note_once("layout", f"self-attention over {length} tokens fits neither this forward's token grid "
                                      f"{self.plan.grid} nor one frame of it; such a call runs dense.")
            self.runtime.count("attention_dense_layout")
            return None
        bs = self.config.block_size
        if num_blocks(length, bs) < 3:
            self._note_once(
                "short", f"self-attention over {length} tokens is under 3 blocks of {bs}; it runs dense (use a smaller block_size)."
            )
            self.runtime.count("attention_dense_short")
            return None
        key_lengths = None
        if attn_mask is not None:
            key_lengths = key_padding_lengths(attn_mask, batch, length)
            if key_lengths is None:
                self._note_once("mask", "an attention mask other than key padding at the sequence end: that call runs dense.")
                self.runtime.count("attention_dense_masked")
                return None

        perm = layout.permutation(q.device)
        if perm is not None:
            q, k, v = (x.index_select(2, perm) for x in (q, k, v))
        mask = self.block_mask(q, k, layout, scale, key_lengths)
        out, implementation = block_sparse_attention(
            q, k, v, mask, bs, scale=scale, implementation=self.config.implementation, key_lengths=key_lengths
        )
        if perm is not None:
            out = out.index_select(2, perm.argsort())
        self.runtime.count("attention_sparse_calls")
        self.runtime.count(f"attention_kernel_{implementation}")
        self.runtime.count("attention_blocks_kept", int(mask.expand(batch, heads, -1, -1).sum()))
        self.runtime.count("attention_blocks_total", batch * heads * mask.shape[-2] * mask.shape[-1])
        return out

    def block_mask(self, q, k, layout: TokenLayout, scale, key_lengths) -> torch.Tensor:
        config = self.config
        bs = config.block_size
        nq = num_blocks(q.shape[2], bs)
        if isinstance(config, BlockSparseAttentionConfig):
            mask = self._adaptive_mask(q, k, scale)
        else:
            mask = self._sliding_tile_mask(layout, q.device)[None, None]
        mask = mask | window_mask(nq, nq, config.window, q.device)
        if config.keep_text and layout.text_tokens:
            text = layout.text_blocks(bs, q.device)
            mask = force_blocks(mask, text, text)
        return drop_padding_blocks(mask, key_lengths, bs)

    def _adaptive_mask(self, q, k, scale) -> torch.Tensor:
        """ASA's mask for this call; shared by the step's CFG branches when ``share_cfg_mask``."""
        config = self.config
        ctx = self.runtime.clock.current
        ordinal = self._call_ordinal
        self._call_ordinal += 1
        branches = len(ctx.branches_in_batch)
        groups = branches if config.share_cfg_mask and branches > 1 and q.shape[0] % branches == 0 else 1
        if config.share_cfg_mask and groups == 1:
            # A per-branch call: reuse what the other branch chose for this step and attention call.
            chosen_by, chosen = self._step_masks.get(ordinal, (None, None))
            n = num_blocks(q.shape[2], config.block_size)
            if chosen is not None and chosen_by != ctx.branch and chosen.shape == (*q.shape[:2], n, n):
                self.runtime.count("attention_masks_shared")
                return chosen
        mask = adaptive_block_mask(
            q, k, config.block_size, config.keep, config.ratio_or_threshold, config.min_density, config.max_density,
            scale, groups=groups,
        )
        if groups > 1:
            self.runtime.count("attention_masks_shared")
        elif config.share_cfg_mask:
            self._step_masks[ordinal] = (ctx.branch, mask)
        return mask

    def _sliding_tile_mask(self, layout: TokenLayout, device) -> torch.Tensor:
        key = (layout, self.config.block_size)
        if key not in self._static_masks:
            window = self.config.tile_window[-len(layout.grid) :]
            if len(window) < len(layout.grid):
                window = (1,) * (len(layout.grid) - len(window)) + tuple(window)
            coords = layout.block_tile_coords(self.config.block_size)
            self._static_masks[key] = sliding_tile_mask(coords, layout.tiles_per_axis(), window).to(device)
        return self._static_masks[key]


class _SparseSDPA(TorchFunctionMode):
    """Answers ``scaled_dot_product_attention`` calls made inside one attention module's forward."""

    def __init__(self, controller: SparseAttentionController) -> None:
        super().__init__()
        self.controller = controller
        self.sdpa_calls = 0
        self.sparse_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.sdpa_calls += 1
            out = self.controller.attend(*args, **kwargs)
            if out is not None:
                self.sparse_calls += 1
                return out
        return func(*args, **kwargs)


class SparseStepHook(ModelHook):
    """On the denoiser, below the runtime's hook: plans each forward (dense step? token grid?)."""

    _is_stateful = False

    def __init__(self, controller: SparseAttentionController) -> None:
        super().__init__()
        self.controller = controller

    def pre_forward(self, module, *args, **kwargs):
        self.controller.begin_forward(kwargs)
        return args, kwargs


class SparseAttentionHook(ModelHook):
    """On one self-attention module: run its processor with SDPA answered block-sparsely."""

    _is_stateful = False

    def __init__(self, controller: SparseAttentionController, block_index: int, name: str) -> None:
        super().__init__()
        self.controller = controller
        self.block_index = block_index
        self.name = name

    def new_forward(self, module, *args, **kwargs):
        controller = self.controller
        plan = controller.plan
        if plan is None or plan.dense or not controller.enabled or self.block_index in controller.config.dense_blocks:
            controller.runtime.count("attention_dense_calls")
            return self.fn_ref.original_forward(*args, **kwargs)
        mode = _SparseSDPA(controller)
        controller.reads_cache = _reads_kv_cache(kwargs)
        try:
            with mode:
                output = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            controller.reads_cache = False
        if mode.sdpa_calls == 0:
            processor = getattr(module, "processor", None)
            raise RuntimeError(
                f"diffaccel: {type(controller.config).__name__} replaces torch's scaled_dot_product_attention, but "
                f"{self.name}'s processor {type(processor).__name__} computed attention without it (another "
                f"attention backend, or linear attention). Use the native backend "
                f"(transformer.set_attention_backend('native')) or remove the attention method."
            )
        if mode.sparse_calls == 0:
            controller.runtime.count("attention_dense_calls")
        return output


def _reads_kv_cache(kwargs: dict) -> bool:
    """Whether an attention module's call is handed a KV cache to read (Qwen-Image 2.1: ``layer_cache`` with
    ``kv_cache_mode="cached"``), as opposed to keys it projects itself."""
    mode = kwargs.get("kv_cache_mode")
    if mode is not None:
        return mode == "cached"
    return any("cache" in name and value is not None for name, value in kwargs.items())


def _submodule(block: torch.nn.Module, path: str) -> torch.nn.Module | None:
    module = block
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, torch.nn.Module):
            return None
    return module


def self_attention_modules(target: AccelTarget) -> list[tuple[int, str, torch.nn.Module]]:
    """(block index, qualified name, module) of each block's self-attention (the first of ``SELF_ATTENTION_NAMES``
    the block has)."""
    found = []
    for index, bound in enumerate(target.blocks):
        block = described_block(bound.module)  # inside a wrapper (HiDream-I1's HiDreamBlock)
        prefix = bound.qualified_name if block is bound.module else f"{bound.qualified_name}.block"
        for name in SELF_ATTENTION_NAMES:
            module = _submodule(block, name)
            if module is not None:
                found.append((index, f"{prefix}.{name}", module))
                break
    return found


class _SparseAttentionHandler:
    def validate(self, config: SparseAttentionOptions, target: AccelTarget) -> None:
        label = f"{type(config).__name__} (attention={config.method!r})"
        if not target.adapter.block_cache:
            raise ValueError(
                f"{label} needs a transformer denoiser with self-attention blocks; {target.denoiser_name} "
                f"({target.adapter.name}) is a UNet, whose attention sequences are short."
            )
        if getattr(target.denoiser, "attention_type", None) == "nabla":
            raise ValueError(
                f"{label} cannot apply to {target.denoiser_name}: it is configured with attention_type='nabla', its "
                f"own block-sparse attention (flex attention over fractal-ordered tokens)."
            )
        for bound in target.blocks[:1]:
            for name, module in described_block(bound.module).named_children():
                reason = NO_SQUARE_SELF_ATTENTION.get(type(module).__name__)
                if reason:
                    raise ValueError(
                        f"{label} cannot apply to {target.denoiser_name}: its blocks' {name} "
                        f"({type(module).__name__}) is no square self-attention. {reason}."
                    )
        modules = self_attention_modules(target)
        if not modules:
            raise ValueError(
                f"{label}: no self-attention module ({'/'.join(SELF_ATTENTION_NAMES)}) found in "
                f"{target.denoiser_name}'s blocks."
            )
        for _, name, module in modules:
            processor = type(getattr(module, "processor", None)).__name__
            if "LinearAttn" in processor:  # Sana: no softmax attention map to cut into blocks
                raise ValueError(
                    f"{label} cannot apply to {target.denoiser_name}: {name} computes linear attention "
                    f"({processor}), which has no softmax attention map to make sparse."
                )
            backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
            if backend is not None and str(getattr(backend, "value", backend)) != "native":
                raise ValueError(
                    f"{label} replaces torch's scaled_dot_product_attention, but {name} uses the attention backend "
                    f"{getattr(backend, 'value', backend)!r}; set transformer.set_attention_backend('native') first."
                )
        too_large = [i for i in config.dense_blocks if i >= len(target.blocks)]
        if too_large:
            raise ValueError(f"{label}.dense_blocks {too_large} out of range: {target.denoiser_name} has {len(target.blocks)} blocks.")
        device = execution_device(target.denoiser)  # under offloading: where it computes
        chosen = resolve_implementation(config.implementation, device)
        if chosen == "triton" and device.type != "cuda":
            raise ValueError(
                f"{label}: implementation='triton' needs the model on a CUDA device, it is on {device.type}; "
                f"use implementation='torch' (or 'auto')."
            )

    def apply(self, config: SparseAttentionOptions, target: AccelTarget, runtime) -> None:
        controller = SparseAttentionController(config, target, runtime)
        setattr(runtime, CONTROLLER_ATTRIBUTE, controller)
        for index, name, module in self_attention_modules(target):
            runtime.register_hook(module, SparseAttentionHook(controller, index, name), ATTENTION_HOOK)
        runtime.register_hook(target.denoiser, SparseStepHook(controller), STEP_HOOK)


@register_method(BlockSparseAttentionConfig)
class BlockSparseAttentionHandler(_SparseAttentionHandler):
    pass


@register_method(SlidingTileAttentionConfig)
class SlidingTileAttentionHandler(_SparseAttentionHandler):
    pass


def set_sparse_attention(pipe: Any, enabled: bool) -> None:
    """Switch the block-sparse attention installed on ``pipe`` off (every forward dense) or on again,
    without removing it: for one transformer that plays several roles in turn, as in sparsity-aware
    distillation, where the student attends sparsely and the teacher and fake score densely."""
    from diffaccel.api import runtime_of

    controller = getattr(runtime_of(pipe), CONTROLLER_ATTRIBUTE, None)
    if controller is None:
        raise ValueError(f"This {type(pipe).__name__} runs no block-sparse attention to switch (accelerate it with "
                         f"attention='block_sparse' or 'sliding_tile' first).")
    controller.enabled = bool(enabled)


def attention_density(stats: dict[str, Any]) -> float | None:
    """Mean kept fraction of blocks over the sparse calls in a ``diffaccel.stats`` dict."""
    total = stats.get("attention_blocks_total", 0)
    return stats.get("attention_blocks_kept", 0) / total if total else None
