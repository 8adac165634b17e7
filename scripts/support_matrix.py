"""Which method applies to which model family: each method on each family's tiny pipeline (the test
suite's, random weights, built offline), recorded as what happened.

    python scripts/support_matrix.py [--out docs/support_matrix.md] [--families flux,wan]

A cell says "yes" when the method ran and did its work on that call (blocks skipped, unconditional
calls skipped, stages run, sparse attention calls made), "dense" when sparse attention fell back to
dense attention with its logged reason (a sequence too short for its blocks at the tiny size, or a mask), "no effect" when it ran without doing anything on these
random weights, and "refused" with the start of the error otherwise. Quality is not measured here:
these are random-weight models (the README's benches measure quality on the reference models).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny pipelines live with the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built in-process

import diffaccel  # noqa: E402
from diffaccel import (  # noqa: E402
    AdaptiveGuidanceConfig,
    BlockCacheConfig,
    BlockSparseAttentionConfig,
    BottleneckConfig,
    DeepCacheConfig,
    DeltaDiTConfig,
    TeaCacheConfig,
)

# Eager settings, so that a method that applies does its work even on a few steps of random weights.
METHODS = {
    "block cache": dict(cache=BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=None)),
    "TeaCache": dict(cache=TeaCacheConfig(threshold=1e9, force_last_step=False)),
    "Δ-DiT": dict(cache=DeltaDiTConfig(cached_blocks=1, boundary_fraction=1.0, cache_interval=2)),
    "DeepCache": dict(cache=DeepCacheConfig(cache_interval=2)),
    "adaptive guidance": dict(guidance=AdaptiveGuidanceConfig(threshold=-1.0, min_steps=1)),
    "bottleneck": dict(sampling=BottleneckConfig(stage_steps=(1, 2, 1), min_stage_tokens=1)),
    "block-sparse attention": dict(attention=BlockSparseAttentionConfig(block_size=16, dense_steps=0, dense_blocks=(),
                                                                        keep="topk", ratio_or_threshold=0.5)),
}
# What shows that a method did its work, from diffaccel.stats().
EVIDENCE = {
    "block cache": "blocks_skipped", "TeaCache": "blocks_skipped", "Δ-DiT": "blocks_skipped",
    "DeepCache": "cache_hits", "adaptive guidance": "guidance_skipped_uncond", "bottleneck": "bottleneck_stages",
    "block-sparse attention": "attention_sparse_calls",
}


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def cell(case, method: str, run) -> str:
    messages = _Messages()
    logger = logging.getLogger("diffaccel")
    logger.addHandler(messages)
    logger.setLevel(logging.INFO)
    try:
        diffaccel.accelerate(case.pipe, **METHODS[method])
        overrides = {}
        if method == "bottleneck":  # twice the tiny size, so the half-size stage keeps a size the pipeline accepts
            overrides = {k: 2 * case.call_kwargs[k] for k in ("height", "width") if k in case.call_kwargs}
        run(case, seed=0, **overrides)
        stats = diffaccel.stats(case.pipe)
    except (ValueError, TypeError, RuntimeError) as error:
        return "refused: " + _short(str(error))
    finally:
        logger.removeHandler(messages)
        diffaccel.remove(case.pipe)
    if stats.get(EVIDENCE[method], 0):
        return "yes"
    dense = next((m for m in messages.records if "runs dense" in m), None)
    if method == "block-sparse attention" and dense is not None:
        return "dense (" + _short(dense.removeprefix("diffaccel: ")) + ")"
    return "no effect"


def _short(text: str, limit: int = 110) -> str:
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "support_matrix.md"))
    parser.add_argument("--families", default=None, help="comma-separated tiny families (default: all)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from tiny_pipelines import FAMILIES, build, run

    torch.set_num_threads(1)
    names = args.families.split(",") if args.families else list(FAMILIES)
    rows = []
    started = time.time()
    for name in names:
        case = build(name)
        denoiser = type(case.denoiser).__name__
        cells = [cell(case, method, run) for method in METHODS]
        rows.append((name, type(case.pipe).__name__, denoiser, cells))
        print(f"{name}: " + ", ".join(f"{m}={c.split(':')[0]}" for m, c in zip(METHODS, cells)), flush=True)
    lines = [
        "# Which method applies to which model family",
        "",
        f"Generated by `python scripts/support_matrix.py` in {time.time() - started:.0f} s: every method on each family's",
        "tiny pipeline (the test suite's: real diffusers classes, random weights, built offline), with eager",
        "settings. \"yes\": the method did its work on the call (blocks or unconditional calls skipped, stages run,",
        "sparse calls made); \"dense\": sparse attention fell back to dense attention, logged; \"no effect\": it ran",
        "and did nothing on these random weights; \"refused\": the start of the error it raised. CFG parallel and",
        "context parallel need torchrun and are covered by `tests/test_parallel.py`. Quality is measured on the",
        "reference models, in the README's benches, not here.",
        "",
        "| family | pipeline | denoiser | " + " | ".join(METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    for name, pipe, denoiser, cells in rows:
        lines.append(f"| {name} | {pipe} | {denoiser} | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
