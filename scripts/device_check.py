"""Run diffaccel's CUDA paths on a GPU machine: every method on every tiny family, the Triton kernel
against its references, and the user's commands (generate, upscale, distill, a VAE training step).

The test suite runs on CPU (CI has no GPU), so this is where the paths our users take on a GPU get run:
reduced precision, CUDA generators and tensors made inside hooks, the Triton kernel chosen at run time.

    bash scripts/device_check.sh                  # on the device machine (carry .whl): reports into $OUT
    python scripts/device_check.py --out DIR [--device cuda] [--families wan flux ...] [--skip commands]

Each check is independent (a failure is recorded with its traceback and the next one runs); the results
go to DIR/device_check.json and a table to DIR/device_check.md. The exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffaccel  # noqa: E402
from diffaccel import (  # noqa: E402
    AdaptiveGuidanceConfig,
    BlockCacheConfig,
    BlockSparseAttentionConfig,
    BottleneckConfig,
    DeepCacheConfig,
    DeltaDiTConfig,
    SlidingTileAttentionConfig,
    TeaCacheConfig,
)
from tiny_pipelines import FAMILIES, build, run  # noqa: E402

UNETS = ("sd15", "sdxl")
PACKED = ("flux", "qwenimage", "ltx")  # packed-token latents: no SEA indicator
VIDEO = ("wan", "cogvideox", "hunyuan_video", "ltx")


@dataclass
class Result:
    part: str
    name: str
    ok: bool
    seconds: float
    detail: str = ""
    data: dict = field(default_factory=dict)


RESULTS: list[Result] = []


def check(part: str, name: str, fn) -> None:
    """Run one check; record pass/fail, its time and what it returned (a dict) or the traceback."""
    start = time.perf_counter()
    try:
        data = fn() or {}
        result = Result(part, name, True, time.perf_counter() - start, data.pop("detail", ""), data)
    except Exception as error:  # noqa: BLE001 - every failure is the finding, recorded and reported
        tb = traceback.format_exc(limit=6)
        result = Result(part, name, False, time.perf_counter() - start, f"{type(error).__name__}: {error}",
                        {"traceback": tb})
    RESULTS.append(result)
    mark = "ok  " if result.ok else "FAIL"
    print(f"[{mark}] {part:9s} {name:48s} {result.seconds:6.1f}s {result.detail[:160]}", flush=True)
    if not result.ok:
        print(result.data["traceback"], flush=True)


# ------------------------------------------------------------------------------------------ kernel


def kernel_checks(device: torch.device) -> None:
    from diffaccel.kernels.block_sparse import (
        block_sparse_attention,
        block_sparse_attention_torch,
        masked_dense_reference,
        num_blocks,
    )

    def one(tokens, heads, head_dim, dtype, block, density, key_pad):
        def body():
            g = torch.Generator(device="cpu").manual_seed(tokens + head_dim)
            q, k, v = (torch.randn(2, heads, tokens, head_dim, generator=g).to(device, dtype) for _ in range(3))
            n = num_blocks(tokens, block)
            scores = torch.rand(2, heads, n, n, generator=g) + torch.eye(n) * 2
            keep = max(1, round(density * n))
            mask = torch.zeros(2, heads, n, n, dtype=torch.bool).scatter_(-1, scores.topk(keep, -1).indices, True)
            mask = mask.to(device)
            lengths = torch.tensor([tokens, tokens - key_pad], device=device) if key_pad else None
            ref = masked_dense_reference(q.float(), k.float(), v.float(), mask, block, key_lengths=lengths)
            tri, used = block_sparse_attention(q, k, v, mask, block, implementation="auto", key_lengths=lengths)
            assert used == "triton", f"implementation='auto' on {device} chose {used}"
            tor = block_sparse_attention_torch(q, k, v, mask, block, key_lengths=lengths)
            err_tri = (tri.float() - ref).abs().max().item()
            err_tor = (tor.float() - ref).abs().max().item()
            tol = 2e-2 if dtype != torch.float32 else 1e-4  # float32: IEEE products (PyTorch's default)
            assert tri.dtype == dtype and tri.shape == q.shape, (tri.dtype, tri.shape)
            assert err_tri < tol and err_tor < tol, f"max error triton {err_tri:.2e}, torch {err_tor:.2e} > {tol}"
            return {"detail": f"max |err| triton {err_tri:.1e}, torch {err_tor:.1e}"}

        name = f"{tokens}t h{heads} d{head_dim} {str(dtype)[6:]} b{block} keep{density}" + (f" pad{key_pad}" if key_pad else "")
        check("kernel", name, body)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        one(4096, 4, 64, dtype, 128, 0.25, 0)
    one(5184 + 77, 3, 128, torch.bfloat16, 64, 0.15, 0)  # odd length (padding), d 128, 64-token blocks
    one(3000, 2, 64, torch.float16, 128, 0.5, 333)  # text padding: per-sample key lengths
    one(1000, 2, 96, torch.bfloat16, 64, 1.0, 0)  # every block kept, a head dim that is no power of two

    def float32_follows_tf32_setting():
        g = torch.Generator(device="cpu").manual_seed(7)
        q, k, v = (torch.randn(1, 4, 4096, 64, generator=g).to(device) for _ in range(3))
        mask = torch.rand(1, 4, 32, 32, generator=g).to(device) < 0.3
        ref = masked_dense_reference(q, k, v, mask, 128)
        errors = {}
        saved = torch.backends.cuda.matmul.allow_tf32
        try:
            for allowed in (False, True):
                torch.backends.cuda.matmul.allow_tf32 = allowed
                out, _ = block_sparse_attention(q, k, v, mask, 128, implementation="triton")
                errors[allowed] = (out - ref).abs().max().item()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        assert errors[False] < 1e-4 and errors[True] < 2e-3 and errors[True] > errors[False], errors
        return {"detail": f"float32 max |err| IEEE {errors[False]:.1e}, TF32 allowed {errors[True]:.1e}"}

    check("kernel", "float32 precision follows allow_tf32", float32_follows_tf32_setting)

    def autograd_refuses_triton():
        q = torch.randn(1, 2, 256, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        mask = torch.ones(1, 2, 2, 2, dtype=torch.bool, device=device)
        out, used = block_sparse_attention(q, q, q, mask, 128, implementation="auto")
        assert used == "torch", f"under autograd 'auto' chose {used}"
        out.float().sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
        return {"detail": "auto under autograd took the differentiable path"}

    check("kernel", "autograd through implementation=auto", autograd_refuses_triton)


# ------------------------------------------------------------------------------------------ families


def eager_cache() -> BlockCacheConfig:
    return BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=None)


def configs_for(name: str, pipe) -> dict[str, dict]:
    """The methods to run on this family: accelerate() keyword arguments, and the stat that must move."""
    if name in UNETS:
        return {
            "preset fast": dict(kwargs={"config": "fast"}, moved="blocks_skipped"),
            "deep cache interval 2": dict(kwargs={"cache": DeepCacheConfig(cache_interval=2)}, moved="blocks_skipped"),
            "AG γ=-1": dict(kwargs={"guidance": AdaptiveGuidanceConfig(threshold=-1.0)}, moved="guidance_skipped_uncond"),
        }
    out = {
        "preset fast": dict(kwargs={"config": "fast"}, moved=None),
        "preset turbo": dict(kwargs={"config": "turbo"}, moved=None),
        "block cache eager + taylorseer": dict(
            kwargs={"cache": BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=None, calibrator="taylorseer")},
            moved="blocks_skipped"),
        "teacache output forecast": dict(
            kwargs={"cache": TeaCacheConfig(threshold=100.0, reuse="output", calibrator="taylorseer")},
            moved="blocks_skipped"),
        "delta-dit": dict(kwargs={"cache": DeltaDiTConfig(cached_blocks=1)}, moved="blocks_skipped"),
        "AG γ=-1": dict(kwargs={"guidance": AdaptiveGuidanceConfig(threshold=-1.0)}, moved="guidance_skipped_uncond"),
        "interval guidance": dict(kwargs={"guidance": "interval"}, moved="guidance_skipped_uncond"),
    }
    # The bottleneck refuses packed-token latents and non-flow-matching schedulers (clear errors, tested on CPU).
    if name not in PACKED and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        out["bottleneck"] = dict(kwargs={"sampling": BottleneckConfig()}, moved=None)
    if name not in PACKED:
        out["teacache sea"] = dict(kwargs={"cache": TeaCacheConfig(threshold=100.0, indicator="sea")}, moved="blocks_skipped")
    if name in VIDEO:
        sparse = dict(block_size=16, dense_steps=0.0, dense_blocks=())
        out["block sparse (triton)"] = dict(
            kwargs={"attention": BlockSparseAttentionConfig(**sparse)}, moved="attention_kernel_triton", big=True)
        out["block sparse (torch)"] = dict(
            kwargs={"attention": BlockSparseAttentionConfig(**sparse, implementation="torch")},
            moved="attention_kernel_torch", big=True)
        out["sliding tile"] = dict(kwargs={"attention": SlidingTileAttentionConfig(block_size=16, dense_steps=0.0,
                                                                                   dense_blocks=())},
                                   moved="attention_sparse_calls", big=True)
    return out


def family_checks(name: str, device: torch.device) -> None:
    dtype = torch.float16 if name in UNETS else torch.bfloat16
    state: dict = {}

    def setup():
        case = build(name)
        case.pipe.to(device, dtype)
        state["case"] = case
        state["baseline"] = run(case, seed=0)
        again = run(case, seed=0)
        state["deterministic"] = bool(np.array_equal(again, state["baseline"]))
        big = {"height": case.call_kwargs["height"] * 2, "width": case.call_kwargs.get("width", 32) * 2}
        state["big"] = big
        state["baseline_big"] = run(case, seed=0, **big)
        assert np.isfinite(state["baseline"]).all(), "baseline output is not finite"
        return {"detail": f"{str(dtype)[6:]}, repeat run bit-identical: {state['deterministic']}"}

    check(name, "build + baseline on the device", setup)
    if "case" not in state:
        return
    case = state["case"]

    def same(a, b) -> float:
        return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())

    def off():
        diffaccel.accelerate(case.pipe, "off")
        diff = same(run(case, seed=0), state["baseline"])
        diffaccel.remove(case.pipe)
        assert diff == 0 or not state["deterministic"], f"off differs from the baseline by {diff}"
        return {"detail": f"max |off - baseline| {diff:.1e}"}

    check(name, "off", off)

    torch_sparse_out = {}
    for label, spec in configs_for(name, case.pipe).items():
        def body(spec=spec, label=label):
            kwargs = dict(spec["kwargs"])
            preset = kwargs.pop("config", None)
            if preset is not None:
                diffaccel.accelerate(case.pipe, preset, **kwargs)
            else:
                diffaccel.accelerate(case.pipe, **kwargs)
            size = state["big"] if spec.get("big") else {}
            try:
                first = run(case, seed=0, **size)
                stats = diffaccel.stats(case.pipe)
                second = run(case, seed=0, **size)
            finally:
                diffaccel.remove(case.pipe)
            baseline = state["baseline_big"] if size else state["baseline"]
            assert first.shape == baseline.shape, (first.shape, baseline.shape)
            assert np.isfinite(first).all(), "accelerated output is not finite"
            if state["deterministic"]:
                assert np.array_equal(first, second), f"a second call differs by {same(first, second):.1e}"
            moved = spec["moved"]
            if moved:
                assert stats.get(moved, 0) > 0, f"{moved} did not move: {stats}"
            if label == "block sparse (torch)":
                torch_sparse_out["out"] = first
            if label == "block sparse (torch)" and "triton" in torch_sparse_out:
                torch_sparse_out["gap"] = same(first, torch_sparse_out["triton"])  # reported; float32 is asserted
            if label == "block sparse (triton)":
                torch_sparse_out["triton"] = first
            keys = ("blocks_skipped", "guidance_skipped_uncond", "attention_kernel_triton", "attention_kernel_torch")
            shown = {k: stats[k] for k in keys if stats.get(k)}
            if label == "block sparse (torch)" and "gap" in torch_sparse_out:
                shown["max |Δ| to triton"] = round(torch_sparse_out["gap"], 3)
            return {"detail": f"vs baseline max |Δ| {same(first, baseline):.3f}; {shown}", "stats": stats}

        check(name, label, body)

    def restored():
        diff = same(run(case, seed=0), state["baseline"])
        assert diff == 0 or not state["deterministic"], f"after remove() the output differs by {diff}"
        return {"detail": f"max |after remove - baseline| {diff:.1e}"}

    check(name, "remove restores the baseline", restored)

    if name in VIDEO:
        def kernels_agree_in_float32():
            # In bf16 the two kernels' rounding differs and an adaptive mask amplifies it over the steps (a near
            # tie flips a block); in float32 the same masks are chosen and the outputs must agree.
            case.pipe.to(device, torch.float32)
            outs = {}
            for implementation in ("triton", "torch"):
                config = BlockSparseAttentionConfig(block_size=16, dense_steps=0.0, dense_blocks=(),
                                                    implementation=implementation)
                diffaccel.accelerate(case.pipe, attention=config)
                try:
                    outs[implementation] = run(case, seed=0, **state["big"])
                    assert diffaccel.stats(case.pipe).get(f"attention_kernel_{implementation}", 0) > 0
                finally:
                    diffaccel.remove(case.pipe)
            gap = same(outs["triton"], outs["torch"])
            assert gap < 1e-2, f"float32: triton and torch kernels differ end to end by {gap}"
            return {"detail": f"float32 end to end max |triton - torch| {gap:.1e}"}

        check(name, "block sparse triton = torch (float32)", kernels_agree_in_float32)
    case.pipe.to("cpu")
    del state["case"]
    torch.cuda.empty_cache() if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------ commands


def last_line(text: str) -> str:
    """The last line of a command's output that is not a progress bar."""
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    return lines[-1][:200] if lines else ""


