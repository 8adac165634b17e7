"""The reference-model trainer's data stream and its resume path (training itself does not run in CI)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trainer():
    """The command line, ``scripts/train_reference.py`` (it puts scripts/ on sys.path for its stages)."""
    spec = importlib.util.spec_from_file_location("train_reference", ROOT / "scripts" / "train_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stages(trainer):
    """The stages' modules, ``scripts/reference_training/``."""
    import importlib
    import types

    names = ("common", "loader", "vae", "text", "denoiser")
    return types.SimpleNamespace(**{n: importlib.import_module(f"reference_training.{n}") for n in names})


# The worker checks fork a pool, so they run in a fresh interpreter: forked after this test process's earlier
# tests (torch thread pools, gloo, many pipelines), the pool's workers have died and left it waiting for ever.
WORKER_CHECKS = r"""
import functools, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])  # scripts/
from reference_training.common import pixels_to_model
from reference_training.denoiser import _loader_batch
from reference_training.loader import BatchLoader
from reference_training.vae import _vae_loader_batch

def draw_all(draw, first, workers, steps):
    loader = BatchLoader(draw, first, workers=workers)
    try:
        return [loader.get() for _ in range(steps)]
    finally:
        loader.close()

draw = functools.partial(_vae_loader_batch, "image", 0, 4)
one, two = draw_all(draw, 3, 1, 3), draw_all(draw, 3, 2, 3)
for a, b, step in zip(one, two, range(3, 6)):
    assert a.shape == (4, 64, 64, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, _vae_loader_batch("image", 0, 4, step))
assert not np.array_equal(one[0], one[1])
# Every 8th image batch is 128 px, a quarter as many; model input is channels-first in [-1, 1].
big = _vae_loader_batch("image", 0, 8, 7)
assert big.shape == (2, 128, 128, 3)
x = pixels_to_model(torch.from_numpy(big))
assert tuple(x.shape) == (2, 3, 128, 128) and float(x.min()) >= -1 and float(x.max()) <= 1
clip = pixels_to_model(torch.from_numpy(_vae_loader_batch("video", 0, 1, 0)))
assert tuple(clip.shape) == (1, 3, 9, 64, 64)

(pixels, captions), = draw_all(functools.partial(_loader_batch, "image", 0, 8), 3, 1, 1)
again, captions_again = _loader_batch("image", 0, 8, 3)
np.testing.assert_array_equal(pixels, again)
assert captions == captions_again and len(captions) == len(pixels) > 0
# A worker that dies fails the step by name instead of leaving the loop waiting for ever.
import os
try:
    draw_all(os._exit, 3, 1, 1)  # the worker exits with status 3 while drawing step 3
except RuntimeError as error:
    assert "step 3" in str(error) and "worker died" in str(error), error
else:
    raise AssertionError("a dead worker went unnoticed")
print("worker checks passed")
"""


