"""Offloading composes with acceleration, in either order: diffusers' group offloading (its own
HookRegistry hooks) and accelerate's device hooks (what enable_sequential_cpu_offload and
enable_model_cpu_offload install). Outputs and skips are those of the accelerated pipeline without
offloading, and ``remove`` gives back the plain pipeline, offloading still in place.

On this CPU-only machine weights are offloaded to and onloaded from the CPU: the hooks, their order and
the meta-device weights of sequential offload are all exercised; only the copies are free. A denoiser
quantized with torch.ao accelerates too."""

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import BlockCacheConfig
from tiny_pipelines import build, offload, run

CACHE = BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=2)


@pytest.mark.parametrize("name", ["wan", "flux"])
@pytest.mark.parametrize("mode", ["group", "sequential", "model"])
@pytest.mark.parametrize("order", ["offload first", "accelerate first"])
def test_offloading_composes_with_acceleration_and_remove(name, mode, order):
    reference_case = build(name)
    plain = run(reference_case, seed=0)
    diffaccel.accelerate(reference_case.pipe, cache=CACHE, guidance="adaptive")
    accelerated = run(reference_case, seed=0)
    expected_stats = diffaccel.stats(reference_case.pipe)
    assert expected_stats["blocks_skipped"] > 0

    case = build(name)
    if order == "offload first":
        offload(case, mode)
        diffaccel.accelerate(case.pipe, cache=CACHE, guidance="adaptive")
    else:
        diffaccel.accelerate(case.pipe, cache=CACHE, guidance="adaptive")
        offload(case, mode)
    out = run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    assert np.array_equal(out, accelerated)
    assert stats["blocks_skipped"] == expected_stats["blocks_skipped"]
    assert stats["denoiser_calls"] == expected_stats["denoiser_calls"]
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), plain)  # offloading still works without our hooks


@pytest.mark.parametrize("name", ["flux", "pixart_alpha"])
def test_a_quantized_denoiser_is_accelerated_and_given_back(name):
    """Dynamic int8 quantization (torch.ao) swaps the Linear layers inside the blocks; the hooks sit on the
    blocks and the denoiser, so the cache still skips, and ``remove`` gives the quantized
    pipeline back bit for bit."""
    case = build(name)
    case.pipe.transformer = torch.ao.quantization.quantize_dynamic(case.pipe.transformer, {torch.nn.Linear},
                                                                   dtype=torch.qint8)
    plain = run(case, seed=0)
    diffaccel.accelerate(case.pipe, cache=CACHE, guidance="adaptive")
    accelerated = run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    assert stats["blocks_skipped"] > 0
    assert np.isfinite(accelerated).all() and not np.array_equal(accelerated, plain)
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), plain)


def test_offloading_applied_again_after_accelerate_is_reported_not_silent(caplog):
    """accelerate's ``add_hook_to_module`` rebuilds its wrapper around the forward it first found when a
    module already has one of its hooks, so offloading applied a second time after ``accelerate`` drops
    diffaccel's hooks on the denoiser. That is never silent: block hooks stop the call with an error that
    says what to do, and a denoiser-level method alone is reported once per call as not accelerated."""
    case = build("wan")
    offload(case, "model")
    diffaccel.accelerate(case.pipe, guidance="adaptive")
    with caplog.at_level("WARNING", logger="diffaccel"):
        run(case, seed=0)
    assert "not (fully) accelerated" not in caplog.text  # a normal accelerated run is not reported
    offload(case, "model")
    with caplog.at_level("WARNING", logger="diffaccel"):
        run(case, seed=0)
    assert caplog.text.count("this call is not (fully) accelerated") == 1
    assert diffaccel.stats(case.pipe)["denoiser_calls"] == 0

    case = build("wan")
    offload(case, "model")
    diffaccel.accelerate(case.pipe, cache=CACHE)
    offload(case, "model")
    with pytest.raises(RuntimeError, match="diffaccel.remove"):
        run(case, seed=0)


@pytest.mark.parametrize("mode", ["group", "sequential", "model"])
def test_the_execution_device_is_where_the_denoiser_computes_not_where_its_weights_rest(mode):
    """Device-dependent choices (the parallel mesh, the sparse-attention kernel) ask the offload hooks."""
    from diffaccel.devices import execution_device

    case = offload(build("wan"), mode)
    assert execution_device(case.pipe.transformer).type == "cpu"  # never "meta" under sequential offload
    diffaccel.accelerate(case.pipe, attention="block_sparse")  # resolves its implementation for that device
    diffaccel.remove(case.pipe)
