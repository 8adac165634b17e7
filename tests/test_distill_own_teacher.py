"""Distilling a teacher of the user's: a pipeline folder (or hub id) through ``from_pretrained``, trained on
a folder of captioned images (LCD) or a prompt file (TDM), told the timesteps its own pipeline tells it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill_helpers import cli_lcd_one_step_then_resume, loss_before_and_after_one_step, saved_tiny_pipeline

from diffaccel.distill import (CaptionedImages, LCDConfig, PromptList, StudentCard, TDMConfig, distill, load_student,
                               student_call_defaults)
from diffaccel.loading import load_model
from diffaccel.distill.data import epoch_indices
from diffaccel.distill.run import load_teacher
from diffaccel.distill.teacher import teacher_for
from diffaccel.pipelines import reference
from diffaccel.pipelines.reference import scenes

TINY_LCD = dict(batch_size=2, solver_steps=10, warmup_steps=0, lora_rank=4, learning_rate=1e-3, height=64, width=64)
TINY_TDM = dict(batch_size=2, warmup_steps=0, lora_rank=4, height=64, width=64)


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    """The reference image model saved as an ordinary pipeline folder: a teacher 'of the user's'."""
    folder = tmp_path_factory.mktemp("teacher") / "my-cogview4"
    reference.load("image").save_pretrained(folder)
    return folder


