"""What every stage of the reference-model training shares: where the weights live, the device and its
autocast, logging, the ``training_state.json`` records."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "pipelines" / "reference" / "weights"
WORK = ROOT / "work" / "reference"


# bfloat16 autocast halves a training step on CPUs with AVX512-BF16/AMX (measured: 2.1-2.6 s -> 1.3 s
# per image-denoiser step) but is emulated, and several times slower, on AVX2-only CPUs: use it only
# where the CPU has it. Master weights, optimizer and losses stay float32 either way.


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


AUTOCAST = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": _cpu_has_bf16()}

CPU_BATCH_SIZE = 32  # images per denoiser step (video: a third as many clips)
# On a GPU, 8x: these models are small enough that a step of 32 leaves an H100 mostly idle (launch-bound),
# while 256 still gives thousands of optimizer steps in a few minutes. The peak learning rate stays 3e-4:
# a larger batch only lowers the gradient noise, so the CPU schedule stays stable (no sqrt/linear scaling).
GPU_BATCH_SIZE = 256


def autocast_for(device: torch.device) -> dict:
    """bfloat16 autocast on CUDA; on CPU only where the CPU has bf16 instructions (AUTOCAST)."""
    if device.type == "cuda":
        return {"device_type": "cuda", "dtype": torch.bfloat16, "enabled": True}
    return AUTOCAST


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu or auto"
        )
    return torch.device(name)


def to_cpu(obj):
    """A copy of a (nested) state dict with every tensor on the CPU (dict types and ``_metadata`` kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pixels_to_model(pixels: torch.Tensor) -> torch.Tensor:
    """Rendered pixels, channels last in [0, 1] -> the models' input, channels first in [-1, 1], on pixels'
    device: images (n, H, W, 3) -> (n, 3, H, W), clips (n, F, H, W, 3) -> (n, 3, F, H, W)."""
    order = (0, 3, 1, 2) if pixels.dim() == 4 else (0, 4, 1, 2, 3)
    return pixels.permute(*order).contiguous() * 2.0 - 1.0


def read_state(folder: Path) -> dict:
    path = folder / "training_state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_state.json").write_text(json.dumps(state, indent=2) + "\n")


def work_folder(weights: Path, kind: str) -> Path:
    """Where a denoiser's full checkpoint goes (not committed): work/reference/KIND for the shipped models,
    work/reference/KIND@FOLDER for a candidate in another ``--weights`` folder."""
    return WORK / kind if weights == WEIGHTS else WORK / f"{kind}@{weights.name}"


def vae_folder(weights: Path, kind: str) -> Path:
    """The VAE a denoiser trains on: ``weights/<kind>/vae``, which a candidate folder must have first."""
    folder = weights / kind / "vae"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} holds no VAE: a denoiser trains on its folder's latent space, so train that "
                         f"first (python scripts/train_reference.py {kind}-vae --fresh --weights {weights})")
    return folder
