"""Named recipes. They grow as methods land; "off" installs the runtime and changes nothing."""

from __future__ import annotations

from .cache import BlockCacheConfig
from .config import AccelConfig

PRESETS: dict[str, AccelConfig] = {
    "off": AccelConfig(),
    # Conservative: a tight threshold and a forced compute at least every other step.
    "safe": AccelConfig(cache=BlockCacheConfig(threshold=0.05, warmup_steps=3, max_consecutive=1)),
    "fast": AccelConfig(cache=BlockCacheConfig(threshold=0.12, warmup_steps=2, max_consecutive=3)),
    "turbo": AccelConfig(cache=BlockCacheConfig(threshold=0.25, warmup_steps=1, max_consecutive=5)),
}


def preset(name: str) -> AccelConfig:
    """The preset called ``name``; a ValueError listing the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(map(repr, PRESETS))}.") from None
