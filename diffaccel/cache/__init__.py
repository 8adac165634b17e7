"""Feature caching methods."""

from .block_cache import BLOCK_CACHE_HOOK, BlockCacheConfig, BlockCacheState, relative_l1

__all__ = ["BLOCK_CACHE_HOOK", "BlockCacheConfig", "BlockCacheState", "relative_l1"]
