"""VBench-style video dimensions, computed offline (no downloaded networks).

Each dimension follows VBench 1.0's published definition (Vchitect/VBench, vbench/*.py; summary in
shared/methods/evaluation.md §3); where VBench needs a pretrained network that cannot ship, the
stand-in is named in the result's ``backend`` — the numbers are *not* comparable with published
VBench scores, only with each other under the same backend and feature network.

* temporal_flickering — exact VBench formula: 1 − mean |F_t − F_{t+1}| (pixels in [0, 1]); a static
  clip scores 1.0. VBench scores only clips that pass its RAFT static filter; here that filter is
  off by default (``static_only=True`` applies the same rule with our flow backend).
* motion_smoothness — VBench drops the odd frames, re-interpolates them with AMT-S from their even
  neighbours and scores 1 − MAE. Offline: linear interpolation (F_{i−1} + F_{i+1}) / 2; a static clip
  (or one whose pixels change linearly in time) scores 1.0.
* dynamic_degree — VBench: RAFT flow per consecutive pair, per pair the mean of the top 5% flow
  magnitudes; a clip is dynamic if at least round(4·T/16) pairs exceed 6·min(H, W)/256 px. Same
  statistic and thresholds here, flow from OpenCV Farneback when ``cv2`` imports, else exhaustive
  block matching in torch (integer displacements up to ``SEARCH_RADIUS`` px at <= 128 px).
* subject_consistency / background_consistency — VBench: per frame t >= 1,
  (max(0, cos(f_{t−1}, f_t)) + max(0, cos(f_0, f_t))) / 2 with DINO (subject) / CLIP (background)
  features. Offline both use a named feature network (default: the shipped image judge, so under the
  default the two dimensions coincide; pass different ``features`` to separate them).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .features import feature_name, resolve_features, to_clips

DIMENSIONS = (
    "temporal_flickering", "motion_smoothness", "dynamic_degree", "subject_consistency", "background_consistency",
)
FLOW_BACKENDS = ("auto", "farneback", "block-matching")
SEARCH_RADIUS = 8  # block matching: max displacement (px) at the working resolution
BLOCK = 7  # block matching: window side (px)
WORK_RES = 128  # block matching runs at min side <= this (area downsampling), magnitudes scaled back
TOP_FRACTION = 0.05  # VBench: mean of the top 5% flow magnitudes per frame pair


@dataclass(frozen=True)
class VideoScore:
    """One dimension over a set of clips: per-clip scores, their mean, and how they were computed."""

    dimension: str
    per_clip: np.ndarray
    mean: float
    backend: str
    feature: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_clip"] = [float(v) for v in self.per_clip]
        return out


def _score(dimension: str, per_clip: np.ndarray, backend: str, feature: str | None = None, **params) -> VideoScore:
    per_clip = np.asarray(per_clip, dtype=np.float64)
    valid = per_clip[~np.isnan(per_clip)]
    mean = float(valid.mean()) if len(valid) else float("nan")
    return VideoScore(dimension, per_clip, mean, backend, feature, params)


def _clips(clips, min_frames: int, dimension: str) -> torch.Tensor:
    x = to_clips(clips, "clips")
    if x.shape[1] < min_frames:
        raise ValueError(f"{dimension} needs clips of at least {min_frames} frames, got {x.shape[1]}.")
    return x


# ------------------------------------------------------------------------------------------ pixels


def temporal_flickering(clips, static_only: bool = False, flow_backend: str = "auto") -> VideoScore:
    """1 − mean |F_t − F_{t+1}| per clip (VBench's formula on [0, 1] pixels; static clip = 1.0).

    ``static_only``: clips that fail VBench's static filter (top-5% flow > 3·min(H, W)/256 px in more
    than round(2·T/16) pairs) get NaN and are left out of the mean, as VBench leaves them out.
    """
    x = _clips(clips, 2, "temporal_flickering")
    per_clip = (x[:, 1:] - x[:, :-1]).abs().flatten(1).mean(1).double()
    scores = (1.0 - per_clip).numpy()
    backend = "pixel-mae (VBench formula; static filter off)"
    params: dict[str, Any] = {}
    if static_only:
        flow, flow_name = _pair_magnitudes(x, flow_backend)
        static = ~_exceeds(flow, x.shape[1], x.shape[-2:], thres_scale=3.0, count_scale=2.0, strict=True)
        scores = np.where(static, scores, np.nan)
        backend = f"pixel-mae (VBench formula; static filter: {flow_name})"
        params["static"] = static.tolist()
    return _score("temporal_flickering", scores, backend, **params)


def motion_smoothness(clips) -> VideoScore:
    """1 − mean |(F_{i−1} + F_{i+1}) / 2 − F_i| over odd i (VBench's protocol with linear interpolation
    in place of AMT-S; a static or pixel-wise linear clip scores 1.0)."""
    x = _clips(clips, 3, "motion_smoothness")
    odd = torch.arange(1, x.shape[1] - 1, 2)
    predicted = 0.5 * (x[:, odd - 1] + x[:, odd + 1])
    err = (predicted - x[:, odd]).abs().flatten(1).mean(1).double()
    return _score("motion_smoothness", (1.0 - err).numpy(), "linear-interpolation (VBench: AMT-S)",
                  frames_predicted=odd.tolist())


# ------------------------------------------------------------------------------------------ flow


def flow_backend(requested: str = "auto") -> str:
    """The flow backend ``requested`` resolves to; ValueError if it cannot run here."""
    if requested not in FLOW_BACKENDS:
        raise ValueError(f"flow_backend must be one of {FLOW_BACKENDS}, got {requested!r}.")
    has_cv2 = importlib.util.find_spec("cv2") is not None
    if requested == "farneback" and not has_cv2:
        raise ValueError("flow_backend='farneback' needs OpenCV: `pip install opencv-python-headless`.")
    if requested == "auto":
        return "farneback" if has_cv2 else "block-matching"
    return requested


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., H, W) luma (BT.601)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)
    return (x * w).sum(-3)


def _block_matching(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel flow magnitude (M, H, W) from a to b (grey (M, H, W) in [0, 1]): for each pixel the
    integer displacement within ±SEARCH_RADIUS minimising the mean |a − b(shifted)| over a BLOCK window
    (ties go to the smallest displacement, so flat regions read as still)."""
    r, pad = SEARCH_RADIUS, BLOCK // 2
    bp = F.pad(b.unsqueeze(1), (r, r, r, r), mode="replicate").squeeze(1)
    h, w = a.shape[-2:]
    best = torch.full_like(a, float("inf"))
    best_mag = torch.zeros_like(a)
    offsets = sorted(((dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)), key=lambda d: d[0] ** 2 + d[1] ** 2)
    for dy, dx in offsets:
        shifted = bp[:, r + dy : r + dy + h, r + dx : r + dx + w]
        cost = F.avg_pool2d((a - shifted).abs().unsqueeze(1), BLOCK, stride=1, padding=pad, count_include_pad=False).squeeze(1)
        better = cost < best - 1e-6
        best = torch.where(better, cost, best)
        best_mag = torch.where(better, torch.tensor(float(np.hypot(dy, dx))), best_mag)
    return best_mag