def write_images(folder, count: int, captions_as: str = "metadata", size=(96, 80)):
    """``count`` procedural scenes as PNGs of ``size`` (not square: loading must crop), captioned."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels, captions, _ = scenes.sample_batch(np.random.default_rng(5), count, max(size))
    rows = []
    for i, (image, caption) in enumerate(zip(pixels, captions)):
        name = f"scene_{i:03d}.png"
        Image.fromarray((image * 255).round().astype(np.uint8)).resize(size).save(folder / name)
        if captions_as == "metadata":
            rows.append(json.dumps({"file_name": name, "text": caption}))
        else:
            (folder / name).with_suffix(".txt").write_text(caption + "\n")
    if rows:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder, captions


def test_captioned_images_read_both_layouts_and_batch_deterministically(tmp_path):
    folder, captions = write_images(tmp_path / "meta", 5)
    data = CaptionedImages(str(folder), resolution=32)
    pixels, got = data.batch(seed=0, step=1, size=3)
    assert pixels.shape == (3, 3, 32, 32) and pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert set(got) <= set(captions)
    again, got_again = CaptionedImages(str(folder), resolution=32).batch(seed=0, step=1, size=3)
    assert torch.equal(pixels, again) and got == got_again  # batch `step` from (seed, step) alone: exact resume
    side, side_captions = write_images(tmp_path / "txt", 4, captions_as="txt")
    assert [c for _, c in CaptionedImages(str(side)).entries] == side_captions
    # an epoch shows every item once
    first_epoch = np.concatenate([epoch_indices(3, step, 2, 7) for step in range(4)])[:7]
    assert sorted(first_epoch) == list(range(7))


def test_bad_training_folders_get_errors_naming_the_file(tmp_path):
    folder, _ = write_images(tmp_path / "a", 2, captions_as="txt")
    (folder / "scene_001.txt").unlink()
    with pytest.raises(ValueError, match="scene_001.png has no caption"):
        CaptionedImages(str(folder))
    folder, _ = write_images(tmp_path / "b", 2)
    (folder / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="line 1: image 'gone.png' is not in"):
        CaptionedImages(str(folder))
    (folder / "metadata.jsonl").write_text('{"file_name": "scene_000.png"}\n')
    with pytest.raises(ValueError, match="needs 'file_name' and a caption"):
        CaptionedImages(str(folder))
    (folder / "metadata.jsonl").write_text('{"file_name": "scene_000.png", "text": " "}\n')
    with pytest.raises(ValueError, match="empty caption"):
        CaptionedImages(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no captioned images"):
        CaptionedImages(str(tmp_path / "empty"))
    (tmp_path / "prompts.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        PromptList.from_file(tmp_path / "prompts.txt")


def test_pipeline_convention_tells_the_timesteps_the_pipeline_tells():
    """A teacher trained elsewhere must see, at noise level σ, the timestep its pipeline gives there
    (CogView4: before the resolution shift), not 1000·σ."""
    pipe = reference.load("image")
    for size in (64, 128):
        seen = []
        pipe(["a red circle on a blue background"], height=size, width=size, num_inference_steps=12, guidance_scale=1.0,
             output_type="latent",
             callback_on_step_end=lambda p, i, t, kw: seen.append((float(p.scheduler.sigmas[i]), float(p.current_timestep))) or {})
        sigmas, told = (torch.tensor(column) for column in zip(*seen))
        pipeline_view = teacher_for(pipe, size, size, "pipeline")
        assert torch.allclose(pipeline_view.told_timestep(sigmas), told, atol=1e-2)
        if size == 64:  # CogView4's shift is the identity at 256 tokens (128 px here), not below
            assert not torch.allclose(teacher_for(pipe, size, size).told_timestep(sigmas), told, atol=1.0)
    with pytest.raises(ValueError, match="timestep_convention"):
        teacher_for(pipe, 64, 64, "shifted")


def test_own_teacher_is_loaded_with_its_pipelines_defaults(teacher_folder):
    pipe, name, facts = load_teacher(str(teacher_folder))
    assert type(pipe).__name__ == "CogView4Pipeline" and name == str(teacher_folder)
    assert pipe.transformer.dtype == torch.float32
    # CogView4's own call defaults, as a user of that model gets them
    assert facts["default_steps"] == 50 and facts["default_guidance"] == 5.0
    side = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    assert (facts["default_height"], facts["default_width"]) == (side, side) and not facts["is_video"]


def test_lcd_student_of_a_teacher_folder_trains_resumes_and_generates(teacher_folder, tmp_path, capsys):
    from diffaccel.cli import main

    images, _ = write_images(tmp_path / "images", 6)
    out = tmp_path / "student"
    base = cli_lcd_one_step_then_resume(teacher_folder, images, out)
    card = StudentCard.load(out)
    assert card.teacher == str(teacher_folder) and card.pipeline == "CogView4Pipeline"
    assert card.guidance_scale == 5.0 and (card.height, card.width) == (64, 64)  # the teacher's CFG default
    assert card.training["steps"] == 2 and card.training["data"].startswith("images:")
    # the same run on other data is another run
    other, _ = write_images(tmp_path / "other", 3, captions_as="txt")
    assert main([*base[:4], str(other), *base[5:], "--max-steps", "3", "--resume"]) == 2
    assert "holds a run on other data" in capsys.readouterr().err

    stats = tmp_path / "stats.json"
    assert main(["generate", "a red circle on a blue background", "-o", str(tmp_path / "a.png"), "--model",
                 str(teacher_folder), "--distilled", str(out), "--preset", "off", "--stats-json", str(stats)]) == 0
    assert Image.open(tmp_path / "a.png").size == (64, 64)
    assert json.loads(stats.read_text())["stats"]["denoiser_calls"] == 4  # the student's 4 steps, CFG baked in


def test_tdm_student_of_a_teacher_folder_reads_prompts_alone(teacher_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n\na green square on the left\n")
    folder = distill(str(teacher_folder), tmp_path / "tdm", TDMConfig(**TINY_TDM), method="tdm", data=prompts,
                     max_steps=1, progress=False)
    card = StudentCard.load(folder)
    assert card.method == "tdm" and card.training["data"].startswith("prompts:2:")


def test_own_teacher_errors_name_what_is_missing(teacher_folder, tmp_path):
    from diffaccel.cli import main

    config = LCDConfig(**TINY_LCD)
    with pytest.raises(ValueError, match="needs training data of its domain: give a folder of captioned images"):
        distill(str(teacher_folder), tmp_path / "a", config, max_steps=1)
    with pytest.raises(ValueError, match="give a prompt file or a folder"):
        distill(str(teacher_folder), tmp_path / "a", TDMConfig(**TINY_TDM), method="tdm", max_steps=1)
    with pytest.raises(ValueError, match="rg-lcd's default expert reward is diffaccel's reference judge"):
        distill(str(teacher_folder), tmp_path / "a", config, method="rg-lcd", data=tmp_path, max_steps=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(ValueError, match="lcd noises training images"):
        distill(str(teacher_folder), tmp_path / "a", config, data=prompts, max_steps=1)
    with pytest.raises(ValueError, match="neither a folder of captioned images or clips nor a prompt file"):
        distill(str(teacher_folder), tmp_path / "a", config, data=tmp_path / "nothing", max_steps=1)
    images, _ = write_images(tmp_path / "images", 2)
    with pytest.raises(ValueError, match="procedural training scenes are square"):
        distill("reference:image", tmp_path / "b", LCDConfig(**{**TINY_LCD, "width": 128}), max_steps=1)
    assert main(["distill", "--teacher", str(teacher_folder), "--data", str(images), "--resolution", "64", "--height", "64",
                 "--width", "96", "--out", str(tmp_path / "d"), "--max-steps", "1"]) == 2
    assert main(["distill", "--teacher", str(teacher_folder), "--data", str(images), "--height", "64",
                 "--out", str(tmp_path / "d"), "--max-steps", "1"]) == 2
    assert main(["distill", "--teacher", str(teacher_folder), "--prompts", str(prompts), "--out", str(tmp_path / "c"),
                 "--max-steps", "1"]) == 2  # --prompts with lcd


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return saved_tiny_pipeline(tmp_path_factory, "sd3")


def test_sd3_teacher_sees_the_pipelines_own_schedule_and_conditioning(sd3_folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    seen = []
    pipe("a red circle", height=64, width=64, num_inference_steps=6, guidance_scale=1.0, output_type="latent",
         max_sequence_length=32,
         callback_on_step_end=lambda p, i, t, kw: seen.append((float(p.scheduler.sigmas[i]), float(t))) or {})
    sigmas, told = (torch.tensor(column) for column in zip(*seen))
    view = teacher_for(pipe, 64, 64, "pipeline")
    assert torch.allclose(view.sigma_grid(6)[:-1], sigmas) and torch.allclose(view.told_timestep(sigmas), told)
    timesteps, stage_sigmas = view.student_grid(4)
    assert torch.allclose(stage_sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))  # trailing 1 − i/4, shift 3
    assert torch.allclose(timesteps, stage_sigmas[:-1] * 1000)  # SD3 tells the shifted σ
    cond, uncond = view.encode(["a red circle", "a blue square"])
    assert cond.pooled.shape[0] == 2 and cond[1:].embeds.shape[0] == 1 and not torch.equal(cond.pooled, uncond.pooled)


@pytest.mark.parametrize("method", ["lcd", "tdm"])
def test_sd3_students_train_load_and_sample_in_their_steps(sd3_folder, tmp_path, method):
    from diffusers import StableDiffusion3Pipeline

    from diffaccel.distill import load_student, student_call_defaults

    if method == "lcd":
        data, _ = write_images(tmp_path / "images", 4)
        config = LCDConfig(**TINY_LCD)
    else:
        data = tmp_path / "prompts.txt"
        data.write_text("a red circle\na blue square on the left\n")
        config = TDMConfig(**TINY_TDM)
    folder = distill(str(sd3_folder), tmp_path / "student", config, method=method, data=data, max_steps=2,
                     progress=False)
    card = StudentCard.load(folder)
    assert card.pipeline == "StableDiffusion3Pipeline" and card.guidance_scale == 7.0  # SD3's CFG default
    teacher = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    before = {k: v.clone() for k, v in teacher.transformer.state_dict().items()}
    student = load_student(teacher, folder)
    changed = [k for k, v in student.transformer.state_dict().items() if not torch.equal(before[k], v)]
    assert any("add_q_proj" in k for k in changed)  # SD3's context stream is adapted too
    told = []
    handle = student.transformer.register_forward_pre_hook(lambda m, a, kw: told.append(float(kw["timestep"][0])),
                                                           with_kwargs=True)
    torch.manual_seed(0)
    image = student("a red circle", max_sequence_length=32, output_type="np", **student_call_defaults(student)).images
    handle.remove()
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    # 4 evaluations, CFG baked in, on the trailing stages it was trained on (told 1000·σ, shifted)
    assert told == pytest.approx([1000.0, 900.0, 750.0, 500.0], abs=0.5)

    # removably, through accelerate: the student's image, then the teacher again bit for bit
    import diffaccel

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    call = dict(prompt="a red circle", max_sequence_length=32, output_type="np", height=64, width=64,
                generator=torch.Generator().manual_seed(0))
    plain = pipe(**call, num_inference_steps=3).images
    diffaccel.accelerate(pipe, sampling=diffaccel.DistilledConfig(student=str(folder)))
    fast = pipe(**{**call, "generator": torch.Generator().manual_seed(0)}).images
    assert diffaccel.stats(pipe)["denoiser_calls"] == 4 and not np.array_equal(fast, plain)
    diffaccel.remove(pipe)
    assert np.array_equal(pipe(**{**call, "generator": torch.Generator().manual_seed(0)}, num_inference_steps=3).images, plain)


def test_half_precision_teacher_trains_float32_adapters(sd3_folder, tmp_path):
    """A big teacher runs in bfloat16; its LoRA student still learns in float32 (and a full student, which
    would train bfloat16 weights, is refused)."""
    from diffaccel.distill.lcd import LCDTrainer

    pipe, _, _ = load_teacher(str(sd3_folder), dtype="bfloat16")
    view = teacher_for(pipe, 64, 64, "pipeline")
    assert view.compute_dtype == torch.bfloat16
    trainer = LCDTrainer(view, LCDConfig(**TINY_LCD, guidance_scale=7.0), CaptionedImages(str(write_images(tmp_path / "i", 4)[0])))
    trainable = [p for p in trainer.student.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert pipe.transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    before, after = loss_before_and_after_one_step(trainer)
    assert np.isfinite(before) and after < before
    # the guidance-scale embedding too: a float32 projection over the bfloat16 timestep embedder
    pipe, _, _ = load_teacher(str(sd3_folder), dtype="bfloat16")
    embedded = LCDTrainer(teacher_for(pipe, 64, 64, "pipeline"),
                          LCDConfig(**TINY_LCD, guidance_scale=7.0, guidance_range=(3.0, 9.0)),
                          CaptionedImages(str(write_images(tmp_path / "j", 4)[0])))
    projection = embedded.guidance_embedding_for_export()["weight"]
    assert projection.dtype == torch.float32 and not projection.any()  # zero-initialised: starts as the teacher
    before, after = loss_before_and_after_one_step(embedded)
    assert np.isfinite(before) and after < before
    assert embedded.guidance_embedding_for_export()["weight"].any()  # it learned
    full = LCDConfig(**{**TINY_LCD, "lora_rank": 0}, guidance_scale=7.0)
    with pytest.raises(ValueError, match="full student .* torch.bfloat16"):
        LCDTrainer(teacher_for(load_teacher(str(sd3_folder), dtype="bfloat16")[0], 64, 64), full)


def test_gradient_checkpointing_changes_memory_not_the_result(sd3_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square on the left\n")
    losses = []
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        folder = distill(str(sd3_folder), tmp_path / name, TDMConfig(**TINY_TDM), method="tdm", data=prompts,
                         max_steps=2, progress=False, gradient_checkpointing=checkpointing)
        losses.append(json.loads((folder / "losses.json").read_text()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_a_folder_without_a_pipeline_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="the folder has no loadable pipeline"):
        load_teacher(str(tmp_path))


def test_images_are_fitted_to_a_size_that_is_not_square(teacher_folder, tmp_path):
    """Landscape training at 64 x 96: every image covers the size and is centre-cropped to it, and the
    student's card and samples keep that size."""
    images, _ = write_images(tmp_path / "images", 4, size=(80, 100))
    data = CaptionedImages(str(images), resolution=64, width=96)
    pixels, _ = data.batch(seed=0, step=0, size=2)
    assert pixels.shape == (2, 3, 64, 96)
    out = distill(str(teacher_folder), tmp_path / "student", LCDConfig(**{**TINY_LCD, "width": 96}), data=images,
                  max_steps=1, progress=False)
    card = StudentCard.load(out)
    assert (card.height, card.width) == (64, 96)
    student = load_student(load_model(str(teacher_folder)).pipe, out)
    image = student("a red circle on a blue background", output_type="pil", **student_call_defaults(student)).images[0]
    assert image.size == (96, 64)
