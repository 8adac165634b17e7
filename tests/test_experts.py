"""Pipelines whose steps two denoisers share (Wan 2.2: ``transformer`` for the high-noise steps,
``transformer_2`` for the rest): both are accelerated, each with caches of its own, and reported."""

import logging

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import AdaptiveGuidanceConfig, BlockCacheConfig, BottleneckConfig
from diffaccel.sampling.distilled import DistilledConfig
from diffaccel.runtime import RUNTIME_HOOK
from tiny_pipelines import run, wan22

EAGER_CACHE = BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=None)


@pytest.fixture(scope="module")
def case_and_baseline():
    case = wan22()
    forwards = {"transformer": 0, "transformer_2": 0}
    handles = [getattr(case.pipe, name).register_forward_hook(
        lambda *_, name=name: forwards.__setitem__(name, forwards[name] + 1)) for name in forwards]
    baseline = run(case, seed=0)
    for handle in handles:
        handle.remove()
    # The fixture really is two-expert: each model runs two of the four steps (cond + uncond each).
    assert forwards == {"transformer": 4, "transformer_2": 4}, forwards
    return case, baseline


def hooked(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(RUNTIME_HOOK) is not None


def test_off_is_bit_identical_reports_both_models_and_remove_unhooks_both(case_and_baseline, caplog):
    case, baseline = case_and_baseline
    diffaccel.accelerate(case.pipe, "off")
    assert hooked(case.pipe.transformer) and hooked(case.pipe.transformer_2)
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        assert np.array_equal(run(case, seed=0), baseline)
    assert "not (fully) accelerated" not in caplog.text  # every step reached an accelerated model
    stats = diffaccel.stats(case.pipe)
    assert stats["steps"] == 4 and stats["denoiser_calls"] == 8
    assert stats["models"]["transformer"]["denoiser_calls"] == 4
    assert stats["models"]["transformer_2"]["denoiser_calls"] == 4
    diffaccel.remove(case.pipe)
    assert not hooked(case.pipe.transformer) and not hooked(case.pipe.transformer_2)
    assert np.array_equal(run(case, seed=0), baseline)


def test_block_cache_skips_in_both_experts_with_caches_of_their_own(case_and_baseline):
    case, baseline = case_and_baseline
    diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    out = run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    diffaccel.remove(case.pipe)
    assert np.isfinite(out).all() and not np.array_equal(out, baseline)
    for name in ("transformer", "transformer_2"):
        model = stats["models"][name]
        # Each expert computes its first step in both branches (nothing of its own cached yet: the other
        # expert's residuals are never reused) and skips in its second.
        assert model["cache_misses"] == 2, (name, model)
        assert model["cache_hits"] == 2 and model["blocks_skipped"] > 0, (name, model)
    assert stats["blocks_skipped"] == sum(m["blocks_skipped"] for m in stats["models"].values())
    assert np.array_equal(run(case, seed=0), baseline)


def test_adaptive_guidance_skips_the_unconditional_branch_of_both_experts(case_and_baseline):
    case, _ = case_and_baseline
    diffaccel.accelerate(case.pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0))
    run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    diffaccel.remove(case.pipe)
    assert stats["guidance_skipped_uncond"] == 4
    for name in ("transformer", "transformer_2"):
        assert stats["models"][name]["denoiser_calls_by_branch"] == {"cond": 2}, stats["models"][name]


def test_preset_turbo_runs_and_the_sampling_method_is_installed_once(case_and_baseline):
    case, baseline = case_and_baseline
    diffaccel.accelerate(case.pipe, "turbo")
    out = run(case, seed=0)
    runtime = case.pipe._diffaccel_runtime
    assert runtime.config.sampling is not None
    assert runtime.experts["transformer_2"].config.sampling is None
    assert runtime.experts["transformer_2"].config.cache == runtime.config.cache
    diffaccel.remove(case.pipe)
    assert out.shape == baseline.shape and np.isfinite(out).all()


def test_methods_that_cannot_serve_two_experts_are_refused_by_name(case_and_baseline):
    case, baseline = case_and_baseline
    with pytest.raises(ValueError, match="transformer_2.*a student replaces one denoiser"):
        diffaccel.accelerate(case.pipe, sampling=DistilledConfig(student="students/any"))
    assert not hooked(case.pipe.transformer) and not hooked(case.pipe.transformer_2)
    assert np.array_equal(run(case, seed=0), baseline)


