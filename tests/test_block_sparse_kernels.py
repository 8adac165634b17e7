"""The block-sparse attention kernels: torch reference and Triton (interpreted on CPU) against dense SDPA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffaccel.kernels import block_sparse as bs_mod
from diffaccel.kernels.block_sparse import (
    block_layout,
    block_sparse_attention,
    block_sparse_attention_torch,
    masked_dense_reference,
    num_blocks,
    resolve_implementation,
)

shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 2),
        "heads": st.integers(1, 3),
        "seq": st.integers(1, 200),
        "head_dim": st.sampled_from([8, 16, 24, 40, 64]),
        "block": st.sampled_from([16, 32, 64]),
        "seed": st.integers(0, 2**16),
    }
)


def _qkv(batch, heads, seq, head_dim, seed, seq_k=None):
    g = torch.Generator().manual_seed(seed)
    seq_k = seq if seq_k is None else seq_k
    return (
        torch.randn(batch, heads, seq, head_dim, generator=g),
        torch.randn(batch, heads, seq_k, head_dim, generator=g),
        torch.randn(batch, heads, seq_k, head_dim, generator=g),
        g,
    )


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_all_blocks_kept_equals_dense_sdpa(s):
    q, k, v, _ = _qkv(s["batch"], s["heads"], s["seq"], s["head_dim"], s["seed"])
    n = num_blocks(s["seq"], s["block"])
    full = torch.ones(1, 1, n, n, dtype=torch.bool)
    out = block_sparse_attention_torch(q, k, v, full, s["block"])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(shapes, st.floats(0.0, 1.0), st.booleans())
def test_random_mask_equals_masked_dense_reference(s, density, padded):
    q, k, v, g = _qkv(s["batch"], s["heads"], s["seq"], s["head_dim"], s["seed"])
    n = num_blocks(s["seq"], s["block"])
    mask = torch.rand(s["batch"], s["heads"], n, n, generator=g) < density
    lengths = None
    if padded:
        lengths = torch.randint(1, s["seq"] + 1, (s["batch"],), generator=g)
    expected = masked_dense_reference(q, k, v, mask, s["block"], key_lengths=lengths)
    out = block_sparse_attention_torch(q, k, v, mask, s["block"], key_lengths=lengths)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_masked_reference_really_masks():
    """The oracle itself: keeping only the diagonal blocks equals attention within each block."""
    q, k, v, _ = _qkv(1, 2, 64, 16, 3)
    diag = torch.eye(4, dtype=torch.bool)[None, None]
    out = masked_dense_reference(q, k, v, diag, 16)
    for i in range(4):
        sl = slice(16 * i, 16 * (i + 1))
        torch.testing.assert_close(out[:, :, sl], F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl]))


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunking_does_not_change_the_result(chunk):
    q, k, v, g = _qkv(2, 2, 150, 32, 5)
    n = num_blocks(150, 16)
    mask = torch.rand(2, 2, n, n, generator=g) < 0.4
    expected = masked_dense_reference(q, k, v, mask, 16)
    out = block_sparse_attention_torch(q, k, v, mask, 16, query_blocks_per_chunk=chunk)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_rectangular_and_half_precision():
    q, _, _, g = _qkv(1, 2, 40, 16, 7)
    _, k, v, _ = _qkv(1, 2, 90, 16, 8)
    mask = torch.rand(1, 2, num_blocks(40, 16), num_blocks(90, 16), generator=g) < 0.6
    expected = masked_dense_reference(q, k, v, mask, 16)
    torch.testing.assert_close(block_sparse_attention_torch(q, k, v, mask, 16), expected, atol=2e-5, rtol=1e-4)
    half = block_sparse_attention_torch(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=3e-2, rtol=3e-2)


def test_block_layout_lists_kept_blocks_in_order():
    mask = torch.tensor([[[[True, False, True, False], [False, False, False, False]]]])
    layout = block_layout(mask, 1, 1, 16)
    assert layout.counts.tolist() == [[[2, 0]]]
    assert layout.indices[0, 0, 0, :2].tolist() == [0, 2]
    assert layout.density == pytest.approx(0.25)


def test_bad_shapes_and_choices_are_clear_errors():
    q, k, v, _ = _qkv(1, 2, 64, 16, 0)
    with pytest.raises(ValueError, match="block_mask has shape"):
        block_sparse_attention_torch(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="bool"):
        block_sparse_attention_torch(q, k, v, torch.ones(1, 1, 4, 4), 16)
    with pytest.raises(ValueError, match="implementation must be one of"):
        resolve_implementation("cuda", torch.device("cpu"))
    assert resolve_implementation("auto", torch.device("cpu")) == "torch"


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(bs_mod, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        resolve_implementation("triton", torch.device("cuda"))
    assert resolve_implementation("auto", torch.device("cuda")) == "torch"


def test_dispatch_reports_the_implementation_that_ran():
    q, k, v, _ = _qkv(1, 1, 32, 16, 1)
    out, name = block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool), 16)
    assert name == "torch"
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)


def test_training_never_runs_the_forward_only_triton_kernel(monkeypatch):
    """Under autograd "auto" takes the differentiable torch path (gradients reach q, k, v) even where it
    would pick Triton; asking for Triton by name is an error that says why."""
    monkeypatch.setattr(bs_mod, "resolve_implementation", lambda implementation, device: "triton")
    q, k, v, _ = _qkv(1, 1, 32, 16, 1)
    q.requires_grad_(True)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    out, name = block_sparse_attention(q, k, v, mask, 16, implementation="auto")
    assert name == "torch"
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="computes no gradients"):
        block_sparse_attention(q, k, v, mask, 16, implementation="triton")


triton = pytest.importorskip("triton", reason="Triton is not installed (test extra)")


def test_triton_kernel_on_cpu_without_interpreter_says_how():
    from diffaccel.kernels.block_sparse_triton import block_sparse_attention_triton, interpreting

    if interpreting():
        pytest.skip("this process runs Triton interpreted")
    q, k, v, _ = _qkv(1, 1, 32, 16, 1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        block_sparse_attention_triton(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool), 16)


def test_triton_kernel_interpreted_matches_reference():
    """All blocks kept, random masks, odd lengths, key padding, several head dims; see the script."""
    script = Path(__file__).with_name("triton_interpret_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == 6, done.stdout


def test_triton_float32_precision_follows_torch_and_refuses_unknown_values():
    """Float32 products are IEEE unless PyTorch allows TF32, as for torch.matmul; an override is checked."""
    from diffaccel.kernels.block_sparse_triton import block_sparse_attention_triton, float32_precision

    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert float32_precision() == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert float32_precision() == "tf32"
        assert float32_precision("ieee") == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    q, k, v, _ = _qkv(1, 1, 32, 16, 1)
    with pytest.raises(ValueError, match="precision must be one of"):
        block_sparse_attention_triton(q.half(), k.half(), v.half(), torch.ones(1, 1, 2, 2, dtype=torch.bool), 16,
                                      precision="fp64")
