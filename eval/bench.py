"""``diffaccel bench``: speed and quality of several configs on one model, side by side, in one run.

Per config: median wall-clock per call and speedup vs the first config (the baseline), denoiser
calls and blocks per call, peak memory, fidelity to the baseline's outputs (same prompts, same
seeds), judge adherence where the prompts are the reference scenes', and FID when there are
enough samples. Configs are interleaved within each repeat so slow drift of a noisy machine hits
all of them alike.
"""

from __future__ import annotations

import json
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import diffaccel
from diffaccel.media import pipeline_samples


@dataclass
class ConfigResult:
    name: str
    config: dict
    seconds: list[float] = field(default_factory=list)  # one per call, all repeats
    median_seconds: float = 0.0
    speedup: float = 1.0
    denoiser_calls: float = 0.0  # per pipeline call
    blocks_computed: float = 0.0
    blocks_skipped: float = 0.0
    peak_memory_mb: float = 0.0
    memory_kind: str = ""
    quality: dict[str, Any] = field(default_factory=dict)


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak, or process RSS sampled on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.kind = "cuda max_memory_allocated" if self.cuda else "process RSS (sampled every 5 ms)"
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            process = psutil.Process()
            self.peak = process.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, process.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def megabytes(self) -> float:
        return self.peak / 2**20


def _call(pipe, prompt: str, seed: int, call_kwargs: dict) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    result = pipe(prompt, generator=generator, output_type="np", **call_kwargs)
    return pipeline_samples(result)[0]


