"""Run by test_block_sparse_kernels.py in a subprocess with TRITON_INTERPRET=1 (set before triton is
imported): the Triton kernel, interpreted on CPU, against the masked dense reference."""

import sys

import torch

from diffaccel.kernels.block_sparse import masked_dense_reference, num_blocks
from diffaccel.kernels.block_sparse_triton import block_sparse_attention_triton, interpreting

CASES = [  # (batch, heads, seq_q, seq_k, head_dim, block_size, density, key padding)
    (1, 2, 64, 64, 16, 16, 1.0, False),  # all blocks kept: dense attention
    (2, 3, 100, 100, 32, 16, 0.5, False),  # odd length: padded last block
    (1, 2, 77, 77, 40, 32, 0.4, False),  # head dim not a power of two
    (2, 1, 129, 129, 64, 32, 0.3, True),  # key padding per batch element
    (1, 1, 48, 80, 16, 16, 0.5, False),  # more keys than queries
    (1, 2, 96, 96, 24, 32, 0.0, False),  # nothing kept anywhere: zeros
]


def main() -> int:
    if not interpreting():
        print("TRITON_INTERPRET=1 was not in effect")
        return 2
    generator = torch.Generator().manual_seed(0)
    failures = 0
    for b, h, sq, sk, d, bs, density, padded in CASES:
        q = torch.randn(b, h, sq, d, generator=generator)
        k = torch.randn(b, h, sk, d, generator=generator)
        v = torch.randn(b, h, sk, d, generator=generator)
        mask = torch.rand(b, h, num_blocks(sq, bs), num_blocks(sk, bs), generator=generator) < density
        if 0 < density < 1:
            mask[0, 0, 0] = False  # an empty query block
        lengths = torch.tensor([sk - 7 * (i + 1) for i in range(b)]) if padded else None
        expected = masked_dense_reference(q, k, v, mask, bs, key_lengths=lengths)
        # the default and each explicit precision (the interpreter computes float32 products either way)
        error = max(
            (block_sparse_attention_triton(q, k, v, mask, bs, key_lengths=lengths, precision=precision) - expected)
            .abs().max().item()
            for precision in (None, "ieee", "tf32")
        )
        ok = error < 1e-4
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} b={b} h={h} sq={sq} sk={sk} d={d} bs={bs} density={density} padded={padded} err={error:.2e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
