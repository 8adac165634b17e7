"""A distilled student on disk, and putting it into a pipeline.

A student folder holds ``student.json`` (a ``StudentCard``: method, teacher, default steps, the CFG scale
baked in) and either ``pytorch_lora_weights.safetensors`` (a LoRA in the diffusers format, loadable with
the pipeline's own ``load_lora_weights``, or the transformer's ``load_lora_adapter`` where the pipeline has no
LoRA loader, as PixArt's) or ``transformer/`` (``unet/`` for a UNet teacher: a full
``save_pretrained`` folder).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .adapters import fuse_and_unload_lora, load_lora_into, save_lora
from .guidance_embedding import WEIGHTS as GUIDANCE_WEIGHTS
from .guidance_embedding import add_guidance_embedding, check_scale, guidance_hook, remove_guidance_embedding

logger = logging.getLogger("diffaccel")

CARD_NAME = "student.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
STUDENT_ATTRIBUTE = "_diffaccel_student"
STUDENT_SCHEDULER = "FlowMatchLCMScheduler"  # multistep consistency sampling for flow models (diffusers)
SPACINGS = ("trailing", "pipeline")


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
    spacing: str = "trailing"  # where the K evaluations sit: see ``trailing_timesteps``
    sizes: list[int] | None = None  # square sizes it was distilled at (None: height × width alone)
    frames: int | None = None  # a video student's clip length (None: an image student)
    # LCM's guidance-scale embedding, {"dim": D, "range": [low, high]}: the student samples at any CFG scale
    # in the range (``guidance_scale`` is its default); None: ``guidance_scale`` alone is baked in.
    guidance_embedding: dict[str, Any] | None = None
    # the block-sparse attention a sparsity-aware student was trained with and samples with (the fields of
    # a BlockSparseAttentionConfig); None: dense
    attention: dict[str, Any] | None = None
    # LoRAs fused into the teacher before distilling (``diffaccel.lora.lora_record`` each): the student learned
    # on top of them, so it samples on a pipeline with the same LoRAs fused; None: the plain teacher
    teacher_loras: list[dict[str, Any]] | None = None

    def guidance_range(self) -> tuple[float, float] | None:
        return None if not self.guidance_embedding else tuple(self.guidance_embedding["range"])

    def trained_at(self, height: int, width: int) -> bool:
        """Whether a call at height × width is at a size the student was distilled at."""
        if self.sizes:
            return height == width and height in self.sizes
        return (height, width) == (self.height, self.width)

    def __post_init__(self) -> None:
        if self.spacing not in SPACINGS:
            raise ValueError(f"StudentCard.spacing={self.spacing!r}: choose from {SPACINGS}.")

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
                 transformer: torch.nn.Module | None = None,
                 guidance_embedding: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the card and the weights (LoRA through the pipeline class's ``save_lora_weights``, in
    float16; a full student as a float16 ``transformer/`` folder; the guidance projection, when the card
    has one, as float16 ``guidance_embedding.safetensors``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (card.guidance_embedding is None) != (guidance_embedding is None):
        raise ValueError("A student card with a guidance embedding needs its weights, and only such a card takes them.")
    if guidance_embedding is not None:
        save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in guidance_embedding.items()},
                  str(folder / GUIDANCE_WEIGHTS))
    if card.lora_rank:
        # peft names (lora_A / lora_B), as diffusers' own LoRA training scripts save them: the loader maps
        # them back onto every targeted layer (the older lora.down / lora.up names lose the attention ones).
        layers = {k: v.to(torch.float16) for k, v in weights.items()}
        save_lora(folder, LORA_WEIGHTS, component_of(card), layers, pipeline_class)
    else:
        if transformer is None:
            raise ValueError("A full student is saved from a denoiser of the teacher's class.")
        export = type(transformer).from_config(transformer.config)
        export.load_state_dict(weights)
        export.to(torch.float16).save_pretrained(folder / component_of(card))
    card.save(folder)
    return folder


def load_student(pipe: Any, folder: str | Path) -> Any:
    """Turn ``pipe`` (the teacher's pipeline) into the student in place and return it: weights, scheduler,
    and the card on ``pipe._diffaccel_student``. The scheduler spreads the student's steps over the whole
    trajectory (``trailing_timesteps``) unless the caller passes a schedule. Call it with ``num_inference_steps=card.default_steps``
    and ``guidance_scale=1`` (``student_call_defaults``); the student's CFG is baked in.

    The call's ``generator`` seeds the re-noising between steps as well as the initial noise (diffusers
    pipelines pass theirs only to the latter), so a seeded call repeats exactly. A student with a
    guidance-scale embedding samples at ``card.guidance_scale`` until ``set_student_guidance`` changes it.
    (``diffaccel.accelerate(pipe, sampling=DistilledConfig(student=folder))`` does the same, removably.)
    """
    card = check_student(pipe, folder)
    install_student_weights(pipe, folder, card)
    if card.guidance_embedding:
        set_student_guidance(pipe, card.guidance_scale, card)
    pipe.scheduler = student_scheduler(pipe.scheduler, card)
    from diffaccel.sampling.distilled import seed_renoising_from_calls

    seed_renoising_from_calls(pipe)
    setattr(pipe, STUDENT_ATTRIBUTE, card)
    logger.info("diffaccel: loaded a %s student of %s from %s (%d steps, CFG %.1f baked in)", card.method,
                card.teacher, folder, card.default_steps, card.guidance_scale)
    return pipe


def check_student(pipe: Any, folder: str | Path, pipeline_name: str | None = None) -> StudentCard:
    """The card of the student in ``folder``, after checking that it fits ``pipe`` (its class, no student
    loaded yet); a ValueError that says why otherwise."""
    card = StudentCard.load(folder)
    name = pipeline_name or type(pipe).__name__
    if name != card.pipeline:
        raise ValueError(f"The student in {folder} was distilled from a {card.pipeline}; this is a {name}.")
    if getattr(pipe, STUDENT_ATTRIBUTE, None) is not None:
        raise ValueError("This pipeline already holds a student; load the teacher again to swap students.")
    if card.teacher_loras:
        from diffaccel.lora import fused_loras, same_loras

        fused = fused_loras(pipe)
        if not same_loras(card.teacher_loras, fused):
            wanted = ", ".join(f"{r['source']}{'/' + r['weight_name'] if r.get('weight_name') else ''}:{r['scale']:g}"
                               for r in card.teacher_loras)
            raise ValueError(f"The student in {folder} was distilled from {card.teacher}: it samples on that teacher with "
                             f"the same LoRA(s) fused ({wanted}; `--lora` in the CLI, diffaccel.lora.apply_loras in "
                             f"Python) and no others; this pipeline has {len(fused)} LoRA(s) fused"
                             f"{' that differ' if fused else ''}.")
    if not card.lora_rank and not (Path(folder) / component_of(card)).is_dir():
        raise ValueError(f"The student in {folder} has no weights: neither {LORA_WEIGHTS} nor {component_of(card)}/.")
    if card.guidance_embedding:
        if not (Path(folder) / GUIDANCE_WEIGHTS).is_file():
            raise ValueError(f"The student in {folder} samples with a guidance-scale embedding, and its weights "
                             f"({GUIDANCE_WEIGHTS}) are missing.")
    return card


def component_of(card: StudentCard) -> str:
    """The pipeline component the student replaces: "transformer", or "unet" for a UNet teacher."""
    from .teacher import denoiser_name_of

    return denoiser_name_of(card.pipeline)


def install_student_weights(pipe: Any, folder: str | Path, card: StudentCard, keep_original: bool = False):
    """Put the student's weights into the pipeline's denoiser (a LoRA fused, or a full state dict).

    With ``keep_original`` the parameters it overwrites are first copied to the CPU, and the function
    returns a ``restore()`` that copies them back (the teacher again, bit for bit); otherwise None."""
    folder = Path(folder)
    component = component_of(card)
    transformer = getattr(pipe, component)
    saved: dict[str, torch.Tensor] = {}
    if card.lora_rank:
        load_lora_into(pipe, component, folder, adapter_name="diffaccel_student", weight_name=LORA_WEIGHTS)
        if keep_original:  # the layers the LoRA wraps: their base weights are what fusing changes
            for name, module in transformer.named_modules():
                base = getattr(module, "base_layer", None)
                if base is not None and hasattr(module, "lora_A"):
                    for param_name, param in base.named_parameters(recurse=False):
                        saved[f"{name}.{param_name}"] = param.detach().to("cpu", copy=True)
        fuse_and_unload_lora(pipe, component)  # the fused weights stay; the transformer is plain again
    else:
        full = type(transformer).from_pretrained(folder / component, torch_dtype=transformer.dtype)
        if keep_original:
            saved = {k: v.detach().to("cpu", copy=True) for k, v in transformer.state_dict().items()}
        transformer.load_state_dict(full.state_dict())
    if card.guidance_embedding:
        weight = load_file(str(folder / GUIDANCE_WEIGHTS))["weight"]
        add_guidance_embedding(transformer, int(card.guidance_embedding["dim"]), weight).scale = card.guidance_scale
    if not keep_original:
        return None

    def restore() -> None:
        if card.guidance_embedding:
            remove_guidance_embedding(transformer)
        live = {**dict(transformer.named_parameters()), **dict(transformer.named_buffers())}
        with torch.no_grad():
            for name, value in saved.items():
                live[name].copy_(value)

    return restore


def set_student_guidance(pipe: Any, scale: float, card: StudentCard | None = None) -> None:
    """Sample a student with a guidance-scale embedding at CFG ``scale`` (in its training range), still one
    evaluation per step: call the pipeline with ``guidance_scale=1`` as always. Students without the
    embedding bake one scale in and get an error that says so."""
    card = card or student_of(pipe)
    if card is None:
        raise ValueError("This pipeline holds no student (diffaccel.distill.load_student puts one in).")
    from diffaccel.api import find_denoiser

    hook = guidance_hook(find_denoiser(pipe))
    if not card.guidance_embedding or hook is None:
        raise ValueError(f"This student bakes in CFG {card.guidance_scale:g} and has no guidance-scale embedding; "
                         f"distil one with LCDConfig(guidance_range=(low, high)) to choose the scale at sampling time.")
    hook.scale = check_scale(scale, card.guidance_range())


def student_scheduler(scheduler: Any, card: StudentCard) -> Any:
    """The scheduler the student samples with, made from the teacher's ``scheduler`` config (its shift
    and timestep count), on trailing timesteps unless the card says otherwise."""
    import diffusers

    scheduler_class = getattr(diffusers, card.scheduler, None)
    if scheduler_class is None:
        raise ValueError(f"The student's card names scheduler {card.scheduler!r}, which this diffusers does not have.")
    from .teacher import FAMILIES, flow_scheduler_config

    family = FAMILIES.get(card.pipeline)
    if family is not None and not family.flow_matching:  # LCM or trailing DDIM on the teacher's DDPM schedule
        from .teacher import ddpm_student_scheduler

        return ddpm_student_scheduler(scheduler, card.scheduler)
    student = scheduler_class.from_config(flow_scheduler_config(scheduler))
    if card.spacing == "trailing":
        use_trailing_spacing(student, family.tells_unshifted_timesteps if family is not None else True)
    return student


def trailing_timesteps(num_steps: int, train_timesteps: int = 1000) -> list[float]:
    """t_i = T·(1 − i/K) for i < K: K evaluations spread over the whole trajectory, the last one ending
    at 0 (Flux spaces its steps this way). CogView4's own spacing, linspace(T, 1, K), puts the last
    evaluation at σ ≈ 0, where a few-step student has nothing left to do: its 2 steps sample like 1."""
    return [float(train_timesteps * (1.0 - i / num_steps)) for i in range(num_steps)]


def _is_pipeline_default(timesteps: Any, sigmas: Any, num_steps: int, train_timesteps: int) -> bool:
    """Whether the pipeline passed its own default spacing (CogView4: linspace(T, 1, K) as integers), not
    a schedule the caller chose."""
    if timesteps is None and sigmas is None:
        return True
    if timesteps is None:
        return False
    default = np.linspace(train_timesteps, 1.0, num_steps).astype(np.int64).astype(np.float32)
    given = np.asarray([float(t) for t in timesteps], dtype=np.float32)
    return given.shape == default.shape and np.allclose(given, default)


def use_trailing_spacing(scheduler: Any, tell_unshifted: bool = True) -> Any:
    """Make ``scheduler`` sample a student on ``trailing_timesteps`` whenever the pipeline asks for its
    default schedule (a schedule the caller passes is kept). ``tell_unshifted``: the transformer is told
    those timesteps as they are (CogView4); otherwise only their fractions go in as sigmas and it is told
    1000·σ after the scheduler's shift (SD3, Wan). Returns the scheduler."""
    current = scheduler.set_timesteps
    train_timesteps = int(scheduler.config.num_train_timesteps)

    def set_timesteps(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None, **extra):
        given = timesteps if timesteps is not None else sigmas  # lists or arrays (Flux passes its sigmas)
        steps = num_inference_steps or (len(given) if given is not None else 0)
        if steps and _is_pipeline_default(timesteps, sigmas, steps, train_timesteps):
            trailing = trailing_timesteps(steps, train_timesteps)
            sigmas = [t / train_timesteps for t in trailing]
            timesteps = trailing if tell_unshifted else None
        return current(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, mu=mu,
                       timesteps=timesteps, **extra)

    scheduler.set_timesteps = functools.update_wrapper(set_timesteps, current)
    return scheduler


