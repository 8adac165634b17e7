"""A farm's record on disk: ``job.json`` (what the job is) and ``manifest/*.jsonl`` (what was made).

Every worker process appends to its own JSONL file, one row per finished item, each row one
``write`` on an ``O_APPEND`` descriptor followed by ``fsync``: no two processes ever share a
file, so no locking is needed on local or network file systems, and a process killed mid-write
leaves at most one truncated last line, which readers skip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger("diffaccel")

JOB_FILE = "job.json"
MANIFEST_DIR = "manifest"
STATUSES = ("done", "failed")


@dataclass(frozen=True)
class JobRecord:
    """What decides every output of a job. A folder holds one job: results made with another
    model, config, call or diffaccel version are never mixed into it."""

    model: str
    revision: str | None  # the weights: a content hash of a local folder, or a hub snapshot commit
    config: dict
    call: dict
    dtype: str
    fps: int
    diffaccel: str
    loras: list = field(default_factory=list)  # LoRAs fused into the model: source, scale, file, content hash
    compile: dict | None = None  # torch.compile of the denoisers (mode, backend): compiled kernels round differently
    # Items per pipeline call: a batch's caches and adaptive guidance decide for the whole batch, and batched
    # kernels round differently, so a batched item's output differs (slightly) from a single call's.
    batch_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        for name in ("loras", "compile"):
            if not record[name]:
                del record[name]  # a job without them keeps the fingerprint it had before they were recorded
        if record["batch_size"] == 1:
            del record["batch_size"]
        return record

    def fingerprint(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def open_job(out: str | Path, record: JobRecord) -> Path:
    """Create ``out`` with ``job.json``, or check that it already holds this very job.

    A different job is refused rather than put in a sub-folder: ``DIR/<shard>/<id>`` stays the one
    place a job's outputs live, and a rerun with a changed option fails loudly instead of quietly
    starting over somewhere else.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JOB_FILE
    wanted = {"fingerprint": record.fingerprint(), **json.loads(json.dumps(record.to_dict()))}
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not valid JSON; it is not a farm folder diffaccel can continue.") from None
        if existing.get("fingerprint") != wanted["fingerprint"]:
            differing = sorted(k for k in wanted if k != "fingerprint" and existing.get(k) != wanted[k])
            raise ValueError(
                f"{out} holds another farm job (fingerprint {existing.get('fingerprint')}, this run "
                f"{wanted['fingerprint']}; fields that differ: {differing}). Results of different models, configs, "
                f"call arguments or diffaccel versions are not mixed: use another --out folder, or delete {out}."
            )
        return out
    tmp = path.with_name(f".{JOB_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(wanted, indent=2) + "\n")
    os.replace(tmp, path)
    return out


@dataclass(frozen=True)
class ManifestRow:
    """One attempt at one item: the inputs, where the output is and its hash, how long it took."""

    id: str
    status: str  # "done" or "failed"
    prompt: str
    seed: int
    negative_prompt: str | None
    params: dict
    worker: str
    path: str | None = None  # relative to the job folder
    sha256: str | None = None
    seconds: dict = field(default_factory=dict)  # render (the item's share of its call), write (encode + hash)
    attempts: int = 1
    error: str | None = None
    stats: dict = field(default_factory=dict)  # diffaccel.stats of the call
    finished: str = ""  # UTC, ISO 8601
    batch: int = 1  # items rendered by the same pipeline call (1 also where a failed batch was redone item by item)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"ManifestRow.status must be one of {STATUSES}, got {self.status!r}.")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"), default=str)

    @classmethod
    def from_dict(cls, data: dict) -> "ManifestRow":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def worker_name(engine: str, index: int) -> str:
    """Unique per process (host and pid included), so every process appends to a file of its own."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", os.uname().nodename) or "host"
    return f"{engine}-{index}-{host}-{os.getpid()}"


class ManifestWriter:
    """Appends rows to ``manifest/<worker>.jsonl``, each one complete on disk before the next item."""

    def __init__(self, out: str | Path, worker: str) -> None:
        folder = Path(out) / MANIFEST_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{worker}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if not _ends_with_newline(self.path):
            self._write(b"\n")  # a predecessor of this name was killed mid-row: start on a fresh line

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def append(self, row: ManifestRow) -> None:
        self._write((row.to_json() + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_with_newline(path: Path) -> bool:
    """True for an empty file or one whose last row is complete."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_manifest(out: str | Path) -> list[ManifestRow]:
    """Every row of every worker file, oldest first; a truncated or garbled line is skipped."""
    folder = Path(out) / MANIFEST_DIR
    rows: list[ManifestRow] = []
    skipped = 0
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else ():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rows.append(ManifestRow.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError):
                skipped += 1
    if skipped:
        logger.warning("diffaccel farm: skipped %d unreadable manifest line(s) in %s (a killed write)", skipped, folder)
    return sorted(rows, key=lambda row: row.finished)


def finished_ids(out: str | Path, rows: Iterable[ManifestRow]) -> set[str]:
    """Ids with a ``done`` row whose output file is on disk."""
    out = Path(out)
    return {row.id for row in rows if row.status == "done" and row.path and (out / row.path).is_file()}