def run_bench(
    pipe: Any,
    configs: Sequence[tuple[str, Any]],
    prompts: Sequence[str],
    call_kwargs: dict,
    repeats: int = 3,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[list[ConfigResult], dict[str, np.ndarray]]:
    """Run every config on every prompt ``repeats`` times; returns results and each config's outputs.

    A config entry is ``(name, config)`` or ``(name, config, call_overrides)``; the overrides change that
    row's call only (e.g. an equal-cost control at fewer steps), and its outputs are still compared with
    the first row's."""
    from tqdm.auto import tqdm

    if len(configs) < 1:
        raise ValueError("bench needs at least one config; the first one is the baseline.")
    calls = {entry[0]: {**call_kwargs, **(entry[2] if len(entry) > 2 else {})} for entry in configs}
    for entry in configs:  # a bad preset or config fails before any row runs
        diffaccel.resolve_config(entry[1])
    resolved = []
    for name, spec, *_ in configs:  # warm-up (allocations, lazy init) once per config
        diffaccel.accelerate(pipe, spec)  # a preset's recipe for this pipeline (its UNet one, its fallbacks)
        resolved.append((name, diffaccel.config_of(pipe)))  # what ran, as the report records it
        _call(pipe, prompts[0], seed, calls[name])
    results = [ConfigResult(name=name, config=cfg.to_dict()) for name, cfg in resolved]
    outputs: dict[str, list[np.ndarray]] = {name: [] for name, _ in resolved}
    bar = tqdm(total=repeats * len(resolved) * len(prompts), disable=not progress, desc="bench", unit="call")
    # Configs take turns call by call, so a slow spell of a shared machine hits every config alike.
    for repeat in range(repeats):
        for i, prompt in enumerate(prompts):
            for (name, cfg), result in zip(resolved, results):
                diffaccel.accelerate(pipe, cfg)
                with PeakMemory(device) as memory:
                    start = time.perf_counter()
                    sample = _call(pipe, prompt, seed + i, calls[name])
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    result.seconds.append(time.perf_counter() - start)
                if repeat == 0:
                    outputs[name].append(sample)
                    stats = diffaccel.stats(pipe)
                    result.denoiser_calls += stats["denoiser_calls"] / len(prompts)
                    result.blocks_computed += stats["blocks_computed"] / len(prompts)
                    result.blocks_skipped += stats["blocks_skipped"] / len(prompts)
                result.peak_memory_mb = max(result.peak_memory_mb, memory.megabytes)
                result.memory_kind = memory.kind
                bar.update(1)
    bar.close()
    diffaccel.remove(pipe)
    baseline = statistics.median(results[0].seconds)
    for result in results:
        result.median_seconds = statistics.median(result.seconds)
        result.speedup = baseline / result.median_seconds
    return results, {name: np.stack(samples) for name, samples in outputs.items()}


def add_quality(
    results: list[ConfigResult],
    outputs: dict[str, np.ndarray],
    prompts: Sequence[str],
    judge_kind: str | None = None,
    real: np.ndarray | None = None,
    fid_min_samples: int = 200,
) -> None:
    """Fidelity to the baseline; judge adherence; FID against ``real`` when there are enough samples."""
    from diffaccel.eval import metrics

    baseline = outputs[results[0].name]
    for result in results:
        samples = outputs[result.name]
        for name, scores in metrics.fidelity(baseline, samples).items():
            if hasattr(scores, "mean"):  # LPIPS reports {"available": False, "reason": ...} when it cannot run
                result.quality[name] = float(scores.mean)
        if judge_kind is not None:
            result.quality["adherence"] = float(metrics.judge_adherence(samples, list(prompts), kind=judge_kind).mean)
        if real is not None and len(samples) >= fid_min_samples and judge_kind == "image":
            fid = metrics.fid(real, samples, features="judge")
            result.quality["fid"] = float(fid.value)
            result.quality["fid_features"] = fid.feature


def _finite(value: float) -> float:
    return value if np.isfinite(value) else 99.0


def write_report(
    results: list[ConfigResult], outputs: dict[str, np.ndarray], out_dir: str | Path, meta: dict
) -> dict[str, Path]:
    """report.json, report.md, speedup_vs_psnr.png, samples.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffaccel.media import to_uint8

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, hardware=hardware(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    (out / "report.json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2) + "\n")

    quality_keys = sorted({k for r in results for k, v in r.quality.items() if isinstance(v, (int, float))})
    header = ["config", "median s/call", "speedup", "denoiser calls", "blocks computed", "blocks skipped", "peak MB", *quality_keys]
    lines = [
        f"# diffaccel bench: {meta.get('model')}",
        "",
        f"{meta.get('num_prompts')} prompts x {meta.get('repeats')} repeats, seeds from {meta.get('seed')}; "
        f"call {meta.get('call_kwargs')}; hardware: {meta['hardware']}.",
        f"Speedup = baseline median / config median, measured in this run; fidelity vs `{results[0].name}` outputs.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in results:
        row = [r.name, f"{r.median_seconds:.3f}", f"{r.speedup:.2f}x", f"{r.denoiser_calls:.1f}", f"{r.blocks_computed:.0f}",
               f"{r.blocks_skipped:.0f}", f"{r.peak_memory_mb:.0f}"]
        row += [f"{r.quality[k]:.4g}" if isinstance(r.quality.get(k), (int, float)) else "" for k in quality_keys]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "![speedup vs PSNR](speedup_vs_psnr.png)", "", "![samples](samples.png)", ""]
    (out / "report.md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for r in results:
        psnr = _finite(r.quality.get("psnr", float("nan")))
        ax.scatter(r.speedup, psnr)
        ax.annotate(r.name, (r.speedup, psnr), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("speedup vs baseline (x)")
    ax.set_ylabel("PSNR vs baseline (dB; identical shown as 99)")
    ax.set_title(str(meta.get("model")))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_psnr.png")
    plt.close(fig)

    columns = min(6, len(next(iter(outputs.values()))))
    rows = []
    for r in results:
        samples = outputs[r.name][:columns]
        if samples.ndim == 5:  # clips: middle frame
            samples = samples[:, samples.shape[1] // 2]
        rows.append(np.concatenate(list(to_uint8(samples)), axis=1))
    from PIL import Image

    Image.fromarray(np.concatenate(rows, axis=0)).save(out / "samples.png")
    return {name: out / name for name in ("report.json", "report.md", "speedup_vs_psnr.png", "samples.png")}


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
