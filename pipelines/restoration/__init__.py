"""Restoration pipelines (installed as ``diffaccel.pipelines.restoration``): ResShift super-resolution.

* ``ResShiftPipeline`` — few-step x2 super-resolution of images and video frames (``pipeline``).
* ``models`` — the small pixel-space UNet and its call; ``data`` — degradations, training/test data;
  ``baselines`` — the flow-matching and regression baselines, bicubic and Lanczos.
"""

from .pipeline import ResShiftPipeline, ResShiftPipelineOutput

__all__ = ["ResShiftPipeline", "ResShiftPipelineOutput"]
