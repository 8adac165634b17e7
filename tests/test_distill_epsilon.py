"""Distilling an ε-prediction teacher (Stable Diffusion 1.x-style UNet, tiny and random, built offline): LCD as
in LCM-LoRA, through the flow view the trainers work in, and a student sampled by diffusers' LCMScheduler."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from distill_helpers import cli_lcd_one_step_then_resume, colour_images, loss_before_and_after_one_step, saved_tiny_pipeline

from diffaccel.distill import CaptionedImages, LCDConfig, StudentCard, TDMConfig, distill, load_student, student_call_defaults
from diffaccel.distill.consistency import euler_step, guided_velocity
from diffaccel.distill.lcd import LCDTrainer
from diffaccel.distill.teacher import EpsilonTeacher, teacher_for

PROMPT = "a red circle"


def tiny_sd():
    from tiny_pipelines import sd15

    return sd15().pipe


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return saved_tiny_pipeline(tmp_path_factory, "sd15")


def test_a_flow_euler_step_of_the_view_is_the_ddim_step_of_the_unet():
    pipe = tiny_sd()
    view = teacher_for(pipe, 64, 64, "pipeline")
    assert isinstance(view, EpsilonTeacher) and not view.flow_matching and view.transformer is pipe.unet
    alpha_bar = pipe.scheduler.alphas_cumprod.double()
    t_from, t_to = 759, 499
    a1, s1 = alpha_bar[t_from].sqrt().float(), (1 - alpha_bar[t_from]).sqrt().float()
    a2, s2 = alpha_bar[t_to].sqrt().float(), (1 - alpha_bar[t_to]).sqrt().float()
    sigma_from, sigma_to = view.level([t_from]), view.level([t_to])
    assert torch.allclose(view.told_timestep(torch.cat([sigma_from, sigma_to])), torch.tensor([759.0, 499.0]), atol=1e-3)
    x_t = torch.randn(2, *view.latent_shape)
    cond, uncond = view.encode([PROMPT, "a blue square"])
    with torch.no_grad():
        # DDIM with CFG 7.5 on ε, as the pipeline computes it
        eps_c = pipe.unet(x_t, t_from, encoder_hidden_states=cond).sample
        eps_u = pipe.unet(x_t, t_from, encoder_hidden_states=uncond).sample
        eps = eps_u + 7.5 * (eps_c - eps_u)
        ddim = a2 * (x_t - s1 * eps) / a1 + s2 * eps
        # the flow view: the point y = x_t / (α + s), CFG on v, one Euler step
        y = x_t / (a1 + s1)
        v = guided_velocity(view.velocity(pipe.unet, y, sigma_from.expand(2), cond),
                            view.velocity(pipe.unet, y, sigma_from.expand(2), uncond), 7.5)
        stepped = euler_step(y, v, sigma_from.expand(2), sigma_to.expand(2))
    assert torch.allclose(stepped * (a2 + s2), ddim, atol=1e-4)


def test_the_grids_are_lcds_ddim_solver_and_lcm_schedulers():
    view = teacher_for(tiny_sd(), 64, 64, "pipeline")
    grid = view.sigma_grid(50)
    assert len(grid) == 51 and grid[-1] == 0 and torch.all(grid[:-1] > grid[1:])
    assert torch.allclose(view.told_timestep(grid[:3]), torch.tensor([999.0, 979.0, 959.0]), atol=1e-3)
    timesteps, sigmas = view.student_grid(4)
    assert timesteps.tolist() == [999.0, 759.0, 499.0, 259.0]  # LCMScheduler's 4 steps of its 50-step origin
    assert torch.allclose(view.told_timestep(sigmas[:-1]), timesteps, atol=1e-3)


def test_v_prediction_teachers_give_the_same_flow_velocity():
    """The same denoiser read as v-prediction: x0 = α·x_t − s·v, ε = s·x_t + α·v."""
    pipe = tiny_sd()
    eps_view = teacher_for(pipe, 64, 64, "pipeline")
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    v_view = teacher_for(pipe, 64, 64, "pipeline")
    y, sigma = torch.randn(1, *v_view.latent_shape), v_view.level([499])
    cond, _ = v_view.encode([PROMPT])
    a, s = pipe.scheduler.alphas_cumprod[499].sqrt(), (1 - pipe.scheduler.alphas_cumprod[499]).sqrt()
    with torch.no_grad():
        out = pipe.unet(y * (a + s), 499, encoder_hidden_states=cond).sample
        x_t = y * (a + s)
        want = (s * x_t + a * out) - (a * x_t - s * out)
        assert torch.allclose(v_view.velocity(pipe.unet, y, sigma, cond), want, atol=1e-4)
        assert not torch.allclose(eps_view.velocity(pipe.unet, y, sigma, cond), want, atol=1e-3)


def test_lcd_step_lowers_the_loss_and_the_guidance_embedding_fits_a_unet(tmp_path):
    images = CaptionedImages(str(colour_images(tmp_path / "images")), resolution=64)
    trainer = LCDTrainer(teacher_for(tiny_sd(), 64, 64, "pipeline"),
                         LCDConfig(lora_rank=4, learning_rate=1e-3, batch_size=2, solver_steps=10, warmup_steps=0,
                                   guidance_scale=7.5), images)
    before, after = loss_before_and_after_one_step(trainer)
    assert after < before
    embedded = LCDTrainer(teacher_for(tiny_sd(), 64, 64, "pipeline"),
                          LCDConfig(lora_rank=4, batch_size=2, solver_steps=10, guidance_scale=7.5,
                                    guidance_range=(3.0, 9.0)), images)
    embedded.train_step()  # the UNet passes its timestep condition by position: the hook fills it
    assert embedded.guidance_embedding_for_export()["weight"].any()


def test_lcm_lora_of_a_sd_folder_trains_resumes_loads_and_samples_with_lcm(sd_folder, tmp_path):
    from safetensors.torch import load_file

    from diffaccel.cli import main
    from diffaccel.loading import load_model

    images = colour_images(tmp_path / "images")
    out = tmp_path / "student"
    cli_lcd_one_step_then_resume(sd_folder, images, out)
    card = StudentCard.load(out)
    assert card.pipeline == "StableDiffusionPipeline" and card.scheduler == "LCMScheduler"
    assert card.guidance_scale == 7.5 and card.training["steps"] == 2  # the pipeline's own CFG default
    assert all(key.startswith("unet.") for key in load_file(str(out / "pytorch_lora_weights.safetensors")))

    student = load_student(load_model(str(sd_folder)).pipe, out)
    assert type(student.scheduler).__name__ == "LCMScheduler"
    call = student_call_defaults(student)
    assert call["num_inference_steps"] == 4 and call["guidance_scale"] == 1.0
    told = []
    handle = student.unet.register_forward_pre_hook(lambda m, a, kw: told.append(float(a[1])), with_kwargs=True)
    first = student(PROMPT, output_type="np", generator=torch.Generator().manual_seed(0), **call).images
    handle.remove()
    assert first.shape == (1, 64, 64, 3) and np.isfinite(first).all()
    assert told == [999.0, 759.0, 499.0, 259.0]  # one evaluation per step, CFG baked in
    again = student(PROMPT, output_type="np", generator=torch.Generator().manual_seed(0), **call).images
    assert np.array_equal(first, again)  # LCM re-noising follows the call's generator
    import diffaccel
    from diffaccel.sampling.distilled import DistilledConfig

    removable = diffaccel.accelerate(load_model(str(sd_folder)).pipe, sampling=DistilledConfig(student=str(out)))
    through_accelerate = removable(PROMPT, output_type="np", generator=torch.Generator().manual_seed(0), height=64,
                                   width=64).images
    assert np.array_equal(through_accelerate, first) and diffaccel.stats(removable)["denoiser_calls"] == 4
    stats = tmp_path / "stats.json"
    assert main(["generate", PROMPT, "-o", str(tmp_path / "a.png"), "--model", str(sd_folder), "--distilled", str(out),
                 "--preset", "off", "--stats-json", str(stats)]) == 0
    assert json.loads(stats.read_text())["stats"]["denoiser_calls"] == 4


def test_sdxl_teacher_is_conditioned_as_its_pipeline_conditions_the_unet(tmp_path):
    """SDXL: pooled text and size time_ids in added_cond_kwargs, exactly as the pipeline passes them; and an
    LCM-LoRA student of it that samples in 4 LCMScheduler steps."""
    from tiny_pipelines import sdxl

    from diffaccel.distill.teacher import SDXLTeacher

    pipe = sdxl().pipe
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    pipe(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    handle.remove()
    view = teacher_for(pipe, 64, 64, "pipeline")
    assert isinstance(view, SDXLTeacher)
    cond, uncond = view.encode([PROMPT])
    ours = view.conditioning_kwargs(cond, torch.zeros(1, *view.latent_shape), torch.float32)
    theirs = seen[0]  # the doubled CFG batch: unconditional half first
    assert torch.equal(ours["encoder_hidden_states"], theirs["encoder_hidden_states"][1:])
    assert torch.equal(ours["added_cond_kwargs"]["text_embeds"], theirs["added_cond_kwargs"]["text_embeds"][1:])
    assert torch.equal(ours["added_cond_kwargs"]["time_ids"], theirs["added_cond_kwargs"]["time_ids"][1:])

    from diffaccel.loading import load_model

    pipe.save_pretrained(tmp_path / "my-sdxl")
    out = distill(str(tmp_path / "my-sdxl"), tmp_path / "s",
                  LCDConfig(lora_rank=4, batch_size=2, solver_steps=10, height=64, width=64),
                  data=colour_images(tmp_path / "images"), max_steps=1, progress=False)
    assert StudentCard.load(out).guidance_scale == 5.0  # SDXL's own CFG default
    student = load_student(load_model(str(tmp_path / "my-sdxl")).pipe, out)
    told = []
    handle = student.unet.register_forward_pre_hook(lambda m, a, kw: told.append(float(a[1])), with_kwargs=True)
    image = student(PROMPT, output_type="np", **student_call_defaults(student)).images
    handle.remove()
    assert told == [999.0, 759.0, 499.0, 259.0] and np.isfinite(image).all()


@pytest.mark.parametrize("name", ["pixart_alpha", "pixart_sigma"])
def test_pixart_teacher_is_called_as_its_pipeline_calls_it_and_its_lcm_student_samples(tmp_path, name):
    """PixArt: T5 text with its mask, the learned variance dropped; the flow view's velocity of the captured
    call is the pipeline's own ε turned into v; a (full) LCM student of it samples in 4 LCMScheduler steps."""
    import tiny_pipelines

    from diffaccel.distill.teacher import PixArtTeacher
    from diffaccel.loading import load_model

    pipe = getattr(tiny_pipelines, name)().pipe
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, kw, out: calls.append((a, kw, out[0])), with_kwargs=True)
    pipe(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=4.5, output_type="latent",
         use_resolution_binning=False, clean_caption=False)
    handle.remove()
    view = teacher_for(pipe, 64, 64, "pipeline")
    assert isinstance(view, PixArtTeacher)
    args, kwargs, out = calls[0]
    t = float(kwargs["timestep"][0])
    x_t = (args[0] if args else kwargs["hidden_states"])[1:]  # the conditional half of the doubled batch
    cond, _ = view.encode([PROMPT])
    assert torch.equal(cond.embeds, kwargs["encoder_hidden_states"][1:])
    alpha_bar = pipe.scheduler.alphas_cumprod[int(t)]
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    eps = out[1:, :4]
    want = eps - (x_t - s * eps) / a
    with torch.no_grad():
        got = view.velocity(pipe.transformer, x_t / (a + s), view.level([t]), cond)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-3)  # x̂0 = (x_t − s·ε)/α is large near t = T

    pipe.save_pretrained(tmp_path / "my-pixart")
    images = colour_images(tmp_path / "images")
    call = dict(output_type="np", use_resolution_binning=False, clean_caption=False)
    # a full student (as PixArt-LCM) and an LCM-LoRA: diffusers has no LoRA loader for PixArt, diffaccel adds one
    for rank in (0, 4):
        out_dir = distill(str(tmp_path / "my-pixart"), tmp_path / f"s{rank}",
                          LCDConfig(lora_rank=rank, batch_size=2, solver_steps=10, height=64, width=64),
                          data=images, max_steps=1, progress=False)
        assert (out_dir / "transformer").is_dir() == (rank == 0)
        assert (out_dir / "pytorch_lora_weights.safetensors").is_file() == (rank > 0)
        student = load_student(load_model(str(tmp_path / "my-pixart")).pipe, out_dir)
        told = []
        handle = student.transformer.register_forward_pre_hook(lambda m, a, kw: told.append(float(kw["timestep"][0])),
                                                               with_kwargs=True)
        image = student(PROMPT, **call, **student_call_defaults(student)).images
        handle.remove()
        assert told == [999.0, 759.0, 499.0, 259.0] and np.isfinite(image).all()
        assert type(student.transformer) is type(pipe.transformer)  # the LoRA fused, the class plain again


