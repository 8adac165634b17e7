"""Distilling at several sizes, and starting a student from another one.

A student distilled at one size is a student of that size: the reference image model's 64 px LCD student
lost 6.7 points of adherence at 128 px, its teacher's other training size. A config with ``sizes`` trains
at each in turn, one per iteration (iteration i at ``sizes[i % n]``), so a resumed run sees the sizes an
uninterrupted one would. Each size has its own view of the teacher (its latent shape and its shifted noise
levels: CogView4 shifts the schedule by the token count) and its own scene source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .data import DataSource, ProceduralClips, ProceduralScenes, serve_at
from .teacher import FlowTeacher, denoiser_name_of

# Which methods' students can start one another: the same student parametrisation and sampler.
FAMILIES = {"lcd": "consistency", "rg-lcd": "consistency", "tdm": "tdm"}


def trained_sizes(config: Any) -> list[tuple[int, int]]:
    """(height, width) of every size the config trains at, the student's default first."""
    if config.sizes:
        return [(s, s) for s in config.sizes]
    return [(config.height, config.width)]


class SizeCycle:
    """The teacher view and scene source of each training size, chosen by the iteration's number."""

    def __init__(self, teacher: FlowTeacher, config: Any, data: DataSource | None = None) -> None:
        from .teacher import teacher_for

        self.sizes = trained_sizes(config) if config.sizes else [(teacher.height, teacher.width)]
        if data is not None:
            source = data
        else:  # the reference models' own distribution
            source = ProceduralClips(frames=teacher.frames) if teacher.frames else ProceduralScenes()
        own = (teacher.height, teacher.width)
        self.teachers = {size: teacher if size == own else teacher_for(teacher.pipe, *size, teacher.timestep_convention,
                                                                       teacher.frames, teacher.embedded_guidance)
                         for size in self.sizes}
        # every size its own copy of the source, serving images at that size
        self.data = {size: serve_at(source, *size) for size in self.sizes}

    def size_at(self, step: int) -> tuple[int, int]:
        return self.sizes[step % len(self.sizes)]


def resolve_student_folder(student: str | Path) -> Path:
    """A shipped reference student's name, or a folder holding student.json."""
    from diffaccel.pipelines import reference

    if str(student) in reference.STUDENTS:
        return reference.path(str(student))
    folder = Path(student)
    if not (folder / "student.json").is_file():
        raise ValueError(f"init_student={str(student)!r} is neither a student folder (with student.json) nor a shipped "
                         f"reference student ({', '.join(reference.STUDENTS)}).")
    return folder


def warm_start(model: torch.nn.Module, adapter_name: str, config: Any, method: str, pipeline_name: str) -> None:
    """Load the LoRA of ``config.init_student`` into ``model``'s adapter ``adapter_name``, after checking
    that it is a student of the same pipeline class, method family, rank and baked CFG scale."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .student import LORA_WEIGHTS, StudentCard

    folder = resolve_student_folder(config.init_student)
    card = StudentCard.load(folder)
    problems = []
    if card.pipeline != pipeline_name:
        problems.append(f"it is a student of a {card.pipeline}, this teacher is a {pipeline_name}")
    if FAMILIES.get(card.method) != FAMILIES[method]:
        problems.append(f"it was trained by {card.method}, whose student does not sample like a {method} student")
    if card.lora_rank != config.lora_rank:
        problems.append(f"its LoRA rank is {card.lora_rank}, this run's {config.lora_rank}")
    alpha = card.training.get("config", {}).get("lora_alpha")
    if alpha != config.lora_alpha:
        problems.append(f"its lora_alpha is {alpha}, this run's {config.lora_alpha}")
    if card.guidance_scale != config.guidance_scale:
        problems.append(f"it bakes in CFG {card.guidance_scale}, this run {config.guidance_scale}")
    if problems:
        raise ValueError(f"Cannot start from the student in {folder}: " + "; ".join(problems) + ".")
    weights = load_file(str(folder / LORA_WEIGHTS))
    prefix = f"{denoiser_name_of(pipeline_name)}."
    state = {k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    slots = sum(1 for key, _ in model.named_parameters() if f".{adapter_name}." in key)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected or len(state) != slots:
        raise ValueError(f"The LoRA of {folder} does not fit this transformer: {len(state)} tensors for {slots} adapter "
                         f"weights{'; unexpected: ' + ', '.join(unexpected[:3]) if unexpected else ''}.")
