"""The turbo preset: bottleneck sampling, AG and the block cache together where they apply, and an
explicit logged fallback (never a silent no-op, never an error) where one of them cannot."""

import numpy as np
import torch
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
    case = build("pixart_sigma")  # a DPM-Solver scheduler on noise levels: the bottleneck is defined for flow matching
    with caplog.at_level("WARNING", logger="diffaccel"):
        diffaccel.accelerate(case.pipe, "turbo")
    config = diffaccel.config_of(case.pipe)
    assert config.sampling is None and config.cache is not None and config.guidance is not None
    messages = [r.getMessage() for r in caplog.records]
    assert any("running without sampling=bottleneck (optional in this config) on PixArtSigmaPipeline" in m
               and "DPMSolverMultistepScheduler" in m for m in messages)
    run(case, seed=0, num_inference_steps=4)
    assert diffaccel.stats(case.pipe)["methods"] == ["cache=block", "guidance=adaptive"]


def test_a_method_asked_for_by_name_or_config_still_raises(tmp_path):
    case = build("pixart_sigma")
    with pytest.raises(ValueError, match="sampling='bottleneck' cannot serve .*DPMSolverMultistepScheduler"):
        diffaccel.accelerate(case.pipe, "turbo", sampling="bottleneck")
    own = diffaccel.AccelConfig(cache="block", sampling="bottleneck")
    with pytest.raises(ValueError, match="sampling='bottleneck' cannot serve .*DPMSolverMultistepScheduler"):
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


def _timesteps(pipe, **call):
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw["timestep"][0])),
                                                        with_kwargs=True)
    try:
        out = pipe("a small red circle on the left, on a blue background", generator=torch.Generator().manual_seed(0),
                   output_type="np", **call).images
    finally:
        handle.remove()
    return seen, out


def test_turbo_on_a_reference_model_with_a_student_samples_with_the_student(monkeypatch, caplog):
    from diffaccel import presets
    from diffaccel.pipelines import reference

    monkeypatch.setitem(presets.TURBO_STUDENTS, "image", "image-tdm")  # the mechanism, whichever student ships
    pipe = reference.load("image")
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    _, teacher = _timesteps(pipe, height=64, width=64, num_inference_steps=4, guidance_scale=4.0)
    with caplog.at_level("INFO", logger="diffaccel"):
        diffaccel.accelerate(pipe, "turbo")
    assert "turbo on this reference model samples with its distilled student image-tdm" in caplog.text
    config = diffaccel.config_of(pipe)
    assert config.sampling == diffaccel.DistilledConfig(student="image-tdm") and config.cache is None
    seen, _ = _timesteps(pipe, height=64, width=64, num_inference_steps=20, guidance_scale=4.0)
    assert seen == [1000.0, 750.0, 500.0, 250.0]  # the student's 4 calls, not 20 CFG steps
    # a slot given by the caller replaces the student, as it replaces any preset's method
    diffaccel.accelerate(pipe, "turbo", sampling="bottleneck")
    assert diffaccel.config_of(pipe).sampling.method == "bottleneck" and diffaccel.config_of(pipe).cache is not None
    diffaccel.remove(pipe)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.transformer.state_dict().items())
    _, again = _timesteps(pipe, height=64, width=64, num_inference_steps=4, guidance_scale=4.0)
    assert np.array_equal(again, teacher)

    # a pipeline that already is a student, or not a reference model, gets the recipe
    student = reference.load("image-tdm")
    diffaccel.accelerate(student, "turbo")
    assert diffaccel.config_of(student).cache.method == "block"
    other = reference.load("image")
    other.register_to_config(_name_or_path="someone/cogview4-model")  # the same class, not the reference model
    diffaccel.accelerate(other, "turbo")
    assert diffaccel.config_of(other).sampling.method == "bottleneck"
    assert diffaccel.preset("turbo").cache.method == "block"  # by name alone: the recipe


def test_the_shipped_turbo_student_was_distilled_at_both_training_sizes_of_its_teacher():
    from diffaccel.distill import StudentCard
    from diffaccel.pipelines import reference
    from diffaccel.presets import TURBO_STUDENTS

    for model, student in TURBO_STUDENTS.items():
        card = StudentCard.load(reference.path(student))
        assert set(reference.info(model)["train_resolutions"]) <= set(card.sizes or [card.height])
        assert reference.STUDENTS[student] == model
