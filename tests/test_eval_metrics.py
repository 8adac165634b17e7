"""diffaccel.eval metrics: FID/KID in the judge's feature space, real statistics, fidelity, guards."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from diffaccel.eval import features as feats
from diffaccel.eval.metrics import (
    MetricResult, RealStats, clip_score, compare_guard, fid, fid_from_stats, fidelity, kid, lpips,
    lpips_unavailable_reason, psnr, real_statistics, ssim,
)
from diffaccel.pipelines.reference import scenes

torch.set_num_threads(1)
N = 160


def _one_background(rng, n, color="black"):
    out = []
    while len(out) < n:
        s = scenes.sample_scene(rng)
        out.append(replace(s, background=color))
    return np.stack([scenes.render_image(s) for s in out])


@pytest.fixture(scope="module")
def sets():
    a = scenes.sample_batch(np.random.default_rng(0), N)[0]
    b = scenes.sample_batch(np.random.default_rng(1), N)[0]
    shifted = _one_background(np.random.default_rng(2), N)
    return a, b, shifted


@pytest.fixture(scope="module")
def judge_features():
    return feats.JudgeFeatures("image")


def test_fid_self_same_and_shifted(sets, judge_features):
    a, b, shifted = sets
    self_fid = fid(a, a, judge_features, batch_size=50)
    same = fid(a, b, judge_features)
    other = fid(a, shifted, judge_features)
    assert self_fid.feature == judge_features.feature_name and self_fid.feature.startswith("judge-image-v1-")
    assert (self_fid.n_real, self_fid.n_fake) == (N, N)
    assert abs(self_fid.value) < 1e-2 * same.value
    assert other.value > 2.0 * same.value > 0


def test_fid_accepts_uint8_channels_first_and_streamed_batches(sets, judge_features):
    a, b, _ = sets
    ref = fid(a, b, judge_features).value
    a8 = torch.from_numpy((a * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)
    assert fid(a8, b, judge_features).value == pytest.approx(ref, rel=0.02)
    streamed = fid((a[i : i + 40] for i in range(0, N, 40)), b, judge_features)
    assert streamed.value == pytest.approx(ref, rel=1e-6) and streamed.n_real == N


def test_kid_basics(sets, judge_features):
    a, b, shifted = sets
    same = kid(a, b, judge_features, subsets=20, subset_size=80)
    other = kid(a, shifted, judge_features, subsets=20, subset_size=80)
    assert same.metric == "kid" and same.std is not None and same.params["subset_size"] == 80
    assert other.value > 5 * max(abs(same.value), same.std)
    again = kid(a, b, judge_features, subsets=20, subset_size=80)
    assert again.value == same.value  # seeded subsets
    with pytest.raises(ValueError, match="subset_size"):
        kid(a[:10], b[:10], judge_features, subset_size=50)


def test_real_stats_roundtrip_equals_direct_fid(sets, judge_features, tmp_path):
    a, b, _ = sets
    stats = real_statistics(a, judge_features)
    assert stats.n == N and stats.feature == judge_features.feature_name
    loaded = RealStats.load(stats.save(tmp_path / "real.npz"))
    assert loaded.feature == stats.feature and loaded.n == N
    direct = fid(a, b, judge_features)
    from_stats = fid_from_stats(loaded, b, judge_features)
    assert from_stats.value == pytest.approx(direct.value, rel=1e-6)
    assert from_stats.n_real == N


def test_mismatched_feature_names_refuse(sets, judge_features):
    a, b, _ = sets
    stats = real_statistics(a[:20], judge_features)
    with pytest.raises(ValueError, match="feature network"):
        fid_from_stats(replace(stats, feature="inception-v3-2048"), b[:20], judge_features)
    r1 = MetricResult("fid", 1.0, "judge-image-v1-x", 10, 10)
    with pytest.raises(ValueError, match="different feature networks"):
        compare_guard(r1, replace(r1, feature="inception-v3-2048"))
    with pytest.raises(ValueError, match="sample counts"):
        compare_guard(r1, replace(r1, n_fake=20))
    compare_guard(r1, replace(r1, value=2.0))


def test_custom_feature_module_named_by_attribute_or_class():
    class Pixels(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    rng = np.random.default_rng(0)
    x, y = rng.random((30, 16, 16, 3)), rng.random((30, 16, 16, 3))
    assert fid(x, y, Pixels()).feature == "Pixels"
    named = Pixels()
    named.feature_name = "pixels-4x4"
    assert fid(x, y, named).feature == "pixels-4x4"


def test_psnr_ssim_known_values():
    rng = np.random.default_rng(0)
    base = (rng.random((3, 32, 32, 3)) * 0.9).astype(np.float32)
    shifted = base + 0.1  # MSE 0.01 -> 20 dB
    p = psnr(base, shifted)
    assert p.per_sample == pytest.approx([20.0] * 3, abs=1e-3) and p.mean == pytest.approx(20.0, abs=1e-3)
    assert psnr(base, base).mean == 100.0  # identical: capped
    s = ssim(base, base)
    assert s.per_sample == pytest.approx([1.0] * 3, abs=1e-6)
    clips = rng.random((2, 4, 3, 24, 24)).astype(np.float32) * 0.9
    out = fidelity(clips, clips + 0.1, lpips_net=None)
    assert out["psnr"].per_sample.shape == (2,) and out["psnr"].mean == pytest.approx(20.0, abs=1e-3)
    assert out["ssim"].per_sample.shape == (2,) and set(out) == {"psnr", "ssim"}
    noisy = np.clip(clips + rng.normal(0, 0.05, clips.shape), 0, 1).astype(np.float32)
    whole, batched = ssim(clips, noisy, batch_size=1000), ssim(clips, noisy, batch_size=3)  # frames in batches of 3
    assert batched.per_sample == pytest.approx(whole.per_sample, abs=1e-12) and whole.mean < 0.99
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(base, base[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(base * 2 - 1, base)


def test_inception_without_weights_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.delenv(feats.INCEPTION_ENV, raising=False)
    with pytest.raises(ValueError) as err:
        feats.inception_features()
    msg = str(err.value)
    assert "torch-fidelity" in msg and feats.INCEPTION_FILE in msg and feats.INCEPTION_ENV in msg
    with pytest.raises(ValueError, match=feats.INCEPTION_FILE):
        feats.resolve_features(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="Unknown feature network"):
        feats.resolve_features("dino")


def test_lpips_and_clip_unavailable_are_clear(sets, monkeypatch, tmp_path):
    a, b, _ = sets
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub: no backbone weights here
    reason = lpips_unavailable_reason("alex")
    assert reason is not None and ("torchvision" in reason or "alexnet" in reason)
    with pytest.raises(ValueError, match="LPIPS"):
        lpips(a[:2], b[:2])
    out = fidelity(a[:2], b[:2])
    assert out["lpips"] == {"available": False, "reason": reason}
    with pytest.raises(ValueError, match="LPIPS"):
        fidelity(a[:2], b[:2], require_lpips=True)
    with pytest.raises(ValueError, match="local CLIP model"):
        clip_score(a[:2], ["x", "y"])
    with pytest.raises(ValueError, match="No CLIP model"):
        clip_score(a[:2], ["x", "y"], model_path=tmp_path)
