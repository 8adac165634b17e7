"""Methods that change the sampling loop itself: pipeline wrappers around the diffusers pipeline."""

from .bottleneck import BottleneckConfig

__all__ = ["BottleneckConfig"]
