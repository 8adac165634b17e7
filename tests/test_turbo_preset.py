"""The turbo preset: bottleneck sampling, AG and the block cache together where they apply, and an
explicit logged fallback (never a silent no-op, never an error) where one of them cannot."""

import numpy as np
import pytest

import diffaccel
from tiny_pipelines import build, run


def test_turbo_composes_all_three_methods_on_a_flow_matching_transformer():
    case = build("sd3")
    diffaccel.accelerate(case.pipe, "turbo")
    config = diffaccel.config_of(case.pipe)
    assert config.cache.method == "block" and config.guidance.method == "adaptive"
    assert config.sampling.method == "bottleneck"
    out = run(case, seed=0, num_inference_steps=20, height=256, width=256)  # 8x8 tokens at half size
    stats = diffaccel.stats(case.pipe)
    assert np.isfinite(out).all()
    assert stats["bottleneck_stages"] == 3 and stats["steps"] == 13  # 65% of the call's steps: 1 / 10 / 2
    assert stats["blocks_skipped"] > 0


def test_turbo_leaves_out_what_a_pipeline_cannot_take_and_says_why(caplog):
    case = build("flux")  # packed-token latents: no bottleneck
    with caplog.at_level("WARNING", logger="diffaccel"):
        diffaccel.accelerate(case.pipe, "turbo")
    config = diffaccel.config_of(case.pipe)
    assert config.sampling is None and config.cache is not None and config.guidance is not None
    messages = [r.getMessage() for r in caplog.records]
    assert any("running without sampling=bottleneck (optional in this config) on FluxPipeline" in m
               and "packed tokens" in m for m in messages)
    run(case, seed=0, num_inference_steps=4)
    assert diffaccel.stats(case.pipe)["methods"] == ["cache=block", "guidance=adaptive"]


def test_a_method_asked_for_by_name_or_config_still_raises(tmp_path):
    case = build("flux")
    with pytest.raises(ValueError, match="sampling='bottleneck' cannot serve .*packed tokens"):
        diffaccel.accelerate(case.pipe, "turbo", sampling="bottleneck")
    own = diffaccel.AccelConfig(cache="block", sampling="bottleneck")
    with pytest.raises(ValueError, match="sampling='bottleneck' cannot serve .*packed tokens"):
        diffaccel.accelerate(case.pipe, own)
    # the preset's marking survives a config file, so the CLI, the bench and the farm keep the fallback
    path = tmp_path / "turbo.yaml"
    diffaccel.preset("turbo").to_file(path)
    diffaccel.accelerate(case.pipe, str(path))
    assert diffaccel.config_of(case.pipe).sampling is None
    assert diffaccel.AccelConfig.from_file(path) == diffaccel.preset("turbo")


def test_optional_slots_are_validated_and_cleared_by_an_override():
    with pytest.raises(ValueError, match=r"AccelConfig.optional names unknown slot\(s\) \['speed'\]"):
        diffaccel.AccelConfig(optional=("speed",))
    turbo = diffaccel.preset("turbo")
    assert turbo.optional == ("cache", "guidance", "sampling")
    assert diffaccel.resolve_config("turbo", sampling="bottleneck").optional == ("cache", "guidance")
    assert "optional" not in diffaccel.AccelConfig(cache="block").to_dict()


def test_turbo_at_a_size_too_small_for_the_bottleneck_keeps_the_cache_and_guidance():
    case = build("sd3")  # 128 px: the half-size stage would have 4x4 tokens
    diffaccel.accelerate(case.pipe, "turbo")
    run(case, seed=0, num_inference_steps=8, height=128, width=128)
    stats = diffaccel.stats(case.pipe)
    assert stats["bottleneck_full_resolution_calls"] == 1 and stats["steps"] == 8
    assert stats["blocks_skipped"] > 0
