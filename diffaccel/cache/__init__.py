"""Feature caching methods."""

from .block_cache import BLOCK_CACHE_HOOK, BlockCacheConfig, BlockCacheState, relative_l1
from .deep_cache import DEEP_CACHE_HOOK, DeepCacheConfig, DeepCacheState
from .delta_dit import DELTA_DIT_HOOK, DeltaDiTConfig, DeltaDiTState
from .learned import LEARNED_CACHE_HOOK, LearnedCacheConfig, train_schedule
from .teacache import TEACACHE_HOOK, TeaCacheConfig, TeaCacheState, calibrate_teacache, calibrate_teacache_experts

__all__ = [
    "BLOCK_CACHE_HOOK",
    "DEEP_CACHE_HOOK",
    "DELTA_DIT_HOOK",
    "BlockCacheConfig",
    "BlockCacheState",
    "DeepCacheConfig",
    "DeepCacheState",
    "DeltaDiTConfig",
    "DeltaDiTState",
    "LEARNED_CACHE_HOOK",
    "LearnedCacheConfig",
    "TEACACHE_HOOK",
    "train_schedule",
    "TeaCacheConfig",
    "TeaCacheState",
    "calibrate_teacache",
    "calibrate_teacache_experts",
    "relative_l1",
]
