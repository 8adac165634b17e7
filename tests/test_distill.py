"""Latent consistency distillation: the formulas, a training step, resuming, students that load and run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffaccel
from distill_helpers import loss_before_and_after_one_step

from diffaccel.distill import (
    LCDConfig,
    StudentCard,
    boundary_scalings,
    consistency_function,
    distill,
    euler_step,
    guided_velocity,
    load_student,
    pseudo_huber,
    student_call_defaults,
)
from diffaccel.distill.lcd import LCDTrainer
from diffaccel.distill.teacher import teacher_for
from diffaccel.pipelines import reference

TINY = dict(batch_size=2, solver_steps=10, warmup_steps=0, guidance_scale=4.0)


def test_boundary_condition_makes_the_consistency_function_the_identity_at_zero():
    c_skip, c_out = boundary_scalings(torch.tensor([0.0, 1.0, 500.0]))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    assert c_skip[2] < 1e-6 and abs(c_out[2] - 1.0) < 1e-6
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    f = consistency_function(x, sigma, v)
    assert torch.equal(f[0], x[0])  # f(x, 0) = x exactly
    assert torch.allclose(f[2], x[2] - v[2], atol=1e-5)  # at σ = 1 it is the x0 estimate x − v


def test_teacher_step_and_guidance_formulas():
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    stepped = euler_step(x, v, torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.5]))
    assert torch.allclose(stepped[0], x[0] - 0.2 * v[0], atol=1e-6) and torch.equal(stepped[1], x[1])
    c, u = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(guided_velocity(c, u, 1.0), c)
    assert torch.allclose(guided_velocity(c, u, 4.0), u + 4 * (c - u))
    a = torch.zeros(2, 5)
    b = torch.tensor([[0.0] * 5, [1.0] * 5])
    d = pseudo_huber(a, b, c=1e-3)
    assert d[0] == 0 and abs(d[1] - (np.sqrt(1 + 1e-6) - 1e-3)) < 1e-6


def test_config_rejects_bad_values():
    for bad in (dict(student_steps=0), dict(skip=50), dict(ema_decay=1.0), dict(guidance_scale=0.5),
                dict(lora_rank=-1), dict(batch_size=0)):
        field = next(iter(bad))
        with pytest.raises(ValueError, match=field):
            LCDConfig(**bad)
    with pytest.raises(ValueError, match="Unknown LCDConfig fields"):
        LCDConfig.from_dict({"student_step": 4})


def test_sigma_grid_is_the_pipelines_own_schedule():
    pipe = reference.load("image")
    grid = teacher_for(pipe, 64, 64).sigma_grid(20)
    seen = []
    pipe(["a red circle on a blue background"], height=64, width=64, num_inference_steps=20, guidance_scale=1.0,
         output_type="latent", callback_on_step_end=lambda p, i, t, kw: seen.append(float(p.scheduler.sigmas[i])) or {})
    assert grid[-1] == 0 and len(grid) == 21
    assert np.allclose(grid[:-1].numpy(), seen, atol=1e-6)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_one_step_lowers_the_loss_on_its_batch(lora_rank):
    torch.manual_seed(0)
    trainer = LCDTrainer(teacher_for(reference.load("image"), 64, 64),
                         LCDConfig(lora_rank=lora_rank, learning_rate=1e-3 if lora_rank else 1e-5, **TINY))
    before, after = loss_before_and_after_one_step(trainer)
    assert after < before


def test_lora_teacher_is_the_untouched_base_model():
    pipe = reference.load("image")
    teacher = teacher_for(pipe, 64, 64)
    x, sigma = torch.randn(1, 4, 16, 16), torch.tensor([0.7])
    cond, uncond = teacher.encode(["a red circle on a blue background"])
    with torch.no_grad():
        plain = teacher.velocity(pipe.transformer, x, sigma, cond)
        guided = teacher.guided_velocity(pipe.transformer, x, sigma, cond, uncond, 4.0)
    trainer = LCDTrainer(teacher, LCDConfig(lora_rank=4, learning_rate=1e-2, **TINY))
    trainer.train_step()
    with torch.no_grad():
        assert torch.equal(trainer._teacher_guided(x, sigma, cond, uncond, 4.0), guided)
        assert not torch.equal(teacher.velocity(trainer.student, x, sigma, cond), plain)


def test_resume_gives_the_same_next_loss_as_not_stopping(tmp_path):
    config = LCDConfig(lora_rank=4, learning_rate=1e-3, **TINY)
    distill("reference:image", tmp_path / "a", config, max_steps=2, progress=False)
    distill("reference:image", tmp_path / "a", config, max_steps=3, resume=True, progress=False)
    distill("reference:image", tmp_path / "b", config, max_steps=3, progress=False)
    a = json.loads((tmp_path / "a" / "losses.json").read_text())
    b = json.loads((tmp_path / "b" / "losses.json").read_text())
    assert len(a) == len(b) == 3 and a == b
    assert StudentCard.load(tmp_path / "a").training["steps"] == 3


def test_bad_runs_get_clear_errors(tmp_path):
    config = LCDConfig(**TINY)
    with pytest.raises(ValueError, match="more than the teacher's own 20 steps"):
        distill("reference:image", tmp_path / "k", LCDConfig(student_steps=25, **TINY), max_steps=1)
    distill("reference:image", tmp_path / "run", config, max_steps=1, progress=False)
    with pytest.raises(ValueError, match="already holds a distillation run"):
        distill("reference:image", tmp_path / "run", config, max_steps=1)
    with pytest.raises(ValueError, match="holds another run"):
        distill("reference:image", tmp_path / "run", LCDConfig(lora_rank=2, **TINY), max_steps=2, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a run")
    with pytest.raises(ValueError, match="not empty"):
        distill("reference:image", tmp_path / "other", config, max_steps=1)
    with pytest.raises(ValueError, match="needs training data of its domain"):
        distill("some/hub-model", tmp_path / "hub", config, max_steps=1)
    with pytest.raises(ValueError, match="makes images, not clips"):
        distill("reference:image", tmp_path / "frames", LCDConfig(frames=9, **TINY), max_steps=1)
    with pytest.raises(ValueError, match="Unknown distillation method"):
        distill("reference:image", tmp_path / "m", config, method="dmd", max_steps=1)


def test_teacher_that_is_not_flow_matching_is_refused():
    from diffusers import DDIMScheduler

    pipe = reference.load("image")
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="flow-matching teacher"):
        teacher_for(pipe, 64, 64)
    with pytest.raises(ValueError, match="cannot use a KandinskyPipeline teacher"):
        teacher_for(type("KandinskyPipeline", (), {})(), 64, 64)
    from tiny_pipelines import sd15

    sd = sd15().pipe  # a DDPM teacher is fine if it predicts ε or v, not x0
    sd.scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="predicts ε or v on a DDPM schedule, or a flow velocity"):
        teacher_for(sd, 64, 64)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_student_loads_offline_generates_and_composes_with_accelerate(tmp_path, lora_rank):
    folder = distill("reference:image", tmp_path / "s", LCDConfig(lora_rank=lora_rank, **TINY), max_steps=1,
                     progress=False)
    pipe = load_student(reference.load("image"), folder)
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
    call = student_call_defaults(pipe)
    assert call["num_inference_steps"] == 4 and call["guidance_scale"] == 1.0

    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    plain = pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0), output_type="np",
                 **call).images
    handle.remove()
    assert plain.shape == (1, 64, 64, 3) and np.isfinite(plain).all()
    assert len(calls) == 4  # one evaluation per step: CFG is baked in

    diffaccel.accelerate(pipe, cache="block", attention="sliding_tile")
    torch.manual_seed(0)
    accelerated = pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0),
                       output_type="np", **call).images
    assert np.isfinite(accelerated).all()
    diffaccel.remove(pipe)
    torch.manual_seed(0)
    again = pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0), output_type="np",
                 **call).images
    assert np.array_equal(again, plain)


def test_lora_student_changes_the_weights_and_a_mismatched_pipeline_is_refused(tmp_path):
    folder = distill("reference:image", tmp_path / "s", LCDConfig(lora_rank=4, learning_rate=1e-2, **TINY),
                     max_steps=1, progress=False)
    teacher = reference.load("image")
    before = {k: v.clone() for k, v in teacher.transformer.state_dict().items()}
    student = load_student(teacher, folder)
    after = student.transformer.state_dict()
    assert set(before) == set(after)  # fused: no LoRA layers left behind
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="already holds a student"):
        load_student(student, folder)
    with pytest.raises(ValueError, match="distilled from a CogView4Pipeline"):
        load_student(reference.load("video"), folder)
    with pytest.raises(ValueError, match="not a diffaccel student"):
        load_student(reference.load("image"), tmp_path)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_loaded_student_is_the_trained_one(tmp_path, lora_rank):
    """Every trained weight survives export and loading (float16 on disk): the loaded pipeline predicts what
    the trainer's student (LoRA) or EMA target (full) predicts."""
    config = LCDConfig(lora_rank=lora_rank, learning_rate=1e-2 if lora_rank else 1e-4, **TINY)
    trainer = LCDTrainer(teacher_for(reference.load("image"), 64, 64), config)
    for _ in range(2):
        trainer.train_step()
    trained = trainer.student if lora_rank else trainer.target
    folder = tmp_path / "s"
    card = StudentCard(method="lcd", teacher="reference:image", pipeline="CogView4Pipeline", default_steps=4,
                       guidance_scale=4.0, lora_rank=lora_rank, scheduler="FlowMatchLCMScheduler", height=64, width=64)
    from diffaccel.distill import save_student
    from diffusers import CogView4Pipeline

    save_student(folder, card, trainer.student_for_export(), CogView4Pipeline, trainer.frozen_teacher)
    teacher = reference.load("image")
    student = load_student(reference.load("image"), folder)
    x, sigma = torch.randn(1, 4, 16, 16), torch.tensor([0.6])
    adapter = teacher_for(student, 64, 64)
    cond, _ = adapter.encode(["a red circle on a blue background"])
    with torch.no_grad():
        want = adapter.velocity(trained, x, sigma, cond)
        got = adapter.velocity(student.transformer, x, sigma, cond)
        base = adapter.velocity(teacher.transformer, x, sigma, cond)
    if lora_rank:  # fused LoRA: the same function up to float16 rounding of the adapters
        error, change = (got - want).abs().max(), (want - base).abs().max()
        assert change > 20 * error, (float(change), float(error))
    else:  # full: exactly the EMA weights rounded to float16
        loaded = student.transformer.state_dict()
        assert all(torch.equal(loaded[k], v.half().float()) for k, v in trained.state_dict().items())
        assert not torch.equal(got, base)


