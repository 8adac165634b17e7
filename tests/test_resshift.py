"""ResShift: the scheduler's schedule and posterior against the paper's closed forms (oracle tier), the
pipeline on a tiny random UNet (images, batches, frames, errors), and the shipped x2 models (offline
load, frames, a PSNR floor above bicubic on held-out procedural images)."""

import time

import numpy as np
import pytest
import torch

from diffaccel.pipelines import reference
from diffaccel.pipelines.restoration import ResShiftPipeline
from diffaccel.pipelines.restoration import data
from diffaccel.pipelines.restoration.models import make_unet
from diffaccel.sampling import ResShiftScheduler

# sqrt(eta_t), t = 1..15, of the official NeurIPS configuration (T=15, p=0.3, kappa=2, min_noise_level=0.04,
# etas_end=0.99), and of the journal one (T=4, min_noise_level=0.2): shared/methods/resshift_distillation.md 1.3.
OFFICIAL_SQRT_ETAS_15 = [0.020, 0.117, 0.176, 0.234, 0.292, 0.351, 0.412, 0.476, 0.542, 0.610, 0.681, 0.754, 0.830, 0.909, 0.990]
OFFICIAL_SQRT_ETAS_4 = [0.100, 0.520, 0.761, 0.990]


def neurips() -> ResShiftScheduler:
    return ResShiftScheduler(num_train_timesteps=15, kappa=2.0, p=0.3, min_noise_level=0.04, etas_end=0.99)


# ------------------------------------------------------------------------------------------ scheduler


def test_eta_schedule_matches_official_values():
    s = neurips()
    assert s.sqrt_etas[0] == pytest.approx(0.02, abs=1e-12)
    assert s.sqrt_etas[-1] == pytest.approx(0.99, abs=1e-12)
    np.testing.assert_allclose(s.sqrt_etas, OFFICIAL_SQRT_ETAS_15, atol=1e-3)
    assert np.all(np.diff(s.sqrt_etas) > 0)
    assert np.all(s.alphas > 0) and s.alphas[0] == pytest.approx(s.etas[0])
    s4 = ResShiftScheduler(num_train_timesteps=4, min_noise_level=0.2)
    np.testing.assert_allclose(s4.sqrt_etas, OFFICIAL_SQRT_ETAS_4, atol=1e-3)


def test_timesteps_run_from_T_minus_1_to_0_and_steps_above_T_are_refused():
    s = neurips()
    s.set_timesteps()
    assert s.timesteps.tolist() == list(range(14, -1, -1))
    s.set_timesteps(4)
    assert s.timesteps.tolist()[0] == 14 and s.timesteps.tolist()[-1] == 0 and len(s.timesteps) == 4
    with pytest.raises(ValueError, match=r"num_inference_steps=16 is above .* T=15"):
        s.set_timesteps(16)


def test_add_noise_at_the_last_step_has_mean_y_and_std_kappa_sqrt_eta_T():
    s = neurips()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    y = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    n = 20000
    noise = torch.randn(n, 3, 8, 8, generator=g)
    x_T = s.add_noise(x0.expand(n, -1, -1, -1), y.expand(n, -1, -1, -1), noise, torch.full((n,), 14))
    mean, std = x_T.mean(0), x_T.std(0)
    eta_T = s.etas[-1]
    # closed form of the mean: x0 + eta_T (y - x0), i.e. y up to (1 - eta_T) = 2% of the residual
    sem = 2.0 * 0.99 / n**0.5
    torch.testing.assert_close(mean, (x0 + eta_T * (y - x0))[0], atol=5 * sem, rtol=0)
    assert (mean - y[0]).abs().max() < 0.02 * 2 + 5 * sem
    assert std.mean().item() == pytest.approx(2.0 * 0.99, rel=0.01)
    # the sampling start: mean exactly y
    start = s.init_noise(y.expand(n, -1, -1, -1), noise)
    torch.testing.assert_close(start.mean(0), y[0], atol=5 * sem, rtol=0)
    assert start.std(0).mean().item() == pytest.approx(2.0 * 0.99, rel=0.01)


