"""Learned cache schedule: exact replay on the oracle toy, all-ones is bit-identical, training runs
along the student's trajectory and gives a schedule that skips blocks."""

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import AccelConfig
from diffaccel.cache.learned import (
    LearnedCacheConfig,
    mask_to_schedule,
    schedule_for_budget,
    schedule_row,
    train_schedule,
)
from tiny_pipelines import build, run
from toy_models import run_toy, toy_pipe


def values(outputs):
    return [float(o.reshape(-1)[0]) for o in outputs]


def test_config_validation_round_trip_and_clear_errors():
    with pytest.raises(ValueError, match="equally long strings"):
        LearnedCacheConfig(schedule=("11", "1"))
    with pytest.raises(ValueError, match="equally long strings"):
        LearnedCacheConfig(schedule=("12",))
    config = AccelConfig(cache=LearnedCacheConfig(schedule=("1111", "1001"), trained_for="toy"))
    assert AccelConfig.from_dict(config.to_dict()) == config
    pipe = toy_pipe()
    with pytest.raises(ValueError, match="needs a schedule trained for this model"):
        diffaccel.accelerate(pipe, cache="learned")
    with pytest.raises(ValueError, match="has 3 blocks per step, but ToyDenoiser has 4"):
        diffaccel.accelerate(pipe, cache=LearnedCacheConfig(schedule=("111",)))
    assert schedule_row(("1", "0", "1"), 4, 9) == "0" and schedule_row(("1", "0", "1"), 8, 9) == "1"


def test_masked_blocks_replay_their_own_last_residual():
    # blocks +1, +t, +t, +10; step 1 reuses block 1, step 2 reuses blocks 1 and 2, step 3 computes all.
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, cache=LearnedCacheConfig(schedule=("1111", "1011", "1001", "1111")))
    # t = 300, 200, 100, 0: step 1 -> 1 + 300 (stale) + 200 + 10; step 2 -> 1 + 300 + 200 + 10 (both stale)
    assert values(run_toy(pipe, 4)) == [611, 511, 511, 11]
    assert diffaccel.stats(pipe)["blocks_skipped"] == 3


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_all_ones_is_bit_identical_and_training_gives_a_schedule_that_skips(name):
    case = build(name)
    baseline = run(case, seed=0, num_inference_steps=4)
    blocks = len(diffaccel.pipelines.adapter_for(case.denoiser).find_blocks(case.denoiser))
    diffaccel.accelerate(case.pipe, cache=LearnedCacheConfig(schedule=mask_to_schedule(torch.ones(4, blocks))))
    assert np.array_equal(run(case, seed=0, num_inference_steps=4), baseline)
    diffaccel.remove(case.pipe)

    calls = [dict(case.call_kwargs, num_inference_steps=4, seed=s) for s in (1, 2)]
    config, router = train_schedule(case.pipe, calls, beta=1.0, iterations=3, lr=0.5, proxy_every=2)
    assert len(config.schedule) == 4 and config.num_blocks == blocks and config.schedule[0] == "1" * blocks
    assert router.logits.grad is not None and torch.isfinite(router.logits).all()
    assert np.array_equal(run(case, seed=0, num_inference_steps=4), baseline), "training leaves no hook behind"

    half = schedule_for_budget(router, 0.5)
    assert 0.4 <= half.compute_fraction <= 0.7
    diffaccel.accelerate(case.pipe, cache=half)
    out = run(case, seed=0, num_inference_steps=4)
    assert np.isfinite(out).all() and diffaccel.stats(case.pipe)["blocks_skipped"] > 0


def test_tune_cache_meets_a_psnr_target_and_a_speedup_target_on_held_out_calls():
    from diffaccel.cache.tune import tune_cache

    case = build("flux")
    calls = [dict(case.call_kwargs, num_inference_steps=6, seed=s) for s in (3, 4)]
    result = tune_cache(case.pipe, calls, "block", target_psnr=35.0, rounds=4)
    assert result.psnr >= 35.0 and result.config.threshold >= 0.0
    assert len(result.trials) == 8
    fast = tune_cache(case.pipe, calls, "teacache", target_speedup=2.0, rounds=4)
    assert abs(fast.compute_fraction - 0.5) <= min(abs(t.compute_fraction - 0.5) for t in fast.trials) + 1e-9
    with pytest.raises(ValueError, match="exactly one of target_psnr and target_speedup"):
        tune_cache(case.pipe, calls, "block")
    with pytest.raises(ValueError, match="unknown method"):
        tune_cache(case.pipe, calls, "magic", target_psnr=30)


def test_tune_cache_cli_writes_a_loadable_config_that_meets_the_target(tmp_path, capsys):
    from diffaccel.cli import main

    out = tmp_path / "cache.json"
    assert main(["tune", "cache", "--method", "block", "--num", "1", "--steps", "6", "--target-psnr", "30",
                 "--out", str(out)]) == 0
    config = AccelConfig.from_file(out)
    assert config.cache is not None and config.cache.method == "block"
    printed = capsys.readouterr().out
    assert "wrote" in printed and "PSNR" in printed
    assert main(["tune", "cache", "--num", "1", "--steps", "3", "--out", str(tmp_path / "x.json")]) == 2
