"""Adaptive guidance: AG, LinearAG and interval guidance (skip the unconditional CFG branch)."""

from .adaptive import (
    ESTIMATED,
    GUIDANCE_HOOK,
    SKIPPED,
    AdaptiveGuidanceConfig,
    GuidanceState,
    IntervalGuidanceConfig,
    LinearGuidanceConfig,
)
from .tune import fit_linear_guidance, pick_threshold, record_guidance

__all__ = [
    "ESTIMATED",
    "GUIDANCE_HOOK",
    "SKIPPED",
    "AdaptiveGuidanceConfig",
    "GuidanceState",
    "IntervalGuidanceConfig",
    "LinearGuidanceConfig",
    "fit_linear_guidance",
    "pick_threshold",
    "record_guidance",
]