@pytest.mark.parametrize("t", [1, 7, 14])
def test_posterior_matches_the_gaussian_closed_form(t):
    """Bayes on q(x_{t-1} | x0, y) = N(x0 + eta_{t-1} e0, k^2 eta_{t-1}) and
    q(x_t | x_{t-1}, y) = N(x_{t-1} + alpha_t e0, k^2 alpha_t), computed here independently."""
    s = neurips()
    k = s.config.kappa
    g = torch.Generator().manual_seed(t)
    x0, y, x_t = (torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    e0 = y - x0
    eta_t, eta_p = float(s.etas[t]), float(s.etas[t - 1])
    alpha = eta_t - eta_p
    prec = 1 / (k**2 * eta_p) + 1 / (k**2 * alpha)
    var = 1 / prec
    mean = var * ((x0 + eta_p * e0) / (k**2 * eta_p) + (x_t - alpha * e0) / (k**2 * alpha))
    got_mean, got_var = s.posterior(x0, x_t, t)
    torch.testing.assert_close(got_mean, mean, atol=1e-10, rtol=1e-10)
    assert got_var == pytest.approx(var, rel=1e-10)
    assert got_var == pytest.approx(k**2 * eta_p / eta_t * alpha, rel=1e-12)
    # step() = mean + sqrt(var) * noise, with the model's x0
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    s2 = ResShiftScheduler(**{**s.config, "clip_sample": False})
    out = s2.step(x0, t, x_t, noise=z).prev_sample
    torch.testing.assert_close(out, mean + var**0.5 * z, atol=1e-10, rtol=1e-10)


def test_last_step_returns_the_x0_estimate_without_noise():
    s = neurips()
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    out = s.step(x0, 0, torch.randn(2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.prev_sample, x0)
    # residual prediction: x0 = y - output
    r = ResShiftScheduler(prediction_type="residual")
    y = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(r.step(y - x0, 0, torch.randn(2, 3, 4, 4), y=y).prev_sample, x0)
    with pytest.raises(ValueError, match="needs y"):
        r.step(x0, 0, x0)


def test_scale_model_input_follows_the_official_normalisation():
    x = torch.ones(2, 3, 4, 4)
    for mode, expected in [("latent", lambda e: (4 * e + 1) ** 0.5), ("pixel", lambda e: 3 * 2 * e**0.5 + 1), ("none", lambda e: 1.0)]:
        s = ResShiftScheduler(input_normalization=mode)
        got = s.scale_model_input(x, torch.tensor([3, 10]))
        for i, t in enumerate([3, 10]):
            assert got[i].mean().item() == pytest.approx(1 / expected(float(s.etas[t])), rel=1e-6)


def test_save_and_load_round_trip(tmp_path):
    s = ResShiftScheduler(num_train_timesteps=4, min_noise_level=0.2, prediction_type="residual", input_normalization="pixel")
    s.save_pretrained(tmp_path)
    back = ResShiftScheduler.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(s.config)
    np.testing.assert_array_equal(back.sqrt_etas, s.sqrt_etas)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        ResShiftScheduler(prediction_type="epsilon")
    with pytest.raises(ValueError, match="etas_end"):
        ResShiftScheduler(etas_end=0.01)


# ------------------------------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    unet = make_unet(channels=(8, 16))
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # an untrained model would return y, whatever the noise
    pipe = ResShiftPipeline(
        unet,
        ResShiftScheduler(num_train_timesteps=4, min_noise_level=0.2, prediction_type="residual", input_normalization="pixel"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_upscales_a_batch_and_a_list(tiny_pipe):
    from PIL import Image

    start = time.perf_counter()
    out = tiny_pipe(image=torch.rand(3, 3, 16, 20), output_type="pt")
    assert out.images.shape == (3, 3, 32, 40) and 0 <= out.images.min() and out.images.max() <= 1
    pil = [Image.fromarray((np.random.rand(12, 12, 3) * 255).astype(np.uint8)) for _ in range(2)]
    images = tiny_pipe(image=pil).images
    assert [im.size for im in images] == [(24, 24)] * 2
    assert tiny_pipe(image=np.random.rand(10, 14, 3), output_type="np").images.shape == (1, 20, 28, 3)
    assert time.perf_counter() - start < 30


def test_pipeline_frames_share_noise_unless_told_otherwise(tiny_pipe):
    frame = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    shared = tiny_pipe(frames=[frame] * 3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert shared.frames.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(shared.frames[0], shared.frames[2])
    own = tiny_pipe(frames=[frame] * 3, generator=torch.Generator().manual_seed(0), output_type="np",
                    share_noise_across_frames=False)
    assert np.abs(own.frames[0] - own.frames[2]).max() > 1e-4
    clips = tiny_pipe(frames=torch.rand(2, 3, 3, 16, 16), output_type="pt", generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert clips.frames.shape == (2, 3, 3, 32, 32) and clips.images.shape == (6, 3, 32, 32)


def test_pipeline_is_deterministic_given_a_generator(tiny_pipe):
    x = torch.rand(2, 3, 16, 16)
    a = tiny_pipe(image=x, generator=torch.Generator().manual_seed(5), output_type="pt").images
    b = tiny_pipe(image=x, generator=torch.Generator().manual_seed(5), output_type="pt").images
    torch.testing.assert_close(a, b)


def test_pipeline_errors_name_what_and_why(tiny_pipe):
    with pytest.raises(ValueError, match="3 color channels.*got 4"):
        tiny_pipe(image=torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="3 color channels.*got 1"):
        tiny_pipe(image=np.random.rand(16, 16, 1))
    with pytest.raises(ValueError, match=r"is 4x4 px.*at least 8x8"):
        tiny_pipe(image=torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"num_inference_steps=5 is above .* T=4"):
        tiny_pipe(image=torch.rand(1, 3, 16, 16), num_inference_steps=5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_pipe(image=torch.rand(1, 3, 16, 16) * 2 - 1)
    with pytest.raises(ValueError, match="exactly one of image= or frames="):
        tiny_pipe()


def test_pipeline_save_and_load(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    back = ResShiftPipeline.from_pretrained(tmp_path)
    back.set_progress_bar_config(disable=True)
    x = torch.rand(1, 3, 16, 16)
    a = tiny_pipe(image=x, generator=torch.Generator().manual_seed(1), output_type="pt").images
    b = back(image=x, generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ shipped models


def _shipped(name):
    try:
        return reference.load(name)
    except ValueError as e:  # not trained in this checkout
        pytest.skip(str(e))


@pytest.mark.parametrize("name,steps", [("upscale", 4), ("upscale15", 15)])
def test_shipped_models_load_offline_and_upscale_frames(name, steps):
    pipe = _shipped(name)
    assert pipe.scheduler.config.num_train_timesteps == steps
    assert reference.info(name)["training"]["steps"] > 0
    start = time.perf_counter()
    clip = np.random.default_rng(0).random((3, 64, 64, 3)).astype(np.float32)
    out = pipe(frames=list(clip), output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (3, 128, 128, 3)
    assert time.perf_counter() - start < 20


def test_shipped_resshift4_beats_bicubic_on_heldout_scenes():
    """Measured on 200 held-out images: see docs/resshift_bench.md; the floor here is 3 dB on 6 images."""
    from diffaccel.eval.metrics import psnr
    from diffaccel.pipelines.restoration.baselines import pil_upscale

    pipe = _shipped("upscale")
    hr, _ = data.heldout_procedural(6)
    lr = data.degrade(hr)
    sr = pipe(image=lr, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    gain = psnr(hr, sr).mean - psnr(hr, pil_upscale(lr)).mean
    assert gain > 3.0, f"ResShift-4 is only {gain:.2f} dB above bicubic"


# ------------------------------------------------------------------------------------------ CLI


def test_cli_upscale_image_folder_and_video(tiny_pipe, tmp_path):
    import imageio.v3 as iio
    from PIL import Image

    from diffaccel.cli import main
    from diffaccel.media import read_video

    model = tmp_path / "model"
    tiny_pipe.save_pretrained(model)
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((16, 24, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    assert main(["upscale", str(folder / "0.png"), "-o", str(tmp_path / "one.png"), "--model", str(model), "--steps", "2"]) == 0
    assert Image.open(tmp_path / "one.png").size == (48, 32)
    assert main(["upscale", str(folder), "-o", str(tmp_path / "out"), "--model", str(model)]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png"]
    iio.imwrite(tmp_path / "clip.gif", (rng.random((3, 16, 16, 3)) * 255).astype(np.uint8), extension=".gif", duration=125, loop=0)
    assert main(["upscale", str(tmp_path / "clip.gif"), "-o", str(tmp_path / "big.gif"), "--model", str(model)]) == 0
    frames, _ = read_video(tmp_path / "big.gif")
    assert frames.shape == (3, 32, 32, 3)
    assert main(["upscale", str(folder), "-o", str(tmp_path / "x.png"), "--model", str(model)]) == 2
    assert main(["upscale", str(folder / "0.png"), "-o", str(tmp_path / "x.png"), "--model", str(model), "--steps", "9"]) == 2


def test_cli_upscales_a_video_as_a_stream(tiny_pipe, tmp_path, monkeypatch):
    """An MP4 longer than one chunk is read and written chunk by chunk, never whole, and the result is the
    same as upscaling all its frames at once with the same noise on every frame."""
    from diffaccel import media
    from diffaccel.cli import UPSCALE_CHUNK, main, upscale_frames

    model = tmp_path / "model"
    tiny_pipe.save_pretrained(model)
    rng = np.random.default_rng(1)
    media.save_video((rng.random((UPSCALE_CHUNK + 5, 16, 16, 3)) * 255).astype(np.uint8), tmp_path / "long.mp4", fps=12)
    frames, _ = media.read_video(tmp_path / "long.mp4")
    expected = upscale_frames(tiny_pipe, frames, 2, 7, share_noise=True)
    media.save_video(expected, tmp_path / "expected.mp4", fps=12)
    monkeypatch.setattr(media, "read_video", lambda *a, **k: pytest.fail("the whole video was read"))
    monkeypatch.setattr(media, "save_video", lambda *a, **k: pytest.fail("the whole video was written at once"))
    argv = ["upscale", str(tmp_path / "long.mp4"), "-o", str(tmp_path / "big.mp4"), "--model", str(model),
            "--steps", "2", "--seed", "7"]
    assert main(argv) == 0
    monkeypatch.undo()
    big, fps = media.read_video(tmp_path / "big.mp4")
    assert big.shape == (UPSCALE_CHUNK + 5, 32, 32, 3) and fps == 12
    assert np.array_equal(big, media.read_video(tmp_path / "expected.mp4")[0])


def test_cli_generate_then_upscale(tmp_path):
    from PIL import Image

    from diffaccel.cli import main

    _shipped("upscale")
    out = tmp_path / "big.png"
    stats = tmp_path / "stats.json"
    assert main(["generate", "a large red circle on the left, on a blue background", "-o", str(out),
                 "--upscale", "2", "--steps", "4", "--stats-json", str(stats)]) == 0
    assert Image.open(out).size == (128, 128)
    import json

    report = json.loads(stats.read_text())
    assert report["upscale_seconds"] > 0 and report["generate_seconds"] > 0
