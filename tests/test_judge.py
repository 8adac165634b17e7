"""The shipped judges read held-out ground-truth renders back into their captions."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from diffaccel.pipelines.reference import judge as J
from diffaccel.pipelines.reference import scenes

TEST_SEED = 31_337  # neither the training stream (seed 0) nor the training script's held-out set


@pytest.fixture(scope="module")
def image_judge():
    return J.load_judge("image")


@pytest.fixture(scope="module")
def clip_judge():
    return J.load_judge("video")


def _batch(n, resolution, clip=False, frames=9):
    rng = np.random.default_rng([TEST_SEED, resolution, int(clip), frames])
    return scenes.sample_batch(rng, n, resolution, clip=clip, frames=frames)


def _other(values, value, avoid=()):
    return next(v for v in values if v != value and v not in avoid)


@pytest.mark.parametrize("n,resolution", [(64, 64), (32, 128)])
def test_image_judge_reads_ground_truth(image_judge, n, resolution):
    pixels, captions, truth = _batch(n, resolution)
    score = J.adherence(image_judge, pixels, captions)
    assert score.shape == (n,)
    assert score.mean() >= 0.98, J.attribute_accuracy(image_judge, pixels, captions)
    # read_scene gives the scenes back (Scene equality ignores the jitter)
    read = J.read_scene(image_judge, pixels)
    assert np.mean([r == t for r, t in zip(read, truth)]) >= 0.9


def test_clip_judge_reads_ground_truth(clip_judge):
    pixels, captions, truth = _batch(32, 64, clip=True)
    score = J.adherence(clip_judge, pixels, captions)
    assert score.shape == (32,)
    assert score.mean() >= 0.98, J.attribute_accuracy(clip_judge, pixels, captions)
    read = J.read_scene(clip_judge, pixels)
    assert np.mean([r == t for r, t in zip(read, truth)]) >= 0.9
    acc = J.attribute_accuracy(clip_judge, pixels, captions)
    assert set(J.CLIP_ATTRIBUTES) <= set(acc)


def test_clip_judge_other_frame_counts(clip_judge):
    """Clips with another frame count are resampled to 9 frames; motion still reads."""
    for frames in (5, 16):
        pixels, captions, _ = _batch(16, 64, clip=True, frames=frames)
        acc = J.attribute_accuracy(clip_judge, pixels, captions)
        assert acc["direction"] >= 0.9 and acc["speed"] >= 0.8, (frames, acc)


def test_layouts_and_features(image_judge, clip_judge):
    pixels, captions, _ = _batch(8, 64)
    channels_first = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    assert np.array_equal(J.adherence(image_judge, pixels, captions), J.adherence(image_judge, channels_first, captions))
    with torch.no_grad():
        logits = image_judge(channels_first)
        feats = image_judge.features(channels_first)
    assert logits["slot_shape"].shape == (8, 5, 4) and logits["slot_color"].shape == (8, 5, 8)
    assert logits["slot_size"].shape == (8, 5, 2) and logits["background"].shape == (8, 8)
    assert feats.shape == (8, image_judge.embed_dim) and torch.isfinite(feats).all()
    clips, _, _ = _batch(2, 64, clip=True)
    with torch.no_grad():
        clip_feats = clip_judge.features(torch.from_numpy(clips).permute(0, 1, 4, 2, 3))
    assert clip_feats.shape == (2, clip_judge.embed_dim)
    assert J.features(clip_judge, clips).shape == (2, clip_judge.embed_dim)


def test_wrong_captions_score_lower(image_judge, clip_judge):
    pixels, _, truth = _batch(32, 64)
    true_score = J.adherence(image_judge, pixels, truth)
    for attribute, values in (("color", scenes.COLORS), ("shape", scenes.SHAPES), ("size", scenes.SIZES)):
        wrong = [
            replace(s, objects=(replace(s.objects[0], **{attribute: _other(values, getattr(s.objects[0], attribute))}),) + s.objects[1:])
            for s in truth
        ]
        wrong_captions = [scenes.caption(w) for w in wrong]
        wrong_score = J.adherence(image_judge, pixels, wrong_captions)
        perfect = true_score == 1.0
        assert perfect.mean() >= 0.9
        assert (wrong_score[perfect] < 1.0).all(), attribute
        assert wrong_score.mean() < true_score.mean(), attribute
    # a shape placed at a slot the image leaves empty
    moved = []
    for s in truth:
        taken = {o.position for o in s.objects}
        free = next(p for p in scenes.POSITIONS if p not in taken)
        moved.append(scenes.caption(replace(s, objects=(replace(s.objects[0], position=free),) + s.objects[1:])))
    assert J.adherence(image_judge, pixels, moved).mean() < true_score.mean()

    clips, _, clip_truth = _batch(32, 64, clip=True)
    true_clip = J.adherence(clip_judge, clips, clip_truth)
    for attribute, values in (("direction", scenes.DIRECTIONS), ("speed", scenes.SPEEDS), ("color", scenes.COLORS)):
        wrong = [replace(s, objects=(replace(s.objects[0], **{attribute: _other(values, getattr(s.objects[0], attribute))}),)) for s in clip_truth]
        wrong_score = J.adherence(clip_judge, clips, [scenes.caption(w) for w in wrong])
        perfect = true_clip == 1.0
        assert (wrong_score[perfect] < 1.0).all(), attribute
        assert wrong_score.mean() < true_clip.mean(), attribute


def test_missing_weights(tmp_path):
    with pytest.raises(ValueError, match=r"train_reference\.py judge"):
        J.load_judge("image", tmp_path / "image.safetensors")
    with pytest.raises(ValueError, match="kind"):
        J.load_judge("audio")


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    judge = J.ClipJudge().eval()
    path = J.save_judge(judge, tmp_path / "video.safetensors")
    assert path.with_suffix(".json").is_file()
    loaded = J.load_judge("video", path)
    assert not loaded.training
    x = torch.rand(2, 4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(judge(x)["direction"], loaded(x)["direction"])
    with pytest.raises(ValueError, match="not a 'image'"):
        J.load_judge("image", path)
    size_mb = sum(p.numel() for p in loaded.parameters()) * 4 / 2**20
    assert size_mb <= 2.0
