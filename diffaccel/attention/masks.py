"""Which (query block, key block) pairs to compute: adaptive (ASA) and static (sliding tile) masks.

All masks are bool ``(B|1, H|1, nq, nk)`` over blocks of ``block_size`` tokens of the (already
reordered) sequence, as ``diffaccel.kernels.block_sparse`` takes them.

* ``adaptive_block_mask`` — Video-BLADE's Adaptive Block-Sparse Attention, scored the way the issue
  and SpargeAttn/NABLA/VSA do it: mean-pool queries and keys per block, softmax the pooled logits
  per query block (each pooled key weighted by how many real tokens it stands for), then keep per
  query block either the top-k key blocks or the fewest whose probability mass reaches a threshold
  (BLADE's "energy" mode, clamped to a density budget).
* ``sliding_tile_mask`` — Sliding Tile Attention: every query tile attends to the key tiles inside a
  window of tiles around it; the window's centre is clamped inward at the borders (NATTEN style),
  so every query tile sees the same number of key tiles. Needs no scoring.

Both then force the always-kept parts: a local window of blocks around the diagonal, and the blocks
holding text/conditioning tokens (as keys for every query, and as dense query rows).
"""

from __future__ import annotations

import math

import torch

from diffaccel.kernels.block_sparse import num_blocks


def pooled_blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each block's real tokens ``(B, H, n, D)`` and the number of real tokens per block ``(n,)``."""
    b, h, s, d = x.shape
    n = num_blocks(s, block_size)
    pad = n * block_size - s
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    sums = x.float().reshape(b, h, n, block_size, d).sum(3)
    counts = torch.full((n,), float(block_size), device=x.device)
    counts[-1] = block_size - pad
    return sums / counts[:, None], counts


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None) -> torch.Tensor:
    """Estimated attention mass of every key block for every query block, ``(B, H, nq, nk)``, rows sum to 1."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    pq, _ = pooled_blocks(q, block_size)
    pk, counts = pooled_blocks(k, block_size)
    logits = pq @ pk.transpose(-1, -2) * scale + counts.log()
    return logits.softmax(-1)


def keep_top(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep the ``keep[..., i]`` highest-scoring key blocks of each query block row."""
    nk = scores.shape[-1]
    order = scores.argsort(-1, descending=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(nk, device=scores.device).expand_as(order))
    return ranks < keep[..., None]


def adaptive_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    keep: str,
    ratio_or_threshold: float,
    min_density: float = 0.0,
    max_density: float = 1.0,
    scale: float | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """ASA selection. ``keep="topk"``: the fraction ``ratio_or_threshold`` of key blocks per row;
    ``keep="mass"``: the fewest key blocks whose estimated mass reaches ``ratio_or_threshold``. The
    count per row is then clamped to ``[min_density, max_density]`` of the key blocks (at least one).

    ``groups > 1``: the batch is that many stacked copies of the same samples (the CFG branches of a
    doubled batch); their scores are averaged and every copy gets the same mask, so the branches drop
    the same blocks and the guidance difference does not amplify the selection noise.
    """
    scores = block_scores(q, k, block_size, scale)
    if groups > 1:
        if scores.shape[0] % groups:
            raise ValueError(f"adaptive_block_mask: batch {scores.shape[0]} is not {groups} stacked groups.")
        scores = scores.unflatten(0, (groups, -1)).mean(0)
    nk = scores.shape[-1]
    if keep == "topk":
        count = torch.full(scores.shape[:-1], math.ceil(ratio_or_threshold * nk), device=scores.device)
    elif keep == "mass":
        mass = scores.sort(-1, descending=True).values.cumsum(-1)
        count = (mass < ratio_or_threshold).sum(-1) + 1
    else:
        raise ValueError(f"keep must be 'topk' or 'mass', got {keep!r}.")
    lower = max(1, math.ceil(min_density * nk))
    upper = max(lower, math.floor(max_density * nk))
    mask = keep_top(scores, count.clamp(lower, upper))
    return mask.repeat(groups, 1, 1, 1) if groups > 1 else mask


def window_mask(nq: int, nk: int, window: int, device=None) -> torch.Tensor:
    """Blocks within ``window`` of the diagonal (query block i keeps key blocks i-window .. i+window)."""
    rows = torch.arange(nq, device=device)[:, None]
    cols = torch.arange(nk, device=device)[None, :]
    return (rows - cols).abs() <= window


def force_blocks(mask: torch.Tensor, kept_keys: torch.Tensor | None, dense_queries: torch.Tensor | None) -> torch.Tensor:
    """Add always-kept key blocks (every row keeps them) and dense query rows (keep everything)."""
    if kept_keys is not None and bool(kept_keys.any()):
        mask = mask | kept_keys[None, None, None, :]
    if dense_queries is not None and bool(dense_queries.any()):
        mask = mask | dense_queries[None, None, :, None]
    return mask


def sliding_tile_mask(block_coords: torch.Tensor, tiles_per_axis: tuple[int, ...], window: tuple[int, ...]) -> torch.Tensor:
    """Static STA mask ``(nb, nb)`` from each block's tile coordinate ``(nb, ndim)``.

    A query tile at ``c`` attends to key tiles within ``w // 2`` of its window centre, the centre being
    ``c`` clamped to ``[w // 2, n - 1 - w // 2]`` per axis so windows never hang over the border.
    """
    coords = block_coords.long()
    keep = torch.ones(coords.shape[0], coords.shape[0], dtype=torch.bool, device=coords.device)
    for axis, (n, w) in enumerate(zip(tiles_per_axis, window)):
        half = min(w, n) // 2
        low, high = half, max(half, n - 1 - half)
        centre = coords[:, axis].clamp(low, high)
        keep &= (coords[None, :, axis] - centre[:, None]).abs() <= half
    return keep
