"""diffaccel: make diffusers pipelines several times faster, and prove the output stays good.

    pipe = diffaccel.accelerate(pipe, "fast")
    image = pipe(prompt).images[0]
    print(diffaccel.stats(pipe))
    diffaccel.remove(pipe)
"""

from . import attention as _attention  # noqa: F401  (registers the attention methods)
from . import cache as _cache  # noqa: F401  (registers the caching methods)
from . import guidance as _guidance  # noqa: F401  (registers the guidance methods)
from .parallel import handler as _parallel  # noqa: F401  (registers CFG / context parallelism)
from . import sampling as _sampling  # noqa: F401  (registers the sampling methods)
from .api import accelerate, config_of, remove, resolve_config, stats
from .attention import BlockSparseAttentionConfig, SlidingTileAttentionConfig
from .cache import BlockCacheConfig, DeepCacheConfig, DeltaDiTConfig, LearnedCacheConfig, TeaCacheConfig
from .config import AccelConfig, MethodConfig, available_methods
from .parallel.config import ParallelConfig
from .guidance import AdaptiveGuidanceConfig, IntervalGuidanceConfig, LinearGuidanceConfig, fit_linear_guidance
from .presets import PRESETS, preset
from .sampling import BottleneckConfig, DistilledConfig

__version__ = "0.1.0"

__all__ = [
    "AccelConfig",
    "AdaptiveGuidanceConfig",
    "BlockCacheConfig",
    "BlockSparseAttentionConfig",
    "BottleneckConfig",
    "DistilledConfig",
    "DeepCacheConfig",
    "DeltaDiTConfig",
    "IntervalGuidanceConfig",
    "LearnedCacheConfig",
    "LinearGuidanceConfig",
    "MethodConfig",
    "PRESETS",
    "ParallelConfig",
    "SlidingTileAttentionConfig",
    "TeaCacheConfig",
    "accelerate",
    "available_methods",
    "config_of",
    "fit_linear_guidance",
    "preset",
    "remove",
    "resolve_config",
    "stats",
]
