"""Every supported family's tiny pipeline: off is bit-identical, remove() restores the baseline,
the block cache skips blocks, repeated calls are deterministic, and new sizes / step counts right
after a call start from clean state."""

import numpy as np
import pytest

import diffaccel
from diffaccel import BlockCacheConfig
from tiny_pipelines import FAMILIES, build, run

TRANSFORMER_FAMILIES = [name for name in FAMILIES if name not in ("sd15", "sdxl")]
UNET_FAMILIES = ["sd15", "sdxl"]

# Reuse whenever possible after one warm-up step, so skipping is certain even on random weights.
EAGER_CACHE = BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=None)

_cases: dict = {}


def case_and_baseline(name):
    """Build each family once per session; its unaccelerated output is the baseline."""
    if name not in _cases:
        case = build(name)
        _cases[name] = (case, run(case, seed=0))
    case, baseline = _cases[name]
    diffaccel.remove(case.pipe)
    return case, baseline


def other_size(case) -> dict:
    """A different latent size (and frame count for video) that the family accepts."""
    kwargs = case.call_kwargs
    changed = {"height": kwargs["height"] * 2}
    if case.is_video and "num_frames" in kwargs:
        changed["num_frames"] = kwargs["num_frames"] + 4
    return changed


@pytest.mark.parametrize("name", list(FAMILIES))
def test_off_is_bit_identical_and_remove_restores(name):
    case, baseline = case_and_baseline(name)
    diffaccel.accelerate(case.pipe, "off")
    assert np.array_equal(run(case, seed=0), baseline)
    stats = diffaccel.stats(case.pipe)
    steps = case.call_kwargs["num_inference_steps"]
    assert stats["steps"] == steps
    assert stats["denoiser_calls"] == 2 * steps  # CFG is on in every tiny case: one call per branch
    assert stats["blocks_skipped"] == 0
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


@pytest.mark.parametrize("name", TRANSFORMER_FAMILIES)
def test_block_cache_skips_blocks_and_remove_restores(name):
    case, baseline = case_and_baseline(name)
    same = diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    assert same is case.pipe
    first = run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    assert stats["blocks_skipped"] > 0, stats
    assert stats["cache_hits"] > 0
    assert np.isfinite(first).all()
    assert first.shape == baseline.shape
    assert np.array_equal(run(case, seed=0), first), "same seed, same accelerated output"

    # Another size and another step count right after: no stale state, no shape crash. The output
    # must equal a freshly accelerated pipe's at that size, bit for bit.
    changed = other_size(case)
    resized = run(case, seed=1, num_inference_steps=3, **changed)
    assert np.isfinite(resized).all()
    assert diffaccel.stats(case.pipe)["steps"] == 3
    diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    assert np.array_equal(run(case, seed=1, num_inference_steps=3, **changed), resized)

    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


@pytest.mark.parametrize("name", TRANSFORMER_FAMILIES)
def test_threshold_zero_block_cache_is_bit_identical(name):
    case, baseline = case_and_baseline(name)
    diffaccel.accelerate(case.pipe, cache=BlockCacheConfig(threshold=0.0))
    assert np.array_equal(run(case, seed=0), baseline)
    assert diffaccel.stats(case.pipe)["blocks_skipped"] == 0
    diffaccel.remove(case.pipe)


@pytest.mark.parametrize("name", UNET_FAMILIES)
def test_block_cache_on_a_unet_is_a_clear_error(name):
    case, baseline = case_and_baseline(name)
    with pytest.raises(ValueError, match=r"cache='block' cannot apply to UNet2DConditionModel"):
        diffaccel.accelerate(case.pipe, cache="block")
    assert not hasattr(case.pipe, "_diffaccel_runtime")
    assert np.array_equal(run(case, seed=0), baseline)
