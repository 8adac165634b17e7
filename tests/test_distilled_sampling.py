"""Distilled sampling through ``accelerate``: a student runs removably, on the call's generator."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import diffaccel
from diffaccel import DistilledConfig
from diffaccel.distill import StudentCard, load_student
from diffaccel.pipelines import reference

CALL = dict(prompt="a red circle on the left", height=64, width=64, num_inference_steps=20, guidance_scale=4.0,
            output_type="np")


def run(pipe, seed: int = 0, **changes):
    return pipe(**{**CALL, **changes}, generator=torch.Generator().manual_seed(seed)).images


def timesteps_of(pipe, **changes) -> list[float]:
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
    try:
        run(pipe, **changes)
    finally:
        handle.remove()
    return seen


def test_distilled_runs_the_student_and_remove_restores_the_teacher_bit_for_bit():
    pipe = reference.load("image")
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    teacher = run(pipe)
    diffaccel.accelerate(pipe, sampling=DistilledConfig(student="image-lcd"))
    student = run(pipe)  # asked for 20 CFG steps: runs the student's 4, guidance 1
    stats = diffaccel.stats(pipe)
    assert stats["steps"] == 4 and stats["denoiser_calls"] == 4 and stats["distilled_calls"] == 1
    assert timesteps_of(pipe) == [1000.0, 750.0, 500.0, 250.0]  # trailing spacing
    assert torch.equal(torch.as_tensor(run(pipe)), torch.as_tensor(student))  # the call's generator seeds the re-noising
    assert not torch.equal(torch.as_tensor(run(pipe, seed=1)), torch.as_tensor(student))

    loaded = load_student(reference.load("image"), reference.path("image-lcd"))  # the same student, loaded for good
    torch.manual_seed(123)
    assert abs(run(loaded, num_inference_steps=4, guidance_scale=1.0) - student).mean() < 0.05
    assert abs(student - teacher).mean() > 0.005

    diffaccel.remove(pipe)
    assert type(pipe).__name__ == "CogView4Pipeline" and type(pipe).__mro__[1].__name__ == "DiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    after = pipe.transformer.state_dict()
    assert set(after) == set(weights) and all(torch.equal(after[k], v) for k, v in weights.items())
    assert (run(pipe) == teacher).all()


def test_steps_override_and_composition_with_the_cache(caplog):
    pipe = reference.load("image")
    diffaccel.accelerate(pipe, sampling=DistilledConfig(student="image-lcd", steps=2),
                         cache=diffaccel.BlockCacheConfig(threshold=1e9, warmup_steps=1))
    assert timesteps_of(pipe) == [1000.0, 500.0]
    stats = diffaccel.stats(pipe)
    assert stats["denoiser_calls"] == 2 and stats["blocks_skipped"] > 0
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        run(pipe, height=128, width=128)
    assert "distilled at 64x64; this 128x128 call runs it outside its training sizes" in caplog.text


def test_a_full_student_is_restored_too(tmp_path):
    """A student saved as a whole transformer (lora_rank 0) swaps every weight; remove puts them back."""
    pipe = reference.load("image")
    teacher = run(pipe, num_inference_steps=4)
    folder = tmp_path / "full"
    changed = reference.load("image").transformer
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(1.01)
    changed.to(torch.float16).save_pretrained(folder / "transformer")
    StudentCard(method="lcd", teacher="reference:image", pipeline="CogView4Pipeline", default_steps=4, guidance_scale=4.0,
                lora_rank=0, scheduler="FlowMatchLCMScheduler", height=64, width=64).save(folder)
    diffaccel.accelerate(pipe, sampling=DistilledConfig(student=str(folder)))
    assert torch.equal(pipe.transformer.state_dict()["proj_out.weight"],
                       changed.state_dict()["proj_out.weight"].float())
    diffaccel.remove(pipe)
    assert (run(pipe, num_inference_steps=4) == teacher).all()


def test_bad_input_gets_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="DistilledConfig.student is empty"):
        DistilledConfig()
    with pytest.raises(ValueError, match="DistilledConfig.student is empty"):
        diffaccel.accelerate(reference.load("image"), sampling="distilled")
    with pytest.raises(ValueError, match="steps"):
        DistilledConfig(student="image-lcd", steps=0)
    pipe = reference.load("image")
    with pytest.raises(ValueError, match="neither a student folder nor a reference student"):
        diffaccel.accelerate(pipe, sampling=DistilledConfig(student=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="not a diffaccel student"):
        diffaccel.accelerate(pipe, sampling=DistilledConfig(student=str(tmp_path)))
    with pytest.raises(ValueError, match="distilled from a CogView4Pipeline; this is a WanPipeline"):
        diffaccel.accelerate(reference.load("video"), sampling=DistilledConfig(student="image-lcd"))
    with pytest.raises(ValueError, match="already holds a student"):
        diffaccel.accelerate(reference.load("image-lcd"), sampling=DistilledConfig(student="image-lcd"))
    teacher = run(pipe, num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance='adaptive' has nothing to act on"):
        diffaccel.accelerate(pipe, sampling=DistilledConfig(student="image-lcd"), guidance="adaptive")
    assert not hasattr(pipe, "_diffaccel_runtime") and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert (run(pipe, num_inference_steps=2) == teacher).all()  # the failed apply left the teacher as it was
    folder = shutil.copytree(reference.path("image-lcd"), tmp_path / "other")
    card = json.loads((folder / "student.json").read_text())
    (folder / "student.json").write_text(json.dumps({**card, "scheduler": "NoSuchScheduler"}))
    with pytest.raises(ValueError, match="NoSuchScheduler"):
        diffaccel.accelerate(pipe, sampling=DistilledConfig(student=str(folder)))


def test_a_new_acceleration_is_judged_on_the_teacher_and_a_failed_one_keeps_the_previous():
    """After a student whose scheduler is FlowMatchLCMScheduler, the bottleneck (flow-matching Euler only)
    still applies: the next acceleration is validated without the previous one's changes."""
    pipe = reference.load("image")
    diffaccel.accelerate(pipe, sampling=DistilledConfig(student="image-rglcd"))
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    diffaccel.accelerate(pipe, diffaccel.preset("turbo"))  # the recipe, by config
    assert diffaccel.config_of(pipe).sampling.method == "bottleneck"
    with pytest.raises(ValueError, match="guidance='adaptive' has nothing to act on"):
        diffaccel.accelerate(pipe, sampling=DistilledConfig(student="image-lcd"), guidance="adaptive")
    config = diffaccel.config_of(pipe)  # the failed call put the previous acceleration back
    assert config.sampling.method == "bottleneck" and config.cache.method == "block"
    run(pipe, height=128, width=128)
    assert diffaccel.stats(pipe)["bottleneck_stages"] == 3
