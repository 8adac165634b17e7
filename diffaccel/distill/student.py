"""A distilled student on disk, and putting it into a pipeline.

A student folder holds ``student.json`` (a ``StudentCard``: method, teacher, default steps, the CFG scale
baked in) and either ``pytorch_lora_weights.safetensors`` (a LoRA in the diffusers format, loadable with
the pipeline's own ``load_lora_weights``) or ``transformer/`` (a full ``save_pretrained`` folder).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("diffaccel")

CARD_NAME = "student.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
STUDENT_ATTRIBUTE = "_diffaccel_student"
STUDENT_SCHEDULER = "FlowMatchLCMScheduler"  # multistep consistency sampling for flow models (diffusers)


@dataclass
class StudentCard:
    """What a student is and how to run it: ``default_steps`` evaluations, guidance 1 (CFG is baked in at
    ``guidance_scale``), sampled with ``scheduler`` (multistep consistency sampling for LCD)."""

    method: str
    teacher: str
    pipeline: str
    default_steps: int
    guidance_scale: float
    lora_rank: int
    scheduler: str
    height: int
    width: int
    training: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / CARD_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "StudentCard":
        path = Path(folder) / CARD_NAME
        if not path.is_file():
            raise ValueError(f"{folder} is not a diffaccel student: it has no {CARD_NAME} (made by `diffaccel distill`).")
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def save_student(folder: str | Path, card: StudentCard, weights: dict[str, torch.Tensor], pipeline_class: Any,
                 transformer: torch.nn.Module | None = None) -> Path:
    """Write the card and the weights (LoRA through the pipeline class's ``save_lora_weights``, in
    float16; a full student as a float16 ``transformer/`` folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if card.lora_rank:
        # peft names (lora_A / lora_B), as diffusers' own LoRA training scripts save them: the loader maps
        # them back onto every targeted layer (the older lora.down / lora.up names lose the attention ones).
        layers = {k: v.to(torch.float16) for k, v in weights.items()}
        pipeline_class.save_lora_weights(folder, transformer_lora_layers=layers, weight_name=LORA_WEIGHTS)
    else:
        if transformer is None:
            raise ValueError("A full student is saved from a transformer of the teacher's class.")
        export = type(transformer).from_config(transformer.config)
        export.load_state_dict(weights)
        export.to(torch.float16).save_pretrained(folder / "transformer")
    card.save(folder)
    return folder


def load_student(pipe: Any, folder: str | Path) -> Any:
    """Turn ``pipe`` (the teacher's pipeline) into the student in place and return it: weights, scheduler,
    and the card on ``pipe._diffaccel_student``. Call it with ``num_inference_steps=card.default_steps``
    and ``guidance_scale=1`` (``student_call_defaults``); the student's CFG is baked in.

    Sampling re-noises between steps with the global torch generator (diffusers pipelines do not pass
    theirs to ``scheduler.step``): seed ``torch.manual_seed`` too for repeatable outputs.
    """
    import diffusers

    card = StudentCard.load(folder)
    if type(pipe).__name__ != card.pipeline:
        raise ValueError(f"The student in {folder} was distilled from a {card.pipeline}; this is a {type(pipe).__name__}.")
    if getattr(pipe, STUDENT_ATTRIBUTE, None) is not None:
        raise ValueError("This pipeline already holds a student; load the teacher again to swap students.")
    folder = Path(folder)
    if card.lora_rank:
        pipe.load_lora_weights(folder, weight_name=LORA_WEIGHTS, adapter_name="student")
        pipe.fuse_lora(lora_scale=1.0, components=["transformer"])
        pipe.unload_lora_weights()  # the fused weights stay; the transformer is plain again
    else:
        full = type(pipe.transformer).from_pretrained(folder / "transformer", torch_dtype=pipe.transformer.dtype)
        pipe.transformer.load_state_dict(full.state_dict())
    scheduler_class = getattr(diffusers, card.scheduler)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    setattr(pipe, STUDENT_ATTRIBUTE, card)
    logger.info("diffaccel: loaded a %s student of %s from %s (%d steps, CFG %.1f baked in)", card.method,
                card.teacher, folder, card.default_steps, card.guidance_scale)
    return pipe


def student_of(pipe: Any) -> StudentCard | None:
    return getattr(pipe, STUDENT_ATTRIBUTE, None)


def student_call_defaults(pipe: Any) -> dict[str, Any]:
    """The call arguments a student pipeline runs with: its steps, guidance 1, its size."""
    card = student_of(pipe)
    if card is None:
        return {}
    return {"num_inference_steps": card.default_steps, "guidance_scale": 1.0, "height": card.height, "width": card.width}