def command_checks(out: Path, device: torch.device) -> None:
    """The user's commands, as subprocesses; what they write goes to ``out`` (not brought back)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    out.mkdir(parents=True, exist_ok=True)

    def cli(args: list[str], timeout: int = 240) -> dict:
        # From "/": in the repository root the bare diffaccel/ folder (no .pipelines) would shadow the install.
        proc = subprocess.run([sys.executable, "-m", "diffaccel.cli", *args], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd="/")
        tail = (proc.stdout + proc.stderr)[-1500:]
        assert proc.returncode == 0, f"exit {proc.returncode}: {tail}"
        return {"detail": last_line(tail), "tail": tail}

    dev = str(device)
    image_prompt = "a big green square at the top left on a black background"
    video_prompt = "a small red circle moving left on a blue background"

    def generate(output: str, prompt: str, *options: str, moved: str | None = None) -> dict:
        """``diffaccel generate``: the file is written, and the statistics it reports show the method ran."""
        path, stats_path = out / output, out / (Path(output).stem + ".json")
        cli(["generate", prompt, "-o", str(path), "--device", dev, "--stats-json", str(stats_path), *options])
        assert path.is_file() and path.stat().st_size > 0, f"{path} was not written"
        stats = json.loads(stats_path.read_text())
        stats = stats.get("stats", stats)
        if moved:
            assert stats.get(moved, 0) > 0, f"{moved} did not move: {stats}"
        keys = ("steps", "denoiser_calls", "blocks_skipped", "distilled_calls", "attention_kernel_triton",
                "attention_kernel_torch")
        return {"detail": ", ".join(f"{k} {stats[k]}" for k in keys if stats.get(k)), "stats": stats}

    check("commands", "generate image fast", lambda: generate(
        "image_fast.png", image_prompt, "--preset", "fast", moved="blocks_skipped"))
    check("commands", "generate image turbo (student)", lambda: generate(
        "image_turbo.png", image_prompt, "--preset", "turbo", moved="distilled_calls"))
    check("commands", "generate image --dtype float16 --upscale 2", lambda: generate(
        "image_up.png", image_prompt, "--dtype", "float16", "--upscale", "2"))
    check("commands", "generate video fast", lambda: generate(
        "video_fast.gif", video_prompt, "--preset", "fast", moved="blocks_skipped"))
    sparse_cfg = out / "sparse.json"
    sparse_cfg.write_text(json.dumps({"attention": {"method": "block_sparse", "block_size": 16}}))
    kernel = "attention_kernel_triton" if device.type == "cuda" else "attention_kernel_torch"
    check("commands", "generate video block sparse (config file)", lambda: generate(
        "video_sparse.gif", video_prompt, "--config", str(sparse_cfg), moved=kernel))
    check("commands", "distill lcd (20 steps)", lambda: cli(
        ["distill", "--method", "lcd", "--teacher", "reference:image", "--out", str(out / "lcd"), "--max-steps", "20",
         "--no-progress", "--lora-rank", "8"], timeout=300))
    check("commands", "distill tdm video sparse (4 steps)", lambda: cli(
        ["distill", "--method", "tdm", "--teacher", "reference:video", "--out", str(out / "tdm"), "--max-steps", "4",
         "--no-progress", "--lora-rank", "8", "--sparse-attention", '{"block_size": 16}'], timeout=300))

    def farm_batching():
        # Throughput of the farm's --batch-size on this GPU (the CPU suite checks only correctness).
        report = out / "farm_bench_image.md"
        proc = subprocess.run([sys.executable, "scripts/bench_farm.py", "--num", "32", "--batch-sizes", "1,4,16",
                               "--repeats", "1", "--device", dev, "--out", str(report.resolve())], capture_output=True,
                              text=True, env=env, timeout=240, cwd=ROOT)
        tail = (proc.stdout + proc.stderr)[-1500:]
        assert proc.returncode == 0, f"exit {proc.returncode}: {tail}"
        rows = [line for line in report.read_text().splitlines() if line.startswith("| 16 ")]
        return {"detail": rows[0] if rows else last_line(tail), "tail": tail}

    check("commands", "farm --batch-size 1/4/16 throughput (bench_farm)", farm_batching)

    def vae_training():
        # A fresh VAE trained into a folder of its own (--weights): the shipped weights are never touched.
        weights = out / "vae_check_weights"
        shutil.rmtree(weights, ignore_errors=True)
        proc = subprocess.run([sys.executable, "scripts/train_reference.py", "video-vae", "--device", dev,
                               "--minutes", "1", "--fresh", "--weights", str(weights.resolve())], capture_output=True,
                              text=True, env=env, timeout=200, cwd=ROOT)
        tail = (proc.stdout + proc.stderr)[-1500:]
        assert proc.returncode == 0, f"exit {proc.returncode}: {tail}"
        return {"detail": last_line(tail), "tail": tail}

    check("commands", "train_reference video-vae on the device (1 min)", vae_training)


def write_report(out: Path, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import diffusers
    header = (f"device {name}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
              f"{sum(r.ok for r in RESULTS)}/{len(RESULTS)} checks passed")
    lines = [f"# CUDA check ({header})", "", "| part | check | ok | s | detail |", "|---|---|---|---|---|"]
    for r in RESULTS:
        detail = r.detail.replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {r.part} | {r.name} | {'yes' if r.ok else '**FAIL**'} | {r.seconds:.1f} | {detail} |")
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    (out / "device_check.json").write_text(json.dumps(
        {"header": header, "results": [r.__dict__ for r in RESULTS]}, indent=1, default=str))
    print(header, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the report: device_check.md and .json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/device_check"),
                        help="what the commands write (images, videos, students)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--skip", nargs="*", default=[], choices=["kernel", "families", "commands"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(0)
    try:
        if "kernel" not in args.skip and device.type == "cuda":
            kernel_checks(device)
        if "families" not in args.skip:
            for name in args.families:
                family_checks(name, device)
        if "commands" not in args.skip:
            command_checks(args.work, device)
    finally:
        write_report(args.out, device)
    return 0 if all(r.ok for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
