"""Methods that change the sampling loop itself: pipeline wrappers around the diffusers pipeline."""

from .bottleneck import BottleneckConfig
from .distilled import DistilledConfig
from .resshift import ResShiftScheduler, ResShiftSchedulerOutput

__all__ = ["BottleneckConfig", "DistilledConfig", "ResShiftScheduler", "ResShiftSchedulerOutput"]
