"""Load a model by name for the CLI: an embedded reference model, a hub id or a local folder."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass
class LoadedModel:
    pipe: Any
    name: str
    is_video: bool
    reference: str | None = None  # "image" / "video" for the embedded models and their students (the judge applies)
    defaults: dict = field(default_factory=dict)  # call arguments that run the model as trained


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"Unknown dtype {name!r}; use auto, float32, float16 or bfloat16.")
    return getattr(torch, name)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# How pipelines name their frame count (Sana-Video: frames; Latte: video_length).
FRAME_COUNT_ARGS = ("num_frames", "frames", "video_length")


def is_video_pipeline(pipe: Any) -> bool:
    """A video pipeline: its family makes videos and its call takes a frame count. The image pipelines of video
    families (Cosmos Predict 2 and Kandinsky 5 text-to-image, on their 3D transformers) take none; a pipeline
    whose call takes any keyword (a modular one) goes by its family."""
    from diffaccel.api import find_denoiser
    from diffaccel.pipelines import adapter_for

    params = inspect.signature(pipe.__call__).parameters
    takes_frames = any(name in params for name in FRAME_COUNT_ARGS)
    open_call = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        family_video = adapter_for(find_denoiser(pipe)).is_video
    except ValueError:
        return takes_frames
    return family_video and (takes_frames or open_call)


def load_model(spec: str | None, device: str | None = None, dtype: str = "auto", video: bool = False,
               loras: Sequence[Any] = ()) -> LoadedModel:
    """``spec`` None -> the embedded image (or, with ``video``, video) model; "image"/"video" (or a student
    such as "image-lcd") -> that embedded model; anything else -> ``DiffusionPipeline.from_pretrained(spec)``.
    ``loras`` (``LoraSpec``s) are fused into it; the name then lists them, so results made with and
    without a LoRA never share a record."""
    loaded = _load_model(spec, device, dtype, video)
    if loras:
        from .lora import apply_loras, describe_loras

        apply_loras(loaded.pipe, loras)
        loaded.name += describe_loras(loras)
    return loaded


def _load_model(spec: str | None, device: str | None, dtype: str, video: bool) -> LoadedModel:
    from diffaccel.pipelines import reference

    device = device or default_device()
    if spec is None:
        spec = "video" if video else "image"
    if spec in reference.GENERATORS and not Path(spec).exists():
        pipe = reference.load(spec, device=device, dtype=torch_dtype(dtype, device))
        facts = reference.info(spec)
        judged_as = reference.STUDENTS.get(spec, spec)  # a student makes the teacher's scenes: the same judge
        return LoadedModel(pipe, f"reference-{spec}", facts["is_video"], judged_as, reference.call_defaults(spec))
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(spec, dtype=torch_dtype(dtype, device))
    except OSError as error:  # not on disk, not in the cache, no network: say which and what to check
        where = ("the folder has no loadable pipeline (model_index.json and its components)" if Path(spec).exists()
                 else "a hub id needs the network or a copy in the local Hugging Face cache")
        raise ValueError(f"Cannot load model {spec!r}: {where}. ({str(error).splitlines()[0]})") from error
    pipe = pipe.to(device)
    return LoadedModel(pipe, str(spec), is_video_pipeline(pipe))


def read_prompts(prompts_file: str | None, prompt_set: str | None, num: int | None) -> list[str]:
    """Prompts from a file (one per line) or a named set: reference-image, reference-video."""
    from diffaccel.pipelines.reference import scenes

    if prompts_file and prompt_set:
        raise ValueError("Give --prompts FILE or --prompt-set NAME, not both.")
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise ValueError(f"Prompt file {prompts_file!r} does not exist.")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"Prompt file {prompts_file!r} holds no prompts.")
        return prompts[:num] if num else prompts
    sets = {"reference-image": False, "reference-video": True}
    name = prompt_set or "reference-image"
    if name not in sets:
        raise ValueError(f"Unknown prompt set {name!r}; available: {list(sets)} (or --prompts FILE).")
    return scenes.prompt_set(num or 200, clip=sets[name])
