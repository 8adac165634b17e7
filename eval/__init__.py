"""Evaluation (installed as ``diffaccel.eval``): metrics, evaluation jobs, reports and plots."""

from .features import (
    INCEPTION_ENV,
    InceptionFeatures,
    JudgeFeatures,
    feature_name,
    inception_features,
    resolve_features,
    to_clips,
    to_images,
)
from .metrics import (
    MetricResult,
    RealStats,
    SampleScores,
    clip_score,
    compare_guard,
    fid,
    fid_from_stats,
    fidelity,
    judge_adherence,
    kid,
    lpips,
    lpips_unavailable_reason,
    psnr,
    real_statistics,
    ssim,
)
from .video import (
    DIMENSIONS,
    VideoScore,
    background_consistency,
    dynamic_degree,
    evaluate_videos,
    flow_backend,
    motion_smoothness,
    subject_consistency,
    temporal_flickering,
)

__all__ = [
    "INCEPTION_ENV", "InceptionFeatures", "JudgeFeatures", "feature_name", "inception_features", "resolve_features",
    "to_clips", "to_images",
    "MetricResult", "RealStats", "SampleScores", "clip_score", "compare_guard", "fid", "fid_from_stats", "fidelity",
    "judge_adherence", "kid", "lpips", "lpips_unavailable_reason", "psnr", "real_statistics", "ssim",
    "DIMENSIONS", "VideoScore", "background_consistency", "dynamic_degree", "evaluate_videos", "flow_backend",
    "motion_smoothness", "subject_consistency", "temporal_flickering",
]
