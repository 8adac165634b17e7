"""Few-step distilled sampling: a student made by ``diffaccel distill`` run through ``accelerate``.

``accelerate(pipe, sampling=DistilledConfig(student=DIR))`` puts the student into the teacher's
pipeline (a LoRA student is fused; the layers it overwrites are kept on the CPU), swaps in the student's
scheduler on its trailing timesteps, and runs every call in the student's steps at guidance 1, its CFG
being baked in (a guidance-distilled Flux student at the scale it was distilled at, which is the model's
input); a student with a guidance-scale embedding takes the call's ``guidance_scale`` as the
scale it embeds. ``remove`` restores the teacher bit for bit. A call at a size other than those the
student was distilled at runs it all the same, with a warning: the reference image model's 64 px LCD
student lost 6.7 points of adherence at 128 px (4 steps against the teacher's 20 with CFG). The "turbo"
preset runs a student distilled at both of the teacher's sizes (``presets.TURBO_STUDENTS``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffaccel.config import MethodConfig, check_int, register_config
from diffaccel.registry import AccelTarget, register_method

from .wrapper import base_class, call_kwargs, call_subclass, wrap_pipeline_call

logger = logging.getLogger("diffaccel")

STATE_ATTRIBUTE = "_diffaccel_distilled"  # on the runtime: the ``DistilledState`` of this acceleration


@dataclass
class DistilledState:
    """What one acceleration with a student keeps: its card, the holder of the running call's generator
    (read by the student scheduler's ``step``), and the notices already logged."""

    card: Any
    feed: dict
    told: set = field(default_factory=set)


def _feed_call_generator(scheduler: Any) -> dict:
    """Make ``scheduler.step`` draw its re-noising from the running call's generator (diffusers pipelines
    pass theirs only to the initial latents, so a student's fresh noise would come from the global RNG and
    a seeded call would not repeat). Returns the holder the call fills in."""
    import functools
    import inspect

    feed: dict = {"generator": None}
    step = scheduler.step
    if "generator" not in inspect.signature(step).parameters:
        return feed

    def step_with_generator(*args, **kwargs):
        if kwargs.get("generator") is None and feed["generator"] is not None:
            kwargs["generator"] = feed["generator"]
        return step(*args, **kwargs)

    scheduler.step = functools.update_wrapper(step_with_generator, step)
    return feed


_SEEDED: dict[type, type] = {}


def seed_renoising_from_calls(pipe: Any) -> None:
    """For a pipeline turned into its student for good (``load_student``): every call's ``generator`` also
    seeds the scheduler's re-noising between steps, as under ``accelerate``, so a seeded call repeats and
    gives what the removable path gives. The object gets a subclass of its class (same name) whose
    ``__call__`` fills the feed; later accelerations wrap on top of it."""
    feed = _feed_call_generator(pipe.scheduler)
    cls = type(pipe)
    if cls not in _SEEDED:
        _SEEDED[cls] = call_subclass(cls, _generator_feeding_call)
    pipe._diffaccel_generator_feed = feed
    pipe.__class__ = _SEEDED[cls]


def _generator_feeding_call(original_call):
    """``__call__`` that hands the call's ``generator`` to the object's feed for the call's duration."""

    def __call__(self, *args, **kwargs):
        holder = getattr(self, "_diffaccel_generator_feed", None)
        if holder is None:
            return original_call(self, *args, **kwargs)
        holder["generator"] = call_kwargs(original_call, args, kwargs).get("generator")
        try:
            return original_call(self, *args, **kwargs)
        finally:
            holder["generator"] = None

    return __call__


@register_config
@dataclass(frozen=True)
class DistilledConfig(MethodConfig):
    """Sample with a distilled student of the pipeline's model.

    Args:
        student: a folder written by ``diffaccel distill`` (student.json + weights), or the name of a
            shipped reference student ("image-lcd").
        steps: evaluations per call; None: the student's own default. Either way it replaces the call's
            ``num_inference_steps``: a student is made for few steps, and 20 steps of it cost 20 evaluations.
    """

    slot = "sampling"
    method = "distilled"

    student: str = ""
    steps: int | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.student, (str, Path)) or not str(self.student):
            raise ValueError(f"{name}.student is empty: give the folder of a student made by `diffaccel distill`, "
                             f"or a shipped reference student's name (e.g. 'image-lcd').")
        object.__setattr__(self, "student", str(self.student))
        if self.steps is not None:
            check_int(name, "steps", self.steps, minimum=1)


