"""diffaccel: make diffusers pipelines several times faster, and prove the output stays good.

    pipe = diffaccel.accelerate(pipe, "fast")
    image = pipe(prompt).images[0]
    print(diffaccel.stats(pipe))
    diffaccel.remove(pipe)
"""

from . import cache as _cache  # noqa: F401  (registers the caching methods)
from .api import accelerate, config_of, remove, resolve_config, stats
from .cache import BlockCacheConfig, DeepCacheConfig, DeltaDiTConfig, TeaCacheConfig
from .config import AccelConfig, MethodConfig, available_methods
from .presets import PRESETS, preset

__version__ = "0.1.0"

__all__ = [
    "AccelConfig",
    "BlockCacheConfig",
    "DeepCacheConfig",
    "DeltaDiTConfig",
    "MethodConfig",
    "PRESETS",
    "TeaCacheConfig",
    "accelerate",
    "available_methods",
    "config_of",
    "preset",
    "remove",
    "resolve_config",
    "stats",
]
