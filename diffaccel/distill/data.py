"""Training data for distillation: deterministic streams, batch ``step`` drawn from (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would.

The sources, each a frozen dataclass with a ``resolution`` (the height; ``serve_at`` gives the same source
at another size) and ``batch(seed, step, size) -> (pixels or None, captions)``:

- ``ProceduralScenes`` / ``ProceduralClips``: the reference models' own training distribution (rendered
  shape scenes, and clips of them moving);
- ``CaptionedImages``: a user's folder of images with captions, for an image teacher of their own (LCD,
  RG-LCD);
- ``CaptionedClips``: a user's folder of video clips with captions, for a video teacher of their own (LCD);
- ``PromptList``: captions alone, which is all a data-free method (TDM) reads.
"""

from __future__ import annotations

import json
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLIP_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".mkv", ".avi")
METADATA = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption", "prompt")  # the column names diffusers' training scripts look for


def epoch_indices(seed: int, step: int, size: int, count: int) -> np.ndarray:
    """Which of ``count`` items batch ``step`` takes: every item once per epoch, in an order drawn from
    (seed, epoch), so any batch is found from its number alone."""
    positions = np.arange(step * size, (step + 1) * size)
    out = np.empty(size, dtype=np.int64)
    for epoch in np.unique(positions // count):
        order = np.random.default_rng([seed, 104729, int(epoch)]).permutation(count)
        here = positions // count == epoch
        out[here] = order[positions[here] % count]
    return out


@dataclass(frozen=True)
class ProceduralScenes:
    """The reference models' own training distribution: rendered shape scenes and their captions."""

    resolution: int = 64

    def batch(self, seed: int, step: int, size: int) -> tuple[torch.Tensor, list[str]]:
        """(size, 3, H, W) pixels in [-1, 1] and their captions."""
        from diffaccel.pipelines.reference import scenes

        rng = np.random.default_rng([seed, 7919, step])
        pixels, captions, _ = scenes.sample_batch(rng, size, self.resolution)
        x = torch.from_numpy(pixels).float().permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0
        return x, captions

    def describe(self) -> str:
        return "procedural-scenes"


@dataclass(frozen=True)
class ProceduralClips:
    """The reference video model's training distribution: rendered clips of moving shapes, captioned."""

    resolution: int = 64
    frames: int = 9

    def batch(self, seed: int, step: int, size: int) -> tuple[torch.Tensor, list[str]]:
        """(size, 3, F, H, W) pixels in [-1, 1] and their captions."""
        from diffaccel.pipelines.reference import scenes

        rng = np.random.default_rng([seed, 7927, step])
        pixels, captions, _ = scenes.sample_batch(rng, size, self.resolution, clip=True, frames=self.frames)
        x = torch.from_numpy(pixels).float().permute(0, 4, 1, 2, 3).contiguous() * 2.0 - 1.0
        return x, captions

    def describe(self) -> str:
        return f"procedural-clips:{self.frames}"


def _metadata_rows(root: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of ``root/metadata.jsonl``."""
    metadata = root / METADATA
    rows = []
    for number, line in enumerate(metadata.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise ValueError(f"{metadata}, line {number}: not JSON ({error.msg}).") from None
    return rows


def read_captioned_folder(root: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, what: str = "image"
                          ) -> tuple[tuple[str, str], ...]:
    """(file name, caption) of every ``what`` (files ending in ``suffixes``) in ``root``: from
    ``metadata.jsonl`` when there is one (the imagefolder / videofolder layout of Hugging Face ``datasets``
    and diffusers' training scripts: one JSON object per line with ``file_name`` and ``text``, ``caption``
    or ``prompt``), else from a ``NAME.txt`` beside each file. Errors name the file at fault."""
    if not root.is_dir():
        raise ValueError(f"Training {what}s: {root} is not a folder.")
    metadata = root / METADATA
    entries: list[tuple[str, str]] = []
    if metadata.is_file():
        for number, row in _metadata_rows(root):
            key = next((k for k in CAPTION_KEYS if k in row), None)
            if "file_name" not in row or key is None:
                raise ValueError(f"{metadata}, line {number}: needs 'file_name' and a caption "
                                 f"({' or '.join(repr(k) for k in CAPTION_KEYS)}); it has {sorted(row)}.")
            if not (root / row["file_name"]).is_file():
                raise ValueError(f"{metadata}, line {number}: {what} {row['file_name']!r} is not in {root}.")
            if Path(row["file_name"]).suffix.lower() not in suffixes:
                raise ValueError(f"{metadata}, line {number}: {row['file_name']!r} is not a {what} "
                                 f"({', '.join(suffixes)}).")
            entries.append((str(row["file_name"]), str(row[key])))
    else:
        for item in sorted(p for p in root.iterdir() if p.suffix.lower() in suffixes):
            caption = item.with_suffix(".txt")
            if not caption.is_file():
                raise ValueError(f"Training {what} {item} has no caption: put one in {caption.name}, or list every "
                                 f"{what} with its caption in {root / METADATA}.")
            entries.append((item.name, caption.read_text().strip()))
    if not entries:
        raise ValueError(f"{root} holds no captioned {what}s ({', '.join(suffixes)} with {METADATA} or .txt "
                         f"captions).")
    empty = [name for name, caption in entries if not caption.strip()]
    if empty:
        raise ValueError(f"{len(empty)} training {what}(s) in {root} have an empty caption, e.g. {empty[0]}.")
    return tuple(entries)


def folder_holds_clips(root: Path) -> bool:
    """Whether a training folder holds video clips rather than images (by the files it lists or holds);
    a folder of both is refused, since one teacher learns from one kind."""
    if (root / METADATA).is_file():
        names = [str(row.get("file_name", "")) for _, row in _metadata_rows(root)]
    else:
        names = [p.name for p in root.iterdir()]
    suffixes = {Path(name).suffix.lower() for name in names}
    clips, images = suffixes & set(CLIP_SUFFIXES), suffixes & set(IMAGE_SUFFIXES)
    if clips and images:
        raise ValueError(f"{root} holds both clips ({', '.join(sorted(clips))}) and images ({', '.join(sorted(images))}); "
                         f"a video teacher learns from clips, an image teacher from images: keep them in separate folders.")
    return bool(clips)


def fit_crop(image: "Image.Image", height: int, width: int) -> torch.Tensor:
    """One picture as (3, H, W) in [-1, 1]: resized (bicubic) until it covers H × W, then centre-cropped
    to it; for a square that is diffusers' training scripts' shorter-side resize and centre crop."""
    from PIL import Image

    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1).contiguous()


def load_picture(path: Path, height: int, width: int) -> torch.Tensor:
    """One image file as (3, H, W) in [-1, 1] (``fit_crop``)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return fit_crop(image, height, width)
    except OSError as error:
        raise ValueError(f"Cannot read training image {path}: {error}") from None


def load_clip_window(path: Path, height: int, width: int, frames: int, rng: np.random.Generator) -> torch.Tensor:
    """``frames`` consecutive frames of a clip, from a start drawn by ``rng``, each fitted to H × W
    (``fit_crop``): (3, F, H, W) in [-1, 1]. Only the window is decoded into memory, so a long video serves
    as it is; a clip shorter than ``frames`` is an error that names it."""
    from PIL import Image

    from diffaccel.media import count_video_frames, read_video_window

    try:
        length = count_video_frames(path)
        if length < frames:
            raise ValueError(f"Training clip {path} has {length} frames; the teacher is trained on {frames} "
                             f"(--frames): drop it or use a shorter clip length.")
        start = int(rng.integers(0, length - frames + 1))
        video = read_video_window(path, start, frames)
    except (OSError, RuntimeError) as error:
        raise ValueError(f"Cannot read training clip {path}: {error}") from None
    window = [fit_crop(Image.fromarray(frame), height, width) for frame in video]
    return torch.stack(window, dim=1)


@dataclass(frozen=True)
class CaptionedImages:
    """A folder of training images with captions (see ``read_captioned_folder``), served at ``resolution``
    × ``width`` (None: square), resized to cover it and centre-cropped. Each epoch visits every image once."""

    root: str
    resolution: int = 64
    entries: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)
    width: int | None = None

    def __post_init__(self) -> None:
        if self.resolution <= 0 or (self.width is not None and self.width <= 0):
            raise ValueError(f"CaptionedImages: resolution={self.resolution} and width={self.width} must be positive.")
        if not self.entries:
            object.__setattr__(self, "entries", read_captioned_folder(Path(self.root)))

    def batch(self, seed: int, step: int, size: int) -> tuple[torch.Tensor, list[str]]:
        chosen = [self.entries[i] for i in epoch_indices(seed, step, size, len(self.entries))]
        pixels = torch.stack([load_picture(Path(self.root) / name, self.resolution, self.width or self.resolution)
                              for name, _ in chosen])
        return pixels, [caption for _, caption in chosen]

    def describe(self) -> str:
        return f"images:{Path(self.root).resolve()} ({len(self.entries)})"


@dataclass(frozen=True)
class CaptionedClips:
    """A folder of training clips (.mp4 needs imageio-ffmpeg; .gif and the other formats imageio reads) with
    captions, laid out as ``CaptionedImages`` is; served as ``frames`` consecutive frames from a start
    drawn from (seed, step, position), at ``resolution`` × ``width`` (None: square). Each epoch visits every
    clip once."""

    root: str
    resolution: int = 64
    frames: int = 9
    entries: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)
    width: int | None = None

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.frames <= 0 or (self.width is not None and self.width <= 0):
            raise ValueError(f"CaptionedClips: resolution={self.resolution}, width={self.width} and frames={self.frames} "
                             f"must be positive.")
        if not self.entries:
            object.__setattr__(self, "entries", read_captioned_folder(Path(self.root), CLIP_SUFFIXES, "clip"))

    def batch(self, seed: int, step: int, size: int) -> tuple[torch.Tensor, list[str]]:
        """(size, 3, F, H, W) pixels in [-1, 1] and their captions."""
        chosen = [self.entries[i] for i in epoch_indices(seed, step, size, len(self.entries))]
        pixels = torch.stack([
            load_clip_window(Path(self.root) / name, self.resolution, self.width or self.resolution, self.frames,
                             np.random.default_rng([seed, 7933, step, position]))
            for position, (name, _) in enumerate(chosen)])
        return pixels, [caption for _, caption in chosen]

    def describe(self) -> str:
        return f"clips:{Path(self.root).resolve()} ({len(self.entries)})"


