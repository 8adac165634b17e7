"""Resumable sample sets: generate prompts x seeds into a folder, one file per seed, with a manifest.

A killed job rerun with the same arguments continues where it stopped and produces exactly the
files an uninterrupted run would: samples are generated in fixed chunks of consecutive indices
(each sample with its own seeded generator), a chunk is written only when complete, and a rerun
regenerates only the chunks that are not on disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from diffaccel.media import pipeline_samples

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SampleJob:
    """What to generate; two jobs with equal manifests write identical folders."""

    model: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    accel_config: dict = field(default_factory=dict)
    call_kwargs: dict = field(default_factory=dict)
    chunk_size: int = 8
    is_video: bool = False

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.seeds):
            raise ValueError(f"SampleJob needs one seed per prompt: {len(self.prompts)} prompts, {len(self.seeds)} seeds.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("SampleJob seeds must be unique: files are named by seed.")
        if self.chunk_size < 1:
            raise ValueError(f"SampleJob.chunk_size must be >= 1, got {self.chunk_size}.")

    def manifest(self) -> dict[str, Any]:
        import diffusers
        import torch

        import diffaccel

        data = asdict(self)
        data["prompts"], data["seeds"] = list(self.prompts), list(self.seeds)
        data["versions"] = {"diffaccel": diffaccel.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__}
        return data

    def file_for(self, seed: int) -> str:
        return f"{seed:08d}.{'npz' if self.is_video else 'png'}"


def _comparable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "versions"}


def open_folder(job: SampleJob, folder: str | Path) -> Path:
    """Create the folder with the job's manifest, or check that it holds this very job."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    manifest = job.manifest()
    if path.is_file():
        existing = json.loads(path.read_text())
        if _comparable(existing) != _comparable(json.loads(json.dumps(manifest))):
            differing = sorted(k for k in _comparable(manifest) if existing.get(k) != json.loads(json.dumps(manifest)).get(k))
            raise ValueError(
                f"{folder} holds a different job (fields that differ: {differing}); use another --out folder or delete it."
            )
    else:
        path.write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def missing_chunks(job: SampleJob, folder: Path) -> list[range]:
    chunks = [range(i, min(i + job.chunk_size, len(job.seeds))) for i in range(0, len(job.seeds), job.chunk_size)]
    return [c for c in chunks if not all((folder / job.file_for(job.seeds[i])).is_file() for i in c)]


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".part" + path.suffix)
    write(tmp)
    os.replace(tmp, path)


def write_sample(path: Path, sample: np.ndarray) -> None:
    """Images as 8-bit PNG, clips as uint8 arrays in .npz (exact, unlike a lossy video codec)."""
    from diffaccel.media import to_uint8

    pixels = to_uint8(sample)
    if path.suffix == ".npz":
        _write_atomic(path, lambda p: np.savez_compressed(p, frames=pixels))
    else:
        from PIL import Image

        _write_atomic(path, lambda p: Image.fromarray(pixels).save(p, format="PNG"))


def read_sample(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) or (F, H, W, 3)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return data["frames"]
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def generate_samples(
    job: SampleJob,
    folder: str | Path,
    pipe: Any,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> Path:
    """Fill ``folder`` with the job's samples; chunks already on disk are skipped.

    ``shard=(k, n)`` takes every n-th missing chunk starting at k (one process per device).
    """
    import torch
    from tqdm.auto import tqdm

    folder = open_folder(job, folder)
    todo = missing_chunks(job, folder)[shard[0] :: shard[1]]
    bar = tqdm(total=sum(len(c) for c in todo), disable=not progress, desc="generating", unit="sample")
    for chunk in todo:
        prompts = [job.prompts[i] for i in chunk]
        generators = [torch.Generator("cpu").manual_seed(job.seeds[i]) for i in chunk]
        result = pipe(prompts, generator=generators, output_type="np", **job.call_kwargs)
        samples = pipeline_samples(result, job.is_video)
        for i, sample in zip(chunk, samples):
            write_sample(folder / job.file_for(job.seeds[i]), sample)
        bar.update(len(chunk))
    bar.close()
    return folder


def list_samples(folder: str | Path) -> list[Path]:
    """The sample files of a folder, sorted (a job's folder or any folder of images)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".npz") and ".part" not in p.name)
    if not files:
        raise ValueError(f"{folder} holds no images (.png/.jpg/.webp) or clips (.npz).")
    return files


def load_samples(paths: Sequence[Path]) -> np.ndarray:
    """Stack sample files into float32 in [0, 1]: (N, H, W, 3) or (N, F, H, W, 3)."""
    return np.stack([read_sample(p) for p in paths]).astype(np.float32) / 255.0
