"""Regional and full torch.compile of accelerated denoisers (``--compile``): the blocks are compiled (the
model's declared repeated blocks, else the family adapter's block lists), the cache still skips the same
blocks, and the output matches eager. The aot_eager backend keeps this fast on CPU; test_compile.py
covers inductor."""

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import BlockCacheConfig
from diffaccel.compiling import compile_denoisers
from tiny_pipelines import build, run

CACHE = BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=2)


@pytest.mark.parametrize("name, blocks", [("flux", "FluxSingleTransformerBlock/FluxTransformerBlock"),
                                          ("pixart_alpha", "BasicTransformerBlock"),
                                          # joined [text, image] single-stream blocks
                                          ("chroma", "ChromaSingleTransformerBlock/ChromaTransformerBlock")])
def test_regional_compile_keeps_the_skips_and_the_output(name, blocks):
    case = build(name)
    diffaccel.accelerate(case.pipe, cache=CACHE)
    eager = run(case, seed=0)
    eager_stats = diffaccel.stats(case.pipe)
    torch._dynamo.reset()
    try:
        done = compile_denoisers(case.pipe, "blocks", backend="aot_eager")
        compiled = run(case, seed=0)
        stats = diffaccel.stats(case.pipe)
    finally:
        torch._dynamo.reset()
    n_blocks = sum(len(getattr(case.pipe.transformer, attr, None) or ())
                   for attr in ("transformer_blocks", "single_transformer_blocks"))
    assert done == [f"transformer: {n_blocks} {blocks} blocks"]
    compiled_blocks = [m for m in case.pipe.transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled_blocks) == n_blocks and case.pipe.transformer._compiled_call_impl is None
    assert stats["blocks_skipped"] == eager_stats["blocks_skipped"] > 0
    np.testing.assert_allclose(compiled, eager, atol=2e-3)


def test_full_compile_and_bad_modes():
    case = build("flux")
    torch._dynamo.reset()
    try:
        assert compile_denoisers(case.pipe, "full", backend="aot_eager") == ["transformer: the whole FluxTransformer2DModel"]
        assert case.pipe.transformer._compiled_call_impl is not None
    finally:
        torch._dynamo.reset()
    assert compile_denoisers(case.pipe, "off") == []
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_denoisers(case.pipe, "max")


def test_generate_compile_reports_what_it_compiled(tmp_path):
    from diffaccel.cli import main

    import json

    from PIL import Image

    stats = tmp_path / "stats.json"
    common = ["a red circle", "--steps", "4", "--seed", "1"]
    assert main(["generate", *common, "-o", str(tmp_path / "eager.png")]) == 0
    torch._dynamo.reset()
    try:
        assert main(["generate", *common, "-o", str(tmp_path / "out.png"), "--compile", "blocks",
                     "--compile-backend", "aot_eager", "--stats-json", str(stats)]) == 0
    finally:
        torch._dynamo.reset()
    report = json.loads(stats.read_text())
    assert report["compiled"] == ["transformer: 12 CogView4TransformerBlock blocks"]  # the adapter's block list
    eager, compiled = (np.asarray(Image.open(tmp_path / f), dtype=np.float32) for f in ("eager.png", "out.png"))
    assert np.abs(eager - compiled).max() <= 2  # uint8 levels: rounding, not a different image