@dataclass(frozen=True)
class PromptList:
    """Captions alone, for data-free distillation (TDM): ``batch`` returns no pixels."""

    prompts: tuple[str, ...]
    resolution: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(str(p) for p in self.prompts))
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise ValueError("PromptList needs at least one prompt, none of them empty.")

    @classmethod
    def from_file(cls, path: str | Path, resolution: int = 64) -> "PromptList":
        """One prompt per line; blank lines are skipped."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Prompt file {path} does not exist.")
        prompts = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if not prompts:
            raise ValueError(f"Prompt file {path} holds no prompts.")
        return cls(prompts, resolution)

    def batch(self, seed: int, step: int, size: int) -> tuple[None, list[str]]:
        return None, [self.prompts[i] for i in epoch_indices(seed, step, size, len(self.prompts))]

    def describe(self) -> str:
        import hashlib

        digest = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:12]
        return f"prompts:{len(self.prompts)}:{digest}"


DataSource = ProceduralScenes | ProceduralClips | CaptionedImages | CaptionedClips | PromptList


def require_images(source: DataSource | None, method: str) -> None:
    """Consistency methods noise training images; prompts alone are for the data-free TDM."""
    if isinstance(source, PromptList):
        raise ValueError(f"{method} noises training images: give a folder of captioned images (or clips, for a video "
                         f"teacher), not prompts alone (tdm is the data-free method).")


def serve_at(source: DataSource, height: int, width: int) -> DataSource:
    """The same source serving ``height`` × ``width``: folders of the user's are cropped to any size; the
    procedural scenes and clips render squares only; prompts have no size to speak of."""
    if isinstance(source, (CaptionedImages, CaptionedClips)):
        return dataclasses.replace(source, resolution=height, width=None if width == height else width)
    if height != width and not isinstance(source, PromptList):
        raise ValueError(f"The procedural training {'clips' if isinstance(source, ProceduralClips) else 'scenes'} are "
                         f"square; distil the reference models at square sizes, not {height} x {width}.")
    return source if source.resolution == height else dataclasses.replace(source, resolution=height)


def data_source(spec: "str | Path | DataSource | None", resolution: int, frames: int = 9) -> DataSource | None:
    """What ``distill(data=...)`` takes: a folder of captioned images or clips, a text file of prompts (one
    per line), a source object, or None (the teacher's own, where it has one)."""
    if spec is None or isinstance(spec, DataSource):
        return spec
    path = Path(spec)
    if path.is_dir():
        return CaptionedClips(str(path), resolution, frames) if folder_holds_clips(path) else CaptionedImages(str(path), resolution)
    if path.is_file():
        return PromptList.from_file(path, resolution)
    raise ValueError(f"Distillation data {str(spec)!r} is neither a folder of captioned images or clips nor a prompt file.")


def describe(data: DataSource | None) -> str:
    """A stable description of a source, recorded in checkpoints so a resumed run uses the same data."""
    return ProceduralScenes().describe() if data is None else data.describe()
