"""Block-sparse self-attention: adaptive (ASA) and sliding-tile masks over the kernels in ``diffaccel.kernels``."""

from .layout import TokenLayout, default_tile
from .masks import adaptive_block_mask, block_scores, sliding_tile_mask
from .sparse import (
    ATTENTION_HOOK,
    BlockSparseAttentionConfig,
    SlidingTileAttentionConfig,
    SparseAttentionOptions,
    attention_density,
    set_sparse_attention,
    token_grid,
)

__all__ = [
    "ATTENTION_HOOK",
    "BlockSparseAttentionConfig",
    "SlidingTileAttentionConfig",
    "SparseAttentionOptions",
    "TokenLayout",
    "adaptive_block_mask",
    "attention_density",
    "block_scores",
    "default_tile",
    "set_sparse_attention",
    "sliding_tile_mask",
    "token_grid",
]
