"""One distillation run: resolve the teacher, train with checkpoints, export the student.

    diffaccel.distill.distill("reference:image", "students/lcd", LCDConfig(lora_rank=16), max_minutes=80)

A run is resumable: ``checkpoint.pt`` in the output folder is rewritten every ``save_every`` minutes
(atomically), together with an exported student, so a killed run loses at most that much work.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from diffaccel.lora import LoraSpec, apply_loras, describe_loras, fused_loras

from .config import LCDConfig, RewardConfig, TDMConfig
from .data import (CaptionedClips, CaptionedImages, DataSource, ProceduralClips, PromptList, data_source, describe,
                   require_images, serve_at)
from .student import STUDENT_SCHEDULER, StudentCard, save_student

logger = logging.getLogger("diffaccel")

CHECKPOINT = "checkpoint.pt"
# Each method and the config type it trains with.
METHODS: dict[str, type] = {"lcd": LCDConfig, "rg-lcd": LCDConfig, "tdm": TDMConfig}
Config = LCDConfig | TDMConfig


def load_teacher(spec: str, device: str | None = None, dtype: str = "float32") -> tuple[Any, str, dict[str, Any]]:
    """``reference:image`` (the embedded model, on the CPU) or a hub id / local folder
    (``DiffusionPipeline.from_pretrained``, on the GPU when there is one), its weights in ``dtype`` ->
    (pipeline, name, facts: the teacher's default steps, CFG scale and resolution, from the pipeline's own
    call defaults for a model of the user's)."""
    from diffaccel.loading import load_model, torch_dtype

    if spec.startswith("reference:"):
        from diffaccel.pipelines import reference

        name = spec.split(":", 1)[1]
        if name not in reference.NAMES:
            raise ValueError(f"Unknown reference teacher {spec!r}; choose from {[f'reference:{n}' for n in reference.NAMES]}.")
        info = reference.info(name)
        facts = {**info, "default_height": info["default_resolution"], "default_width": info["default_resolution"]}
        return reference.load(name, device=device or "cpu", dtype=torch_dtype(dtype, device or "cpu")), spec, facts
    loaded = load_model(spec, device=device, dtype=dtype)
    return loaded.pipe, spec, pipeline_facts(loaded.pipe, loaded.is_video)


def pipeline_facts(pipe: Any, is_video: bool = False) -> dict[str, Any]:
    """A user's teacher's defaults, as its pipeline runs when called without arguments: steps and CFG scale
    from ``__call__``'s signature, resolution from the pipeline's ``default_sample_size`` or the
    transformer's ``sample_size`` (CogView4) × the VAE's scale factor, or else ``__call__``'s own height
    and width (Wan: 480 × 832, and ``num_frames``)."""
    parameters = inspect.signature(pipe.__call__).parameters

    def default(name: str) -> Any:
        value = parameters[name].default if name in parameters else inspect.Parameter.empty
        return None if value is inspect.Parameter.empty else value

    from diffaccel.api import find_denoiser

    sample_size = getattr(pipe, "default_sample_size", None) or getattr(find_denoiser(pipe).config, "sample_size", None)
    factor = getattr(pipe, "vae_scale_factor", None)
    height, width = (sample_size * factor,) * 2 if sample_size and factor else (default("height"), default("width"))
    facts = {"default_steps": default("num_inference_steps"), "default_guidance": default("guidance_scale"),
             "default_height": height, "default_width": width, "is_video": is_video}
    if is_video:
        facts["frames"] = default("num_frames")
    missing = [k for k, v in facts.items() if v is None]
    if missing:
        raise ValueError(f"Cannot tell {type(pipe).__name__}'s default {', '.join(missing)} from the pipeline; this "
                         f"teacher is not one diffaccel distill knows.")
    return facts


def _check_folder(out: Path, resume: bool, teacher: str, method: str, config: Config, data: str) -> dict[str, Any] | None:
    checkpoint = out / CHECKPOINT
    if not checkpoint.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(f"Output folder {out} is not empty and holds no distillation checkpoint; choose an empty "
                             f"or new folder.")
        if resume:
            raise ValueError(f"--resume: {out} holds no {CHECKPOINT} to resume from.")
        return None
    if not resume:
        raise ValueError(f"{out} already holds a distillation run; pass --resume to continue it, or choose another folder.")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if (state["teacher"], state["method"]) != (teacher, method):
        raise ValueError(f"{out} holds another run (teacher {state['teacher']}, method {state['method']}); this one is "
                         f"teacher {teacher}, method {method}.")
    theirs = (state["teacher"], state["method"], type(config).from_dict(state["config"]))
    if theirs != (teacher, method, config):
        raise ValueError(f"{out} holds another run (teacher {theirs[0]}, method {theirs[1]}, {theirs[2]}); "
                         f"this one is teacher {teacher}, method {method}, {config}.")
    if state.get("data", "procedural-scenes") != data:
        raise ValueError(f"{out} holds a run on other data ({state.get('data', 'procedural-scenes')}); this one reads {data}.")
    return state


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _scheduler_of(method: str, config: Config, flow_matching: bool = True) -> str:
    """The diffusers scheduler a student samples with: LCM-style re-noising for consistency students
    (``LCMScheduler`` on a DDPM teacher's schedule); for TDM the one its training rollouts re-noise like
    (η = 1: the flow's Euler step)."""
    if not flow_matching:  # a DDPM teacher: LCM sampling, or for TDM with η = 1 trailing DDIM (deterministic)
        return "DDIMScheduler" if method == "tdm" and config.eta == 1.0 else "LCMScheduler"
    if method == "tdm" and config.eta == 1.0:
        return "FlowMatchEulerDiscreteScheduler"
    return STUDENT_SCHEDULER


def _guidance_embedding_of(config: Config) -> dict[str, Any] | None:
    """The card's description of the student's guidance-scale embedding (LCD with ``guidance_range``)."""
    scale_range = getattr(config, "guidance_range", None)
    return None if scale_range is None else {"dim": config.guidance_embedding_dim, "range": list(scale_range)}


def distill(teacher: str, out: str | Path, config: Config | None = None, *, method: str = "lcd",
            reward: RewardConfig | None = None, data: str | Path | DataSource | None = None,
            max_minutes: float | None = None, max_steps: int | None = None, resume: bool = False,
            save_every: float = 3.0, progress: bool = True, dtype: str = "float32",
            gradient_checkpointing: bool = False, loras: Sequence[LoraSpec] = ()) -> Path:
    """Train a student of ``teacher`` into ``out``; returns the folder (a loadable student).

    ``teacher``: "reference:image" / "reference:video", or a hub id or local folder of a supported pipeline
    (CogView4, SD3, FLUX.1 [dev], Stable Diffusion 1.x / 2.x / XL, PixArt, Wan 2.1).
    ``method`` "lcd", or "rg-lcd" with ``reward`` (default ``RewardConfig()``: β = 1, latent proxy), whose
    expert is the reference judge of the teacher's scenes (both with an ``LCDConfig``); or "tdm" with a
    ``TDMConfig`` (data-free: it reads only the captions).
    ``data``: a folder of captioned images (``CaptionedImages``: ``metadata.jsonl`` or ``.txt`` captions) or,
    for a video teacher, of captioned clips (``CaptionedClips``), a prompt file (TDM), or a source object. The
    reference teachers default to their procedural scenes and clips; a teacher of the user's needs data of
    its domain.
    ``dtype``: the teacher's frozen weights ("float32", "bfloat16", "float16"; "auto": bfloat16 on a GPU);
    LoRA adapters train in float32 over them either way. ``gradient_checkpointing`` recomputes the
    transformer's activations in the backward pass (less memory, more time; the same result).
    ``loras``: LoRAs fused into the teacher first (a style or a fine-tune of the user's); the student learns
    the LoRA'd teacher, and its card asks for the same LoRAs where it is loaded."""
    from tqdm.auto import tqdm

    from .lcd import LCDTrainer
    from .teacher import teacher_for

    if method not in METHODS:
        raise ValueError(f"Unknown distillation method {method!r}; available: {list(METHODS)}.")
    config = config if config is not None else METHODS[method]()
    if not isinstance(config, METHODS[method]):
        raise ValueError(f"Method {method!r} trains with a {METHODS[method].__name__}, not a {type(config).__name__}.")
    if reward is not None and method != "rg-lcd":
        raise ValueError(f"A reward config is for method 'rg-lcd', not {method!r}.")
    if max_minutes is None and max_steps is None:
        raise ValueError("Give a budget: max_minutes or max_steps.")
    if method == "rg-lcd" and teacher != "reference:image" and (reward or RewardConfig()).expert == "judge":
        raise ValueError(f"rg-lcd's default expert reward is diffaccel's reference judge, which scores the procedural "
                         f"scenes of reference:image; it cannot reward {teacher}'s images. Give a CLIP reward model "
                         f"(RewardConfig(expert=...), `--reward-model`: CLIPScore, PickScore), or use lcd or tdm.")
    is_reference = teacher.startswith("reference:")
    if data is None and not is_reference:
        folder = "a folder of captioned images (clips, for a video model)"
        wanted = f"a prompt file or {folder}" if method == "tdm" else folder
        raise ValueError(f"Distilling {teacher} needs training data of its domain: give {wanted} (data=..., "
                         f"`diffaccel distill --data`). Only the reference teachers bring their own (procedural scenes).")
    # the data is checked before a (possibly large) teacher loads; its resolution is set once that is known
    source = data_source(data, config.height or 64, config.frames or 9)
    if method == "tdm" and isinstance(source, (CaptionedImages, CaptionedClips)):  # data-free: captions only
        source = PromptList(tuple(caption for _, caption in source.entries), source.resolution)
    if method != "tdm":
        require_images(source, method)
    from accelerate import Accelerator

    # one process, or one of several launched by `accelerate launch` / torchrun (data parallel)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    many, main = accelerator.num_processes > 1, accelerator.is_main_process
    pipe, name, facts = load_teacher(teacher, device=str(accelerator.device), dtype=dtype)
    apply_loras(pipe, loras)
    name += describe_loras(loras)  # a resume with other LoRAs is another run
    resolved = dataclasses.replace(
        config,
        guidance_scale=config.guidance_scale if config.guidance_scale is not None else float(facts["default_guidance"]),
        height=config.height or (config.sizes[0] if config.sizes else facts["default_height"]),
        width=config.width or (config.sizes[0] if config.sizes else facts["default_width"]),
        frames=(config.frames or facts.get("frames")) if facts["is_video"] else config.frames,
    )
    if resolved.frames is not None and not facts["is_video"]:
        raise ValueError(f"frames={resolved.frames}: {teacher} makes images, not clips.")
    if resolved.student_steps > facts["default_steps"]:
        raise ValueError(f"student_steps={resolved.student_steps} is more than the teacher's own {facts['default_steps']} "
                         f"steps: nothing to distill.")
    if facts["is_video"] and isinstance(source, CaptionedImages):
        raise ValueError(f"{teacher} makes clips, and {method} would noise them: a folder of still images cannot "
                         f"teach it. Give a folder of captioned clips (.mp4, .gif, ...), or use tdm with the folder's "
                         f"captions or a prompt file (--prompts).")
    if not facts["is_video"] and isinstance(source, CaptionedClips):
        raise ValueError(f"{teacher} makes images, and {source.root} holds clips: give it a folder of captioned images.")
    if source is None and facts["is_video"] and is_reference:
        source = ProceduralClips(resolved.height, resolved.frames)
    if source is not None:
        source = serve_at(source, resolved.height, resolved.width)
    if isinstance(source, CaptionedClips) and source.frames != resolved.frames:
        source = dataclasses.replace(source, frames=resolved.frames)
    out = Path(out)
    saved = _check_folder(out, resume, name, method, resolved, describe(source))
    accelerator.wait_for_everyone()  # every process has read the folder before the first writes to it
    if main:
        out.mkdir(parents=True, exist_ok=True)

    # the reference models were trained told 1000·σ; a teacher of the user's is told what its pipeline tells it
    adapter = teacher_for(pipe, resolved.height, resolved.width, "sigma" if is_reference else "pipeline", resolved.frames,
                          resolved.guidance_scale)
    if gradient_checkpointing:
        adapter.transformer.enable_gradient_checkpointing()
    if method == "rg-lcd":
        from .rglcd import RGLCDTrainer

        reward = reward or RewardConfig()
        if reward.expert == "judge":
            from diffaccel.pipelines.reference import judge as judges

            expert = judges.load_judge("image")
        else:
            from .reward import ClipReward

            expert = ClipReward.from_pretrained(reward.expert, accelerator.device)
        trainer = RGLCDTrainer(adapter, resolved, reward, expert, data=source, accelerator=accelerator)
    elif method == "tdm":
        from .tdm import TDMTrainer

        trainer = TDMTrainer(adapter, resolved, source, accelerator)
    else:
        trainer = LCDTrainer(adapter, resolved, source, accelerator)
    minutes_before, losses = 0.0, []
    if saved is not None:
        trainer.load_state_dict(saved["trainer"])
        minutes_before, losses = float(saved["minutes"]), list(saved["losses"])
        logger.info("diffaccel distill: resumed %s at step %d (%.1f min so far)", out, trainer.step, minutes_before)

    start = last_save = time.monotonic()

    def minutes() -> float:
        return minutes_before + (time.monotonic() - start) / 60.0

    def save() -> None:
        _atomic_save({"teacher": name, "method": method, "config": resolved.to_dict(), "data": describe(source),
                      "trainer": trainer.state_dict(), "minutes": minutes(), "losses": losses}, out / CHECKPOINT)
        card = StudentCard(
            method=method, teacher=name, pipeline=type(pipe).__name__, default_steps=resolved.student_steps,
            guidance_scale=resolved.guidance_scale, lora_rank=resolved.lora_rank,
            scheduler=_scheduler_of(method, resolved, adapter.flow_matching), height=resolved.height,
            width=resolved.width,
            sizes=list(resolved.sizes) if resolved.sizes else None, frames=resolved.frames,
            guidance_embedding=_guidance_embedding_of(resolved),
            attention=getattr(resolved, "sparse_attention", None),
            teacher_loras=fused_loras(pipe) or None,
            training={"steps": trainer.step, "minutes": round(minutes(), 2), "threads": torch.get_num_threads(),
                      "processes": accelerator.num_processes,
                      "data": describe(source), "dtype": str(adapter.compute_dtype).removeprefix("torch."),
                      "final_loss": float(np.mean(losses[-100:])) if losses else None, "config": resolved.to_dict(),
                      **({"reward": trainer.reward.to_dict()} if method == "rg-lcd" else {})},
        )
        save_student(out, card, trainer.student_for_export(), type(pipe), trainer.frozen_teacher,
                     getattr(trainer, "guidance_embedding_for_export", lambda: None)())

    def done() -> bool:
        stop = ((max_steps is not None and trainer.step >= max_steps)
                or (max_minutes is not None and time.monotonic() - start >= max_minutes * 60.0))
        if many:  # one decision for all: a process that stopped alone would leave the others waiting
            stop = bool(accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "sum") > 0)
        return stop

    bar = tqdm(total=max_steps, initial=trainer.step, disable=not (progress and main), desc=f"distill {method}")
    while not done():
        loss = trainer.train_step()
        if many:  # the record is the mean over the processes' batches
            loss = float(accelerator.reduce(torch.tensor(loss, device=accelerator.device), "mean"))
        losses.append(loss)
        bar.update(1)
        extra = "".join(f" {k} {v:.3f}" for k, v in getattr(trainer, "last_rewards", {}).items())
        bar.set_postfix_str(f"step {trainer.step} loss {np.mean(losses[-50:]):.4f}{extra}", refresh=False)
        if main and time.monotonic() - last_save >= save_every * 60.0:
            save()
            last_save = time.monotonic()
    bar.close()
    if main:
        save()
        (out / "losses.json").write_text(json.dumps([round(x, 6) for x in losses]))
    accelerator.wait_for_everyone()
    return out