def test_cli_distills_resumes_and_generates_with_the_student(tmp_path, capsys):
    from PIL import Image

    from diffaccel.cli import main

    out = tmp_path / "student"
    base = ["distill", "--lora-rank", "4", "--batch-size", "2", "--solver-steps", "10", "--out", str(out),
            "--no-progress", "--threads", "1"]
    assert main(base + ["--max-steps", "1"]) == 0
    assert main(base + ["--max-steps", "1"]) == 2  # the folder holds a run: refused without --resume
    assert "already holds a distillation run" in capsys.readouterr().err
    assert main(base + ["--max-steps", "2", "--resume"]) == 0
    assert StudentCard.load(out).training["steps"] == 2
    assert main(["distill", "--steps", "30", "--out", str(tmp_path / "k"), "--max-steps", "1"]) == 2
    assert "more than the teacher's own 20 steps" in capsys.readouterr().err

    stats = tmp_path / "stats.json"
    image = tmp_path / "a.png"
    assert main(["generate", "a red circle on a blue background", "-o", str(image), "--distilled", str(out),
                 "--preset", "off", "--stats-json", str(stats)]) == 0
    assert Image.open(image).size == (64, 64)
    assert json.loads(stats.read_text())["stats"]["denoiser_calls"] == 4  # 4 steps, no CFG branch


