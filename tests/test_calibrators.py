"""TaylorSeer calibrator: exact forecasts on the oracle toys, and it runs on every transformer family."""

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import AccelConfig, BlockCacheConfig, DeltaDiTConfig, TeaCacheConfig
from diffaccel.cache.calibrators import TaylorExtrapolator, taylor_forecast, taylor_update
from tiny_pipelines import FAMILIES, build, run
from toy_models import run_toy, toy_pipe
from test_delta_dit import six_block_pipe


def values(outputs):
    return [float(o.reshape(-1)[0]) for o in outputs]


def test_taylor_update_and_forecast_are_exact_for_polynomials_of_their_order():
    quadratic = lambda k: torch.tensor([3.0 + 2.0 * k - 0.5 * k * k])  # noqa: E731
    first, second = TaylorExtrapolator(order=1), TaylorExtrapolator(order=2)
    for k in (0, 2, 4):
        first.update(quadratic(k), k)
        second.update(quadratic(k), k)
    # Order 2 from steps 0, 2, 4 (finite differences): d0=F4, d1=(F4-F2)/2, d2=(d1(4)-d1(2))/2.
    assert second.factors[2].item() == pytest.approx(-1.0)  # backward differences: F'' estimate of -1
    linear = lambda k: torch.tensor([5.0 - 3.0 * k])  # noqa: E731
    exact = TaylorExtrapolator(order=1)
    exact.update(linear(1), 1)
    assert exact.predict(3).item() == 2.0  # one computed step: plain reuse
    exact.update(linear(3), 3)
    assert exact.predict(6).item() == pytest.approx(linear(6).item())
    assert taylor_forecast(taylor_update([], torch.tensor([1.0]), None, 2), 5).item() == 1.0


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="calibrator must be None or one of"):
        BlockCacheConfig(calibrator="magic")
    with pytest.raises(ValueError, match="calibrator_order must be an integer from 1 to 2"):
        DeltaDiTConfig(calibrator="taylorseer", calibrator_order=3)
    config = AccelConfig(cache=BlockCacheConfig(calibrator="taylorseer", calibrator_order=2))
    assert AccelConfig.from_dict(config.to_dict()) == config


def test_block_cache_forecast_is_exact_on_a_linear_residual():
    # The toy's middle residual is 2t, linear in the step index: after two computed steps a
    # first-order forecast replays it exactly where plain reuse replays a stale one.
    common = dict(threshold=0.5, compute_first_blocks=1, compute_last_blocks=1, warmup_steps=2, max_consecutive=2)
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, cache=BlockCacheConfig(**common))
    assert values(run_toy(pipe, 5)) == [811, 611, 611, 611, 11]
    diffaccel.accelerate(pipe, cache=BlockCacheConfig(**common, calibrator="taylorseer"))
    assert values(run_toy(pipe, 5)) == [11 + 2 * t for t in (400, 300, 200, 100, 0)]
    stats = diffaccel.stats(pipe)
    assert stats["cache_hits"] == 2 and stats["blocks_skipped"] == 4


def test_delta_dit_forecast_is_exact_once_two_full_steps_exist():
    pipe = six_block_pipe()
    # Outline stage throughout: rear span (+t, +100), Δ = t + 100; full steps 0, 2, 4.
    diffaccel.accelerate(pipe, cache=DeltaDiTConfig(cache_interval=2, cached_blocks=2, boundary_fraction=1.0))
    plain = values(run_toy(pipe, 6))
    diffaccel.accelerate(
        pipe, cache=DeltaDiTConfig(cache_interval=2, cached_blocks=2, boundary_fraction=1.0, calibrator="taylorseer")
    )
    forecast = values(run_toy(pipe, 6))
    exact = [3 * t + 111 for t in (500, 400, 300, 200, 100, 0)]
    # step 1 has one full step behind it: plain reuse (+100 too much); steps 3 and 5 are forecast exactly.
    assert forecast == [1611, 1411, 1011, 711, 411, 111]
    assert plain[3] != exact[3] and forecast[3] == exact[3]





@pytest.mark.parametrize("config", [
    BlockCacheConfig(threshold=10.0, warmup_steps=1, max_consecutive=2, calibrator="taylorseer", calibrator_order=2),
    DeltaDiTConfig(cache_interval=2, cached_blocks=2, calibrator="taylorseer"),
    TeaCacheConfig(threshold=10.0, max_consecutive=1, calibrator="taylorseer", calibrator_order=2),
], ids=["block", "delta_dit", "teacache"])
@pytest.mark.parametrize("name", ["flux", "sd3", "wan", "qwenimage"])
def test_calibrated_caches_skip_blocks_and_stay_finite_on_real_families(name, config):
    case = build(name)
    diffaccel.accelerate(case.pipe, cache=config)
    out = run(case, seed=0, num_inference_steps=6)
    assert np.isfinite(out).all()
    assert diffaccel.stats(case.pipe)["blocks_skipped"] > 0
