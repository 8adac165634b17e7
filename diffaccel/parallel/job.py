"""A farm job: the model, the acceleration config and the call every item shares.

It is small and picklable on purpose: each Ray actor or torchrun rank builds its own pipeline
from it, and its ``record`` is the fingerprint that keeps different jobs out of one folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffaccel.compiling import COMPILE_MODES
from diffaccel.lora import LoraSpec, describe_loras, lora_record

from .manifest import JobRecord

DTYPES = ("auto", "float32", "float16", "bfloat16")
HASHED_FILE_LIMIT = 64 << 20  # larger weight files are identified by name and size, not read


@dataclass(frozen=True)
class FarmJob:
    """``model``: "image"/"video" (the embedded reference models), a hub id or a local folder;
    ``config``: an ``AccelConfig.to_dict()``; ``call``: pipeline call arguments shared by all items;
    ``preset``: the preset name ``config`` came from, so each replica applies the preset's recipe for its
    pipeline (a UNet's DeepCache rather than the transformers' block cache)."""

    model: str
    config: dict
    call: dict = field(default_factory=dict)
    dtype: str = "auto"
    fps: int = 8
    preset: str | None = None
    loras: tuple[LoraSpec, ...] = ()  # fused into every replica's pipeline, in this order
    compile: str = "off"  # torch.compile of each replica's denoisers after acceleration: off, blocks, full
    compile_backend: str = "inductor"
    batch_size: int = 1  # items per pipeline call (those sharing their call arguments)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"FarmJob.batch_size must be >= 1, got {self.batch_size}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"FarmJob.dtype must be one of {DTYPES}, got {self.dtype!r}.")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"FarmJob.compile must be one of {COMPILE_MODES}, got {self.compile!r}.")
        if self.fps < 1:
            raise ValueError(f"FarmJob.fps must be >= 1, got {self.fps}.")
        if self.config.get("parallel"):
            method = self.config["parallel"].get("method")
            raise ValueError(f"The farm runs one pipeline per replica process; a config with parallel={method!r} "
                             "spreads one call over several processes, which farm replicas do not do yet. Drop the "
                             "parallel slot (more replicas give the throughput).")

    @property
    def name(self) -> str:
        """The model as results name it (``reference-image`` for the embedded image model)."""
        from diffaccel.pipelines import reference

        base = f"reference-{self.model}" if _is_embedded(self.model, reference.NAMES) else self.model
        return base + describe_loras(self.loras)

    def accel_config(self):
        """What ``accelerate`` takes: the preset's name when the job has one, else the config."""
        from diffaccel.config import AccelConfig

        return self.preset or AccelConfig.from_dict(self.config)

    def record(self) -> JobRecord:
        """The fingerprint's fields (reads a local model folder to hash it: call once per run)."""
        import diffaccel

        return JobRecord(model=self.name, revision=model_revision(self.model), config=self.config, call=self.call,
                         dtype=self.dtype, fps=self.fps, diffaccel=diffaccel.__version__,
                         loras=[lora_record(lora) for lora in self.loras],
                         compile=None if self.compile == "off" else {"mode": self.compile,
                                                                     "backend": self.compile_backend},
                         batch_size=self.batch_size)


def model_revision(model: str) -> str | None:
    """What identifies the weights behind a model name, so retrained weights under the same name are a
    new job: a content hash of a local folder (the embedded models included), the snapshot commit of a
    hub id found in the local cache, None when neither is known."""
    from diffaccel.pipelines import reference

    folder = reference.path(model) if _is_embedded(model, reference.NAMES) else Path(model)
    if folder.is_dir():
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            size = path.stat().st_size
            digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
            if size <= HASHED_FILE_LIMIT:
                digest.update(path.read_bytes())
        return "sha256:" + digest.hexdigest()[:16]
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json")
    except Exception:  # noqa: BLE001 - not a hub id either: nothing to identify
        return None
    return f"hub:{Path(cached).parent.name}" if isinstance(cached, str) else None


def _is_embedded(model: str, names: tuple[str, ...]) -> bool:
    return model in names and not Path(model).exists()


def make_job(model: str | None, config: Any, overrides: dict[str, Any] | None = None, dtype: str = "auto",
             fps: int = 8, loras: tuple[LoraSpec, ...] = (), compile: str = "off",
             compile_backend: str = "inductor", batch_size: int = 1) -> FarmJob:
    """Resolve what the user named into a job, without loading the model: the embedded models'
    trained call defaults under the user's ``overrides`` (None values ignored); a local folder is
    made absolute so the fingerprint does not depend on the working directory."""
    import diffaccel
    from diffaccel.pipelines import reference

    model = model or "image"
    call: dict[str, Any] = {}
    if _is_embedded(model, reference.NAMES):
        call.update(reference.call_defaults(model))
        if (overrides or {}).get("num_frames") is not None and not reference.info(model)["is_video"]:
            raise ValueError(f"--frames applies to video models; the embedded {model} model makes images.")
    elif Path(model).exists():
        model = str(Path(model).resolve())
    call.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if "guidance_scale" in call:
        call["guidance_scale"] = float(call["guidance_scale"])
    config = config or "fast"
    accel = diffaccel.resolve_config(config)  # a bad preset or config fails here, before any loading
    preset = config if isinstance(config, str) and config in diffaccel.PRESETS else None
    return FarmJob(model=model, config=accel.to_dict(), call=call, dtype=dtype, fps=fps, preset=preset,
                   loras=tuple(loras), compile=compile, compile_backend=compile_backend, batch_size=batch_size)