def test_a_pixart_lora_student_loads_as_it_trained_and_unloads_to_the_teacher(tmp_path):
    """PixArt's transformer has no adapter methods in diffusers: the LoRA a trainer adds is saved in the
    diffusers layout, fused on load to the same output the adapter gave in training, and removed again
    bit for bit (sampling='distilled' is removable)."""
    import diffaccel
    from diffaccel.distill.adapters import remove_adapter_support, with_adapter_support
    from diffaccel.distill.lcd import add_lora
    from diffaccel.distill.student import LORA_WEIGHTS, save_student
    from diffaccel.sampling import DistilledConfig
    import tiny_pipelines
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    pipe = tiny_pipelines.pixart_sigma().pipe
    transformer = pipe.transformer
    plain_class = type(transformer)
    teacher_state = {k: v.clone() for k, v in transformer.state_dict().items()}
    trained = copy.deepcopy(transformer)
    add_lora(trained, 4, None, seed=0, targets=("to_q", "to_v", "ff.net.2", "proj_out"))
    assert type(trained).__name__ == plain_class.__name__ and isinstance(trained, plain_class)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(encoder_hidden_states=torch.randn(1, 5, 32), timestep=torch.tensor([500]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        want = trained(x, **kwargs).sample
        assert (transformer(x, **kwargs).sample - want).abs().max() > 2e-2  # the adapter changes the output
    layers = {k: v.half().float() for k, v in get_peft_model_state_dict(trained, adapter_name="lcd").items()}
    card = StudentCard(method="lcd", teacher="tiny", pipeline=type(pipe).__name__, default_steps=4, guidance_scale=4.5,
                       lora_rank=4, scheduler="LCMScheduler", height=64, width=64)
    save_student(tmp_path / "s", card, layers, type(pipe))
    assert all(k.startswith("transformer.") for k in load_file(str(tmp_path / "s" / LORA_WEIGHTS)))

    accelerated = diffaccel.accelerate(pipe, sampling=DistilledConfig(student=str(tmp_path / "s")))
    assert type(pipe.transformer) is plain_class and not getattr(pipe.transformer, "peft_config", None)
    with torch.no_grad():
        got = pipe.transformer(x, **kwargs).sample
    assert torch.allclose(got, want, atol=2e-3), (got - want).abs().max()
    diffaccel.remove(accelerated)
    assert all(torch.equal(v, teacher_state[k]) for k, v in pipe.transformer.state_dict().items())

    with_adapter_support(transformer)
    remove_adapter_support(transformer)
    assert type(transformer) is plain_class


def test_tdm_rollout_of_an_sd_teacher_is_the_pipelines_trailing_ddim_sampling():
    """The TDM student's training rollout (flow Euler steps from the pipeline's starting point) is exactly
    what its pipeline samples with trailing DDIM: the same stages, start and steps."""
    from diffaccel.distill import PromptList
    from diffaccel.distill.tdm import STUDENT, TDMTrainer
    from diffaccel.distill.teacher import ddpm_student_scheduler

    pipe = tiny_sd()
    trainer = TDMTrainer(teacher_for(pipe, 64, 64, "pipeline"), TDMConfig(lora_rank=4, batch_size=1, guidance_scale=7.5),
                         PromptList((PROMPT,)))
    timesteps, _ = trainer.grids[(64, 64)]
    assert timesteps.tolist() == [999.0, 749.0, 499.0, 249.0]  # DDIM's trailing spacing
    z = torch.randn(1, *trainer.teacher.latent_shape, generator=torch.Generator().manual_seed(3))
    cond, _ = trainer.teacher.encode([PROMPT])
    with torch.no_grad():
        rolled = trainer.rollout(trainer.teacher.initial_point(z, trainer.sigmas[0]), torch.tensor([4]), cond,
                                 torch.Generator().manual_seed(0))
    trainer._use(STUDENT)
    pipe.scheduler = ddpm_student_scheduler(pipe.scheduler, "DDIMScheduler")
    sampled = pipe(PROMPT, latents=z, num_inference_steps=4, guidance_scale=1.0, output_type="latent", height=64,
                   width=64).images
    assert torch.allclose(rolled, sampled, atol=1e-4)


def test_tdm_student_of_an_sd_folder_loads_with_trailing_ddim(sd_folder, tmp_path):
    from diffaccel.cli import main
    from diffaccel.loading import load_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "tdm"
    assert main(["distill", "--method", "tdm", "--teacher", str(sd_folder), "--prompts", str(prompts), "--resolution",
                 "64", "--lora-rank", "4", "--batch-size", "2", "--out", str(out), "--max-steps", "1", "--no-progress",
                 "--threads", "1"]) == 0
    assert StudentCard.load(out).scheduler == "DDIMScheduler"
    student = load_student(load_model(str(sd_folder)).pipe, out)
    told = []
    handle = student.unet.register_forward_pre_hook(lambda m, a, kw: told.append(float(a[1])), with_kwargs=True)
    call = dict(output_type="np", **student_call_defaults(student))
    first = student(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    handle.remove()
    assert told == [999.0, 749.0, 499.0, 249.0] and np.isfinite(first).all()
    torch.manual_seed(123)  # DDIM (η = 1) draws nothing between steps: the global RNG cannot matter
    assert np.array_equal(student(PROMPT, generator=torch.Generator().manual_seed(0), **call).images, first)


def test_tdm_student_of_a_pixart_folder_trains_lora_and_samples_with_trailing_ddim(tmp_path):
    """TDM's own setting (PixArt-α): the student and the fake score are LoRA adapters of the teacher, which
    diffusers gives PixArt no methods for; the saved student loads and samples 4 trailing DDIM steps."""
    import tiny_pipelines

    from diffaccel.cli import main
    from diffaccel.loading import load_model

    tiny_pipelines.pixart_alpha().pipe.save_pretrained(tmp_path / "my-pixart")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "tdm"
    assert main(["distill", "--method", "tdm", "--teacher", str(tmp_path / "my-pixart"), "--prompts", str(prompts),
                 "--resolution", "64", "--lora-rank", "4", "--batch-size", "2", "--out", str(out), "--max-steps", "1",
                 "--no-progress", "--threads", "1"]) == 0
    card = StudentCard.load(out)
    assert card.scheduler == "DDIMScheduler" and card.lora_rank == 4
    student = load_student(load_model(str(tmp_path / "my-pixart")).pipe, out)
    told = []
    handle = student.transformer.register_forward_pre_hook(lambda m, a, kw: told.append(float(kw["timestep"][0])),
                                                           with_kwargs=True)
    image = student(PROMPT, output_type="np", use_resolution_binning=False, clean_caption=False,
                    generator=torch.Generator().manual_seed(0), **student_call_defaults(student)).images
    handle.remove()
    assert told == [999.0, 749.0, 499.0, 249.0] and np.isfinite(image).all()
