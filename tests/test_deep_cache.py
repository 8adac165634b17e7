"""DeepCache on the tiny SD 1.5 / SDXL UNets: interval 1 is bit-identical, larger intervals skip the deep
blocks (counted, and proven by the deep resnets not running), remove() restores the baseline, a new size
or step count starts from clean state, and a retrieval step fed the full step's inputs reproduces the
full step bit for bit (the cached deep features are exactly what the full step computed)."""

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import AccelConfig, DeepCacheConfig
from diffaccel.cache.deep_cache import is_full_step
from tiny_pipelines import build, run

torch.set_num_threads(1)

UNET_FAMILIES = ["sd15", "sdxl"]
STEPS = 4  # num_inference_steps of every tiny case
# Mean |accelerated - baseline| in [0, 1] pixels measured at interval 2, branch 0: sd15 0.0017, sdxl 0.0043.
CLOSE_ENOUGH = 0.02

_cases: dict = {}


def case_and_baseline(name):
    """Build each family once per module; its unaccelerated output is the baseline."""
    if name not in _cases:
        case = build(name)
        _cases[name] = (case, run(case, seed=0))
    case, baseline = _cases[name]
    diffaccel.remove(case.pipe)
    return case, baseline


# ------------------------------------------------------------------------------------------ config


def test_config_defaults_validation_and_round_trip():
    assert AccelConfig(cache="deep").cache == DeepCacheConfig(cache_interval=3, cache_branch=0)
    assert "deep" in diffaccel.available_methods("cache")
    config = DeepCacheConfig(cache_interval=2, cache_branch=1)
    assert DeepCacheConfig.from_dict(config.to_dict()) == config
    for bad in (dict(cache_interval=0), dict(cache_interval=1.5), dict(cache_interval=True), dict(cache_branch=-1)):
        with pytest.raises(ValueError, match=rf"DeepCacheConfig\.{next(iter(bad))}"):
            DeepCacheConfig(**bad)


def test_uniform_schedule():
    assert [is_full_step(i, 3) for i in range(7)] == [True, False, False, True, False, False, True]
    assert all(is_full_step(i, 1) for i in range(5))


# ------------------------------------------------------------------------------------------ pipelines


@pytest.mark.parametrize("name", UNET_FAMILIES)
def test_interval_one_is_bit_identical(name):
    case, baseline = case_and_baseline(name)
    diffaccel.accelerate(case.pipe, cache=DeepCacheConfig(cache_interval=1))
    assert np.array_equal(run(case, seed=0), baseline)
    stats = diffaccel.stats(case.pipe)
    assert stats["blocks_skipped"] == 0
    assert stats["cache_misses"] == STEPS and stats.get("cache_hits", 0) == 0
    diffaccel.remove(case.pipe)


@pytest.mark.parametrize("name", UNET_FAMILIES)
def test_interval_two_skips_deep_blocks_and_remove_restores(name):
    case, baseline = case_and_baseline(name)
    diffaccel.accelerate(case.pipe, cache=DeepCacheConfig(cache_interval=2, cache_branch=0))
    first = run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    # Steps 1 and 3 reuse; CFG is one doubled batch, so one forward per step. Branch 0 of a 3-level
    # UNet reuses down_blocks[1:], the mid block and up_blocks[:2]: 4 counted blocks per retrieval.
    assert stats["cache_hits"] == 2 and stats["cache_misses"] == 2, stats
    assert stats["blocks_skipped"] == 2 * 4, stats
    assert np.isfinite(first).all() and first.shape == baseline.shape
    assert not np.array_equal(first, baseline), "the retrieval path did not change anything"
    assert np.abs(first - baseline).mean() < CLOSE_ENOUGH
    assert np.array_equal(run(case, seed=0), first), "same seed, same accelerated output"

    # Another size and step count right after: no stale state; equal to a freshly accelerated pipe.
    changed = dict(num_inference_steps=3, height=case.call_kwargs["height"] * 2)
    resized = run(case, seed=1, **changed)
    assert np.isfinite(resized).all()
    assert diffaccel.stats(case.pipe)["steps"] == 3
    diffaccel.accelerate(case.pipe, cache=DeepCacheConfig(cache_interval=2, cache_branch=0))
    assert np.array_equal(run(case, seed=1, **changed), resized)

    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


def test_deeper_branch_skips_fewer_blocks():
    case, baseline = case_and_baseline("sd15")
    diffaccel.accelerate(case.pipe, cache=DeepCacheConfig(cache_interval=2, cache_branch=1))
    out = run(case, seed=0)
    assert diffaccel.stats(case.pipe)["blocks_skipped"] == 2 * 2  # down_blocks[2] and up_blocks[0]
    assert not np.array_equal(out, baseline) and np.abs(out - baseline).mean() < CLOSE_ENOUGH
    diffaccel.remove(case.pipe)


