"""TeaCache: exact skips on the oracle toy, off is bit-identical, every transformer family, calibration."""

import logging

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import AccelConfig, TeaCacheConfig
from diffaccel.cache.teacache import calibrate_teacache, rescale
from tiny_pipelines import FAMILIES, build, run
from toy_models import run_toy, toy_pipe

TRANSFORMER_FAMILIES = [name for name in FAMILIES if name not in ("sd15", "sdxl")]


def values(outputs):
    return [float(o.reshape(-1)[0]) for o in outputs]


def test_config_validation_rescale_and_round_trip():
    with pytest.raises(ValueError, match="threshold"):
        TeaCacheConfig(threshold=-1.0)
    with pytest.raises(ValueError, match="coefficients must be a tuple of finite numbers"):
        TeaCacheConfig(coefficients=(1.0, float("nan")))
    with pytest.raises(ValueError, match="force_last_step"):
        TeaCacheConfig(force_last_step="yes")
    assert rescale(0.3, ()) == 0.3 and rescale(0.5, (2.0, 1.0)) == 2.0
    config = AccelConfig(cache=TeaCacheConfig(threshold=0.2, coefficients=(1.5, -0.25, 0.01)))
    assert AccelConfig.from_dict(config.to_dict()) == config
    assert diffaccel.resolve_config(cache="teacache").cache == TeaCacheConfig()


def test_accumulated_change_decides_and_the_stack_residual_is_replayed():
    # The toy's blocks receive temb = t: changes 100/400, 100/300, 100/200, 100/100 from step to step.
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, cache=TeaCacheConfig(threshold=0.6))
    # step 0 computes (warm-up); 1: acc 0.25 skip; 2: acc 0.583 skip; 3: acc 1.08 computes; 4: last, computes.
    assert values(run_toy(pipe, 5)) == [811, 811, 811, 211, 11]
    stats = diffaccel.stats(pipe)
    assert stats["cache_hits"] == 2 and stats["cache_misses"] == 3 and stats["blocks_skipped"] == 2 * 4
    diffaccel.accelerate(pipe, cache=TeaCacheConfig(threshold=0.6, max_consecutive=1))
    assert values(run_toy(pipe, 5)) == [811, 811, 411, 411, 11]  # forced compute at step 2, acc restarts


def test_calibrator_forecasts_the_stack_residual_exactly_when_it_is_linear():
    # The toy's stack residual is 11 + 2t, linear in the step index: steps 0 and 1 compute (warm-up),
    # step 2 skips (accumulated 0.5); plain TeaCache replays step 1's residual, the forecast step 2's.
    pipe = toy_pipe()
    common = dict(threshold=0.6, warmup_steps=2)
    diffaccel.accelerate(pipe, cache=TeaCacheConfig(**common))
    assert values(run_toy(pipe, 5)) == [811, 611, 611, 211, 11]
    diffaccel.accelerate(pipe, cache=TeaCacheConfig(**common, calibrator="taylorseer"))
    assert values(run_toy(pipe, 5)) == [811, 611, 411, 211, 11]
    assert diffaccel.stats(pipe)["cache_hits"] == 1
    with pytest.raises(ValueError, match="calibrator must be None or one of"):
        TeaCacheConfig(calibrator="magic")
    with pytest.raises(ValueError, match="calibrator_order must be an integer from 1 to 2"):
        TeaCacheConfig(calibrator="taylorseer", calibrator_order=0)


def test_output_reuse_replays_the_prediction_not_the_residual_on_the_fresh_input():
    # The input grows by 1 a step. Step 0 computes 0 + 11 + 2·400 = 811; steps 1 and 2 skip: the residual
    # replay gives the fresh input plus 811, the output replay gives 811 itself.
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, cache=TeaCacheConfig(threshold=0.6))
    assert values(run_toy(pipe, 5, input_step=1.0)) == [811, 812, 813, 214, 15]
    diffaccel.accelerate(pipe, cache=TeaCacheConfig(threshold=0.6, reuse="output"))
    assert values(run_toy(pipe, 5, input_step=1.0)) == [811, 811, 811, 214, 15]
    assert diffaccel.stats(pipe)["blocks_skipped"] == 2 * 4
    # The calibrator forecasts the prediction along the steps: 812 + 2·(t) falls by 199 a step here.
    diffaccel.accelerate(pipe, cache=TeaCacheConfig(threshold=0.6, warmup_steps=2, calibrator="taylorseer",
                                                    reuse="output"))
    assert values(run_toy(pipe, 5, input_step=1.0)) == [811, 612, 413, 214, 15]
    with pytest.raises(ValueError, match="reuse must be one of"):
        TeaCacheConfig(reuse="features")


