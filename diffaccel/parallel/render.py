"""One replica of a farm: an accelerated pipeline that turns work items into files and manifest rows.

Every engine runs the same ``Renderer``; only how items reach it differs. A failing item (a
pipeline error, a bad per-item argument) becomes a ``failed`` row and the replica goes on; a
rerun of the job tries it again.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from diffaccel.media import pipeline_samples

from .items import WorkItem
from .job import FarmJob
from .manifest import ManifestRow, ManifestWriter, utc_now

logger = logging.getLogger("diffaccel")


def load_pipeline(job: FarmJob, device: str | None = None, devices: Sequence[int] = ()) -> Any:
    """The job's pipeline on ``device``; with several CUDA ``devices`` its components are spread
    over them by diffusers' ``device_map="balanced"`` (a model too large for one device)."""
    from diffaccel.loading import load_model

    if len(devices) <= 1:
        return load_model(job.model, device, job.dtype, loras=job.loras).pipe
    import torch
    from diffusers import DiffusionPipeline

    from diffaccel.loading import torch_dtype
    from diffaccel.lora import apply_loras
    from diffaccel.pipelines import reference

    missing = [d for d in devices if d >= torch.cuda.device_count()]
    if missing:
        raise ValueError(f"A replica on CUDA devices {list(devices)} needs them visible; this process sees "
                         f"{torch.cuda.device_count()} CUDA device(s).")
    source = reference.path(job.model) if job.name != job.model else job.model
    max_memory = {d: torch.cuda.get_device_properties(d).total_memory for d in devices}
    pipe = DiffusionPipeline.from_pretrained(source, dtype=torch_dtype(job.dtype, "cuda"), device_map="balanced",
                                             max_memory=max_memory)
    apply_loras(pipe, job.loras)
    return pipe


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_output(path: Path, sample: np.ndarray, is_video: bool, fps: int) -> None:
    """Write-then-rename with the project's writers: a killed write never leaves a partial output."""
    from diffaccel.eval.samples import _write_atomic, write_sample
    from diffaccel.media import save_video

    path.parent.mkdir(parents=True, exist_ok=True)
    if is_video:
        _write_atomic(path, lambda tmp: save_video(sample, tmp, fps=fps))
    else:
        write_sample(path, sample)


class Renderer:
    """Loads (or takes) a pipeline, accelerates it with the job's config, renders items (one by one, or
    ``job.batch_size`` at a time where they share their call arguments),
    writing each output to ``out/<shard>/<id>.png|mp4`` and its row to this worker's manifest file."""

    def __init__(self, job: FarmJob, out: str | Path, worker: str, device: str | None = None,
                 devices: Sequence[int] = (), pipe: Any = None, retries: int = 0) -> None:
        import diffaccel
        from diffaccel.compiling import compile_denoisers
        from diffaccel.loading import is_video_pipeline

        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}.")
        self.job, self.out, self.worker, self.retries = job, Path(out), worker, retries
        self.pipe = pipe if pipe is not None else load_pipeline(job, device, devices)
        self.is_video = is_video_pipeline(self.pipe)
        diffaccel.accelerate(self.pipe, job.accel_config())
        compile_denoisers(self.pipe, job.compile, backend=job.compile_backend)
        self.pipe.set_progress_bar_config(disable=True)
        self.accepted = set(inspect.signature(self.pipe.__call__).parameters)
        refused = sorted(set(job.call) - self.accepted)
        if refused:
            raise ValueError(f"{type(self.pipe).__name__} does not take {refused}; drop those options.")
        self.writer = ManifestWriter(self.out, worker)

    def output_path(self, item: WorkItem) -> Path:
        return self.out / item.shard / f"{item.id}.{'mp4' if self.is_video else 'png'}"

    def render(self, item: WorkItem) -> ManifestRow:
        """Render one item (``retries`` more tries on an error), record the outcome, return its row."""
        error: Exception | None = None
        for attempt in range(1, self.retries + 2):
            try:
                (row,) = self._render_once([item], attempt)
                break
            except Exception as caught:  # noqa: BLE001 - one bad item must not stop the replica
                error = caught
                logger.warning("diffaccel farm: item %s (line %d) failed on try %d: %s", item.id, item.index + 1,
                               attempt, caught)
        else:
            row = self._row(item, "failed", attempts=self.retries + 1, error=f"{type(error).__name__}: {error}")
        self.writer.append(row)
        return row

    def render_batch(self, items: Sequence[WorkItem]) -> list[ManifestRow]:
        """Render items that share their call arguments (``items.batches``) in one pipeline call and record
        them; a batch that raises is redone item by item, so one bad item fails alone."""
        if len(items) == 1:
            return [self.render(items[0])]
        try:
            rows = self._render_once(items, attempt=1)
        except Exception as caught:  # noqa: BLE001 - redo the items one by one
            logger.warning("diffaccel farm: a call of %d items (lines %s) failed (%s: %s); rendering them one by one",
                           len(items), ", ".join(str(item.index + 1) for item in items), type(caught).__name__, caught)
            return [self.render(item) for item in items]
        for row in rows:
            self.writer.append(row)
        return rows

    def _render_once(self, items: Sequence[WorkItem], attempt: int) -> list[ManifestRow]:
        import torch

        import diffaccel

        first = items[0]
        kwargs = dict(first.params)
        if first.negative_prompt is not None:
            negatives = [item.negative_prompt for item in items]
            kwargs["negative_prompt"] = negatives if len(items) > 1 else negatives[0]
        refused = sorted(set(kwargs) - self.accepted)
        if refused:
            raise ValueError(f"{type(self.pipe).__name__} does not take {refused}.")
        generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
        prompts = [item.prompt for item in items]
        start = time.perf_counter()
        result = self.pipe(prompt=prompts if len(items) > 1 else prompts[0],
                           generator=generators if len(items) > 1 else generators[0], output_type="np", **kwargs)
        share = (time.perf_counter() - start) / len(items)
        samples = pipeline_samples(result, self.is_video)
        if len(samples) != len(items):
            raise RuntimeError(f"{type(self.pipe).__name__} returned {len(samples)} outputs for {len(items)} prompts.")
        stats = diffaccel.stats(self.pipe)
        rows = []
        for item, sample in zip(items, samples):
            written = time.perf_counter()
            path = self.output_path(item)
            write_output(path, sample, self.is_video, self.job.fps)
            digest = file_sha256(path)
            seconds = {"render": round(share, 4), "write": round(time.perf_counter() - written, 4)}
            rows.append(self._row(item, "done", attempts=attempt, path=path.relative_to(self.out).as_posix(),
                                  sha256=digest, seconds=seconds, stats=stats, batch=len(items)))
        return rows

    def _row(self, item: WorkItem, status: str, **values: Any) -> ManifestRow:
        return ManifestRow(id=item.id, status=status, prompt=item.prompt, seed=item.seed,
                           negative_prompt=item.negative_prompt, params=item.params, worker=self.worker,
                           finished=utc_now(), **values)

    def close(self) -> None:
        self.writer.close()
