"""Named recipes. They grow as methods land; "off" installs the runtime and changes nothing.

A preset has one recipe per kind of denoiser: transformers get the block residual cache, UNets
(which have no flat block list) get DeepCache at a comparable aggressiveness.
"""

from __future__ import annotations

from .cache import BlockCacheConfig, DeepCacheConfig
from .config import AccelConfig

# Transformers: the block residual cache with the TaylorSeer calibrator. On the reference image model at
# 28 steps (docs/cache_bench_image_28.md) τ 0.1 / 0.2 / 0.3 with the calibrator measured 1.4x / 2.1x /
# 2.9x at 59 / 44 / 32 dB PSNR to the uncached output; the safe recipe also forces a compute every
# other step.
PRESETS: dict[str, AccelConfig] = {
    "off": AccelConfig(),
    "safe": AccelConfig(cache=BlockCacheConfig(threshold=0.1, warmup_steps=3, max_consecutive=1, calibrator="taylorseer")),
    "fast": AccelConfig(cache=BlockCacheConfig(threshold=0.2, warmup_steps=2, max_consecutive=4, calibrator="taylorseer")),
    "turbo": AccelConfig(cache=BlockCacheConfig(threshold=0.3, warmup_steps=2, max_consecutive=None, calibrator="taylorseer")),
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