@pytest.mark.parametrize("name", ["flux", "wan", "pixart_alpha"])
def test_output_reuse_is_exact_when_nothing_skips_and_skips_otherwise(name):
    """Both CFG layouts: per-branch calls (Wan) and one doubled batch (PixArt)."""
    case = build(name)
    baseline = run(case, seed=0)
    diffaccel.accelerate(case.pipe, cache=TeaCacheConfig(threshold=0.0, reuse="output"))
    assert np.array_equal(run(case, seed=0), baseline)
    diffaccel.accelerate(case.pipe, cache=TeaCacheConfig(threshold=100.0, reuse="output", calibrator="taylorseer"))
    fast = run(case, seed=0)
    assert diffaccel.stats(case.pipe)["blocks_skipped"] > 0 and np.isfinite(fast).all()
    assert not np.array_equal(fast, baseline)
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


@pytest.mark.parametrize("threshold, skipping", [(0.2, True), (0.5, True), (0.05, False)])
def test_the_sea_indicator_reproduces_diffusers_seacache_on_wan(threshold, skipping):
    """SeaCache's settings (linear residual forecast, at most two skips in a row, first and last steps
    computed) on the SEA indicator make exactly diffusers' SeaCache decisions and outputs."""
    from diffusers import SeaCacheConfig

    case = build("wan")
    baseline = run(case, seed=0, num_inference_steps=10)
    case.pipe.transformer.enable_cache(SeaCacheConfig(threshold=threshold))
    theirs = run(case, seed=0, num_inference_steps=10)
    case.pipe.transformer.disable_cache()
    diffaccel.accelerate(case.pipe, cache=TeaCacheConfig(indicator="sea", threshold=threshold, max_consecutive=2,
                                                         calibrator="taylorseer"))
    ours = run(case, seed=0, num_inference_steps=10)
    assert np.array_equal(ours, theirs)
    assert (diffaccel.stats(case.pipe).get("cache_hits", 0) > 0) == skipping
    assert np.array_equal(ours, baseline) != skipping


def test_the_sea_filter_weighs_detail_less_at_higher_noise_and_needs_a_latent_grid():
    from diffaccel.cache.teacache import sea_filter

    x = torch.ones(1, 1, 8, 8)
    x[..., ::2, ::2] += 1.0  # DC plus the highest frequency
    def detail(sigma):
        y = sea_filter(x, sigma, (2, 3), 3.0)
        return float(y.std() / y.mean())
    assert detail(0.9) < detail(0.5) < detail(0.1)
    with pytest.raises(ValueError, match="packed into tokens"):
        diffaccel.accelerate(build("flux").pipe, cache=TeaCacheConfig(indicator="sea"))
    with pytest.raises(ValueError, match="indicator must be one of"):
        TeaCacheConfig(indicator="spectral")
    with pytest.raises(ValueError, match="sea_power"):
        TeaCacheConfig(sea_power=-1.0)


@pytest.mark.parametrize("name", TRANSFORMER_FAMILIES)
def test_every_transformer_family_off_is_exact_on_skips_and_remove_restores(name):
    case = build(name)
    baseline = run(case, seed=0)
    diffaccel.accelerate(case.pipe, cache=TeaCacheConfig(threshold=0.0))
    assert np.array_equal(run(case, seed=0), baseline)
    assert diffaccel.stats(case.pipe)["blocks_skipped"] == 0
    diffaccel.accelerate(case.pipe, cache=TeaCacheConfig(threshold=100.0))
    fast = run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    assert stats["blocks_skipped"] > 0 and np.isfinite(fast).all()
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


def test_blocks_without_a_timestep_embedding_measure_their_hidden_input(caplog):
    """Cosmos 3 adds the timestep to the tokens before its decoder layers, which take none: the indicator is the
    first layer's hidden input, said once in the log, and the cache still skips on a slow-changing input."""
    case = build("cosmos3_omni")
    with caplog.at_level(logging.INFO, logger="diffaccel"):
        diffaccel.accelerate(case.pipe, cache=TeaCacheConfig(threshold=100.0))
    assert sum("takes no timestep embedding" in r.getMessage() for r in caplog.records) == 1
    run(case, seed=0)
    assert diffaccel.stats(case.pipe)["blocks_skipped"] > 0
    diffaccel.remove(case.pipe)


def test_unet_is_a_clear_error():
    case = build("sd15")
    with pytest.raises(ValueError, match="cache='teacache' cannot apply to UNet2DConditionModel"):
        diffaccel.accelerate(case.pipe, cache="teacache")


