"""Distilling at several sizes, and starting a student from another student's LoRA."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import diffaccel
from diffaccel.distill import LCDConfig, StudentCard, TDMConfig, distill
from diffaccel.distill.lcd import ADAPTER_NAME, LCDTrainer
from diffaccel.distill.tdm import STUDENT, TDMTrainer
from diffaccel.distill.teacher import teacher_for
from diffaccel.pipelines import reference

TDM_TINY = dict(batch_size=2, guidance_scale=4.0, lora_rank=4)
LCD_TINY = dict(batch_size=2, solver_steps=10, warmup_steps=0, guidance_scale=4.0, lora_rank=4)


def test_iterations_take_the_sizes_in_turn_each_with_its_own_latents_and_noise_levels():
    torch.manual_seed(0)
    trainer = TDMTrainer(teacher_for(reference.load("image"), 64, 64), TDMConfig(**TDM_TINY, sizes=(64, 32)))
    first = trainer.prepare(0)
    assert first.sample.shape[-2:] == (16, 16) and trainer.teacher.height == 64
    big_sigmas = trainer.sigmas.clone()
    second = trainer.prepare(1)
    assert second.sample.shape[-2:] == (8, 8) and trainer.teacher.height == 32
    # CogView4 shifts its noise levels by the token count: a smaller image sits at lower levels mid-way
    assert trainer.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    assert bool((trainer.sigmas[1:-1] < big_sigmas[1:-1]).all())
    assert trainer.prepare(2).sample.shape[-2:] == (16, 16)
    trainer.train_step()
    trainer.train_step()  # one iteration at each size runs end to end
    assert trainer.step == 2

    lcd = LCDTrainer(teacher_for(reference.load("image"), 64, 64), LCDConfig(**LCD_TINY, sizes=(64, 32)))
    assert lcd.forward_batch(0).latents.shape[-2:] == (16, 16)
    assert lcd.forward_batch(1).latents.shape[-2:] == (8, 8)


def test_a_multi_size_run_resumes_exactly_and_its_card_lists_the_sizes(tmp_path):
    config = TDMConfig(**TDM_TINY, sizes=(64, 32))
    straight = distill("reference:image", tmp_path / "a", config, method="tdm", max_steps=3, progress=False)
    distill("reference:image", tmp_path / "b", config, method="tdm", max_steps=2, progress=False)
    resumed = distill("reference:image", tmp_path / "b", config, method="tdm", max_steps=3, resume=True, progress=False)
    assert json.loads((straight / "losses.json").read_text()) == json.loads((resumed / "losses.json").read_text())
    card = StudentCard.load(straight)
    assert (card.height, card.width, card.sizes) == (64, 64, [64, 32])
    assert card.trained_at(32, 32) and card.trained_at(64, 64) and not card.trained_at(48, 48)
    assert not StudentCard.load(reference.path("image-lcd")).trained_at(128, 128)


def test_bad_sizes_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="sizes=.*each size once"):
        TDMConfig(sizes=(64, 64))
    with pytest.raises(ValueError, match="sizes=.*height and width must be None or 64"):
        LCDConfig(sizes=(64, 128), height=128)
    with pytest.raises(ValueError, match="sizes=.*positive"):
        TDMConfig(sizes=(64, -8))
    with pytest.raises(ValueError, match="36x36 must be a multiple of 8"):
        distill("reference:image", tmp_path / "x", TDMConfig(**TDM_TINY, sizes=(64, 36)), method="tdm", max_steps=1)


def _adapter(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if f".{name}." in k}


def test_a_student_starts_from_another_students_lora(tmp_path):
    source = distill("reference:image", tmp_path / "src", TDMConfig(**TDM_TINY, learning_rate=1e-2), method="tdm",
                     max_steps=1, progress=False)
    torch.manual_seed(0)
    fresh = TDMTrainer(teacher_for(reference.load("image"), 64, 64), TDMConfig(**TDM_TINY))
    started = TDMTrainer(teacher_for(reference.load("image"), 64, 64),
                         TDMConfig(**TDM_TINY, sizes=(64, 32), init_student=str(source)))
    from safetensors.torch import load_file

    # the new student holds the source's weights as shipped (float16)
    shipped = {k[len("transformer."):]: v.float()
               for k, v in load_file(str(source / "pytorch_lora_weights.safetensors")).items()}
    exported = started.student_for_export()
    assert set(shipped) == set(exported) and all(torch.equal(exported[k], shipped[k]) for k in shipped)
    assert any(not torch.equal(a, b) for a, b in zip(_adapter(fresh.model, STUDENT).values(),
                                                       _adapter(started.model, STUDENT).values()))

    with pytest.raises(ValueError, match="its LoRA rank is 4, this run's 8"):
        TDMTrainer(teacher_for(reference.load("image"), 64, 64),
                   TDMConfig(**{**TDM_TINY, "lora_rank": 8}, init_student=str(source)))
    with pytest.raises(ValueError, match="trained by tdm, whose student does not sample like a lcd student"):
        LCDTrainer(teacher_for(reference.load("image"), 64, 64), LCDConfig(**LCD_TINY, init_student=str(source)))
    with pytest.raises(ValueError, match="bakes in CFG 4.0, this run 2.0"):
        TDMTrainer(teacher_for(reference.load("image"), 64, 64),
                   TDMConfig(**{**TDM_TINY, "guidance_scale": 2.0}, init_student=str(source)))
    with pytest.raises(ValueError, match="neither a student folder"):
        TDMTrainer(teacher_for(reference.load("image"), 64, 64), TDMConfig(**TDM_TINY, init_student=str(tmp_path)))
    with pytest.raises(ValueError, match="init_student=.*full student"):
        LCDConfig(lora_rank=0, init_student="image-lcd")
    lcd = LCDTrainer(teacher_for(reference.load("image"), 64, 64),
                     LCDConfig(**{**LCD_TINY, "lora_rank": 16}, init_student="image-lcd"))  # a shipped name
    assert any(bool(v.abs().sum()) for k, v in _adapter(lcd.student, ADAPTER_NAME).items() if "lora_B" in k)


def test_a_call_at_any_trained_size_runs_without_the_size_warning(tmp_path, caplog):
    folder = distill("reference:image", tmp_path / "s", TDMConfig(**TDM_TINY, sizes=(64, 32)), method="tdm",
                     max_steps=1, progress=False)
    pipe = diffaccel.accelerate(reference.load("image"), sampling=diffaccel.DistilledConfig(student=str(folder)))
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        pipe("a red circle", height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np")
        assert "outside its training sizes" not in caplog.text
        pipe("a red circle", height=48, width=48, generator=torch.Generator().manual_seed(0), output_type="np")
    assert "distilled at 64x64 and 32x32; this 48x48 call runs it outside its training sizes" in caplog.text
