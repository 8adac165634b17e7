"""Oracle toy: exact expected numbers for computed and reused steps, the clock, branches, resets."""

import pytest
import torch

import diffaccel
from diffaccel import BlockCacheConfig
from toy_models import run_toy, toy_pipe


def values(outputs):
    return [float(o.reshape(-1)[0]) for o in outputs]


def test_off_counts_steps_and_calls_and_changes_nothing():
    pipe = toy_pipe()
    base = values(run_toy(pipe, 4))
    diffaccel.accelerate(pipe, "off")
    assert values(run_toy(pipe, 4)) == base == [11 + 2 * t for t in (300, 200, 100, 0)]
    stats = diffaccel.stats(pipe)
    assert stats["steps"] == 4 and stats["denoiser_forwards"] == 4 and stats["denoiser_calls"] == 4
    assert stats["blocks_computed"] == 16 and stats["blocks_skipped"] == 0


def test_reused_steps_replay_the_cached_middle_residual_exactly():
    pipe = toy_pipe()
    # Block 0 (+1) has a constant residual, so after warm-up every step may reuse; the middle
    # span (+t, +t) is replayed from the last computed step; the back block (+10) always runs.
    config = BlockCacheConfig(threshold=0.5, compute_first_blocks=1, compute_last_blocks=1, warmup_steps=1, max_consecutive=2)
    diffaccel.accelerate(pipe, cache=config)
    out = values(run_toy(pipe, 5))
    # steps: t=400 computed (warm-up); 300, 200 reuse 2*400; 100 forced compute (max 2 in a row); 0 reuses 2*100
    assert out == [11 + 800, 11 + 800, 11 + 800, 11 + 200, 11 + 200]
    stats = diffaccel.stats(pipe)
    assert stats["cache_hits"] == 3 and stats["cache_misses"] == 2
    assert stats["blocks_skipped"] == 3 * 2
    assert stats["blocks_computed"] == 5 * 4 - 6


def test_threshold_zero_never_reuses_and_output_is_exact():
    pipe = toy_pipe()
    base = values(run_toy(pipe, 4))
    diffaccel.accelerate(pipe, cache=BlockCacheConfig(threshold=0.0, warmup_steps=0))
    assert values(run_toy(pipe, 4)) == base
    assert diffaccel.stats(pipe)["blocks_skipped"] == 0


def test_state_is_per_call_and_needs_no_step_count():
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, cache=BlockCacheConfig(threshold=0.5, warmup_steps=1, max_consecutive=None))
    first = values(run_toy(pipe, 3))
    assert first == [11 + 400] * 3  # t = 200 computed, then reused
    # A new call with another step count starts clean: its first step is computed, not replayed.
    second = values(run_toy(pipe, 5))
    assert second == [11 + 800] * 5
    stats = diffaccel.stats(pipe)
    assert stats["steps"] == 5 and stats["calls"] == 1
    assert diffaccel.stats(pipe, cumulative=True)["calls"] == 2


def test_shape_change_inside_a_call_drops_the_state():
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, cache=BlockCacheConfig(threshold=0.5, warmup_steps=1, max_consecutive=None))
    out = run_toy(pipe, 4, tokens=4, shape_at=(2, 6))
    assert out[2].shape[1] == 6
    # the step after the change is computed with its own timestep (t=100), not replayed from t=300
    assert values(out) == [11 + 600, 11 + 600, 11 + 200, 11 + 200]
    assert diffaccel.stats(pipe)["state_resets"] == 1


def test_branches_keep_separate_state_under_cache_context():
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, cache=BlockCacheConfig(threshold=0.5, warmup_steps=1, max_consecutive=None))
    pipe.scheduler.set_timesteps(3)
    seen = {"cond": [], "uncond": []}
    for t in pipe.scheduler.timesteps:
        for branch, offset in (("cond", 0.0), ("uncond", 1000.0)):
            with pipe.transformer.cache_context(branch):
                x = torch.full((1, 4, 2), offset)
                seen[branch].append(float(pipe.transformer(x, t.expand(1)).reshape(-1)[0]))
        pipe.scheduler.step(None, t, None)
    assert seen["cond"] == [11 + 400] * 3
    assert seen["uncond"] == [1011 + 400] * 3  # its own residual, not the cond branch's
    stats = diffaccel.stats(pipe)
    assert stats["denoiser_calls_by_branch"] == {"cond": 3, "uncond": 3}
    assert stats["cache_hits"] == 4


