"""Named recipes. They grow as methods land; "off" installs the runtime and changes nothing.

A preset has one recipe per kind of denoiser: transformers get the block residual cache, UNets
(which have no flat block list) get DeepCache at a comparable aggressiveness. Every method of a preset is
optional (``AccelConfig.optional``): a pipeline one cannot serve runs without it, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from .cache import BlockCacheConfig, DeepCacheConfig
from .config import AccelConfig
from .guidance import AdaptiveGuidanceConfig
from .sampling import BottleneckConfig, DistilledConfig

logger = logging.getLogger("diffaccel")

# Transformers: the block residual cache with the TaylorSeer calibrator. On the reference image model at
# 28 steps (docs/cache_bench_image_28.md) τ 0.1 / 0.2 / 0.3 with the calibrator measured 1.4x / 2.1x /
# 2.9x at 59 / 44 / 32 dB PSNR to the uncached output; the safe recipe also forces a compute every
# other step.
# Turbo adds bottleneck sampling and AG where they apply: a pipeline the bottleneck cannot serve, or a call
# too small for it, runs without it, with a warning. The bottleneck runs 65% of the call's steps, 1/10/2 of
# 13 at 20, and keeps full resolution below an 8x8 token grid in the half-size stage: the reference image
# model at 64 px would run that stage at 32 px, below both its training sizes, and lost 7.4 points of
# adherence so (docs/bench_turbo_bottleneck_at_64.md) against 2.4 without it. AG runs at the paper's middle
# threshold, 0.994: at 64 px it gave 2.81x at -2.4 points, 0.9975 2.48x at -3.1
# (docs/bench_turbo_threshold_64.md); at 128 px see docs/bench_turbo_128/.
TURBO_BOTTLENECK = BottleneckConfig(
    scales=(1.0, 0.5, 1.0),
    step_fractions=(1 / 13, 10 / 13, 2 / 13),
    strengths=(1.0, 0.8, 0.6),
    steps_ratio=0.65,
    min_stage_tokens=64,
)

PRESETS: dict[str, AccelConfig] = {
    "off": AccelConfig(),
    "safe": AccelConfig(cache=BlockCacheConfig(threshold=0.1, warmup_steps=3, max_consecutive=1, calibrator="taylorseer")),
    "fast": AccelConfig(cache=BlockCacheConfig(threshold=0.2, warmup_steps=2, max_consecutive=4, calibrator="taylorseer")),
    "turbo": AccelConfig(
        cache=BlockCacheConfig(threshold=0.3, warmup_steps=2, max_consecutive=None, calibrator="taylorseer"),
        guidance=AdaptiveGuidanceConfig(),
        sampling=TURBO_BOTTLENECK,
    ),
}

UNET_PRESETS: dict[str, AccelConfig] = {
    "off": AccelConfig(),
    "safe": AccelConfig(cache=DeepCacheConfig(cache_interval=2)),
    "fast": AccelConfig(cache=DeepCacheConfig(cache_interval=3)),
    "turbo": AccelConfig(cache=DeepCacheConfig(cache_interval=5)),
}


def _every_method_optional(table: dict[str, AccelConfig]) -> dict[str, AccelConfig]:
    return {name: dataclasses.replace(c, optional=tuple(m.slot for m in c.methods())) for name, c in table.items()}


PRESETS = _every_method_optional(PRESETS)
UNET_PRESETS = _every_method_optional(UNET_PRESETS)


# The shipped student "turbo" runs on the reference model it was distilled from, in place of the recipe
# above: distilled at both of the teacher's training sizes (64 and 128 px), 4 calls where the recipe makes
# about 20 (README, "Step distillation").
TURBO_STUDENTS: dict[str, str] = {"image": "image-tdm-ms"}


def turbo_student(pipe: Any) -> str | None:
    """The shipped student "turbo" runs on ``pipe``: the pipeline was loaded from a reference model that has
    one, holds no student or LoRA yet, and the student is in this checkout; None otherwise (the recipe)."""
    from diffaccel.distill.student import student_of
    from diffaccel.pipelines import reference

    student = TURBO_STUDENTS.get(reference.name_of(pipe) or "")
    transformer = getattr(pipe, "transformer", None)
    if student is None or student_of(pipe) is not None or getattr(transformer, "peft_config", None):
        return None
    try:
        reference.path(student)
    except ValueError as error:
        logger.warning("diffaccel: turbo runs its recipe, not the %s student: %s", student, error)
        return None
    return student


def preset_for(name: str, pipe: Any, unet: bool = False, overridden: tuple[str, ...] = ()) -> AccelConfig:
    """``preset(name, unet)`` for this pipeline: "turbo" on a reference model with a shipped student
    (``TURBO_STUDENTS``) samples with that student, unless the caller sets the ``overridden`` slot
    "sampling" or "guidance" (a student has no CFG to guide): then it is the recipe, as everywhere."""
    config = preset(name, unet=unet)
    wants_recipe = bool({"sampling", "guidance"} & set(overridden))
    student = turbo_student(pipe) if name == "turbo" and not wants_recipe else None
    if student is None:
        return config
    logger.info("diffaccel: turbo on this reference model samples with its distilled student %s", student)
    return AccelConfig(sampling=DistilledConfig(student=student), optional=("sampling",))


def preset(name: str, unet: bool = False) -> AccelConfig:
    """The preset called ``name`` (its UNet recipe with ``unet=True``); a ValueError listing the presets otherwise.

    Every method of a preset is optional: a pipeline one cannot serve runs without it, with a warning."""
    table = UNET_PRESETS if unet else PRESETS
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(map(repr, PRESETS))}.") from None
