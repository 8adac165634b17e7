"""Distilling a video teacher (Wan family; the reference video model): its schedule and latents as the
pipeline has them, TDM and LCD students that train on clips, load and sample a clip in their steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill_helpers import loss_before_and_after_one_step

from diffaccel.distill import LCDConfig, StudentCard, TDMConfig, distill, load_student, student_call_defaults
from diffaccel.distill.lcd import LCDTrainer
from diffaccel.distill.teacher import WanTeacher, flow_scheduler_config, teacher_for
from diffaccel.pipelines import reference

PROMPT = "a small red circle moving to the right, on a blue background"


def test_video_teacher_sees_the_pipelines_schedule_timesteps_and_latents():
    pipe = reference.load("video")
    seen, shapes = [], []
    pipe(PROMPT, height=64, width=64, num_frames=9, num_inference_steps=6, guidance_scale=1.0, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append((float(p.scheduler.sigmas[i]), float(t)))
         or shapes.append(tuple(kw["latents"].shape)) or {})
    sigmas, told = (torch.tensor(column) for column in zip(*seen))
    view = teacher_for(pipe, 64, 64, "pipeline", frames=9)
    assert isinstance(view, WanTeacher)
    assert torch.allclose(view.sigma_grid(6)[:-1], sigmas) and torch.allclose(view.told_timestep(sigmas), told)
    assert shapes[0] == (1, *view.latent_shape)
    # the latents are normalised as the pipeline un-normalises them before decoding
    clip = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    latents = view.encode_images(clip)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(latents * std + mean, vae.encode(clip).latent_dist.mode(), atol=1e-5)


def test_video_teacher_errors(tmp_path):
    from PIL import Image

    (tmp_path / "a.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a black square")
    with pytest.raises(ValueError, match="a folder of still images cannot teach it"):
        distill("reference:video", tmp_path / "out", LCDConfig(lora_rank=4), data=tmp_path, max_steps=1)
    pipe = reference.load("video")
    step = pipe.vae_scale_factor_temporal  # 2 for the reference VAE, 4 for Wan 2.1's
    with pytest.raises(ValueError, match=f"takes 1 \\+ {step}·k frames"):
        teacher_for(pipe, 64, 64, frames=step)
    with pytest.raises(ValueError, match="makes images, not clips"):
        teacher_for(reference.load("image"), 64, 64, frames=9)


def test_wan_unipc_flow_schedule_is_read_as_its_flow_shift():
    """Hub Wan pipelines sample with UniPC on flow sigmas; the distiller reads its flow_shift as the shift."""
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    assert flow_scheduler_config(unipc) == {"num_train_timesteps": 1000, "shift": 5.0, "use_dynamic_shifting": False}
    pipe = reference.load("video")
    pipe.scheduler = unipc
    view = teacher_for(pipe, 64, 64, frames=9)
    unipc.set_timesteps(20)
    assert torch.allclose(view.sigma_grid(20), unipc.sigmas.float())  # the teacher's own spacing
    _, stages = view.student_grid(4)
    s = np.array([1.0, 0.75, 0.5, 0.25])
    assert np.allclose(stages[:-1].numpy(), 5 * s / (1 + 4 * s), atol=1e-6)  # trailing, static shift k·s / (1 + (k − 1)·s)
    with pytest.raises(ValueError, match="flow-matching teacher"):
        flow_scheduler_config(DDIMScheduler())


def test_video_lcd_step_lowers_the_loss_on_its_batch():
    torch.manual_seed(0)
    trainer = LCDTrainer(teacher_for(reference.load("video"), 64, 64, frames=9),
                         LCDConfig(lora_rank=4, learning_rate=1e-4, batch_size=2, solver_steps=10, warmup_steps=0,
                                   guidance_scale=4.0))
    before, after = loss_before_and_after_one_step(trainer)
    assert after < before


def test_video_tdm_student_trains_resumes_loads_and_samples_a_clip(tmp_path):
    config = TDMConfig(lora_rank=4, batch_size=2)
    distill("reference:video", tmp_path / "a", config, method="tdm", max_steps=1, progress=False)
    folder = distill("reference:video", tmp_path / "a", config, method="tdm", max_steps=2, resume=True, progress=False)
    distill("reference:video", tmp_path / "b", config, method="tdm", max_steps=2, progress=False)
    assert json.loads((folder / "losses.json").read_text()) == json.loads((tmp_path / "b" / "losses.json").read_text())
    card = StudentCard.load(folder)
    assert card.pipeline == "WanPipeline" and card.frames == 9 and card.training["data"] == "procedural-clips:9"
    student = load_student(reference.load("video"), folder)
    call = student_call_defaults(student)
    assert call["num_frames"] == 9 and call["num_inference_steps"] == 4
    told = []
    handle = student.transformer.register_forward_pre_hook(lambda m, a, kw: told.append(float(kw["timestep"][0])),
                                                           with_kwargs=True)
    clip = student(PROMPT, output_type="np", **call).frames
    handle.remove()
    assert clip.shape == (1, 9, 64, 64, 3) and np.isfinite(clip).all()
    assert told == pytest.approx([1000.0, 900.0, 750.0, 500.0], abs=0.5)  # 4 calls, trailing, shifted as Wan shifts


def test_cli_distills_the_video_model_and_generates_with_the_student(tmp_path):
    from diffaccel.cli import main

    out = tmp_path / "student"
    assert main(["distill", "--teacher", "reference:video", "--method", "tdm", "--lora-rank", "4", "--batch-size", "2",
                 "--out", str(out), "--max-steps", "1", "--no-progress", "--threads", "1"]) == 0
    stats = tmp_path / "stats.json"
    assert main(["generate", PROMPT, "-o", str(tmp_path / "clip.gif"), "--model", "video", "--distilled", str(out),
                 "--preset", "off", "--stats-json", str(stats)]) == 0
    assert (tmp_path / "clip.gif").stat().st_size > 0
    assert json.loads(stats.read_text())["stats"]["denoiser_calls"] == 4


def write_clips(folder, count: int, frames: int = 12, size: int = 48):
    """``count`` GIF clips whose frame i is the grey level 20·i (so a window's position can be read off its
    pixels), captioned through metadata.jsonl."""
    from diffaccel.media import save_video

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(count):
        levels = np.arange(frames, dtype=np.uint8)[:, None, None, None] * 20
        save_video(np.broadcast_to(levels, (frames, size, size + 16, 3)).copy(), folder / f"clip_{n}.gif")
        rows.append(json.dumps({"file_name": f"clip_{n}.gif", "caption": f"clip number {n}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_captioned_clips_serve_consecutive_frames_deterministically(tmp_path):
    from diffaccel.distill import CaptionedClips
    from diffaccel.distill.data import data_source

    folder = write_clips(tmp_path / "clips", 3)
    data = data_source(folder, 32, 5)
    assert isinstance(data, CaptionedClips) and data.frames == 5
    pixels, captions = data.batch(seed=0, step=0, size=2)
    assert pixels.shape == (2, 3, 5, 32, 32) and set(captions) <= {f"clip number {n}" for n in range(3)}
    again, _ = CaptionedClips(str(folder), 32, 5).batch(seed=0, step=0, size=2)
    assert torch.equal(pixels, again)  # batch `step` from (seed, step) alone: exact resume
    levels = ((pixels[:, 0, :, 0, 0] + 1.0) * 127.5).round() / 20  # each sample's frame indices
    assert torch.equal(levels - levels[:, :1], torch.arange(5.0).expand(2, 5))  # consecutive frames of the clip
    starts = {int(CaptionedClips(str(folder), 32, 5).batch(0, step, 1)[0][0, 0, 0, 0, 0].add(1).mul(127.5).round() / 20)
              for step in range(12)}
    assert len(starts) > 1 and starts <= set(range(8))  # windows start anywhere the clip allows
    with pytest.raises(ValueError, match="clip_.\\.gif has 12 frames; the teacher is trained on 13"):
        CaptionedClips(str(folder), 32, 13).batch(0, 0, 1)


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_clip_windows_are_decoded_as_a_stream(tmp_path, monkeypatch, suffix):
    """A window of a long video equals the same frames of the whole file, and the clip source never reads a
    whole file (so long videos need not be cut)."""
    from diffaccel import media
    from diffaccel.distill.data import load_clip_window

    levels = np.arange(30, dtype=np.uint8)[:, None, None, None] * 8
    path = media.save_video(np.broadcast_to(levels, (30, 16, 16, 3)).copy(), tmp_path / f"long{suffix}")
    whole, _ = media.read_video(path)
    assert media.count_video_frames(path) == len(whole) == 30
    assert np.array_equal(media.read_video_window(path, 11, 5), whole[11:16])
    assert np.array_equal(media.read_video_window(path, 25, 5), whole[25:])
    with pytest.raises(ValueError, match=f"long{suffix} has 30 frames; frames 27-31 were asked for"):
        media.read_video_window(path, 27, 5)
    monkeypatch.setattr(media, "read_video", lambda *a, **k: pytest.fail("the whole clip was read"))
    window = load_clip_window(path, 16, 16, 5, np.random.default_rng(3))
    start = int(np.random.default_rng(3).integers(0, 26))
    expected = torch.from_numpy(whole[start:start + 5]).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    assert window.shape == (3, 5, 16, 16) and torch.allclose(window, expected, atol=1e-6)


def test_bad_clip_folders_are_named(tmp_path):
    from PIL import Image

    from diffaccel.distill.data import data_source

    folder = write_clips(tmp_path / "mixed", 1)
    Image.new("RGB", (8, 8)).save(folder / "still.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "clip_0.gif", "text": "a"}\n{"file_name": "still.png", "text": "b"}\n')
    with pytest.raises(ValueError, match="holds both clips \\(.gif\\) and images \\(.png\\)"):
        data_source(folder, 32)
    sidecars = write_clips(tmp_path / "sidecars", 1)
    (sidecars / "metadata.jsonl").unlink()  # and no clip_0.txt beside the clip
    with pytest.raises(ValueError, match="Training clip .*clip_0.gif has no caption"):
        data_source(sidecars, 32)
    (sidecars / "clip_0.txt").write_text("a grey clip")
    assert data_source(sidecars, 32).entries == (("clip_0.gif", "a grey clip"),)


def test_lcd_student_of_a_wan_folder_trains_on_clips(tmp_path):
    """A user's own Wan (the reference video model saved as a pipeline folder) distilled by LCD on their clips,
    at a size that is not square."""
    from diffaccel.cli import main

    teacher = tmp_path / "my-wan"
    reference.load("video").save_pretrained(teacher)
    clips = write_clips(tmp_path / "clips", 3, size=64)
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher), "--data", str(clips), "--height", "64", "--width", "96", "--frames", "9",
                 "--lora-rank", "4", "--batch-size", "2", "--solver-steps", "10", "--out", str(out), "--max-steps", "1",
                 "--no-progress", "--threads", "1"]) == 0
    card = StudentCard.load(out)
    assert card.pipeline == "WanPipeline" and card.frames == 9 and card.training["data"].startswith("clips:")
    assert (card.height, card.width) == (64, 96)  # Wan's sizes are landscape: the clips are fitted to it
    with pytest.raises(ValueError, match="makes images, and .* holds clips"):
        distill("reference:image", tmp_path / "wrong", LCDConfig(lora_rank=4), data=clips, max_steps=1)


# small blocks: the reference clips are 192 tokens (3 x 8 x 8), too short for the default 128-token blocks
SPARSE = {"block_size": 16, "keep": "topk", "ratio_or_threshold": 0.3, "max_density": 0.5, "dense_blocks": []}


def test_sparsity_aware_tdm_student_attends_sparsely_and_teacher_and_fake_densely():
    """Video-BLADE: one shared transformer; block-sparse attention is on only while it plays the student."""
    import diffaccel
    from diffaccel.attention import set_sparse_attention
    from diffaccel.distill.tdm import TDMTrainer

    trainer = TDMTrainer(teacher_for(reference.load("video"), 64, 64, frames=9),
                         TDMConfig(lora_rank=4, batch_size=2, guidance_scale=4.0, learning_rate=1e-2,
                                   sparse_attention=SPARSE))
    pipe = trainer.teacher.pipe

    def sparse_calls(run):
        before = diffaccel.stats(pipe, cumulative=True).get("attention_sparse_calls", 0)
        out = run()
        return diffaccel.stats(pipe, cumulative=True).get("attention_sparse_calls", 0) - before, out

    batch = trainer.prepare(0)
    x, sigma, stages = torch.randn(2, *trainer.teacher.latent_shape), torch.tensor([0.6, 0.6]), torch.tensor([0, 1])
    with torch.no_grad():
        student_sparse, sparse_x0 = sparse_calls(lambda: trainer.student_x0(x, stages, batch.cond))
        assert student_sparse > 0
        assert sparse_calls(lambda: trainer.real_x0(x, sigma, batch.cond, batch.uncond))[0] == 0
        assert sparse_calls(lambda: trainer.fake_velocity(x, sigma, batch.cond))[0] == 0
        assert torch.equal(trainer.student_x0(x, stages, batch.cond), sparse_x0)  # the student again: sparse again
        set_sparse_attention(pipe, False)  # the same student forward with dense attention differs: it was sparse
        dense_x0 = trainer.student_x0(x, stages, batch.cond)
        set_sparse_attention(pipe, True)
        assert not torch.allclose(dense_x0, sparse_x0, atol=1e-4)
    weights = {k: v.clone() for k, v in trainer.student_for_export().items()}
    trainer.train_step()  # gradients reach the student's LoRA through the sparse attention
    assert any(not torch.equal(weights[k], v) for k, v in trainer.student_for_export().items())


def test_sparse_tdm_student_records_its_attention_and_samples_with_it(tmp_path):
    from diffaccel.cli import main
    from diffaccel.distill.student import student_attention

    config = TDMConfig(lora_rank=4, batch_size=2, sparse_attention=SPARSE)
    out = distill("reference:video", tmp_path / "s", config, method="tdm", max_steps=1, progress=False)
    card = StudentCard.load(out)
    assert student_attention(card).block_size == 16 and student_attention(card).dense_steps == 0
    assert distill("reference:video", tmp_path / "s", config, method="tdm", max_steps=2, resume=True,
                   progress=False) == out  # the config round-trips through the checkpoint
    stats = tmp_path / "stats.json"
    assert main(["generate", PROMPT, "-o", str(tmp_path / "clip.gif"), "--model", "video", "--distilled", str(out),
                 "--preset", "off", "--stats-json", str(stats)]) == 0
    report = json.loads(stats.read_text())["stats"]
    assert report["denoiser_calls"] == 4 and report.get("attention_sparse_calls", 0) > 0
    with pytest.raises(ValueError, match="dense steps"):
        TDMConfig(sparse_attention={"dense_steps": 2})
    with pytest.raises(ValueError, match="unknown BlockSparseAttentionConfig fields \\['blocksize'\\]"):
        TDMConfig(sparse_attention={"blocksize": 64})
    assert main(["distill", "--method", "lcd", "--sparse-attention", "--out", str(tmp_path / "x"), "--max-steps", "1"]) == 2
