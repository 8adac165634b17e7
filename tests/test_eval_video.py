"""diffaccel.eval.video: VBench-style dimensions behave as their definitions say on known clips."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from diffaccel.eval.video import (
    DIMENSIONS, dynamic_degree, evaluate_videos, flow_backend, motion_smoothness, subject_consistency,
    temporal_flickering,
)
from diffaccel.pipelines.reference import scenes

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def moving():
    clips, captions, _ = scenes.sample_batch(np.random.default_rng(0), 4, clip=True)
    return clips, captions


def _static(clips):
    return np.repeat(clips[:, :1], clips.shape[1], axis=1)


def test_temporal_flickering(moving):
    clips, _ = moving
    static = temporal_flickering(_static(clips))
    assert static.per_clip == pytest.approx([1.0] * 4) and static.backend.startswith("pixel-mae")
    alternating = np.zeros((1, 8, 16, 16, 3), np.float32)
    alternating[:, 1::2] = 1.0
    assert temporal_flickering(alternating).per_clip == pytest.approx([0.0])
    smooth = temporal_flickering(clips)
    assert np.all(smooth.per_clip < 1.0) and np.all(smooth.per_clip > 0.9)
    channels_first = temporal_flickering(torch.from_numpy(clips).permute(0, 1, 4, 2, 3))
    assert channels_first.per_clip == pytest.approx(smooth.per_clip)


def test_motion_smoothness_linear_high_random_low(moving):
    clips, _ = moving
    ramp = np.linspace(0, 1, 9, dtype=np.float32)[None, :, None, None, None] * np.ones((1, 9, 16, 16, 3), np.float32)
    assert motion_smoothness(ramp).per_clip == pytest.approx([1.0], abs=1e-6)  # pixel-wise linear in time
    shape = motion_smoothness(clips)
    rand = motion_smoothness(np.random.default_rng(1).random((2, 9, 64, 64, 3)).astype(np.float32))
    assert shape.backend.startswith("linear-interpolation")
    assert shape.per_clip.min() > 0.95 and rand.per_clip.max() < 0.8


def test_dynamic_degree_still_vs_moving(moving):
    clips, _ = moving
    still = dynamic_degree(_static(clips))
    move = dynamic_degree(clips)
    assert still.mean == 0.0 and move.mean == 1.0
    assert move.params["threshold_px"] == pytest.approx(6.0 * 64 / 256) and move.params["count"] == 2
    assert move.backend.startswith("opencv-farneback" if flow_backend() == "farneback" else "block-matching")
    slow = scenes.sample_scene(np.random.default_rng(3), clip=True)
    obj = replace(slow.objects[0], speed="slowly", direction="right", size="large")
    clip = scenes.render_clip(replace(slow, objects=(obj,)))[None]
    flow = np.array(dynamic_degree(clip, flow_backend="block-matching").params["flow_top5"])
    assert flow == pytest.approx(np.full((1, 8), 64 * scenes.TRAVEL["slowly"] / 8), abs=0.3)  # 2 px per frame
    with pytest.raises(ValueError, match="flow_backend"):
        dynamic_degree(clips, flow_backend="raft")


def test_subject_consistency_static_vs_unrelated(moving):
    clips, _ = moving
    static = subject_consistency(_static(clips))
    assert static.per_clip == pytest.approx([1.0] * 4, abs=1e-6) and static.feature.startswith("judge-image-v1-")
    unrelated = scenes.sample_batch(np.random.default_rng(2), 18)[0].reshape(2, 9, 64, 64, 3)
    assert subject_consistency(unrelated).per_clip.max() < subject_consistency(clips).per_clip.min()


def test_evaluate_videos_with_captions(moving):
    clips, captions = moving
    out = evaluate_videos(clips, captions)
    assert set(out) == set(DIMENSIONS) | {"judge_adherence"}
    adh = out["judge_adherence"]
    assert adh.per_clip.shape == (4,) and "direction" in adh.params["attributes"] and adh.feature.startswith("judge-video-v1-")
    assert all(v.per_clip.shape == (4,) for v in out.values())
    with pytest.raises(ValueError, match="Unknown video dimensions"):
        evaluate_videos(clips, dimensions=("aesthetic_quality",))
    with pytest.raises(ValueError, match="at least 3 frames"):
        motion_smoothness(clips[:, :2])
