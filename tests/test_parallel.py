"""CFG parallel and Ulysses context parallel under torchrun (gloo, 2 CPU processes) against one process."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from tiny_pipelines import add_lora, build, run, wan22

import diffaccel
from diffaccel import ParallelConfig

CACHE = {"method": "block", "threshold": 0.3, "warmup_steps": 1}
AG = {"method": "adaptive", "threshold": -1.0, "min_steps": 2}
LORA = {"rank": 4, "seed": 3}
BATCH = {"num_videos_per_prompt": 2}
SCENARIOS = [
    dict(name="cfg_batched", family="pixart_alpha", config={"parallel": {"method": "cfg"}}),
    dict(name="cfg_separate", family="wan", config={"parallel": {"method": "cfg"}}),
    dict(name="cfg_separate_cache_ag", family="wan", config={"parallel": {"method": "cfg"}, "cache": CACHE, "guidance": AG}),
    dict(name="ulysses_flux_cache", family="flux", config={"parallel": {"method": "context"}, "cache": CACHE}),
    dict(name="ulysses_wan_cache", family="wan", config={"parallel": {"method": "context"}, "cache": CACHE}),
    # What xDiT / ParaAttention users ask for: a LoRA fine-tune and more than one output per call.
    dict(name="cfg_lora_batch", family="wan", lora=LORA, overrides=BATCH,
         config={"parallel": {"method": "cfg"}, "cache": CACHE}),
    dict(name="ulysses_lora_batch", family="flux", lora=LORA, overrides={"num_images_per_prompt": 2},
         config={"parallel": {"method": "context"}}),
    # Memory per GPU: offloading (diffusers' group offloading, accelerate's sequential and model offload)
    # under each parallel mode, installed before or after accelerate.
    *[dict(name=f"{parallel}_{family}_{mode}_{order}", family=family, offload=[mode, order],
           config={"parallel": {"method": parallel}, "cache": CACHE})
      for parallel, family in (("cfg", "wan"), ("context", "flux"), ("context", "wan"))
      for mode in ("group", "sequential", "model") for order in ("before", "after")],
    # Branches told by call order (Chroma opens no cache context), by a diffusers guider (HunyuanVideo 1.5), and
    # Z-Image's doubled list of latents, conditional half first.
    dict(name="cfg_chroma_cache", family="chroma", config={"parallel": {"method": "cfg"}, "cache": CACHE}),
    dict(name="cfg_hunyuan_video15", family="hunyuan_video15", config={"parallel": {"method": "cfg"}}),
    dict(name="cfg_z_image", family="z_image", config={"parallel": {"method": "cfg"}}),
    # Cosmos calls cond then uncond without a cache context; HiDream-I1's Llama states hold the batch in dim 1.
    dict(name="cfg_cosmos_cache", family="cosmos", config={"parallel": {"method": "cfg"}, "cache": CACHE}),
    dict(name="cfg_hidream", family="hidream_image", config={"parallel": {"method": "cfg"}}),
    # Qwen-Image 2.1: each branch keeps its own KV cache of its text; the cache skips on the image tokens.
    dict(name="cfg_qwenimage21_cache", family="qwenimage21", config={"parallel": {"method": "cfg"}, "cache": CACHE}),
    dict(name="wrong_degrees", family="wan", config={"parallel": {"method": "hybrid", "cfg": 2, "ulysses": 2}}),
    dict(name="no_plan", family="pixart_alpha", config={"parallel": {"method": "context"}}),
]


# Wan 2.2's two experts: each denoiser gets the parallel hooks of its own (and its caches).
EXPERTS = [dict(name="cfg_wan22_cache", family="wan22", config={"parallel": {"method": "cfg"}, "cache": CACHE}),
           dict(name="ulysses_wan22_cache", family="wan22", config={"parallel": {"method": "context"}, "cache": CACHE})]
HYBRID = [dict(name="hybrid_wan_cache", family="wan", config={"parallel": {"method": "hybrid", "cfg": 2, "ulysses": 2}, "cache": CACHE})]


def _torchrun(folder, scenarios, processes):
    (folder / "scenarios.json").write_text(json.dumps(scenarios))
    worker = Path(__file__).with_name("parallel_worker.py")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), str(worker),
         str(folder / "scenarios.json"), str(folder)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return folder


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    return _torchrun(tmp_path_factory.mktemp("parallel"), SCENARIOS, 2)


def _single_process(family, config, lora=None, **overrides):
    made = wan22() if family == "wan22" else build(family)
    case = add_lora(made, **lora) if lora else made
    config = {k: v for k, v in config.items() if k != "parallel"}
    diffaccel.accelerate(case.pipe, config)
    try:
        return run(case, **overrides), diffaccel.stats(case.pipe)
    finally:
        diffaccel.remove(case.pipe)


def _result(folder, name):
    return np.load(folder / f"{name}.npy"), json.loads((folder / f"{name}.json").read_text())


def test_cfg_parallel_doubled_batch_equals_one_process(torchrun_results):
    out, stats = _result(torchrun_results, "cfg_batched")
    single, _ = _single_process("pixart_alpha", {})
    np.testing.assert_allclose(out, single, atol=1e-4)
    assert stats["parallel_cfg_exchanges"] == stats["steps"]  # one all-gather per step


def test_cfg_parallel_separate_calls_equals_one_process(torchrun_results):
    out, stats = _result(torchrun_results, "cfg_separate")
    single, _ = _single_process("wan", {})
    np.testing.assert_allclose(out, single, atol=1e-4)
    # From the second step on, rank 1 computes the unconditional branch during the conditional call.
    assert stats["parallel_cfg_speculated"] == stats["steps"] - 1
    assert "parallel_cfg_mispredicted" not in stats


def test_cfg_parallel_composes_with_cache_and_adaptive_guidance(torchrun_results):
    out, stats = _result(torchrun_results, "cfg_separate_cache_ag")
    single, single_stats = _single_process("wan", {"cache": CACHE, "guidance": AG})
    np.testing.assert_allclose(out, single, atol=1e-4)
    assert stats["guidance_skipped_uncond"] == single_stats["guidance_skipped_uncond"] > 0
    assert stats["blocks_skipped"] > 0
    # Step 1 is speculated and used; step 2 is speculated but guidance skips the branch, so from step 3 on
    # rank 1 stops speculating (it duplicates the conditional call).
    assert stats["parallel_cfg_speculated"] == 2


@pytest.mark.parametrize("family, name, overrides, config", [
    ("wan", "cfg_lora_batch", BATCH, {"cache": CACHE}),
    ("flux", "ulysses_lora_batch", {"num_images_per_prompt": 2}, {}),
])
def test_parallel_runs_carry_a_lora_and_a_batch(torchrun_results, family, name, overrides, config):
    out, stats = _result(torchrun_results, name)
    single, _ = _single_process(family, config, LORA, **overrides)
    plain_lora_off, _ = _single_process(family, config, None, **overrides)
    assert out.shape[0] == 2 and not np.allclose(single, plain_lora_off, atol=1e-3)  # the LoRA matters
    np.testing.assert_allclose(out, single, atol=1e-4)
    assert not np.allclose(out[0], out[1], atol=1e-3)  # two different samples, not one copied


@pytest.mark.parametrize("family, name", [("flux", "ulysses_flux_cache"), ("wan", "ulysses_wan_cache")])
def test_ulysses_with_block_cache_equals_one_process(torchrun_results, family, name):
    out, stats = _result(torchrun_results, name)
    single, single_stats = _single_process(family, {"cache": CACHE})
    np.testing.assert_allclose(out, single, atol=1e-4)
    # The reuse decision is all-reduced: both ranks skip exactly what one process skips.
    assert stats["blocks_skipped"] == single_stats["blocks_skipped"] > 0


def test_hybrid_cfg_times_ulysses_on_four_ranks(tmp_path):
    """cfg=2 x ulysses=2: two CFG groups, each splitting the sequence over two ranks."""
    folder = _torchrun(tmp_path, HYBRID, 4)
    out, stats = _result(folder, "hybrid_wan_cache")
    single, single_stats = _single_process("wan", {"cache": CACHE})
    np.testing.assert_allclose(out, single, atol=1e-4)
    assert stats["parallel_cfg_speculated"] == stats["steps"] - 1
    assert stats["blocks_skipped"] > 0 and single_stats["blocks_skipped"] > 0


def test_parallel_shards_both_experts_of_wan22(tmp_path):
    """Wan 2.2 (A14B) in a render farm: CFG parallel and Ulysses run on both experts, each with its own
    speculation and caches, and equal one process."""
    folder = _torchrun(tmp_path, EXPERTS, 2)
    single, single_stats = _single_process("wan22", {"cache": CACHE})
    out, stats = _result(folder, "cfg_wan22_cache")
    np.testing.assert_allclose(out, single, atol=1e-4)
    for name in ("transformer", "transformer_2"):
        model = stats["models"][name]
        # Each expert runs two of the four steps: its first on both ranks, its second speculated.
        assert model["parallel_cfg_exchanges"] == 1 and model["parallel_cfg_speculated"] == 1, (name, model)
        assert model["blocks_skipped"] > 0, (name, model)
    out, stats = _result(folder, "ulysses_wan22_cache")
    np.testing.assert_allclose(out, single, atol=1e-4)
    for name in ("transformer", "transformer_2"):
        assert stats["models"][name]["blocks_skipped"] == single_stats["models"][name]["blocks_skipped"] > 0


@pytest.mark.parametrize("parallel, family", [("cfg", "wan"), ("context", "flux"), ("context", "wan")])
def test_parallel_runs_compose_with_offloading(torchrun_results, parallel, family):
    """What xDiT / ParaAttention users ask for: memory per GPU kept down by offloading in a parallel run.
    The mesh is built for the device the denoiser computes on, not where offloading parks its weights
    (the meta device, for sequential offload)."""
    single, single_stats = _single_process(family, {"cache": CACHE})
    for mode in ("group", "sequential", "model"):
        for order in ("before", "after"):
            out, stats = _result(torchrun_results, f"{parallel}_{family}_{mode}_{order}")
            np.testing.assert_allclose(out, single, atol=1e-4, err_msg=f"{mode} offload {order} accelerate")
            assert stats["blocks_skipped"] > 0
            if parallel == "context":
                assert stats["blocks_skipped"] == single_stats["blocks_skipped"]
            else:
                assert stats["parallel_cfg_speculated"] == stats["steps"] - 1


@pytest.mark.parametrize("name, family, config", [
    ("cfg_chroma_cache", "chroma", {"cache": CACHE}),
    ("cfg_hunyuan_video15", "hunyuan_video15", {}),
    ("cfg_cosmos_cache", "cosmos", {"cache": CACHE}),
    ("cfg_qwenimage21_cache", "qwenimage21", {"cache": CACHE}),
])
def test_cfg_parallel_on_branches_told_by_call_order_or_a_guider(torchrun_results, name, family, config):
    out, stats = _result(torchrun_results, name)
    single, single_stats = _single_process(family, config)
    np.testing.assert_allclose(out, single, atol=1e-4)
    assert stats["parallel_cfg_speculated"] == stats["steps"] - 1
    assert stats["denoiser_calls_by_branch"] == single_stats["denoiser_calls_by_branch"]


def test_cfg_parallel_cuts_an_argument_whose_batch_is_its_second_dimension(torchrun_results):
    """HiDream-I1's stacked Llama states are (layers, batch, tokens, channels): each rank gets its half of the
    batch there (before, each rank's half attended to both halves' Llama tokens)."""
    out, stats = _result(torchrun_results, "cfg_hidream")
    single, _ = _single_process("hidream_image", {})
    np.testing.assert_allclose(out, single, atol=1e-4)
    assert stats["parallel_cfg_exchanges"] == stats["steps"]


def test_cfg_parallel_splits_a_list_of_latents_conditional_half_first(torchrun_results):
    out, stats = _result(torchrun_results, "cfg_z_image")
    single, _ = _single_process("z_image", {})
    np.testing.assert_allclose(out, single, atol=1e-4)
    assert stats["parallel_cfg_exchanges"] == stats["steps"]


def test_wrong_degrees_and_missing_plans_are_clear_errors(torchrun_results):
    assert "world size 2" in (torchrun_results / "wrong_degrees.error").read_text()
    assert "no context-parallel plan" in (torchrun_results / "no_plan.error").read_text()


def test_without_torchrun_it_says_how_to_launch():
    assert not (dist.is_available() and dist.is_initialized())
    case = build("pixart_alpha")
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        diffaccel.accelerate(case.pipe, parallel="cfg")


def test_degrees_fill_the_world_size():
    assert ParallelConfig(cfg=2, ulysses=0).degrees(8) == (2, 1, 4)
    assert diffaccel.resolve_config(None, parallel="cfg").parallel.degrees(2) == (2, 1, 1)
    assert diffaccel.resolve_config(None, parallel="context").parallel.degrees(4) == (1, 1, 4)
    with pytest.raises(ValueError, match="world size 6"):
        ParallelConfig(cfg=2, ulysses=4).degrees(6)
    with pytest.raises(ValueError, match="at most one degree"):
        ParallelConfig(cfg=0, ulysses=0)
    with pytest.raises(ValueError, match="cfg"):
        ParallelConfig(cfg=3)