def student_folder(student: str) -> Path:
    """The folder of ``student``: a shipped reference student's name, or a path."""
    from diffaccel.pipelines import reference

    if student in reference.STUDENTS:
        return reference.path(student)
    folder = Path(student)
    if not folder.is_dir():
        raise ValueError(f"sampling='distilled': {student!r} is neither a student folder nor a reference student "
                         f"({', '.join(reference.STUDENTS)}).")
    return folder


@register_method(DistilledConfig)
class DistilledHandler:
    def validate(self, config: DistilledConfig, target: AccelTarget) -> None:
        from diffaccel.distill.student import check_student

        pipe = target.pipe
        name = base_class(pipe).__name__
        denoiser = target.denoiser
        if not (hasattr(pipe, "transformer") or hasattr(pipe, "unet")):
            raise ValueError(f"sampling='distilled' cannot serve {name}: students are distilled transformers or UNets, "
                             f"and this pipeline has neither.")
        check_student(pipe, student_folder(config.student), pipeline_name=name)
        if getattr(denoiser, "peft_config", None):
            raise ValueError(f"sampling='distilled': {name}'s denoiser already holds LoRA adapters "
                             f"({', '.join(denoiser.peft_config)}); fuse or unload them before adding a student.")

    def apply(self, config: DistilledConfig, target: AccelTarget, runtime) -> None:
        from diffaccel.distill.student import check_student, install_student_weights, student_scheduler

        guidance = runtime.config.guidance
        if guidance is not None:
            raise ValueError(f"guidance={guidance.method!r} has nothing to act on with sampling='distilled': a student "
                             f"runs at guidance 1, its CFG baked in. Drop one of the two.")
        pipe = target.pipe
        folder = student_folder(config.student)
        card = check_student(pipe, folder, pipeline_name=base_class(pipe).__name__)
        teacher_scheduler = pipe.scheduler
        pipe.scheduler = student_scheduler(teacher_scheduler, card)
        setattr(runtime, STATE_ATTRIBUTE, DistilledState(card, _feed_call_generator(pipe.scheduler)))

        def restore_scheduler() -> None:
            pipe.scheduler = teacher_scheduler

        runtime.add_cleanup(restore_scheduler)
        runtime.add_cleanup(install_student_weights(pipe, folder, card, keep_original=True))
        wrap_pipeline_call(pipe, runtime.add_cleanup)
        logger.info("diffaccel: sampling with the %s student in %s: %d steps per call at guidance 1 (CFG %.1f baked in)",
                    card.method, folder, config.steps or card.default_steps, card.guidance_scale)

    def call(self, pipe, original_call, config: DistilledConfig, args: tuple, kwargs: dict):
        from diffaccel.distill.student import call_guidance

        runtime = pipe._diffaccel_runtime
        state: DistilledState = getattr(runtime, STATE_ATTRIBUTE)
        card, told = state.card, state.told
        kwargs = call_kwargs(original_call, args, kwargs)
        steps = config.steps or card.default_steps
        asked = (kwargs.get("num_inference_steps"), kwargs.get("guidance_scale"))
        kwargs["num_inference_steps"] = steps
        kwargs["guidance_scale"] = call_guidance(card)
        if card.guidance_embedding:  # the asked CFG scale goes into the embedding: still one evaluation a step
            from diffaccel.distill.guidance_embedding import check_scale, guidance_hook

            scale = card.guidance_scale if asked[1] is None else check_scale(asked[1], card.guidance_range())
            from diffaccel.api import find_denoiser

            guidance_hook(find_denoiser(pipe)).scale = scale
        size = (kwargs.get("height"), kwargs.get("width"))
        if None not in size and not card.trained_at(*size) and ("size", *size) not in told:
            told.add(("size", *size))
            trained = " and ".join(f"{s}x{s}" for s in card.sizes) if card.sizes else f"{card.height}x{card.width}"
            logger.warning("diffaccel: the student was distilled at %s; this %dx%d call runs it outside its "
                           "training sizes (expect lower quality)", trained, *size)
        if ("call", *asked) not in told:
            told.add(("call", *asked))
            if asked[1] is not None and asked[1] not in (1.0, card.guidance_scale) and not card.guidance_embedding:
                logger.warning("diffaccel: the student bakes in CFG %.1f; guidance_scale=%s cannot be honoured",
                               card.guidance_scale, asked[1])
            if asked[0] is not None and asked[0] != steps:
                logger.info("diffaccel: the student runs %d steps at guidance 1 in place of num_inference_steps=%s",
                            steps, asked[0])
        feed = state.feed
        feed["generator"] = kwargs.get("generator")
        try:
            output = original_call(pipe, **kwargs)
        finally:
            feed["generator"] = None
        runtime.count("distilled_calls", 1)  # after the call: its start resets the call's counters
        return output
