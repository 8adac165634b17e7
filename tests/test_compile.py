"""torch.compile of a tiny transformer with the block cache on: runs, skips, matches eager."""

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import BlockCacheConfig
from tiny_pipelines import build, run

CACHE = BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=2)


@pytest.mark.parametrize("name, backend", [("pixart_alpha", "inductor"), ("flux", "aot_eager")])
def test_compiled_transformer_with_block_cache_matches_eager(name, backend):
    case = build(name)
    diffaccel.accelerate(case.pipe, cache=CACHE)
    eager = run(case, seed=0)
    eager_stats = diffaccel.stats(case.pipe)

    torch._dynamo.reset()
    case.pipe.transformer.compile(backend=backend)
    try:
        compiled = run(case, seed=0)
        compiled_stats = diffaccel.stats(case.pipe)
        again = run(case, seed=0)
    finally:
        torch._dynamo.reset()
    assert compiled_stats["blocks_skipped"] == eager_stats["blocks_skipped"] > 0
    assert compiled_stats["cache_hits"] == eager_stats["cache_hits"]
    np.testing.assert_allclose(compiled, eager, atol=2e-3, rtol=0)
    np.testing.assert_allclose(again, compiled, atol=1e-6, rtol=0)