def test_batches_from_workers_depend_on_the_step_alone():
    """VAE and denoiser batches drawn by 1 or 2 ``BatchLoader`` workers equal the in-process draw of each step;
    a worker that dies is an error naming the step."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", WORKER_CHECKS, str(ROOT / "scripts")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "worker checks passed" in done.stdout, done.stderr[-3000:]


def test_a_resumed_vae_warms_its_fresh_optimizer_up(stages, tmp_path):
    """Resuming a trained VAE must not undo it: full-size first Adam steps took 27 dB to 16 dB in 7 steps."""
    weights = tmp_path / "weights"
    shutil.copytree(stages.common.WEIGHTS / "image" / "vae", weights / "image" / "vae")
    before = json.loads((weights / "image" / "vae" / "training_state.json").read_text())
    stages.vae.train_vae("image", minutes=0.1, seed=0, batch_size=4, weights=weights)
    after = json.loads((weights / "image" / "vae" / "training_state.json").read_text())
    assert after["steps"] > before["steps"]
    # Without the warm-up the first ~40 steps take 26.3 dB to 14-16 dB; with it a run swings by up to about 1.5 dB
    # (lr 1e-3 swings 2 dB between saves), more the more steps a fast machine fits in the 6 s.
    assert after["psnr_64px"] > before["psnr_64px"] - 3.0, (before, after)


def test_a_vae_whose_loss_turns_nan_stops_without_saving(stages, tmp_path, monkeypatch):
    """A non-finite loss must not be trained on and saved over the VAE (bfloat16 autocast on an AMX CPU gave
    non-finite gradients at the first step; the run trained NaN weights until its first save)."""
    import types

    import torch

    weights = tmp_path / "weights"
    shutil.copytree(stages.common.WEIGHTS / "image" / "vae", weights / "image" / "vae")
    before = (weights / "image" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    functional = types.SimpleNamespace(mse_loss=torch.nn.functional.mse_loss,
                                       l1_loss=lambda a, b: torch.nn.functional.l1_loss(a, b) * float("nan"))
    monkeypatch.setattr(stages.vae, "F", functional)
    with pytest.raises(SystemExit, match="loss is nan; stopping without saving"):
        stages.vae.train_vae("image", minutes=0.1, seed=0, batch_size=2, weights=weights)
    assert (weights / "image" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert stages.vae.vae_autocast(torch.device("cpu"))["enabled"] is False


def test_foreground_weights_mark_the_shape_not_the_background(stages):
    import torch

    clip = torch.full((2, 3, 5, 16, 16), -0.6)
    clip[:, 0] = 0.4  # a flat coloured background
    clip[0, :, 2, 3:7, 5:9] = torch.tensor([1.0, -1.0, 0.2]).view(3, 1, 1)  # one 4x4 shape in one frame
    weights = stages.vae.foreground_weights(clip, 10.0)
    assert weights.shape == (2, 1, 5, 16, 16)
    assert float(weights[0, 0, 2, 3:7, 5:9].min()) == 11.0 and int((weights[0] > 1).sum()) == 16
    assert bool((weights[1] == 1).all())  # no shape, no extra weight


@pytest.mark.parametrize("argv, named", [
    (["video-vae", "--profile"], "--profile does nothing for the video-vae stage"),
    (["image-text", "--workers", "2"], "--workers does nothing for the image-text stage"),
    (["judge", "--weights", "elsewhere"], "--weights does nothing for the judge stage"),
    (["video", "--temporal-scale", "2"], "--temporal-scale does nothing for the video stage"),
    (["video", "--fresh"], "--fresh does nothing for the video stage"),
    (["video", "--foreground-weight", "4"], "--foreground-weight does nothing for the video stage"),
    (["video-text", "--lr", "1e-4"], "--lr does nothing for the video-text stage"),
    (["image", "--long-every", "4"], "--long-every does nothing for the image stage"),
])
def test_an_option_the_stage_does_not_read_is_refused_by_name(trainer, capsys, argv, named):
    with pytest.raises(SystemExit):
        trainer.main([*argv, "--minutes", "0.01"])
    assert named in capsys.readouterr().err


def test_temporal_scale_only_shapes_a_fresh_video_vae(trainer, tmp_path):
    with pytest.raises(SystemExit, match="--temporal-scale sets the architecture of a fresh video VAE"):
        trainer.main(["video-vae", "--temporal-scale", "2", "--minutes", "0.01", "--weights", str(tmp_path)])
    assert not (tmp_path / "video").exists()


def test_a_video_vae_compressing_time_by_two_keeps_five_of_nine_frames():
    """The shipped VAE's layout: 9 frames -> 5 latent frames -> 9 frames, and the pipeline reads the factor."""
    import torch
    from diffaccel.pipelines.reference import build

    components = build.video_components(0, temporal_scale=2)
    vae = components["vae"]
    clip = torch.rand(1, 3, build.VIDEO_FRAMES, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(clip).latent_dist.mode()
        assert tuple(latents.shape) == (1, build.VIDEO_LATENT_CHANNELS, 5, 8, 8)
        assert tuple(vae.decode(latents).sample.shape) == tuple(clip.shape)
    assert build.video_pipeline(components).vae_scale_factor_temporal == 2
    assert build.video_components(0)["vae"].config.scale_factor_temporal == 2  # the shipped layout is the default
    assert build.video_components(0, temporal_scale=4)["vae"].config.scale_factor_temporal == 4  # the earlier one
    with pytest.raises(ValueError, match="temporal_scale must be one of"):
        build.video_components(0, temporal_scale=3)


def test_a_candidate_folder_trains_beside_the_shipped_model(stages, tmp_path, monkeypatch):
    """--weights DIR: a denoiser trained on a candidate VAE starts from the shipped transformer and writes
    only into DIR (a full pipeline folder), with its checkpoint apart from the shipped model's."""
    # Checkpoints into this test's folder: work/reference/video@next may hold a real candidate's run.
    monkeypatch.setattr(stages.common, "WORK", tmp_path / "work")
    candidate = tmp_path / "next"
    shutil.copytree(stages.common.WEIGHTS / "video" / "vae", candidate / "video" / "vae")
    shipped = stages.common.WEIGHTS / "video" / "transformer" / "training_state.json"
    shipped_before = shipped.read_text()
    work = stages.common.work_folder(candidate, "video")
    assert work == tmp_path / "work" / "video@next" != stages.common.work_folder(stages.common.WEIGHTS, "video")
    stages.denoiser.train_denoiser("video", minutes=0.4, seed=0, batch_size=6, weights=candidate, save_every=100.0,
                                   long_every=1)  # every step on one long clip
    state = json.loads((candidate / "video" / "transformer" / "training_state.json").read_text())
    trained = state["steps"] - json.loads(shipped_before)["steps"]
    assert trained >= 1 and state["long_steps"] == trained and state["long_clips"] == "128 px x 17 frames"
    assert (candidate / "video" / "model_index.json").is_file()
    assert (work / "checkpoint.pt").is_file()
    assert shipped.read_text() == shipped_before


def test_video_captions_are_encoded_once_each_and_as_the_pipeline_encodes_them(stages):
    """The video recipe's text cache: the same embeddings as a batched ``encode_prompt`` (512 tokens, pads
    zeroed), and the frozen encoder runs once per distinct caption."""
    import torch

    recipe = stages.denoiser.VideoRecipe(0)
    recipe.pipe.text_encoder.eval()  # frozen, as train_denoiser holds it
    calls = []
    recipe.pipe.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    captions = ["a small red circle moving to the right, on a blue background", "",
                "a large white square moving up slowly, on a black background",
                "a small red circle moving to the right, on a blue background"]
    cached = recipe.text(captions)
    assert calls == [1, 1, 1]  # three distinct captions, each encoded alone
    again = recipe.text(captions[::-1])
    assert len(calls) == 3 and torch.equal(again, cached.flip(0))
    with torch.no_grad():
        direct = recipe.pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=512)[0]
    assert cached.shape == direct.shape == (4, 512, direct.shape[-1])
    torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-5)
    assert bool((cached[0, 40:] == 0).all())  # the pads stay zero


def test_long_clips_come_every_nth_step_with_about_the_same_tokens(stages):
    """--long-every N: step k draws 128 px x 17-frame clips when k % N == N - 1, a 24th of the batch (at least
    one); in a worker as in the training process, and nothing changes with N = 0."""
    import numpy as np

    denoiser = stages.denoiser
    draw = lambda step, every: denoiser._loader_batch("video", 0, 48, step, long_every=every)  # noqa: E731
    short, long = draw(2, 4)[0], draw(3, 4)[0]
    assert short.shape == (16, 9, 64, 64, 3) and long.shape == (2, 17, 128, 128, 3)
    np.testing.assert_array_equal(draw(2, 0)[0], short)  # off: the usual stream
    assert draw(3, 0)[0].shape == (16, 9, 64, 64, 3)
    assert denoiser.VideoRecipe.sample(np.random.default_rng(0), 0, 12, long_every=1)[0].shape == (1, 17, 128, 128, 3)
    with pytest.raises(SystemExit, match="long clips are a video option"):
        denoiser.train_denoiser("image", minutes=0.1, seed=0, long_every=4)
