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
from tiny_pipelines import build, run

CACHE = BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=2)
CPU = torch.device("cpu")


def offload(pipe, mode: str) -> None:
    from accelerate import cpu_offload, cpu_offload_with_hook

    transformer = pipe.transformer
    if mode == "group":
        transformer.enable_group_offload(CPU, CPU, offload_type="block_level", num_blocks_per_group=1)
    elif mode == "sequential":  # weights on the meta device, moved in module by module
        cpu_offload(transformer, execution_device=CPU)
        assert any(p.device.type == "meta" for p in transformer.parameters())
    else:  # "model": the whole denoiser moved in for its forward
        cpu_offload_with_hook(transformer, execution_device=CPU)


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
        offload(case.pipe, mode)
        diffaccel.accelerate(case.pipe, cache=CACHE, guidance="adaptive")
    else:
        diffaccel.accelerate(case.pipe, cache=CACHE, guidance="adaptive")
        offload(case.pipe, mode)
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
