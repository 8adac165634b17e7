"""The render farm: many prompts over many devices and nodes, resumable, one manifest.

    diffaccel farm --prompts prompts.jsonl --preset fast --out renders/ --engine ray

``run_farm`` opens the job folder (its fingerprint refuses a different job), plans what is left
(items with a ``done`` row and their file on disk are skipped; failed ones are tried again),
hands the rest to an engine and reports a summary. Outputs land at ``DIR/<shard>/<id>.png|mp4``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from diffaccel.lora import parse_loras

from .engines import ENGINES, EngineOptions, FarmError, make_engine
from .items import PromptLine, WorkItem, read_prompt_lines, work_items
from .job import FarmJob, make_job
from .manifest import finished_ids, open_job, read_manifest

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class Plan:
    """What this run does: ``todo`` in prompt-file order; ``finished`` items are skipped."""

    todo: tuple[WorkItem, ...]
    total: int
    finished: int
    retrying: int  # items in todo that failed in an earlier run


def make_plan(out: Path, items: Sequence[WorkItem], max_items: int | None = None) -> Plan:
    rows = read_manifest(out)
    done = finished_ids(out, rows)
    failed_before = {row.id for row in rows if row.status == "failed"}
    todo = [item for item in items if item.id not in done]
    if max_items is not None:
        todo = todo[:max_items]
    return Plan(tuple(todo), len(items), len(items) - sum(1 for item in items if item.id not in done),
                sum(1 for item in todo if item.id in failed_before))


@dataclass(frozen=True)
class Summary:
    """One run: ``done``/``failed`` now, ``skipped`` (finished before), ``left`` (not tried: --max-items)."""

    total: int
    done: int
    failed: int
    skipped: int
    retried: int
    left: int
    seconds: float
    mean_render_seconds: float | None

    @property
    def items_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        text = (f"farm: {self.total} items: {self.done} done, {self.skipped} skipped (finished before), "
                f"{self.failed} failed")
        if self.retried:
            text += f" ({self.retried} retried from an earlier run)"
        if self.left:
            text += f", {self.left} left for a later run"
        return text + f"; {self.seconds:.1f} s, {self.items_per_second:.2f} items/s"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "items_per_second": round(self.items_per_second, 4)}


def run_farm(job: FarmJob, prompts: Sequence[PromptLine], out: str | Path, engine: str = "local",
             options: EngineOptions | None = None, max_items: int | None = None, pipe: Any = None) -> Summary | None:
    """Render every prompt of ``prompts`` not yet finished in ``out``; the summary on the main process
    (None on other torchrun ranks). ``pipe``: an already loaded pipeline (local engine only)."""
    if max_items is not None and max_items < 0:
        raise ValueError(f"--max-items must be >= 0, got {max_items}.")
    out = Path(out)
    items = work_items(list(prompts), job.name, job.config, job.call)
    runner = make_engine(engine, options or EngineOptions())
    record = job.record()
    try:
        open_job(out, record)  # every process checks: a mismatch fails on all ranks alike
        plan = runner.share(lambda: make_plan(out, items, max_items))
        start = time.perf_counter()
        rows = runner.run(job, plan.todo, out, pipe)
        seconds = time.perf_counter() - start
    finally:
        runner.close()
    if rows is None:
        return None
    renders = [row.seconds["render"] for row in rows if row.status == "done"]
    done = sum(row.status == "done" for row in rows)
    failed = len(rows) - done
    summary = Summary(total=plan.total, done=done, failed=failed, skipped=plan.finished, retried=plan.retrying,
                      left=plan.total - plan.finished - len(rows), seconds=round(seconds, 3),
                      mean_render_seconds=round(sum(renders) / len(renders), 4) if renders else None)
    tmp = out / f".{SUMMARY_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"engine": engine, "fingerprint": record.fingerprint(), **summary.to_dict()},
                              indent=2) + "\n")
    os.replace(tmp, out / SUMMARY_FILE)
    return summary


def farm_command(args) -> int:
    """``diffaccel farm``: exit 0 when no item failed, 1 when some did (their rows say why; a rerun retries them)."""
    job = make_job(args.model, args.config or args.preset,
                   {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "height": args.height,
                    "width": args.width, "num_frames": args.frames}, dtype=args.dtype, fps=args.fps,
                   loras=parse_loras(args.lora, args.lora_2), compile=args.compile, compile_backend=args.compile_backend,
                   batch_size=args.batch_size)
    prompts = read_prompt_lines(args.prompts, seed=args.seed, negative_prompt=args.negative_prompt)
    options = EngineOptions(workers=args.workers, devices_per_replica=args.devices_per_replica, device=args.device,
                            retries=args.retries, progress=not args.no_progress, ray_address=args.ray_address)
    try:
        summary = run_farm(job, prompts, args.out, args.engine, options, max_items=args.max_items)
    except FarmError as error:
        print(f"diffaccel: error: {error}", file=sys.stderr)
        return 1
    if summary is None:
        return 0
    print(summary.line())
    print(f"outputs and manifest: {args.out} (manifest/*.jsonl, {SUMMARY_FILE})")
    return 0 if summary.failed == 0 else 1


__all__ = ["ENGINES", "EngineOptions", "FarmError", "FarmJob", "Plan", "Summary", "farm_command", "make_job",
           "make_plan", "read_prompt_lines", "run_farm"]