def test_bottleneck_stages_are_summed_for_both_experts(case_and_baseline):
    case, _ = case_and_baseline
    forwards = {"transformer": 0, "transformer_2": 0}
    handles = [getattr(case.pipe, name).register_forward_hook(
        lambda *_, name=name: forwards.__setitem__(name, forwards[name] + 1)) for name in forwards]
    diffaccel.accelerate(case.pipe, sampling=BottleneckConfig(), cache=EAGER_CACHE)
    try:
        out = run(case, seed=0, num_inference_steps=8, height=64, width=64)
        stats = diffaccel.stats(case.pipe)
    finally:
        diffaccel.remove(case.pipe)
        for handle in handles:
            handle.remove()
    assert np.isfinite(out).all()
    assert stats["bottleneck_stages"] == 3
    # The report covers every stage of the call, for each expert: what really ran.
    assert {name: stats["models"][name]["denoiser_forwards"] for name in forwards} == forwards
    assert stats["denoiser_forwards"] == sum(forwards.values())
    assert all(count > 0 for count in forwards.values()), forwards


def test_one_scheduler_tap_drives_both_experts_and_follows_a_replaced_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    case = wan22()
    diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    first = run(case, seed=0)
    old = case.pipe.scheduler
    case.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(old.config)
    assert np.array_equal(run(case, seed=0), first)
    stats = diffaccel.stats(case.pipe)
    assert stats["steps"] == 4 and stats["models"]["transformer_2"]["cache_hits"] == 2
    tapped = ("step", "set_timesteps")
    assert not any(name in vars(old) for name in tapped)  # the old scheduler is left as it was
    diffaccel.remove(case.pipe)
    assert not any(name in vars(case.pipe.scheduler) for name in tapped)


def _teacache_skips(case, config) -> dict:
    diffaccel.accelerate(case.pipe, cache=config)
    try:
        run(case, seed=0)
        models = diffaccel.stats(case.pipe)["models"]
    finally:
        diffaccel.remove(case.pipe)
    return {name: models[name]["blocks_skipped"] for name in ("transformer", "transformer_2")}


def test_teacache_takes_each_experts_own_polynomial(case_and_baseline):
    """A constant polynomial 0 rates every change as nothing (skip), 10 as large (compute): the expert
    follows its own entry in expert_coefficients, the main denoiser ``coefficients``."""
    from diffaccel.cache import TeaCacheConfig

    case, _ = case_and_baseline
    rule = dict(threshold=0.5, warmup_steps=0, force_last_step=False)
    both = _teacache_skips(case, TeaCacheConfig(coefficients=(0.0,), **rule))
    assert both["transformer"] > 0 and both["transformer_2"] > 0, both
    own = _teacache_skips(case, TeaCacheConfig(coefficients=(0.0,), expert_coefficients={"transformer_2": (10.0,)}, **rule))
    assert own == {"transformer": both["transformer"], "transformer_2": 0}, own
    swapped = _teacache_skips(case, TeaCacheConfig(coefficients=(10.0,), expert_coefficients={"transformer_2": (0.0,)}, **rule))
    assert swapped == {"transformer": 0, "transformer_2": both["transformer_2"]}, swapped
    config = TeaCacheConfig(coefficients=(1.0, 0.0), expert_coefficients={"transformer_2": (2.0, 0.0)})
    assert diffaccel.AccelConfig.from_dict(diffaccel.AccelConfig(cache=config).to_dict()).cache == config
    assert "expert_coefficients" not in TeaCacheConfig().to_dict()  # earlier configs' farm job ids stay the same


def test_settings_for_an_expert_the_pipeline_lacks_are_refused_by_name(case_and_baseline):
    from diffaccel.cache import TeaCacheConfig
    from tiny_pipelines import build

    case, baseline = case_and_baseline
    with pytest.raises(ValueError, match=r"expert\(s\) \['transformer_3'\].*expert denoisers: \['transformer_2'\]"):
        diffaccel.accelerate(case.pipe, cache=TeaCacheConfig(expert_coefficients={"transformer_3": (1.0, 0.0)}))
    assert not hooked(case.pipe.transformer) and np.array_equal(run(case, seed=0), baseline)
    with pytest.raises(ValueError, match=r"none \(one denoiser\)"):
        diffaccel.accelerate(build("wan").pipe, cache=TeaCacheConfig(expert_coefficients={"transformer_2": (1.0,)}))


@pytest.mark.filterwarnings("ignore:Polyfit may be poorly conditioned")  # 4 steps give few distinct changes
def test_teacache_calibration_fits_each_expert_on_its_own_steps(case_and_baseline):
    from diffaccel.cache import calibrate_teacache, calibrate_teacache_experts

    case, baseline = case_and_baseline
    def runs():  # fresh generators for each calibration
        return [dict(case.call_kwargs, generator=torch.Generator().manual_seed(seed)) for seed in (0, 1, 2)]

    main, experts = calibrate_teacache_experts(case.pipe, runs(), degree=1)
    assert set(experts) == {"transformer_2"} and len(main) == 2 and len(experts["transformer_2"]) == 2
    assert main != experts["transformer_2"]  # two models, two fits
    assert calibrate_teacache(case.pipe, runs(), degree=1) == main
    assert not hooked(case.pipe.transformer) and not hooked(case.pipe.transformer_2)
    assert np.array_equal(run(case, seed=0), baseline)
