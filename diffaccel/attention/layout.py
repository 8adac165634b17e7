"""Where the tokens of one self-attention call come from, and the order that makes blocks local.

A video transformer flattens its latent grid frame-major, so 128 consecutive tokens are a thin
slice of one or two rows. Reordering the tokens *tile-major* (all tokens of a small 3D tile of the
grid next to each other, tiles in raster order) turns every block into a compact spatio-temporal
neighbourhood, which is what makes block-level scores meaningful (STA's layout; BLADE uses a
Hilbert curve for the same purpose). Text/conditioning tokens of joint attention stay where the
model put them (before or after the video tokens) and are never reordered. Attention is invariant
to a joint permutation of queries, keys and values, so reordering (and undoing it on the output) is
exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

TEXT_POSITIONS = ("none", "prefix", "suffix")


def default_tile(block_size: int, ndim: int) -> tuple[int, ...]:
    """A tile whose volume is the block size: square in space, the rest in time (128 → (2, 8, 8))."""
    side = 2 ** (int(math.log2(block_size)) // 2)
    if ndim == 1:
        return (block_size,)
    if ndim == 2:
        return (block_size // side, side)
    spatial = min(side, 8)
    return (max(1, block_size // (spatial * spatial)), spatial, spatial)


@dataclass(frozen=True)
class TokenLayout:
    """The token sequence of one attention call: a grid of latent tokens plus text before or after."""

    grid: tuple[int, ...]
    text_tokens: int = 0
    text_position: str = "none"
    tile: tuple[int, ...] | None = None  # None: keep the model's order

    @property
    def grid_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def length(self) -> int:
        return self.grid_tokens + self.text_tokens

    @property
    def grid_offset(self) -> int:
        return self.text_tokens if self.text_position == "prefix" else 0

    def permutation(self, device: torch.device) -> torch.Tensor | None:
        """``perm`` with ``reordered = x[perm]``; None when the order is kept."""
        if self.tile is None:
            return None
        return _sequence_permutation(self).to(device)

    def text_blocks(self, block_size: int, device=None) -> torch.Tensor:
        """Which blocks (of the reordered sequence) contain text tokens."""
        n = -(-self.length // block_size)
        blocks = torch.zeros(n, dtype=torch.bool, device=device)
        if self.text_tokens:
            start = 0 if self.text_position == "prefix" else self.grid_tokens
            stop = start + self.text_tokens
            blocks[start // block_size : (stop - 1) // block_size + 1] = True
        return blocks

    def block_tile_coords(self, block_size: int) -> torch.Tensor:
        """Tile coordinate (per grid axis) of the first grid token of every block, ``(nb, ndim)``;
        blocks with no grid token get the coordinate of the nearest grid token."""
        tile = self.tile or (1,) * len(self.grid)
        order = _tile_major_order(self.grid, tile)
        coords = torch.stack(torch.unravel_index(order, self.grid), -1)  # grid coords in sequence order
        tile_coords = coords // torch.tensor(tile)
        n = -(-self.length // block_size)
        starts = torch.arange(n) * block_size - self.grid_offset
        return tile_coords[starts.clamp(0, self.grid_tokens - 1)]

    def tiles_per_axis(self) -> tuple[int, ...]:
        tile = self.tile or (1,) * len(self.grid)
        return tuple(-(-g // t) for g, t in zip(self.grid, tile))


@lru_cache(maxsize=32)
def _tile_major_order(grid: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """Indices of the grid tokens (frame-major flattening) in tile-major order."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, len(grid))
    tiles = torch.tensor(tile)
    tile_index = coords // tiles
    inner = coords % tiles
    counts = torch.tensor([-(-g // t) for g, t in zip(grid, tile)])
    key = torch.zeros(coords.shape[0], dtype=torch.long)
    for axis in range(len(grid)):
        key = key * counts[axis] + tile_index[:, axis]
    for axis in range(len(grid)):
        key = key * tiles[axis] + inner[:, axis]
    return key.argsort()


@lru_cache(maxsize=32)
def _sequence_permutation(layout: TokenLayout) -> torch.Tensor:
    order = _tile_major_order(layout.grid, layout.tile)
    text = torch.arange(layout.text_tokens)
    if layout.text_position == "prefix":
        return torch.cat([text, order + layout.text_tokens])
    return torch.cat([order, text + layout.grid_tokens])
