"""Block-sparse attention: exact softmax attention restricted to kept (query block, key block) pairs.

Layout follows ``torch.nn.functional.scaled_dot_product_attention``: ``q`` is ``(B, H, Sq, D)``,
``k``/``v`` are ``(B, H, Sk, D)``. The sequence is cut into blocks of ``block_size`` tokens; a
boolean ``block_mask`` of shape ``(B|1, H|1, ceil(Sq/bs), ceil(Sk/bs))`` says which key blocks each
query block attends to. Inside a kept pair attention is exact; everything else is never computed.
Sequences that are not a multiple of the block size are padded internally and the padded keys are
masked, so they never take probability mass. A query block that keeps no key block gets zeros.

Two implementations of the same function:

* ``torch`` (any device): gathers the kept key/value blocks of a few query blocks at a time and runs
  SDPA on them. Gathering every query block at once is slower than dense attention because the
  copies dominate; a chunk of a few query blocks keeps the copies small and SDPA's tiles full.
* ``triton`` (CUDA): a FlashAttention-style forward kernel that walks each query block's list of
  kept key blocks (``kernels/block_sparse_triton.py``).

``block_sparse_attention(..., implementation="auto")`` takes Triton on CUDA when it is installed
and the torch path otherwise, and returns which one ran.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger("diffaccel")

IMPLEMENTATIONS = ("auto", "torch", "triton")
_TOLD: set[str] = set()


def _log_once(key: str, message: str) -> None:
    if key not in _TOLD:
        _TOLD.add(key)
        logger.info("diffaccel: %s", message)
GATHER_BUDGET_TOKENS = 4096


@dataclass(frozen=True)
class BlockLayout:
    """A block mask in the compressed form both kernels walk (FlexAttention's ``kv_num_blocks`` /
    ``kv_indices``): per query block, how many key blocks it keeps and which, in ascending order."""

    counts: torch.Tensor  # int32 (B, H, nq)
    indices: torch.Tensor  # int32 (B, H, nq, nk); kept block ids first (ascending), then padding
    block_size: int

    @property
    def density(self) -> float:
        nk = self.indices.shape[-1]
        return float(self.counts.float().mean() / nk) if nk else 0.0


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def check_block_mask(block_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    """Clear errors for shapes that do not belong together."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"block-sparse attention takes (B, H, S, D) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}.")
    if k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head dim.")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    nq, nk = num_blocks(q.shape[2], block_size), num_blocks(k.shape[2], block_size)
    if block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise ValueError(f"block_mask must be a 4-d bool tensor (B, H, nq, nk), got {block_mask.dtype} {tuple(block_mask.shape)}.")
    b, h = q.shape[:2]
    mb, mh, mq, mk = block_mask.shape
    if (mq, mk) != (nq, nk) or mb not in (1, b) or mh not in (1, h):
        raise ValueError(
            f"block_mask has shape {tuple(block_mask.shape)}; for q {tuple(q.shape)}, k {tuple(k.shape)} and "
            f"block_size {block_size} it must be ({b} or 1, {h} or 1, {nq}, {nk})."
        )


def block_layout(block_mask: torch.Tensor, batch: int, heads: int, block_size: int) -> BlockLayout:
    """The compressed form of a (broadcastable) bool block mask, expanded to ``(batch, heads)``."""
    mask = block_mask.expand(batch, heads, *block_mask.shape[-2:])
    counts = mask.sum(-1, dtype=torch.int32)
    nk = mask.shape[-1]
    # Kept blocks first, in ascending order: sort by (not kept, block id).
    order_key = (~mask).to(torch.int32) * nk + torch.arange(nk, device=mask.device, dtype=torch.int32)
    indices = order_key.argsort(dim=-1).to(torch.int32)
    return BlockLayout(counts=counts.contiguous(), indices=indices.contiguous(), block_size=block_size)