def test_calibration_fits_a_polynomial_on_baseline_runs_and_leaves_the_pipe_clean():
    case = build("flux")
    baseline = run(case, seed=0)
    runs = [dict(case.call_kwargs, num_inference_steps=6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    coefficients = calibrate_teacache(case.pipe, runs, degree=2)
    assert len(coefficients) == 3 and np.isfinite(coefficients).all()
    assert np.array_equal(run(case, seed=0), baseline)
    with pytest.raises(ValueError, match="too few"):
        calibrate_teacache(case.pipe, runs[:1], degree=40)


def test_a_fixed_schedule_decides_instead_of_the_indicator():
    # The toy's prediction is 812 - 199·i at step i (input rising by 1): "10010" computes steps 0 and 3 and
    # replays step 0's prediction at 1-2 and step 3's at 4; with the Taylor forecast, step 4 comes from the
    # slope of steps 0 and 3 and is exact. No threshold, warm-up or last-step rule applies.
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, cache=TeaCacheConfig(threshold=0.0, reuse="output", schedule="10010"))
    assert values(run_toy(pipe, 5, input_step=1.0)) == [811, 811, 811, 214, 214]
    stats = diffaccel.stats(pipe)
    assert stats["cache_hits"] == 3 and stats["cache_misses"] == 2 and stats["blocks_skipped"] == 3 * 4
    diffaccel.accelerate(pipe, cache=TeaCacheConfig(reuse="output", calibrator="taylorseer", schedule="10010"))
    assert values(run_toy(pipe, 5, input_step=1.0))[3:] == [214, 15]
    # A call of another length follows the nearest step's plan: "10" over 4 steps computes steps 0 and 1.
    diffaccel.accelerate(pipe, cache=TeaCacheConfig(reuse="output", schedule="10"))
    run_toy(pipe, 4, input_step=1.0)
    assert diffaccel.stats(pipe)["cache_misses"] == 2
    with pytest.raises(ValueError, match="schedule must be a string of '1'"):
        TeaCacheConfig(schedule="1x0")
    with pytest.raises(ValueError, match="must compute its first step"):
        TeaCacheConfig(schedule="01")
    config = AccelConfig(cache=TeaCacheConfig(reuse="output", schedule="1101"))
    assert AccelConfig.from_dict(config.to_dict()) == config


def test_the_schedule_search_keeps_the_count_and_only_accepts_improvements():
    from diffaccel.cache.tune import Trial, climb_schedule, spread_schedule

    assert spread_schedule(28, 11) == "1110100100100100010010010010"
    assert spread_schedule(10, 10) == "1" * 10
    with pytest.raises(ValueError, match="between 1 and 6"):
        spread_schedule(6, 0)
    # A stand-in objective whose best plan computes the last steps: the climb walks the computes there.
    target = "1000000111"
    seen = []

    def evaluate(config):
        seen.append(config.schedule)
        assert config.schedule.count("1") == 4 and config.schedule[0] == "1"
        computed = [i for i, c in enumerate(config.schedule) if c == "1"]
        wanted = [i for i, c in enumerate(target) if c == "1"]
        return Trial(config, -sum(abs(a - b) for a, b in zip(computed, wanted)), 0.4)

    best = climb_schedule(evaluate, spread_schedule(10, 4, warmup=1), sweeps=20)
    assert best.config.schedule == target and best.config.reuse == "output"
    assert len(seen) > 4  # it tried neighbours of each plan it kept


def test_tune_cache_schedule_on_a_tiny_pipeline_beats_or_equals_the_spread_plan():
    from diffaccel.cache.tune import spread_schedule, tune_cache

    case = build("flux")
    calls = [dict(case.call_kwargs, num_inference_steps=6, seed=s) for s in (0, 1)]
    calls = [{k: v for k, v in c.items() if k != "output_type"} for c in calls]
    result = tune_cache(case.pipe, calls, "schedule", target_speedup=2.0)
    assert isinstance(result.config, TeaCacheConfig) and result.config.schedule.count("1") == 3
    spread = [t for t in result.trials if t.config.schedule == spread_schedule(6, 3)]
    assert spread and result.psnr >= spread[0].psnr
    assert 0.4 < result.compute_fraction < 0.65  # 3 of 6 steps run their blocks
    assert not hasattr(case.pipe, "_diffaccel_runtime")  # the search leaves the pipeline plain
    # With calibration prompts of their own, the climbed plan must also beat its start there, or the start stays:
    # one plan of that count remains to pick from, and it is the climbed one or the start.
    checked = tune_cache(case.pipe, calls, "schedule", target_speedup=2.0,
                         calibration_calls=[dict(calls[0], seed=7)])
    plans = {t.config.schedule for t in checked.trials}
    assert len(plans) == 1 and checked.config.schedule in (spread_schedule(6, 3), result.config.schedule)
