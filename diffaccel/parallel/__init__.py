"""Multi-device and multi-node inference: CFG / context parallelism and the render farm (``diffaccel farm``)."""

from .config import CfgParallelConfig, ContextParallelDegrees, ParallelConfig
from .farm import EngineOptions, FarmJob, Summary, make_job, read_prompt_lines, run_farm
from .config import CfgParallelConfig, ContextParallelDegrees, ParallelConfig  # noqa: E402
from .handler import ParallelHandler  # noqa: E402
