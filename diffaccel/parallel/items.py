"""Work items of a render farm: prompts read from a file, each with a deterministic id.

An item's id hashes everything that decides its output (model, accel config, the full call,
prompt, negative prompt, seed), so the same item always lands in the same file and a rerun
can tell what is already done without comparing pixels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

# Per-item call arguments a prompts.jsonl line may set (the same ones the CLI exposes).
ITEM_PARAMS = ("num_inference_steps", "guidance_scale", "height", "width", "num_frames")
ITEM_KEYS = ("prompt", "seed", "negative_prompt", *ITEM_PARAMS)
ID_LENGTH = 20  # hex digits of sha256: 80 bits, no collision in any farm's lifetime


@dataclass(frozen=True)
class WorkItem:
    """One generation: a prompt, its seed and the call arguments that differ from the job's."""

    id: str
    prompt: str
    seed: int
    negative_prompt: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the job's call arguments merged with the item's own
    index: int = 0  # line number in the prompts file (0-based), for messages and ordering

    @property
    def shard(self) -> str:
        """Output sub-folder: the id's first two hex digits, so no folder holds more than ~1/256 of a job."""
        return self.id[:2]


def item_id(model: str, config: dict, params: dict, prompt: str, negative_prompt: str | None, seed: int) -> str:
    """sha256 of the canonical JSON of everything that decides the output."""
    payload = {"model": model, "config": config, "params": params, "prompt": prompt,
               "negative_prompt": negative_prompt, "seed": seed}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_LENGTH]


@dataclass(frozen=True)
class PromptLine:
    """One prompt as read from the file, before it is tied to a job."""

    prompt: str
    seed: int
    negative_prompt: str | None
    params: dict[str, Any]
    index: int


def read_prompt_lines(path: str | Path, seed: int = 0, negative_prompt: str | None = None) -> list[PromptLine]:
    """A ``.jsonl`` file (one object per line: ``prompt``, optional ``seed``, ``negative_prompt`` and
    call arguments) or any other text file (one prompt per line). Blank lines are skipped; a line
    without a seed gets ``seed`` + its index among the prompts."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Prompts file {str(path)!r} does not exist.")
    jsonl = path.suffix.lower() == ".jsonl"
    lines: list[PromptLine] = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        index = len(lines)
        if jsonl:
            lines.append(_parse_json_line(path, number, text, index, seed + index, negative_prompt))
        else:
            lines.append(PromptLine(text.strip(), seed + index, negative_prompt, {}, index))
    if not lines:
        raise ValueError(f"Prompts file {str(path)!r} holds no prompts.")
    return lines


def _parse_json_line(path: Path, number: int, text: str, index: int, seed: int, negative: str | None) -> PromptLine:
    where = f"{path.name} line {number}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error.msg} at column {error.colno}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object with a 'prompt', got {type(data).__name__}.")
    unknown = sorted(set(data) - set(ITEM_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; allowed: {list(ITEM_KEYS)}.")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where} needs a non-empty 'prompt' string.")
    item_seed = data.get("seed", seed)
    if not isinstance(item_seed, int) or isinstance(item_seed, bool) or item_seed < 0:
        raise ValueError(f"{where}: 'seed' must be a non-negative integer, got {item_seed!r}.")
    negative = data.get("negative_prompt", negative)
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"{where}: 'negative_prompt' must be a string.")
    params = {k: data[k] for k in ITEM_PARAMS if k in data}
    for name, value in params.items():
        kind = float if name == "guidance_scale" else int
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
            raise ValueError(f"{where}: {name!r} must be a positive {kind.__name__}, got {value!r}.")
    return PromptLine(prompt.strip(), item_seed, negative, params, index)


def work_items(lines: list[PromptLine], model: str, config: dict, call: dict) -> list[WorkItem]:
    """Tie prompt lines to a job: merge each line's call arguments over the job's and hash the id.

    Two lines that come out identical are one item (same id, same file), kept at the first line.
    """
    items: dict[str, WorkItem] = {}
    for line in lines:
        params = {**call, **line.params}
        if "guidance_scale" in params:
            params["guidance_scale"] = float(params["guidance_scale"])  # 4 and 4.0 are one item
        ident = item_id(model, config, params, line.prompt, line.negative_prompt, line.seed)
        items.setdefault(ident, WorkItem(ident, line.prompt, line.seed, line.negative_prompt, params, line.index))
    return list(items.values())


def batches(items: Sequence[WorkItem], size: int) -> list[list[WorkItem]]:
    """Items for one pipeline call each: runs of consecutive items with the same call arguments (and a
    negative prompt on all or none of them, which one list argument needs), at most ``size`` a call, in order."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}.")
    groups: list[list[WorkItem]] = []
    for item in items:
        last = groups[-1] if groups else None
        if (last is not None and len(last) < size and last[0].params == item.params
                and (last[0].negative_prompt is None) == (item.negative_prompt is None)):
            last.append(item)
        else:
            groups.append([item])
    return groups