def _farneback(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import cv2

    out = []
    for fa, fb in zip((a * 255).round().byte().numpy(), (b * 255).round().byte().numpy()):
        flow = cv2.calcOpticalFlowFarneback(fa, fb, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        out.append(np.hypot(flow[..., 0], flow[..., 1]))
    return torch.from_numpy(np.stack(out)).float()


def _pair_magnitudes(x: torch.Tensor, requested: str) -> tuple[np.ndarray, str]:
    """(N, F−1) per consecutive pair: mean of the top 5% flow magnitudes (px at input resolution),
    and the backend's name."""
    backend = flow_backend(requested)
    n, f = x.shape[:2]
    g = _gray(x.flatten(0, 1))  # (N*F, H, W)
    scale = 1.0
    if backend == "block-matching" and min(g.shape[-2:]) > WORK_RES:
        scale = WORK_RES / min(g.shape[-2:])
        size = (max(1, round(g.shape[-2] * scale)), max(1, round(g.shape[-1] * scale)))
        g = F.adaptive_avg_pool2d(g.unsqueeze(1), size).squeeze(1)
    g = g.view(n, f, *g.shape[-2:])
    a, b = g[:, :-1].flatten(0, 1), g[:, 1:].flatten(0, 1)
    mag = (_farneback(a, b) if backend == "farneback" else _block_matching(a, b)) / scale
    k = max(1, int(mag[0].numel() * TOP_FRACTION))
    top = mag.flatten(1).topk(k, dim=1).values.mean(1).view(n, f - 1).double().numpy()
    name = "opencv-farneback" if backend == "farneback" else f"block-matching (torch, ±{SEARCH_RADIUS}px, {BLOCK}px blocks)"
    return top, name


def _exceeds(flow: np.ndarray, frames: int, hw, thres_scale: float, count_scale: float, strict: bool = False) -> np.ndarray:
    """VBench's rule: pairs above thres_scale·min(H, W)/256 counted against round(count_scale·T/16)
    (at least 1); >= count (dynamic) or, with ``strict``, > count (fails the static filter)."""
    thres = thres_scale * min(hw) / 256.0
    count = max(1, round(count_scale * frames / 16.0))
    above = (flow > thres).sum(1)
    return above > count if strict else above >= count


def dynamic_degree(clips, flow_backend: str = "auto", fps: float | None = None) -> VideoScore:
    """1.0 per clip judged dynamic, else 0.0 (mean = VBench's dynamic degree). ``fps``: subsample to
    ~8 fps first, as VBench does (interval round(fps / 8)); None keeps every frame."""
    x = _clips(clips, 2, "dynamic_degree")
    interval = 1 if fps is None else max(1, round(fps / 8.0))
    x = x[:, ::interval]
    if x.shape[1] < 2:
        raise ValueError(f"dynamic_degree: fewer than 2 frames left after subsampling to ~8 fps (interval {interval}).")
    flow, flow_name = _pair_magnitudes(x, flow_backend)
    dynamic = _exceeds(flow, x.shape[1], x.shape[-2:], thres_scale=6.0, count_scale=4.0)
    return _score(
        "dynamic_degree", dynamic.astype(np.float64), f"{flow_name} (VBench: RAFT-things)",
        flow_top5=flow.round(4).tolist(), threshold_px=6.0 * min(x.shape[-2:]) / 256.0,
        count=max(1, round(4.0 * x.shape[1] / 16.0)), frame_interval=interval,
    )


# ------------------------------------------------------------------------------------------ features


def _consistency(dimension: str, clips, features, batch_size: int) -> VideoScore:
    x = _clips(clips, 2, dimension)
    module = resolve_features(features)
    if getattr(module, "kind", None) == "video":
        raise ValueError(f"{dimension} needs a per-frame (image) feature network, got the clip judge; use features='judge'.")
    n, f = x.shape[:2]
    frames = x.flatten(0, 1)
    with torch.no_grad():
        feats = torch.cat([module(frames[i : i + batch_size]).reshape(len(frames[i : i + batch_size]), -1)
                           for i in range(0, len(frames), batch_size)])
    feats = F.normalize(feats.double(), dim=-1).view(n, f, -1)
    to_prev = (feats[:, 1:] * feats[:, :-1]).sum(-1).clamp(min=0)
    to_first = (feats[:, 1:] * feats[:, :1]).sum(-1).clamp(min=0)
    per_clip = ((to_prev + to_first) / 2).mean(1).numpy()
    reference = "DINO ViT-B/16" if dimension == "subject_consistency" else "CLIP ViT-B/32"
    return _score(dimension, per_clip, f"cosine to previous and first frame (VBench: {reference})", feature_name(module))


def subject_consistency(clips, features="judge", batch_size: int = 128) -> VideoScore:
    """Mean over t >= 1 of (max(0, cos(f_{t−1}, f_t)) + max(0, cos(f_0, f_t))) / 2; static clip = 1.0."""
    return _consistency("subject_consistency", clips, features, batch_size)


def background_consistency(clips, features="judge", batch_size: int = 128) -> VideoScore:
    """VBench's background formula (same as subject's); by default the same network, so equal numbers."""
    return _consistency("background_consistency", clips, features, batch_size)


# ------------------------------------------------------------------------------------------ all


def evaluate_videos(
    clips, captions: Sequence[str] | None = None, dimensions: Sequence[str] = DIMENSIONS,
    features="judge", flow_backend: str = "auto", fps: float | None = None,
) -> dict[str, VideoScore]:
    """Every requested dimension, plus ``judge_adherence`` (clip judge: shape, color, size, direction,
    speed, background; per-attribute rates in its params) when captions are given."""
    unknown = [d for d in dimensions if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"Unknown video dimensions {unknown}; choose from {DIMENSIONS}.")
    x = to_clips(clips, "clips")
    features = resolve_features(features)  # once, shared by both consistency dimensions
    runners = {
        "temporal_flickering": lambda: temporal_flickering(x, flow_backend=flow_backend),
        "motion_smoothness": lambda: motion_smoothness(x),
        "dynamic_degree": lambda: dynamic_degree(x, flow_backend=flow_backend, fps=fps),
        "subject_consistency": lambda: subject_consistency(x, features),
        "background_consistency": lambda: background_consistency(x, features),
    }
    out = {d: runners[d]() for d in dimensions}
    if captions is not None:
        from .metrics import judge_adherence

        adh = judge_adherence(x, captions, kind="video")
        out["judge_adherence"] = VideoScore("judge_adherence", adh.per_sample, adh.mean, "clip judge", adh.backend, adh.params)
    return out
