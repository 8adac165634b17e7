"""The command line: generate from a saved tiny pipeline folder, images and video, clear errors."""

import json
import shutil
import subprocess

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from diffaccel.cli import main
from tiny_pipelines import build, wan22


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny pipelines saved with save_pretrained, as a user's local model folders."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for name in ("pixart_alpha", "wan"):
        folder = root / name
        build(name).pipe.save_pretrained(folder)
        folders[name] = folder
    folders["wan22"] = root / "wan22"
    wan22().pipe.save_pretrained(folders["wan22"])
    return folders


def test_console_script_help():
    exe = shutil.which("diffaccel")
    assert exe, "the diffaccel console script is installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "generate" in out
    out = subprocess.run([exe, "generate", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--model", "--preset", "--config", "--steps", "--guidance", "--seed", "--height", "--frames", "--device"):
        assert option in out


def test_generate_writes_a_valid_png_and_reports_stats(saved, tmp_path, capsys):
    out = tmp_path / "out.png"
    stats_file = tmp_path / "stats.json"
    code = main(
        ["generate", "a red circle", "-o", str(out), "--model", str(saved["pixart_alpha"]), "--steps", "4",
         "--height", "64", "--width", "64", "--preset", "turbo", "--stats-json", str(stats_file)]
    )
    assert code == 0
    image = Image.open(out)
    image.load()
    assert image.size == (64, 64) and image.mode == "RGB"
    report = json.loads(stats_file.read_text())
    stats = report["stats"]  # turbo on PixArt (DDIM): cache and AG; the bottleneck left out, with a warning
    assert stats["steps"] == 4 and stats["methods"] == ["cache=block", "guidance=adaptive"]
    assert 4 <= stats["denoiser_calls"] < 8 and stats["guidance_skipped_uncond"] == 8 - stats["denoiser_calls"]
    assert report["wall_seconds"] > 0
    assert "wrote" in capsys.readouterr().out


def test_generate_same_seed_same_image_and_config_file(saved, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("cache:\n  method: block\n  threshold: 0.0\n")
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        assert main(["generate", "x", "-o", str(paths[-1]), "--model", str(saved["pixart_alpha"]), "--steps", "3",
                     "--height", "64", "--width", "64", "--config", str(config), "--seed", "7"]) == 0
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(paths[1])))


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_generate_video_writes_a_readable_file(saved, tmp_path, suffix):
    out = tmp_path / f"clip{suffix}"
    code = main(["generate", "a red circle moving", "-o", str(out), "--model", str(saved["wan"]), "--steps", "2",
                 "--height", "32", "--width", "32", "--frames", "9"])
    assert code == 0
    frames = iio.imread(out, index=None)
    assert frames.shape[0] == 9 and frames.shape[1:3] == (32, 32)


def test_generate_errors_are_clear(saved, tmp_path, capsys):
    args = ["generate", "x", "--model", str(saved["pixart_alpha"]), "--height", "64", "--width", "64"]
    assert main(args + ["-o", str(tmp_path / "a.png"), "--preset", "warp"]) == 2
    assert "Unknown preset 'warp'" in capsys.readouterr().err
    assert main(args + ["-o", str(tmp_path / "a.mp4")]) == 2
    assert "image pipeline" in capsys.readouterr().err
    assert main(args + ["-o", str(tmp_path / "a.png"), "--frames", "9"]) == 2
    assert "does not take 'num_frames'" in capsys.readouterr().err


def test_generate_defaults_to_the_embedded_image_model(tmp_path):
    out = tmp_path / "ref.png"
    assert main(["generate", "a large red circle on the left, on a blue background", "-o", str(out), "--steps", "4"]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)


def test_video_flag_with_a_model_is_refused(tmp_path, capsys):
    assert main(["generate", "x", "-o", str(tmp_path / "a.gif"), "--model", "somewhere", "--video"]) == 2
    assert "--video selects the embedded video model" in capsys.readouterr().err


def test_generate_wan22_folder_accelerates_both_experts_with_their_own_guidance(saved, tmp_path, capsys):
    """A Wan 2.2 folder (transformer_2, boundary_ratio) through from_pretrained: both experts run accelerated,
    --guidance-2 reaches the low-noise steps, and a pipeline without a second expert refuses it clearly."""
    stats_path = tmp_path / "stats.json"
    common = ["--steps", "4", "--height", "32", "--width", "32", "--frames", "9", "--preset", "fast"]
    outputs = []
    for guidance_2 in ("5", "1"):
        out = tmp_path / f"clip{guidance_2}.gif"
        assert main(["generate", "a red circle moving", "-o", str(out), "--model", str(saved["wan22"]), *common,
                     "--guidance", "5", "--guidance-2", guidance_2, "--stats-json", str(stats_path)]) == 0
        outputs.append(iio.imread(out, index=None))
    stats = json.loads(stats_path.read_text())["stats"]
    assert set(stats["models"]) == {"transformer", "transformer_2"}
    assert stats["models"]["transformer_2"]["denoiser_forwards"] > 0
    assert not np.array_equal(outputs[0], outputs[1])  # the low-noise steps took the other scale
    code = main(["generate", "x", "-o", str(tmp_path / "w.gif"), "--model", str(saved["wan"]), *common,
                 "--guidance-2", "3"])
    assert code == 2 and "guidance_scale_2" in capsys.readouterr().err


def test_guidance_goes_to_the_guider_of_a_pipeline_that_has_one():
    """HunyuanVideo 1.5 guides through a diffusers guider, not a guidance_scale argument: --guidance sets the
    guider's scale; a pipeline with neither still refuses the option by name."""
    import argparse

    from diffaccel.cli import call_arguments

    args = argparse.Namespace(prompt="a red circle", steps=None, guidance=6.0, guidance_2=None, negative_prompt=None,
                              height=None, width=None, frames=None, seed=0)
    case = build("hunyuan_video15")
    kwargs = call_arguments(case.pipe, args)
    assert "guidance_scale" not in kwargs and case.pipe.guider.guidance_scale == 6.0
    assert call_arguments(build("pixart_alpha").pipe, args)["guidance_scale"] == 6.0
    lumina = build("lumina2").pipe
    with pytest.raises(ValueError, match="does not take 'guidance_scale_2'"):
        call_arguments(lumina, argparse.Namespace(**{**vars(args), "guidance_2": 2.0}))