def test_doubled_cfg_batch_counts_two_branches():
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, "off")
    run_toy(pipe, 3, doubled=True)
    stats = diffaccel.stats(pipe)
    assert stats["denoiser_forwards"] == 3
    assert stats["denoiser_calls"] == 6 and stats["denoiser_calls_by_branch"] == {"uncond": 3, "cond": 3}
    run_toy(pipe, 3, batch=2)  # an even batch of different latents is not CFG
    x = torch.randn(2, 4, 2)
    pipe.scheduler.set_timesteps(1)
    pipe.transformer(x, torch.tensor([0.0, 0.0]))
    assert diffaccel.stats(pipe)["denoiser_calls_by_branch"] == {"cond": 1}


def test_replacing_the_scheduler_is_followed():
    from toy_models import CountdownScheduler

    pipe = toy_pipe()
    diffaccel.accelerate(pipe, cache=BlockCacheConfig(threshold=0.5, warmup_steps=1, max_consecutive=None))
    run_toy(pipe, 3)
    pipe.scheduler = CountdownScheduler()
    assert values(run_toy(pipe, 4)) == [11 + 600] * 4
    assert diffaccel.stats(pipe)["steps"] == 4


def test_remove_takes_every_hook_and_tap_away():
    pipe = toy_pipe()
    base = values(run_toy(pipe, 4))
    diffaccel.accelerate(pipe, cache=BlockCacheConfig(threshold=0.5, warmup_steps=0))
    assert values(run_toy(pipe, 4)) != base
    diffaccel.remove(pipe)
    assert values(run_toy(pipe, 4)) == base
    for module in pipe.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not registry.hooks
    assert "set_timesteps" not in vars(pipe.scheduler) and "step" not in vars(pipe.scheduler)
    with pytest.raises(ValueError, match="not accelerated"):
        diffaccel.stats(pipe)


def test_accelerate_again_replaces_the_configuration():
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, cache=BlockCacheConfig(threshold=0.5, warmup_steps=0))
    same = diffaccel.accelerate(pipe, "off")
    assert same is pipe
    assert values(run_toy(pipe, 3)) == [11 + 2 * t for t in (200, 100, 0)]
    assert diffaccel.config_of(pipe) == diffaccel.preset("off")


def test_a_failed_validation_installs_nothing():
    pipe = toy_pipe()
    with pytest.raises(ValueError, match=r"leaves no middle block to skip in ToyDenoiser, which has 4 blocks"):
        diffaccel.accelerate(pipe, cache=BlockCacheConfig(compute_first_blocks=2, compute_last_blocks=2))
    assert not hasattr(pipe, "_diffaccel_runtime")
    assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in pipe.transformer.modules())


def test_unsupported_denoiser_names_its_class_and_the_supported_ones():
    from types import SimpleNamespace

    class MysteryNet(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match=r"does not support the denoiser class MysteryNet\. Supported: .*FluxTransformer2DModel"):
        diffaccel.accelerate(SimpleNamespace(transformer=MysteryNet()), "fast")
    with pytest.raises(ValueError, match=r"has no denoiser"):
        diffaccel.accelerate(SimpleNamespace(), "fast")


def test_user_adapter_is_checked_against_the_forward_signature():
    from diffaccel.pipelines import FamilyAdapter, register_adapter

    class Net(torch.nn.Module):
        def forward(self, x, t):
            return x

    with pytest.raises(ValueError, match=r"timestep_arg='timestep' is not an argument of Net.forward \['x', 't'\]"):
        register_adapter(Net, FamilyAdapter(name="net", block_lists=(), latent_layout="BSC", cfg_layout="batched"))


def test_a_denoiser_shared_by_two_pipelines_is_accelerated_once():
    from types import SimpleNamespace

    from toy_models import CountdownScheduler

    first = toy_pipe()
    second = SimpleNamespace(transformer=first.transformer, scheduler=CountdownScheduler())
    diffaccel.accelerate(first, "fast")
    with pytest.raises(ValueError, match=r"already accelerated through another pipeline object"):
        diffaccel.accelerate(second, "fast")
    diffaccel.remove(first)
    diffaccel.accelerate(second, "off")
    assert values(run_toy(second, 3)) == [11 + 2 * t for t in (200, 100, 0)]
