"""LCM's guidance-scale embedding: a consistency student that samples at any CFG scale of its range."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel.distill import LCDConfig, distill, load_student, set_student_guidance, student_call_defaults
from diffaccel.distill.guidance_embedding import (
    WEIGHTS,
    add_guidance_embedding,
    guidance_features,
    guidance_hook,
    guidance_projection,
    remove_guidance_embedding,
)
from diffaccel.distill.lcd import LCDTrainer
from diffaccel.distill.teacher import teacher_for
from diffaccel.pipelines import reference
from diffaccel.sampling import DistilledConfig

TINY = dict(batch_size=2, solver_steps=10, warmup_steps=0, guidance_scale=4.0)
PROMPT = "a red circle on a blue background"


def _velocity(pipe, transformer=None):
    adapter = teacher_for(pipe, 64, 64)
    cond, _ = adapter.encode([PROMPT])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return adapter.velocity(transformer or pipe.transformer, x, torch.tensor([0.6]), cond)


def test_features_follow_lcm_and_tell_scales_apart():
    features = guidance_features(torch.tensor([1.0, 4.0, 4.0]), 256)
    assert features.shape == (3, 256)
    # w = g − 1 = 0 embeds as sin 0 = 0 and cos 0 = 1 (LCM's order: sines, then cosines)
    assert torch.equal(features[0, :128], torch.zeros(128)) and torch.equal(features[0, 128:], torch.ones(128))
    assert torch.equal(features[1], features[2]) and not torch.allclose(features[0], features[1])


def test_zero_projection_changes_nothing_and_removal_restores_the_model():
    pipe = reference.load("image")
    before = _velocity(pipe)
    hook = add_guidance_embedding(pipe.transformer)
    hook.scale = 6.0
    assert torch.equal(_velocity(pipe), before)  # zero-initialised: the student starts as its teacher
    with torch.no_grad():
        guidance_projection(pipe.transformer).weight.normal_(std=0.1)
    at_6 = _velocity(pipe)
    hook.scale = 2.0
    at_2 = _velocity(pipe)
    hook.scale = None
    assert torch.equal(_velocity(pipe), before)  # no scale: no condition, the teacher's view
    assert not torch.allclose(at_6, before) and not torch.allclose(at_6, at_2)
    with pytest.raises(ValueError, match="already has a condition projection"):
        add_guidance_embedding(pipe.transformer)
    remove_guidance_embedding(pipe.transformer)
    assert guidance_hook(pipe.transformer) is None
    assert torch.equal(_velocity(pipe), before)
    assert set(pipe.transformer.state_dict()) == set(reference.load("image").transformer.state_dict())


def test_config_checks_the_range():
    with pytest.raises(ValueError, match="guidance_range"):
        LCDConfig(guidance_range=(4.0, 2.0))
    with pytest.raises(ValueError, match="guidance_range"):
        LCDConfig(guidance_range=(0.5, 2.0))
    with pytest.raises(ValueError, match="guidance_scale=9.0.*must lie in guidance_range"):
        LCDConfig(guidance_scale=9.0, guidance_range=(2.0, 8.0))
    with pytest.raises(ValueError, match="guidance_embedding_dim"):
        LCDConfig(guidance_range=(2.0, 8.0), guidance_embedding_dim=7)
    assert LCDConfig.from_dict(LCDConfig(guidance_range=[2, 8]).to_dict()).guidance_range == (2.0, 8.0)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_teacher_targets_follow_each_examples_scale_and_the_projection_learns(lora_rank):
    config = LCDConfig(lora_rank=lora_rank, learning_rate=1e-2 if lora_rank else 1e-3,
                       guidance_range=(1.0, 8.0), **TINY)
    trainer = LCDTrainer(teacher_for(reference.load("image"), 64, 64), config)
    plain = LCDTrainer(teacher_for(reference.load("image"), 64, 64), LCDConfig(lora_rank=lora_rank, **TINY))
    batch, baked = trainer.forward_batch(0), plain.forward_batch(0)
    # same noise and noise levels (the scales are drawn after them); targets differ as the scales do
    assert torch.equal(batch.latents, baked.latents)
    assert not torch.allclose(batch.target, baked.target)
    trainer.train_step()
    projection = guidance_projection(trainer.accelerator.unwrap_model(trainer.student)).weight
    assert projection.abs().sum() > 0  # the embedding is trained, not left at zero
    # the teacher's view of a shared (LoRA) transformer embeds nothing
    if lora_rank:
        model = trainer.accelerator.unwrap_model(trainer.student)
        noisy, sigma = torch.randn(2, 4, 16, 16), torch.tensor([0.5, 0.5])
        cond, uncond = trainer.teacher.encode(["a", "b"])
        with torch.no_grad():
            got = trainer._teacher_guided(noisy, sigma, cond, uncond, 4.0)
            model.disable_adapters()
            remove_guidance_embedding(model)
            want = trainer.teacher.guided_velocity(model, noisy, sigma, cond, uncond, 4.0)
        assert torch.equal(got, want)


def test_resume_gives_the_same_next_loss(tmp_path):
    config = LCDConfig(lora_rank=4, learning_rate=1e-2, guidance_range=(2.0, 6.0), height=64, width=64, **TINY)
    distill("reference:image", tmp_path / "a", config, max_steps=2, progress=False, save_every=1e9)
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    straight = LCDTrainer(teacher_for(reference.load("image"), 64, 64), config)
    for _ in range(2):
        straight.train_step()
    resumed = LCDTrainer(teacher_for(reference.load("image"), 64, 64), config)
    resumed.load_state_dict(state["trainer"])
    assert torch.equal(guidance_projection(resumed.student).weight, guidance_projection(straight.student).weight)
    assert resumed.train_step() == straight.train_step()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_student_samples_at_the_asked_scale_with_one_evaluation_a_step(tmp_path, lora_rank):
    config = LCDConfig(lora_rank=lora_rank, learning_rate=1e-2 if lora_rank else 1e-3, guidance_range=(1.0, 8.0),
                       **TINY)
    folder = distill("reference:image", tmp_path / "s", config, max_steps=2, progress=False)
    card = json.loads((folder / "student.json").read_text())
    assert card["guidance_embedding"] == {"dim": 256, "range": [1.0, 8.0]} and (folder / WEIGHTS).is_file()

    # load_student: the card's scale, then set_student_guidance
    pipe = load_student(reference.load("image"), folder)
    call = {**student_call_defaults(pipe), "output_type": "np"}

    def sample(**extra):
        torch.manual_seed(0)
        return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **{**call, **extra}).images

    at_4 = sample()
    set_student_guidance(pipe, 7.0)
    at_7 = sample()
    set_student_guidance(pipe, 4.0)
    assert np.array_equal(sample(), at_4) and not np.allclose(at_4, at_7)
    with pytest.raises(ValueError, match=r"scales in \[1.0, 8.0\]"):
        set_student_guidance(pipe, 9.0)

    # through accelerate: the call's guidance_scale is the embedded scale; one transformer call per step
    teacher = reference.load("image")
    original = {k: v.clone() for k, v in teacher.transformer.state_dict().items()}
    diffaccel.accelerate(teacher, sampling=DistilledConfig(student=str(folder)))
    calls = []
    handle = teacher.transformer.register_forward_hook(lambda *a: calls.append(1))
    runs = {g: teacher(PROMPT, generator=torch.Generator().manual_seed(0), guidance_scale=g, output_type="np").images
            for g in (4.0, 7.0)}
    handle.remove()
    assert len(calls) == 2 * card["default_steps"]
    # no scale asked: the card's 4 (the runtime feeds the call's generator to the re-noising, so compare there)
    assert np.array_equal(teacher(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np").images, runs[4.0])
    assert not np.allclose(runs[4.0], runs[7.0])
    with pytest.raises(ValueError, match=r"guidance_scale=9.5.*\[1.0, 8.0\]"):
        teacher(PROMPT, guidance_scale=9.5, output_type="np")
    diffaccel.remove(teacher)
    assert guidance_hook(teacher.transformer) is None
    restored = teacher.transformer.state_dict()
    assert set(restored) == set(original) and all(torch.equal(restored[k], v) for k, v in original.items())


def test_a_baked_student_refuses_another_scale(tmp_path):
    folder = distill("reference:image", tmp_path / "s", LCDConfig(lora_rank=4, **TINY), max_steps=1, progress=False)
    pipe = load_student(reference.load("image"), folder)
    with pytest.raises(ValueError, match="bakes in CFG 4 and has no guidance-scale embedding"):
        set_student_guidance(pipe, 6.0)


def test_cli_trains_and_generates_at_a_chosen_scale(tmp_path, capsys):
    from PIL import Image

    from diffaccel.cli import main

    out = tmp_path / "s"
    assert main(["distill", "--out", str(out), "--lora-rank", "4", "--batch-size", "2", "--solver-steps", "10",
                 "--guidance-range", "1,8", "--max-steps", "1", "--no-progress"]) == 0
    images = {}
    for g in ("2", "7"):
        path = tmp_path / f"g{g}.png"
        assert main(["generate", PROMPT, "-o", str(path), "--model", "image", "--distilled", str(out),
                     "--guidance", g, "--preset", "off"]) == 0
        images[g] = np.asarray(Image.open(path))
    assert not np.array_equal(images["2"], images["7"])
    capsys.readouterr()
    assert main(["distill", "--out", str(tmp_path / "t"), "--method", "tdm", "--guidance-range", "1,8",
                 "--max-steps", "1"]) != 0
    assert "--guidance-range is an option of the consistency methods" in capsys.readouterr().err
    assert main(["distill", "--out", str(tmp_path / "t"), "--guidance-range", "8", "--max-steps", "1"]) != 0
    assert "give two CFG scales, LOW,HIGH" in capsys.readouterr().err
