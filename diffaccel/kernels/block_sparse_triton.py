"""Triton forward kernel for block-sparse attention (see ``block_sparse.py`` for the contract).

FlashAttention-2 style: one program per (query tile, batch*head); it walks only the key blocks its
query block keeps (``BlockLayout``), with an online softmax in fp32. Keys past the sequence end are
masked, so any sequence length works; head dims that are not a power of two are padded in registers.

Float32 inputs follow PyTorch's matmul precision setting, as ``torch.matmul`` and SDPA do: IEEE float32
products by default, TF32 tensor-core products once the user allows them
(``torch.backends.cuda.matmul.allow_tf32 = True`` or ``torch.set_float32_matmul_precision("high")``).
``precision=`` overrides it per call. Half-precision inputs are unaffected.

With ``TRITON_INTERPRET=1`` set before Triton is imported, the same kernel runs on CPU tensors under
Triton's interpreter; that is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .block_sparse import block_layout, check_block_mask, drop_padding_blocks, num_blocks


@triton.jit
def _block_sparse_attention_fwd(
    Q, K, V, Out, Counts, Indices, KeyLengths,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    heads, seq_q, seq_k, n_q_blocks, n_k_blocks, scale_log2,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    q_block = (tile * BLOCK_M) // BLOCK

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seq_q) & d_ok[None, :], other=0.0)

    row = bh * n_q_blocks + q_block
    key_limit = tl.minimum(tl.load(KeyLengths + b), seq_k)
    count = tl.load(Counts + row)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for j in range(0, count):
        k_block = tl.load(Indices + row * n_k_blocks + j)
        for s in tl.static_range(BLOCK // BLOCK_N):
            offs_n = k_block * BLOCK + s * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < key_limit
            kt = tl.load(
                k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=n_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            qk = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
            qk = tl.where(n_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=n_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(vt.dtype), vt, acc, input_precision=PRECISION)
            m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seq_q) & d_ok[None, :])


PRECISIONS = ("ieee", "tf32", "tf32x3")


def float32_precision(precision: str | None = None) -> str:
    """The ``tl.dot`` input precision for float32 inputs: ``precision`` if given, else PyTorch's setting.

    Triton's own default is TF32, which PyTorch only uses when allowed; following PyTorch keeps a float32
    call as exact as the dense SDPA it replaces (TF32 costs about 1e-3 of absolute error).
    """
    if precision is None:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)} (or None: follow "
                         f"torch.backends.cuda.matmul.allow_tf32), got {precision!r}.")
    return precision


def _tile_sizes(block_size: int, head_dim: int) -> tuple[int, int]:
    """Query/key tile sizes: divisors of the block size, at least 16 (``tl.dot``'s minimum).

    128x64 tiles were fastest or within 5% of the fastest of six configurations on an H100 at 32k
    tokens, head dims 64 and 128, 75% and 90% sparsity (docs/sparse_attention_gpu*.md).
    """
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two block_size >= 16, got {block_size}.")
    return min(block_size, 128), min(block_size, 64)


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    key_lengths: torch.Tensor | None = None,
    precision: str | None = None,
) -> torch.Tensor:
    """Run the kernel: compiled on CUDA tensors, under Triton's interpreter on CPU tensors.

    ``precision`` ("ieee", "tf32", "tf32x3") sets how float32 products are computed; None follows
    ``torch.backends.cuda.matmul.allow_tf32``.
    """
    # half-precision products always run on tensor cores; keep Triton's default there (one compiled variant)
    precision = float32_precision(precision)
    if q.dtype != torch.float32:
        precision = "tf32"
    check_block_mask(block_mask, q, k, block_size)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    layout = block_layout(drop_padding_blocks(block_mask, key_lengths, block_size), b, h, block_size)
    default_m, default_n = _tile_sizes(block_size, d)
    block_m, block_n = block_m or default_m, block_n or default_n
    block_d = max(16, triton.next_power_of_2(d))
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nq, nk = num_blocks(sq, block_size), num_blocks(sk, block_size)
    grid = (nq * (block_size // block_m), b * h)
    if key_lengths is None:
        key_lengths = torch.full((b,), sk, dtype=torch.int32, device=q.device)
    key_lengths = key_lengths.to(device=q.device, dtype=torch.int32).contiguous()
    args = (
        q, k, v, out, layout.counts, layout.indices, key_lengths,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, sq, sk, nq, nk, scale * 1.4426950408889634,
    )
    meta = dict(HEAD_D=d, BLOCK_D=block_d, BLOCK=block_size, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision)
    if q.device.type != "cuda":
        if not interpreting():
            raise RuntimeError(
                f"the Triton block-sparse kernel needs CUDA tensors (got {q.device.type}); on CPU it runs only "
                "under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported). Use "
                "implementation='torch' on CPU."
            )
        _block_sparse_attention_fwd[grid](*args, **meta)
    else:
        launch = {"num_warps": num_warps or (4 if d <= 64 else 8), "num_stages": num_stages or 3}
        _block_sparse_attention_fwd[grid](*args, **meta, **launch)
    return out


def interpreting() -> bool:
    """Whether Triton was imported in interpreter mode (kernels then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_block_sparse_attention_fwd, InterpretedFunction)
