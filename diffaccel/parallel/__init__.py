"""Multi-device and multi-node inference: CFG / context parallelism and the render farm (``diffaccel farm``)."""

from .config import CfgParallelConfig, ContextParallelDegrees, ParallelConfig
from .farm import EngineOptions, FarmJob, Summary, make_job, read_prompt_lines, run_farm
from .handler import ParallelHandler

__all__ = [
    "CfgParallelConfig",
    "ContextParallelDegrees",
    "EngineOptions",
    "FarmJob",
    "ParallelConfig",
    "ParallelHandler",
    "Summary",
    "make_job",
    "read_prompt_lines",
    "run_farm",
]