def test_judge_reward_is_differentiable_adherence():
    from diffaccel.distill.reward import JudgeReward
    from diffaccel.pipelines.reference import judge as judges
    from diffaccel.pipelines.reference import scenes

    pixels, captions, _ = scenes.sample_batch(np.random.default_rng(3), 8, 64)
    x = torch.from_numpy(pixels).float().permute(0, 3, 1, 2).requires_grad_(True)
    reward = JudgeReward(judges.load_judge("image"))
    right = reward(x, captions)
    wrong = reward(x, captions[1:] + captions[:1])
    assert right.shape == (8,) and right.min() > 0.9  # ground truth reads back
    assert wrong.mean() < 0.5
    right.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ImageJudge"):
        JudgeReward(judges.load_judge("video"))


def test_preference_loss_falls_on_a_toy_preference_set():
    from diffaccel.distill.reward import LatentRewardModel, preference_loss

    torch.manual_seed(0)
    latents = torch.randn(32, 3, 4, 8, 8)
    prompts = torch.randn(32, 5, 16)
    expert = latents.mean(dim=(2, 3, 4))  # the "expert" prefers brighter latents
    model = LatentRewardModel(4, 16, width=8, embed_dim=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        scores = model(latents.flatten(0, 1), prompts.repeat_interleave(3, dim=0)).reshape(32, 3)
        return preference_loss(scores, expert, temperature=0.05)

    first = float(loss().detach())
    for _ in range(60):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert float(loss().detach()) < 0.5 * first


def test_rg_lcd_adds_the_reward_term_and_resumes_exactly(tmp_path):
    from diffaccel.distill import RewardConfig

    config = LCDConfig(lora_rank=4, learning_rate=1e-3, **TINY)
    reward = RewardConfig(reward_warmup=1, proxy_batch=2)
    distill("reference:image", tmp_path / "a", config, method="rg-lcd", reward=reward, max_steps=2, progress=False)
    distill("reference:image", tmp_path / "a", config, method="rg-lcd", reward=reward, max_steps=3, resume=True,
            progress=False)
    distill("reference:image", tmp_path / "b", config, method="rg-lcd", reward=reward, max_steps=3, progress=False)
    a = json.loads((tmp_path / "a" / "losses.json").read_text())
    b = json.loads((tmp_path / "b" / "losses.json").read_text())
    assert a == b
    plain = json.loads((_lcd_losses(tmp_path / "c", config)).read_text())
    assert a[0] == plain[0] and a[1] != plain[1]  # the reward term starts after its warm-up step
    card = StudentCard.load(tmp_path / "a")
    assert card.method == "rg-lcd" and card.training["reward"]["reward_scale"] == 1.0
    with pytest.raises(ValueError, match="another reward config"):
        distill("reference:image", tmp_path / "a", config, method="rg-lcd", reward=RewardConfig(reward_scale=2.0),
                max_steps=4, resume=True, progress=False)
    with pytest.raises(ValueError, match="for method 'rg-lcd'"):
        distill("reference:image", tmp_path / "d", config, reward=reward, max_steps=1)
    with pytest.raises(ValueError, match="mode"):
        RewardConfig(mode="hps")


def _lcd_losses(folder, config):
    distill("reference:image", folder, config, max_steps=3, progress=False)
    return folder / "losses.json"


@pytest.mark.parametrize("name, steps, size", [("image-lcd", 4, 64), ("image-rglcd", 2, 64), ("image-tdm", 4, 64),
                                              ("image-tdm-ms", 4, 64), ("image-tdm-ms", 4, 128)])
def test_shipped_student_beats_the_teacher_at_equal_steps(name, steps, size):
    """reference.load(name): ``steps`` evaluations per image, and on 16 held-out prompts its adherence is
    well above the teacher's at the same steps with CFG (twice the evaluations), at each size it was
    distilled at."""
    from diffaccel.pipelines.reference import judge as judges
    from diffaccel.pipelines.reference import scenes

    facts = reference.info(name)
    assert facts["teacher"] == "image" and facts["default_steps"] == steps and facts["default_guidance"] == 1.0
    prompts = scenes.prompt_set(16)
    judge = judges.load_judge("image")

    def adherence(pipe, **call) -> float:
        torch.manual_seed(0)
        images = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(16)], output_type="np",
                      **call).images
        return float(judges.adherence(judge, images, prompts).mean())

    student = reference.load(name)
    calls = []
    handle = student.transformer.register_forward_hook(lambda *a: calls.append(1))
    learned = adherence(student, **{**reference.call_defaults(name), "height": size, "width": size})
    handle.remove()
    assert len(calls) == steps
    teacher = adherence(reference.load("image"), **{**reference.call_defaults("image"), "num_inference_steps": steps,
                                                    "height": size, "width": size})
    assert learned >= 0.8 and learned >= teacher + 0.05, (learned, teacher)


