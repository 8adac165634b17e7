"""Named recipes. They grow as methods land; "off" installs the runtime and changes nothing.

A preset has one recipe per kind of denoiser: transformers get the block residual cache, UNets
(which have no flat block list) get DeepCache at a comparable aggressiveness.
"""

from __future__ import annotations

from .cache import BlockCacheConfig, DeepCacheConfig
from .config import AccelConfig

PRESETS: dict[str, AccelConfig] = {
    "off": AccelConfig(),
    # Conservative: a tight threshold and a forced compute at least every other step.
    "safe": AccelConfig(cache=BlockCacheConfig(threshold=0.05, warmup_steps=3, max_consecutive=1)),
    "fast": AccelConfig(cache=BlockCacheConfig(threshold=0.12, warmup_steps=2, max_consecutive=3)),
    "turbo": AccelConfig(cache=BlockCacheConfig(threshold=0.25, warmup_steps=1, max_consecutive=5)),
}

UNET_PRESETS: dict[str, AccelConfig] = {
    "off": AccelConfig(),
    "safe": AccelConfig(cache=DeepCacheConfig(cache_interval=2)),
    "fast": AccelConfig(cache=DeepCacheConfig(cache_interval=3)),
    "turbo": AccelConfig(cache=DeepCacheConfig(cache_interval=5)),
}


def preset(name: str, unet: bool = False) -> AccelConfig:
    """The preset called ``name`` (its UNet recipe with ``unet=True``); a ValueError listing the presets otherwise."""
    table = UNET_PRESETS if unet else PRESETS
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(map(repr, PRESETS))}.") from None
