"""Writing pipeline outputs to image and video files."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".gif")


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] (diffusers' ``output_type="np"``) to uint8."""
    if array.dtype == np.uint8:
        return array
    return (np.clip(np.nan_to_num(array), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def pipeline_samples(result, is_video: bool | None = None) -> np.ndarray:
    """The samples a pipeline call returned, one per prompt: ``frames`` of a video pipeline, ``images`` of an
    image one (Kandinsky 5's image pipeline names the field ``image``; Cosmos 3's holds one ``video`` and SANA-WM's
    ``frames`` one video, given their batch axis here). ``is_video=None`` takes whichever the output has, frames first."""
    names = {True: ("frames", "video"), False: ("images", "image"), None: ("frames", "video", "images", "image")}[is_video]
    for name in names:
        value = getattr(result, name, None)
        if value is not None:
            if hasattr(value, "detach"):  # a tensor (output_type="pt")
                value = value.detach().float().cpu()
            samples = np.asarray(value)
            # one video without a batch axis (Cosmos 3's ``video``, SANA-WM's ``frames``): (T, H, W, C)
            return samples[None] if name == "video" or (is_video and samples.ndim == 4) else samples
    raise ValueError(f"{type(result).__name__} holds none of {list(names)}: not a pipeline output this tool reads.")


def check_output_path(path: str | Path, is_video: bool) -> Path:
    """Refuse a file type the pipeline cannot produce, before any generation work."""
    path = Path(path)
    suffix = path.suffix.lower()
    if is_video and suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"This is a video pipeline: write to one of {VIDEO_SUFFIXES}, not {path.name!r}.")
    if not is_video and suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"This is an image pipeline: write to one of {IMAGE_SUFFIXES}, not {path.name!r}.")
    return path


def save_image(image: np.ndarray, path: str | Path) -> Path:
    """Save one (H, W, C) image."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(image)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    Image.fromarray(pixels).save(path)
    return path


def _require_writer(path: Path) -> None:
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise ValueError(
            f"Writing {path.name} needs imageio-ffmpeg: pip install 'diffaccel[video]' (or write a .gif)."
        ) from None


def save_video(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Save (F, H, W, C) frames as MP4 (needs imageio-ffmpeg: pip install 'diffaccel[video]') or GIF."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(frames)
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, pixels, extension=".gif", duration=1000 / fps, loop=0)
        return path
    _require_writer(path)
    # H.264 wants even sizes; macro_block_size=1 keeps tiny test frames as they are.
    iio.imwrite(path, pixels, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)
    return path


def _require_reader(path: Path) -> None:
    if path.suffix.lower() == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ValueError(f"Reading {path.name} needs imageio-ffmpeg: pip install 'diffaccel[video]'.") from None


def _rgb_frames(frames: np.ndarray, path: Path) -> np.ndarray:
    """(F, H, W, 3) uint8 from what a reader returns: one frame, grey frames or RGBA frames."""
    frames = np.asarray(frames)
    if frames.ndim == 2:  # one grey frame
        frames = frames[..., None]
    if frames.ndim == 3 and frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    if frames.ndim == 3 and frames.shape[-1] not in (3, 4):  # grey frames
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim == 3:  # a one-frame file
        frames = frames[None]
    if frames.ndim == 4 and frames.shape[-1] == 4:
        frames = frames[..., :3]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{path.name}: expected RGB video frames, got an array shaped {frames.shape}.")
    return frames.astype(np.uint8)


def read_video(path: str | Path) -> tuple[np.ndarray, int]:
    """(F, H, W, 3) uint8 frames of an .mp4 (needs imageio-ffmpeg) or .gif, and its frame rate (8 if unknown)."""
    import imageio.v3 as iio

    path = Path(path)
    _require_reader(path)
    frames = _rgb_frames(iio.imread(path, index=None), path)
    return frames, video_fps(path)


def video_fps(path: str | Path) -> int:
    """A video's frame rate from its metadata (8 if it states none)."""
    import imageio.v3 as iio

    try:
        meta = iio.immeta(path)
        if meta.get("fps"):
            return int(round(float(meta["fps"])))
        if meta.get("duration"):  # GIF: milliseconds per frame
            return max(1, int(round(1000.0 / float(meta["duration"]))))
    except Exception:  # metadata is optional; the frames are what matter
        pass
    return 8


def _iter_frames(path: Path) -> Iterator[np.ndarray]:
    """A video's frames one by one as (H, W, 3) uint8, decoded as a stream."""
    import imageio.v3 as iio

    _require_reader(path)
    for frame in iio.imiter(path):
        yield _rgb_frames(frame, path)[0]


def iter_video_chunks(path: str | Path, size: int) -> Iterator[np.ndarray]:
    """A video as consecutive (≤ size, H, W, 3) uint8 chunks, decoded as a stream: memory holds one chunk."""
    chunk = []
    for frame in _iter_frames(Path(path)):
        chunk.append(frame)
        if len(chunk) == size:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)


class VideoWriter:
    """Appends frames to a video file as they come: an MP4 is encoded as a stream (so a long video never
    sits in memory whole); a GIF, which is written in one go, gathers its frames until ``close``."""

    def __init__(self, path: str | Path, fps: int = 8) -> None:
        self.path, self.fps = Path(path), fps
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._gif_frames: list[np.ndarray] = []
        self._stream = None
        self._mp4 = self.path.suffix.lower() == ".mp4"
        if self._mp4:
            _require_writer(self.path)

    def append(self, frames: np.ndarray) -> None:
        """(F, H, W, 3) frames, floats in [0, 1] or uint8. The file is created with the first frames, so a
        run that fails before them leaves none."""
        for frame in to_uint8(frames):
            if not self._mp4:
                self._gif_frames.append(frame)
                continue
            if self._stream is None:
                import imageio.v2 as imageio

                # The same encoder settings as save_video: H.264, tiny frames kept as they are.
                self._stream = imageio.get_writer(self.path, format="FFMPEG", mode="I", fps=self.fps,
                                                  codec="libx264", macro_block_size=1)
            self._stream.append_data(frame)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        elif self._gif_frames:
            save_video(np.stack(self._gif_frames), self.path, fps=self.fps)
            self._gif_frames = []

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.lru_cache(maxsize=4096)
def _frame_count(path: str, modified_ns: int, size: int) -> int:
    import imageio.v3 as iio

    return sum(1 for _ in iio.imiter(path))  # counted, not converted


def count_video_frames(path: str | Path) -> int:
    """How many frames a video file holds, by decoding it once without keeping the frames (container
    metadata is often an estimate). Remembered per file version, so a training loop pays it once."""
    path = Path(path)
    _require_reader(path)
    stat = path.stat()
    return _frame_count(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def read_video_window(path: str | Path, start: int, count: int) -> np.ndarray:
    """Frames ``start`` … ``start + count − 1`` of a video as (count, H, W, 3) uint8, decoded as a stream:
    memory holds the window, not the file, so long videos need not be cut into clips."""
    path = Path(path)
    if start < 0 or count <= 0:
        raise ValueError(f"read_video_window: start={start} must be >= 0 and count={count} positive.")
    window = []
    for index, frame in enumerate(_iter_frames(path)):
        if index >= start:
            window.append(frame)
            if len(window) == count:
                return np.stack(window)
    raise ValueError(f"{path.name} has {start + len(window)} frames; frames {start}-{start + count - 1} were asked for.")
