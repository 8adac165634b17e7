"""Quality floors on the trained reference image model: every caching method, on at a moderate
setting, computes fewer blocks and stays within a stated PSNR of the uncached output; adaptive
guidance skips unconditional evaluations and stays within its own floor. The floors sit a few dB
below what the shipped model measures (see docs/cache_bench_image_*.md), so a regression that
breaks a method's fidelity fails here."""

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import AdaptiveGuidanceConfig, BlockCacheConfig, DeltaDiTConfig, TeaCacheConfig
from diffaccel.eval.metrics import psnr
from diffaccel.pipelines import reference
from diffaccel.pipelines.reference import scenes

PROMPTS = scenes.prompt_set(2, seed=77)

# (config, PSNR floor in dB vs the uncached output at 20 steps, mean over PROMPTS)
CASES = {
    # measured with the shipped model (6,288 steps): 50.2 dB / 33% skipped, 37.1 / 39%, 33.5 / 17%, 43.5 / 50%
    "block": (BlockCacheConfig(threshold=0.15, max_consecutive=None), 45.0),
    "block+taylorseer": (BlockCacheConfig(threshold=0.2, max_consecutive=None, calibrator="taylorseer"), 33.0),
    "delta_dit": (DeltaDiTConfig(cache_interval=2, cached_blocks=4), 30.0),
    "teacache": (TeaCacheConfig(threshold=0.15), 39.0),
}


@pytest.fixture(scope="module")
def pipe_and_baseline():
    pipe = reference.load("image")
    kwargs = reference.call_defaults("image")

    def run():
        images = [pipe(p, generator=torch.Generator().manual_seed(i), output_type="np", **kwargs).images[0]
                  for i, p in enumerate(PROMPTS)]
        return np.stack(images)

    return pipe, run, run()


@pytest.mark.parametrize("name", list(CASES))
def test_cache_skips_blocks_within_its_psnr_floor(pipe_and_baseline, name):
    pipe, run, baseline = pipe_and_baseline
    config, floor = CASES[name]
    diffaccel.accelerate(pipe, cache=config)
    try:
        out = run()
        stats = diffaccel.stats(pipe, cumulative=True)
    finally:
        diffaccel.remove(pipe)
    assert stats["blocks_skipped"] > 0.15 * (stats["blocks_computed"] + stats["blocks_skipped"]), stats
    assert psnr(baseline, out).mean >= floor


def test_adaptive_guidance_skips_unconditional_passes_within_its_floor(pipe_and_baseline):
    pipe, run, baseline = pipe_and_baseline
    diffaccel.accelerate(pipe, guidance=AdaptiveGuidanceConfig(threshold=0.996))
    try:
        out = run()
        stats = diffaccel.stats(pipe, cumulative=True)
    finally:
        diffaccel.remove(pipe)
    assert stats["guidance_skipped_uncond"] > 0
    assert psnr(baseline, out).mean >= 27.0  # measured 31.1 dB, 29 of 40 unconditional passes skipped
