"""Feature caching methods."""

from .block_cache import BLOCK_CACHE_HOOK, BlockCacheConfig, BlockCacheState, relative_l1
from .deep_cache import DEEP_CACHE_HOOK, DeepCacheConfig, DeepCacheState

__all__ = [
    "BLOCK_CACHE_HOOK",
    "DEEP_CACHE_HOOK",
    "BlockCacheConfig",
    "BlockCacheState",
    "DeepCacheConfig",
    "DeepCacheState",
    "relative_l1",
]