def student_of(pipe: Any) -> StudentCard | None:
    return getattr(pipe, STUDENT_ATTRIBUTE, None)


def student_attention(card: StudentCard | None):
    """The ``BlockSparseAttentionConfig`` a sparsity-aware student samples with (what it was trained with),
    or None for a dense student: ``diffaccel.accelerate(pipe, attention=student_attention(card))``."""
    if card is None or card.attention is None:
        return None
    from .config import sparse_attention_config

    return sparse_attention_config(card.attention)


def call_guidance(card: StudentCard) -> float:
    """The ``guidance_scale`` a student's pipeline is called with: 1, its CFG being baked in; for a
    guidance-distilled family (Flux dev, whose scale is an input of the model) the scale it was distilled
    at, which that pipeline passes to the model and never turns into a second evaluation."""
    from .teacher import FAMILIES

    family = FAMILIES.get(card.pipeline)
    return float(card.guidance_scale) if family is not None and family.guidance_distilled else 1.0


def student_call_defaults(pipe: Any) -> dict[str, Any]:
    """The call arguments a student pipeline runs with: its steps, guidance 1 (``call_guidance``), its size."""
    card = student_of(pipe)
    if card is None:
        return {}
    call = {"num_inference_steps": card.default_steps, "guidance_scale": call_guidance(card), "height": card.height,
            "width": card.width}
    if card.frames:
        call["num_frames"] = card.frames
    return call
