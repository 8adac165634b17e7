"""Embedded reference models: procedural scenes, two small trained pipelines, and the judge.

    pipe = diffaccel.pipelines.reference.load("image")   # a CogView4Pipeline trained here
    pipe = diffaccel.pipelines.reference.load("video")   # a WanPipeline trained here
    pipe = diffaccel.pipelines.reference.load("upscale")   # x2 super-resolution, ResShift T=4 ("upscale15": T=15)
    pipe = diffaccel.pipelines.reference.load("image-lcd") # the image model's 4-step LCD student (LoRA)
    pipe = diffaccel.pipelines.reference.load("image-rglcd")  # its 2-step reward-guided (RG-LCD) student
    pipe = diffaccel.pipelines.reference.load("image-tdm")  # its 4-step TDM student (deterministic sampling)
    pipe = diffaccel.pipelines.reference.load("image-tdm-ms")  # the same, taught 128 px too: what "turbo" runs
    diffaccel.pipelines.reference.info("image")          # resolutions, default steps/guidance, ...

They are ordinary diffusers pipelines (``DiffusionPipeline.from_pretrained(path("image"))`` works
too), shipped in the repository so nothing is downloaded; ``scripts/train_reference.py`` retrains
them from a seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).parent / "weights"

# Facts of each model that callers need to use it as trained (the pipeline's own call defaults
# are the upstream model's, e.g. Wan's 480x832x81): sizes, steps, guidance.
INFO: dict[str, dict[str, Any]] = {
    "image": {
        "pipeline": "CogView4Pipeline",
        "train_resolutions": [64, 128],
        "default_resolution": 64,
        "default_steps": 20,
        "default_guidance": 4.0,
        "is_video": False,
    },
    "video": {
        "pipeline": "WanPipeline",
        "train_resolutions": [64],
        "default_resolution": 64,
        "frames": 9,
        "default_steps": 20,
        "default_guidance": 4.0,
        "is_video": True,
    },
}
NAMES = tuple(INFO)  # the generative models

# The x2 super-resolution models (ResShiftPipeline, 64 -> 128 px, pixel space; scripts/train_resshift.py).
UPSCALERS: dict[str, dict[str, Any]] = {
    "upscale": {
        "pipeline": "ResShiftPipeline",
        "scale_factor": 2,
        "train_resolutions": [128],
        "default_steps": 4,
        "schedule": "ResShift journal settings: T=4, kappa=2, p=0.3, min_noise_level=0.2",
        "is_video": False,
    },
    "upscale15": {
        "pipeline": "ResShiftPipeline",
        "scale_factor": 2,
        "train_resolutions": [128],
        "default_steps": 15,
        "schedule": "ResShift NeurIPS settings: T=15, kappa=2, p=0.3, min_noise_level=0.04",
        "is_video": False,
    },
}


# Few-step students of the generative models (``diffaccel distill``; a student folder holds student.json
# and its weights). Their facts are the teacher's, with the student's steps and guidance 1 (CFG baked in).
STUDENTS: dict[str, str] = {"image-lcd": "image", "image-rglcd": "image", "image-tdm": "image", "image-tdm-ms": "image"}
GENERATORS = NAMES + tuple(STUDENTS)  # what `diffaccel generate --model NAME` can run


def _check(name: str) -> None:
    if name not in INFO and name not in UPSCALERS and name not in STUDENTS:
        raise ValueError(f"Unknown reference model {name!r}; choose from {list(GENERATORS) + list(UPSCALERS)}.")


def path(name: str) -> Path:
    """Folder of the shipped pipeline (loadable with ``DiffusionPipeline.from_pretrained``)."""
    _check(name)
    folder = WEIGHTS / name
    if name in STUDENTS:
        if not (folder / "student.json").is_file():
            raise ValueError(f"The reference student {name} is not in this checkout ({folder}); train it with: "
                             f"python scripts/train_distill.py {name}")
        return folder
    if not (folder / "model_index.json").is_file():
        script = (f"scripts/train_resshift.py {'resshift4' if name == 'upscale' else 'resshift15'}"
                  if name in UPSCALERS else f"scripts/train_reference.py {name}")
        raise ValueError(f"The reference {name} model is not in this checkout ({folder}); train it with: python {script}")
    return folder


def name_of(pipe: Any) -> str | None:
    """The embedded generative model ``pipe`` was loaded from ("image", "video"; also through
    ``DiffusionPipeline.from_pretrained(path(name))``), or None for any other pipeline."""
    source = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not isinstance(source, (str, Path)) or not str(source):
        return None
    try:
        resolved = Path(source).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return next((name for name in NAMES if resolved == (WEIGHTS / name).resolve()), None)


def info(name: str) -> dict[str, Any]:
    """The model's facts: train_resolutions, default_steps, default_guidance, frames (video), training record."""
    _check(name)
    if name in STUDENTS:
        from diffaccel.distill.student import StudentCard

        card = StudentCard.load(path(name))
        facts = dict(INFO[STUDENTS[name]])
        facts.update(default_steps=card.default_steps, default_guidance=1.0, teacher=STUDENTS[name],
                     method=card.method, guidance_baked=card.guidance_scale, training=card.training)
        return facts
    facts = dict(INFO[name] if name in INFO else UPSCALERS[name])
    state = WEIGHTS / name / ("unet" if name in UPSCALERS else "transformer") / "training_state.json"
    if state.is_file():
        facts["training"] = json.loads(state.read_text())
    return facts


def call_defaults(name: str) -> dict[str, Any]:
    """The keyword arguments that run the model as trained (size, frames, steps, guidance)."""
    facts = info(name)
    if name in UPSCALERS:
        return {"num_inference_steps": facts["default_steps"]}
    kwargs = {
        "height": facts["default_resolution"],
        "width": facts["default_resolution"],
        "num_inference_steps": facts["default_steps"],
        "guidance_scale": facts["default_guidance"],
    }
    if facts["is_video"]:
        kwargs["num_frames"] = facts["frames"]
    return kwargs


def load(name: str = "image", device: str = "cpu", dtype=None):
    """The shipped reference pipeline, in float32 on CPU unless told otherwise ("upscale" /
    "upscale15": a ``diffaccel.pipelines.restoration.ResShiftPipeline``)."""
    import torch
    from diffusers import DiffusionPipeline

    if name in UPSCALERS:
        from diffaccel.pipelines.restoration import ResShiftPipeline

        pipe = ResShiftPipeline.from_pretrained(path(name), dtype=dtype or torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    if name in STUDENTS:
        from diffaccel.distill.student import load_student

        return load_student(load(STUDENTS[name], device=device, dtype=dtype), path(name))

    from diffusers.utils import logging as diffusers_logging

    # The image pipeline ships a UMT5 text encoder where CogView4 names GLM (any encoder returning
    # hidden states serves it); diffusers warns about the type on every load, which says nothing here.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe = DiffusionPipeline.from_pretrained(path(name), dtype=dtype or torch.float32)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
