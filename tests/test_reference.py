"""The shipped reference models: offline loading, generation in seconds, ordinary diffusers pipelines."""

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel.pipelines import reference


@pytest.fixture(scope="module")
def image_pipe():
    return reference.load("image")


def _shipped(name: str) -> bool:
    return (reference.WEIGHTS / name / "model_index.json").is_file()


video_model = pytest.mark.skipif(
    not _shipped("video"), reason="the reference video model is not trained and shipped yet (issue 3 in progress)"
)


@pytest.fixture(scope="module")
def video_pipe():
    return reference.load("video")


def test_info_states_the_facts():
    image, video = reference.info("image"), reference.info("video")
    assert image["train_resolutions"] == [64, 128] and video["frames"] == 9
    for facts in (image, video):
        assert facts["default_steps"] > 0 and facts["default_guidance"] > 1.0
    assert image["training"]["steps"] > 0
    with pytest.raises(ValueError, match="Unknown reference model 'audio'"):
        reference.info("audio")


def test_a_missing_model_says_how_to_train_it(tmp_path, monkeypatch):
    monkeypatch.setattr(reference, "WEIGHTS", tmp_path)
    with pytest.raises(ValueError, match=r"python scripts/train_reference.py video"):
        reference.path("video")


def test_shipped_weights_fit_the_budget():
    total = sum(p.stat().st_size for p in reference.WEIGHTS.rglob("*") if p.is_file())
    assert total <= 60 * 2**20, f"{total / 2**20:.1f} MB"


def test_ordinary_diffusers_pipeline(image_pipe):
    from diffusers import CogView4Pipeline, DiffusionPipeline

    assert isinstance(image_pipe, CogView4Pipeline)
    again = DiffusionPipeline.from_pretrained(reference.path("image"), dtype=torch.float32)
    assert type(again) is CogView4Pipeline
    assert len(image_pipe.transformer.transformer_blocks) >= 12


def test_image_model_generates_in_seconds_and_accelerates(image_pipe):
    kwargs = dict(reference.call_defaults("image"), num_inference_steps=6)
    run = lambda: image_pipe("a large red circle on the left, on a blue background", output_type="np",
                             generator=torch.Generator().manual_seed(0), **kwargs).images
    base = run()
    assert base.shape == (1, 64, 64, 3) and np.isfinite(base).all()
    diffaccel.accelerate(image_pipe, "off")
    assert np.array_equal(run(), base)
    diffaccel.accelerate(image_pipe, cache=diffaccel.BlockCacheConfig(threshold=1e9, warmup_steps=2))
    cached = run()
    assert diffaccel.stats(image_pipe)["blocks_skipped"] > 0
    assert np.abs(cached - base).mean() < 0.25
    diffaccel.remove(image_pipe)
    assert np.array_equal(run(), base)


@video_model
def test_video_model_generates(video_pipe):
    from diffusers import WanPipeline

    assert isinstance(video_pipe, WanPipeline)
    kwargs = dict(reference.call_defaults("video"), num_inference_steps=4)
    frames = video_pipe("a small green square moving right slowly, on a black background", output_type="np",
                        generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert frames.shape == (1, 9, 64, 64, 3) and np.isfinite(frames).all()


def test_ceiling_judges_the_prompts_ground_truth_and_its_vae_reconstruction():
    """`eval_reference.py --ceiling`: the prompt set's own scenes rendered (so the judge reads them back)
    and their VAE reconstructions, which lose some of it."""
    import sys
    from pathlib import Path

    from diffaccel.pipelines.reference import scenes

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from eval_reference import ceiling

    assert [scenes.caption(s) for s in scenes.prompt_scenes(12)] == scenes.prompt_set(12)
    result = ceiling("image", 12)
    assert result["ground_truth"]["adherence"] >= 0.95
    assert 0.5 <= result["vae_reconstruction"]["adherence"] <= result["ground_truth"]["adherence"] + 0.05
    assert 20.0 < result["vae_psnr_db"] < 40.0


def test_ceiling_of_a_candidate_vae_reads_its_folder(tmp_path):
    """`eval_reference.py video --ceiling --path DIR`: the same figures from a copy of the shipped VAE, other
    figures from a VAE that differs; without --out it refuses to overwrite the shipped model's figures."""
    import json
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import eval_reference

    candidate = tmp_path / "video"
    shutil.copytree(reference.WEIGHTS / "video" / "vae", candidate / "vae")
    shipped = eval_reference.ceiling("video", 2)
    copied = eval_reference.ceiling("video", 2, candidate)
    assert copied["vae_psnr_db"] == shipped["vae_psnr_db"] and str(candidate) in copied["model"]
    from diffaccel.pipelines.reference import build

    build.video_components(0, temporal_scale=2)["vae"].save_pretrained(candidate / "vae")  # untrained, 2x in time
    assert eval_reference.ceiling("video", 2, candidate)["vae_psnr_db"] < shipped["vae_psnr_db"] - 5
    with pytest.raises(SystemExit):
        eval_reference.main(["video", "--ceiling", "--path", str(candidate), "--num", "2"])
    out = tmp_path / "c.json"
    eval_reference.main(["video", "--ceiling", "--path", str(candidate), "--num", "2", "--out", str(out)])
    assert json.loads(out.read_text())["num_prompts"] == 2
    # Long clips (train_reference.py --long-every): the size and frames reach the renders and the record.
    eval_reference.main(["video", "--ceiling", "--num", "1", "--resolution", "128", "--frames", "17", "--out", str(out)])
    assert (json.loads(out.read_text())["size"], json.loads(out.read_text())["frames"]) == (128, 17)
    for bad in (["image", "--frames", "17"], ["video", "--ceiling", "--steps", "4"]):
        with pytest.raises(SystemExit):
            eval_reference.main([*bad, "--num", "1", "--out", str(out)])