def drop_padding_blocks(block_mask: torch.Tensor, key_lengths: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """Key blocks made only of padding (start at or past a batch element's key length) are never visited."""
    if key_lengths is None:
        return block_mask
    starts = torch.arange(block_mask.shape[-1], device=block_mask.device) * block_size
    valid = starts[None, :] < key_lengths.to(block_mask.device)[:, None]  # (B, nk)
    return block_mask & valid[:, None, None, :]


def _pad_sequence(x: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - x.shape[2]
    return x if extra == 0 else F.pad(x, (0, 0, 0, extra))


def block_sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    query_blocks_per_chunk: int | None = None,
    layout: BlockLayout | None = None,
    key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference implementation: per chunk of query blocks, gather the kept key/value blocks and run SDPA.

    ``query_blocks_per_chunk=None`` sizes chunks so one chunk gathers about ``GATHER_BUDGET_TOKENS``
    keys per (batch, head): measured on CPU, larger gathers lose to their copies, smaller ones to
    per-call overhead.
    """
    check_block_mask(block_mask, q, k, block_size)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    bs = block_size
    nq, nk = num_blocks(sq, bs), num_blocks(sk, bs)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    layout = layout or block_layout(drop_padding_blocks(block_mask, key_lengths, bs), b, h, bs)
    counts = layout.counts.reshape(b * h, nq)
    if query_blocks_per_chunk is None:
        widest = max(1, int(counts.max()) * bs)
        query_blocks_per_chunk = max(1, GATHER_BUDGET_TOKENS // widest)
    indices = layout.indices.reshape(b * h, nq, nk).long()

    qp = _pad_sequence(q, nq * bs).reshape(b * h, nq, bs, d)
    kb = _pad_sequence(k, nk * bs).reshape(b * h, nk, bs, d)
    vb = _pad_sequence(v, nk * bs).reshape(b * h, nk, bs, d)
    out = torch.zeros_like(qp)
    kb_flat, vb_flat = kb.reshape(b * h * nk, bs, d), vb.reshape(b * h * nk, bs, d)
    block_offsets = (torch.arange(b * h, device=q.device) * nk)[:, None, None]
    # Valid keys per (batch*head): the sequence end, or a shorter length per batch element (key padding).
    limits = torch.full((b,), sk, device=q.device) if key_lengths is None else key_lengths.to(q.device).clamp(max=sk)
    limits = limits.repeat_interleave(h)[:, None, None, None]  # (BH, 1, 1, 1)
    first_padded_block = int(limits.min()) // bs
    neg_inf = torch.finfo(torch.float32 if q.dtype == torch.float64 else q.dtype).min
    positions = torch.arange(bs, device=q.device)

    for start in range(0, nq, query_blocks_per_chunk):
        stop = min(start + query_blocks_per_chunk, nq)
        chunk_counts = counts[:, start:stop]
        kmax = int(chunk_counts.max())
        if kmax == 0:
            continue  # nothing kept: the output stays zero
        idx = indices[:, start:stop, :kmax]  # (BH, c, kmax)
        flat = (idx + block_offsets).reshape(-1)
        c = stop - start
        keys = kb_flat.index_select(0, flat).reshape(b * h, c, kmax * bs, d)
        values = vb_flat.index_select(0, flat).reshape(b * h, c, kmax * bs, d)
        # Invalid key slots: beyond a query block's count, or padding past the sequence end.
        slot_unused = torch.arange(kmax, device=q.device)[None, None, :] >= chunk_counts[..., None]
        bias = None
        needs_padding_mask = first_padded_block < nk and bool(
            (idx >= first_padded_block).logical_and(~slot_unused).any()
        )
        if bool(slot_unused.any()) or needs_padding_mask:
            invalid = slot_unused[..., None].expand(-1, -1, -1, bs)
            if needs_padding_mask:
                key_pos = idx[..., None] * bs + positions  # (BH, c, kmax, bs)
                invalid = invalid | (key_pos >= limits)
            invalid = invalid.flatten(2, 3)[:, :, None, :]  # (BH, c, 1, kmax*bs)
            bias = torch.zeros(invalid.shape, dtype=q.dtype, device=q.device).masked_fill_(invalid, neg_inf)
        chunk = F.scaled_dot_product_attention(qp[:, start:stop], keys, values, attn_mask=bias, scale=scale)
        empty = chunk_counts == 0
        if bool(empty.any()):
            chunk = chunk.masked_fill(empty[..., None, None], 0.0)
        out[:, start:stop] = chunk
    return out.reshape(b, h, nq * bs, d)[:, :, :sq]


def masked_dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense SDPA with the block mask expanded to tokens: what both kernels must equal (tests, checks).

    Rows that keep nothing are defined as zeros, like the kernels.
    """
    check_block_mask(block_mask, q, k, block_size)
    sq, sk = q.shape[2], k.shape[2]
    token_mask = block_mask.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :sq, :sk]
    if key_lengths is not None:
        valid = torch.arange(sk, device=q.device)[None, :] < key_lengths.to(q.device)[:, None]
        token_mask = token_mask & valid[:, None, None, :]
    empty = ~token_mask.any(-1, keepdim=True)
    safe_mask = token_mask | empty  # avoid NaN rows, zeroed below
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask, scale=scale)
    return out.masked_fill(empty, 0.0)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_implementation(implementation: str, device: torch.device) -> str:
    """``auto`` → Triton on CUDA when installed, torch otherwise; an explicit choice that cannot run errors."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}.")
    if implementation == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if implementation == "triton" and not triton_available():
        raise RuntimeError(
            "implementation='triton' was asked for, but Triton is not installed; install the GPU extra "
            "(pip install 'diffaccel[gpu]') or use implementation='torch'."
        )
    return implementation


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    implementation: str = "auto",
    key_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, str]:
    """Block-sparse attention with the implementation chosen for the device; returns ``(out, name)``.

    ``key_lengths`` (B,): keys at or past this position of batch element b are padding (masked).
    """
    name = resolve_implementation(implementation, q.device)
    if name == "triton" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        # the Triton kernel has no backward: training through it would drop the attention's gradients
        if implementation == "triton":
            raise ValueError("implementation='triton' computes no gradients (forward-only kernel), and this attention "
                             "call needs them (training); use implementation='torch' or 'auto'.")
        _log_once("grad", "block-sparse attention under autograd runs the torch implementation: the Triton kernel "
                  "is forward-only")
        name = "torch"
    if name == "triton":
        from .block_sparse_triton import block_sparse_attention_triton

        out = block_sparse_attention_triton(q, k, v, block_mask, block_size, scale=scale, key_lengths=key_lengths)
        return out, name
    return block_sparse_attention_torch(q, k, v, block_mask, block_size, scale=scale, key_lengths=key_lengths), name