def _call_counter(modules: dict[str, torch.nn.Module]):
    """Counts real computations: children of a block only run when the block itself computes."""
    counts = {name: 0 for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(_module, _args, name=name):
            counts[name] += 1

        handles.append(module.register_forward_pre_hook(hook))
    return counts, handles


def test_retrieval_steps_do_not_run_the_deep_blocks():
    case, _ = case_and_baseline("sd15")
    unet = case.pipe.unet
    counts, handles = _call_counter(
        {
            "down0": unet.down_blocks[0].resnets[0],
            "down0_downsampler": unet.down_blocks[0].downsamplers[0].conv,
            "down1": unet.down_blocks[1].resnets[0],
            "down2": unet.down_blocks[2].resnets[0],
            "mid": unet.mid_block.resnets[0],
            "up0": unet.up_blocks[0].resnets[0],
            "up1": unet.up_blocks[1].resnets[0],
            "up2": unet.up_blocks[2].resnets[0],
            "conv_out": unet.conv_out,
        }
    )
    try:
        diffaccel.accelerate(case.pipe, cache=DeepCacheConfig(cache_interval=2, cache_branch=0))
        run(case, seed=0)
    finally:
        for handle in handles:
            handle.remove()
        diffaccel.remove(case.pipe)
    full, every = STEPS // 2, STEPS
    assert counts == {
        "down0": every,
        "down0_downsampler": full,  # feeds only cached consumers: reused too
        "down1": full,
        "down2": full,
        "mid": full,
        "up0": full,
        "up1": full,
        "up2": every,
        "conv_out": every,
    }


@pytest.mark.parametrize("branch", [0, 1, 2])
@pytest.mark.parametrize("freeu", [False, True], ids=["plain", "freeu"])
def test_retrieval_with_the_full_steps_inputs_reproduces_it(branch, freeu):
    """Oracle: fed the same inputs, a retrieval step must equal the full step bit for bit. With FreeU the
    first fresh up block scales its input in place, so this also proves the cache is not edited."""
    case, _ = case_and_baseline("sd15")
    pipe, unet = case.pipe, case.pipe.unet
    if freeu:
        unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        diffaccel.accelerate(pipe, cache=DeepCacheConfig(cache_interval=2, cache_branch=branch))
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(1, 4, 8, 8, generator=generator)
        other = torch.randn(1, 4, 8, 8, generator=generator)
        text = torch.randn(1, 77, 32, generator=generator)
        pipe.scheduler.set_timesteps(STEPS)
        t = pipe.scheduler.timesteps[0]
        with torch.no_grad():
            full = unet(sample, t, encoder_hidden_states=text).sample  # step 0: full
            pipe.scheduler.step(full, t, sample)
            reused = unet(sample, t, encoder_hidden_states=text).sample  # step 1: retrieval
            shallow_changed = unet(other, t, encoder_hidden_states=text).sample  # step 1 again: retrieval
            pipe.scheduler.step(full, t, sample)
            fresh_other = unet(other, t, encoder_hidden_states=text).sample  # step 2: full
        stats = diffaccel.stats(pipe)
        assert stats["cache_hits"] == 2 and stats["cache_misses"] == 2, stats
        assert torch.equal(reused, full)
        assert not torch.equal(shallow_changed, full), "the shallow branch must run on a retrieval step"
        assert not torch.equal(shallow_changed, fresh_other), "the deep features must come from the cache"
    finally:
        diffaccel.remove(pipe)
        if freeu:
            unet.disable_freeu()


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", UNET_FAMILIES)
def test_cache_branch_out_of_range_is_a_clear_error(name):
    case, baseline = case_and_baseline(name)
    with pytest.raises(ValueError, match=r"cache_branch=3 is out of range.*has 3 down blocks.*between 0 and 2"):
        diffaccel.accelerate(case.pipe, cache=DeepCacheConfig(cache_branch=3))
    assert not hasattr(case.pipe, "_diffaccel_runtime")


def test_deep_cache_on_a_transformer_is_a_clear_error():
    case = build("pixart_alpha")
    with pytest.raises(ValueError, match=r"DeepCacheConfig \(cache='deep'\) needs a UNet.*PixArtTransformer2DModel"):
        diffaccel.accelerate(case.pipe, cache="deep")
    assert not hasattr(case.pipe, "_diffaccel_runtime")


def test_block_cache_on_a_unet_points_to_deep_cache():
    case, _ = case_and_baseline("sd15")
    with pytest.raises(ValueError, match=r"cache='block' cannot apply to UNet2DConditionModel.*cache='deep'"):
        diffaccel.accelerate(case.pipe, cache="block")


def test_t2i_adapter_residuals_are_a_clear_error():
    """The UNet adds adapter residuals in place to deep block outputs; reusing them would be wrong."""
    case, _ = case_and_baseline("sd15")
    pipe, unet = case.pipe, case.pipe.unet
    diffaccel.accelerate(pipe, cache=DeepCacheConfig(cache_interval=2))
    try:
        pipe.scheduler.set_timesteps(STEPS)
        residuals = [torch.zeros(1, 8, 8, 8)]
        with torch.no_grad(), pytest.raises(ValueError, match=r"cache='deep'\) cannot run with T2I-Adapter"):
            unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 32), down_intrablock_additional_residuals=residuals)
    finally:
        diffaccel.remove(pipe)


def test_presets_pick_deep_cache_on_unets():
    from diffaccel import DeepCacheConfig, preset

    case = build("sd15")
    diffaccel.accelerate(case.pipe, "fast")
    assert diffaccel.config_of(case.pipe).cache == preset("fast", unet=True).cache
    assert isinstance(diffaccel.config_of(case.pipe).cache, DeepCacheConfig)
    run(case, seed=0)
    assert diffaccel.stats(case.pipe)["blocks_skipped"] > 0
    diffaccel.remove(case.pipe)
