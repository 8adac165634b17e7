"""Distilling a guidance-distilled Flux teacher (FLUX.1 [dev]-style, tiny and random, built offline): one
evaluation per step with the scale as the model's input, packed latents, the pipeline's own schedule, and
students that train, load and sample in their steps at that scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffaccel.distill import LCDConfig, StudentCard, TDMConfig, distill, load_student, student_call_defaults
from diffaccel.distill.lcd import LCDTrainer
from diffaccel.distill.teacher import FluxTeacher, teacher_for

FLUX_DEV_SCHEDULE = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                         max_image_seq_len=4096)
PROMPT = "a red circle"


def tiny_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tiny_pipelines import flux

    pipe = flux().pipe
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULE)  # FLUX.1 [dev]'s own schedule
    return pipe


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "my-flux"
    tiny_flux().save_pretrained(folder)
    return folder


def test_flux_teacher_is_called_as_the_pipeline_calls_it():
    """Same noise levels and timesteps as the pipeline, and the same velocity from the unpacked latents."""
    pipe = tiny_flux()
    seen, calls = [], []

    def record(module, args, kwargs, output):
        calls.append((kwargs["hidden_states"].clone(), kwargs["timestep"].clone(), kwargs["guidance"].clone(), output[0].clone()))

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    pipe(PROMPT, height=64, width=64, num_inference_steps=6, guidance_scale=3.5, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append((float(p.scheduler.sigmas[i]), float(t))) or {})
    handle.remove()
    sigmas, told = (torch.tensor(column) for column in zip(*seen))
    view = teacher_for(pipe, 64, 64, "pipeline", guidance_scale=3.5)
    assert isinstance(view, FluxTeacher) and view.guidance_distilled
    assert torch.allclose(view.sigma_grid(6)[:-1], sigmas) and torch.allclose(view.told_timestep(sigmas), told)
    packed, timestep, guidance, output = calls[2]
    assert torch.allclose(guidance, torch.tensor([3.5])) and torch.allclose(timestep, sigmas[2:3], atol=1e-6)
    factor = pipe.vae_scale_factor
    latents = pipe._unpack_latents(packed, 64, 64, factor)
    assert latents.shape == (1, *view.latent_shape)
    cond, uncond = view.encode([PROMPT])
    with torch.no_grad():
        ours = view.guided_velocity(pipe.transformer, latents, sigmas[2:3], cond, uncond, 3.5)
    assert torch.allclose(ours, pipe._unpack_latents(output, 64, 64, factor), atol=1e-5)


def test_flux_errors_name_what_cannot_be():
    pipe = tiny_flux()
    with pytest.raises(ValueError, match="told its guidance scale as an input"):
        teacher_for(pipe, 64, 64)
    view = teacher_for(pipe, 64, 64, guidance_scale=3.5)
    with pytest.raises(ValueError, match="guidance-distilled"):
        LCDTrainer(view, LCDConfig(lora_rank=4, guidance_scale=3.5, guidance_range=(2.0, 5.0), batch_size=2,
                                   solver_steps=10))
    with pytest.raises(ValueError, match="cannot be added on top"):
        view.guided_velocity(pipe.transformer, torch.zeros(1, *view.latent_shape), torch.tensor([0.5]),
                             *view.encode([PROMPT]), 5.0)
    pipe.transformer.register_to_config(guidance_embeds=False)
    with pytest.raises(ValueError, match="schnell"):
        teacher_for(pipe, 64, 64, guidance_scale=3.5)


@pytest.mark.parametrize("method", ["lcd", "tdm"])
def test_flux_students_train_load_and_sample_at_the_distilled_scale(flux_folder, tmp_path, method):
    from diffaccel.cli import main
    from diffaccel.loading import load_model

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    rows = []
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (64, 64), colour).save(images / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a {colour} picture"}))
    (images / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "student"
    extra = ["--solver-steps", "10"] if method == "lcd" else []
    assert main(["distill", "--method", method, "--teacher", str(flux_folder), "--data", str(images), "--resolution", "64",
                 "--lora-rank", "4", "--batch-size", "2", "--steps", "4", "--out", str(out), "--max-steps", "1",
                 "--no-progress", "--threads", "1", *extra]) == 0
    card = StudentCard.load(out)
    assert card.pipeline == "FluxPipeline" and card.guidance_scale == 3.5  # FLUX.1 [dev]'s default, embedded

    student = load_student(load_model(str(flux_folder)).pipe, out)
    call = student_call_defaults(student)
    assert call["guidance_scale"] == 3.5 and call["num_inference_steps"] == 4  # the embedding's scale, not 1
    told = []
    handle = student.transformer.register_forward_pre_hook(
        lambda m, a, kw: told.append((float(kw["timestep"][0]), float(kw["guidance"][0]))), with_kwargs=True)
    image = student(PROMPT, output_type="np", generator=torch.Generator().manual_seed(0), **call).images
    handle.remove()
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert len(told) == 4 and {g for _, g in told} == {3.5}  # one evaluation per step, told the distilled scale
    view = teacher_for(student, 64, 64, guidance_scale=3.5)
    assert [t for t, _ in told] == pytest.approx(view.student_grid(4)[1][:-1].tolist(), abs=1e-4)  # its training stages


def test_flux_student_through_accelerate_runs_at_its_scale_and_matches_load_student(flux_folder, tmp_path):
    import diffaccel
    from diffaccel.loading import load_model
    from diffaccel.sampling.distilled import DistilledConfig

    out = distill(str(flux_folder), tmp_path / "student", LCDConfig(lora_rank=4, batch_size=2, solver_steps=10, height=64,
                  width=64), data=_images(tmp_path / "images"), max_steps=1, progress=False)
    loaded = load_student(load_model(str(flux_folder)).pipe, out)
    first = loaded(PROMPT, output_type="np", generator=torch.Generator().manual_seed(1), **student_call_defaults(loaded)).images
    pipe = diffaccel.accelerate(load_model(str(flux_folder)).pipe, sampling=DistilledConfig(student=str(out)))
    guidance = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: guidance.append(float(kw["guidance"][0])),
                                                        with_kwargs=True)
    again = pipe(PROMPT, output_type="np", generator=torch.Generator().manual_seed(1), height=64, width=64).images
    handle.remove()
    assert guidance == [3.5] * 4 and np.array_equal(again, first)


def _images(folder):
    from PIL import Image

    folder.mkdir()
    for i, colour in enumerate(["red", "green"]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} picture")
    return folder