def test_student_steps_spread_over_the_whole_trajectory(tmp_path):
    """A student's K evaluations sit at T(1 − i/K) (the last ends at 0), not at CogView4's linspace(T, 1, K),
    whose last evaluation at σ ≈ 0 makes 2 student steps sample like 1; a schedule the caller passes is kept,
    and a card with spacing 'pipeline' keeps the pipeline's own."""
    import dataclasses

    from diffaccel.distill.student import CARD_NAME

    def timesteps(pipe, **call) -> list[float]:
        seen = []
        handle = pipe.transformer.register_forward_pre_hook(
            lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
        torch.manual_seed(0)
        pipe(["a red circle"], height=64, width=64, guidance_scale=1.0, output_type="latent", **call)
        handle.remove()
        return seen

    student = reference.load("image-lcd")
    assert timesteps(student, num_inference_steps=2) == [1000.0, 500.0]
    assert timesteps(student, num_inference_steps=4) == [1000.0, 750.0, 500.0, 250.0]
    assert timesteps(student, num_inference_steps=2, timesteps=[1000, 300]) == [1000.0, 300.0]
    assert timesteps(reference.load("image"), num_inference_steps=2) == [1000.0, 1.0]  # the teacher is untouched

    with pytest.raises(ValueError, match="spacing"):
        dataclasses.replace(StudentCard.load(reference.path("image-lcd")), spacing="leading")
    import shutil

    folder = shutil.copytree(reference.path("image-lcd"), tmp_path / "s")
    card = json.loads((folder / CARD_NAME).read_text())
    (folder / CARD_NAME).write_text(json.dumps({**card, "spacing": "pipeline"}))
    assert timesteps(load_student(reference.load("image"), folder), num_inference_steps=2) == [1000.0, 1.0]


def test_a_loaded_student_repeats_a_seeded_call_and_matches_the_removable_path(tmp_path):
    """The call's generator seeds the re-noising between steps too: the global RNG does not matter, and
    ``load_student`` gives what ``accelerate(sampling=DistilledConfig(...))`` gives for the same seed."""
    from diffaccel.sampling.distilled import DistilledConfig

    folder = distill("reference:image", tmp_path / "s", LCDConfig(lora_rank=4, learning_rate=1e-2, **TINY), max_steps=1,
                     progress=False)
    pipe = load_student(reference.load("image"), folder)
    call = student_call_defaults(pipe)
    assert type(pipe).__name__ == "CogView4Pipeline"

    def run(target, global_seed: int, seed: int = 3):
        torch.manual_seed(global_seed)
        return target("a red circle on a blue background", generator=torch.Generator().manual_seed(seed),
                      output_type="np", **call).images

    first = run(pipe, 0)
    assert np.array_equal(run(pipe, 1), first)
    assert not np.array_equal(run(pipe, 0, seed=4), first)
    removable = diffaccel.accelerate(reference.load("image"), sampling=DistilledConfig(student=str(folder)))
    assert np.array_equal(run(removable, 2), first)
