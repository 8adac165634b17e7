"""Feature networks for distribution metrics (FID / KID / consistency), each with a stable name.

Every feature network carries a ``feature_name`` that is recorded in every result: numbers computed
in different feature spaces are never comparable, and ``metrics.compare_guard`` refuses to compare
them. Nothing here downloads anything.

* ``JudgeFeatures("image" | "video")``: the shipped judge's penultimate embedding (192-d). Its name
  holds the judge's format version and a hash of its weights file, so a retrained judge never
  compares silently with an old one.
* ``inception_features(path)``: the standard InceptionV3 2048-d pool features of FID (torch-fidelity's
  port of the 2015-12-05 TF graph, as torchmetrics uses it), from a *local* weights file only.
* ``resolve_features(spec)``: "judge", "judge-video", "inception", a weights path, or a module.

Also the pixel-layout helpers shared by the metrics: ``to_images`` / ``to_clips`` turn numpy or torch
pixels (channels-last or channels-first, float in [0, 1] or uint8) into float tensors
(N, 3, H, W) / (N, F, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

INCEPTION_ENV = "DIFFACCEL_INCEPTION_WEIGHTS"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_NAME = "inception-v3-2048"
FEATURE_SPECS = ("judge", "judge-video", "inception")

# ------------------------------------------------------------------------------------------ pixels


def _as_tensor(pixels) -> torch.Tensor:
    if isinstance(pixels, torch.Tensor):
        return pixels.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(np.asarray(pixels)))


def _to_unit_float(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"{what} must be float in [0, 1] or uint8, got dtype {x.dtype}.")
    x = x.float()
    if x.numel() and (x.min() < -1e-4 or x.max() > 1 + 1e-4):
        raise ValueError(
            f"{what} must lie in [0, 1] (got values in [{x.min():.3f}, {x.max():.3f}]); "
            "convert from [-1, 1] with (x + 1) / 2 first."
        )
    return x.clamp(0.0, 1.0)


def to_images(pixels, what: str = "images") -> torch.Tensor:
    """(N, 3, H, W) or (N, H, W, 3), float in [0, 1] or uint8 -> float32 (N, 3, H, W) in [0, 1]."""
    x = _as_tensor(pixels)
    if x.ndim != 4:
        raise ValueError(f"{what} must be a batch shaped (N, 3, H, W) or (N, H, W, 3), got {tuple(x.shape)}.")
    if x.shape[1] != 3:
        if x.shape[-1] != 3:
            raise ValueError(f"{what} must have 3 color channels (N, 3, H, W) or (N, H, W, 3), got {tuple(x.shape)}.")
        x = x.permute(0, 3, 1, 2)
    return _to_unit_float(x, what).contiguous()


def to_clips(pixels, what: str = "clips") -> torch.Tensor:
    """(N, F, 3, H, W) or (N, F, H, W, 3), float in [0, 1] or uint8 -> float32 (N, F, 3, H, W) in [0, 1]."""
    x = _as_tensor(pixels)
    if x.ndim != 5:
        raise ValueError(f"{what} must be a batch shaped (N, F, 3, H, W) or (N, F, H, W, 3), got {tuple(x.shape)}.")
    if x.shape[2] != 3:
        if x.shape[-1] != 3:
            raise ValueError(f"{what} must have 3 color channels (N, F, 3, H, W) or (N, F, H, W, 3), got {tuple(x.shape)}.")
        x = x.permute(0, 1, 4, 2, 3)
    return _to_unit_float(x, what).contiguous()


# ------------------------------------------------------------------------------------------ judge


@lru_cache(maxsize=8)
def _file_digest(path: str, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


class JudgeFeatures(nn.Module):
    """The shipped judge's penultimate embedding as a feature network: (N, D) float64.

    Input: images (N, 3, H, W) (kind "image") or clips (N, F, 3, H, W) (kind "video"), float in
    [0, 1] or uint8 (as torchmetrics passes them). Always in eval mode, no gradients.
    ``feature_name`` = ``judge-<kind>-v<format_version>-<sha256 of the weights file, 10 hex>``.
    """

    def __init__(self, kind: str = "image", path: str | Path | None = None):
        super().__init__()
        from diffaccel.pipelines.reference import judge as judge_mod

        self.judge = judge_mod.load_judge(kind, path)  # ValueError (with the fix) if missing
        weights = Path(path) if path is not None else judge_mod.default_path(kind)
        digest = _file_digest(str(weights.resolve()), weights.stat().st_mtime_ns)
        self.kind = kind
        self.feature_name = f"judge-{kind}-v{judge_mod.FORMAT_VERSION}-{digest}"
        self.num_features = int(self.judge.embed_dim)
        self.requires_grad_(False)
        self.eval()

    @property
    def name(self) -> str:
        return self.feature_name

    def train(self, mode: bool = True) -> "JudgeFeatures":
        return super().train(False)  # a metric's feature network never trains

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_clips(x, "judge-video input") if self.kind == "video" else to_images(x, "judge-image input")
        device = next(self.judge.parameters()).device
        return self.judge.features(x.to(device)).double()


# ------------------------------------------------------------------------------------------ inception


def _inception_help(problem: str) -> str:
    return (
        f"{problem}{' ' if problem else ''}The standard FID features (InceptionV3, 2048-d pool) need torch-fidelity's port of the "
        f"2015-12-05 TF Inception weights, `{INCEPTION_FILE}` (the same graph as pytorch-fid's "
        f"`pt_inception-2015-12-05-6726825d.pth`, but in torch-fidelity's key layout), which diffaccel never "
        f"downloads. Fetch it once on a machine with network access: `curl -L -o {INCEPTION_FILE} {INCEPTION_URL}`, "
        f"copy it anywhere (e.g. ~/.cache/diffaccel/{INCEPTION_FILE}), then pass its path "
        f"(inception_features(path) / features=<path>) or set the environment variable "
        f"{INCEPTION_ENV}=<path>. Or use features='judge' (offline, this project's own feature space)."
    )


class InceptionFeatures(nn.Module):
    """torchmetrics' InceptionV3 (torch-fidelity "inception-v3-compat", 2048-d) from a local file.

    Input: float (N, 3, H, W) in [0, 1] or uint8; floats are quantised exactly as torchmetrics does
    with ``normalize=True`` (``(x * 255).byte()``), then resized to 299 inside the network.
    """

    feature_name = INCEPTION_NAME
    num_features = 2048

    def __init__(self, weights_path: str | Path, antialias: bool = True):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"],
            feature_extractor_weights_path=str(weights_path), antialias=antialias,
        )
        self.weights_path = str(weights_path)
        self.requires_grad_(False)

    @property
    def name(self) -> str:
        return self.feature_name

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2).contiguous()  # channels-last uint8: no round trip through float
        if x.dtype != torch.uint8:
            x = (to_images(x, "inception input") * 255).byte()  # torchmetrics' normalize=True quantisation
        return self.net(x).double()


def inception_features(weights_path: str | Path | None = None, antialias: bool = True) -> InceptionFeatures:
    """InceptionV3 FID features from ``weights_path`` or ``$DIFFACCEL_INCEPTION_WEIGHTS``; ValueError
    saying how to obtain the file when neither is set or the file is missing. Never downloads."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ValueError(
            "Inception features need the optional package torch-fidelity (torchmetrics' image extra): "
            "`pip install torch-fidelity` (or `pip install torchmetrics[image]`). " + _inception_help("")
        )
    source = "argument weights_path"
    if weights_path is None:
        weights_path, source = os.environ.get(INCEPTION_ENV) or None, f"${INCEPTION_ENV}"
    if weights_path is None:
        raise ValueError(_inception_help(f"No Inception weights given (neither weights_path nor ${INCEPTION_ENV})."))
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise ValueError(_inception_help(f"Inception weights file {path} (from {source}) does not exist."))
    return InceptionFeatures(path, antialias=antialias)


# ------------------------------------------------------------------------------------------ resolve


def feature_name(module: nn.Module) -> str:
    """The name recorded in results: ``module.feature_name`` if set, else its class name."""
    name = getattr(module, "feature_name", None)
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{type(module).__name__}.feature_name must be a str, got {type(name).__name__}.")
    return name or type(module).__name__


def resolve_features(spec: str | Path | nn.Module) -> nn.Module:
    """"judge" | "judge-video" | "inception" | a path to Inception weights | an nn.Module (custom; its name
    is its ``feature_name`` attribute or class name — give distinct networks distinct names)."""
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, Path) or (isinstance(spec, str) and spec not in FEATURE_SPECS):
        path = Path(spec).expanduser()
        if path.suffix in (".pth", ".pt") or path.exists():
            return inception_features(path)
        raise ValueError(
            f"Unknown feature network {str(spec)!r}: use one of {FEATURE_SPECS}, a path to the Inception "
            "weights file (.pth), or an nn.Module."
        )
    if spec == "judge":
        return JudgeFeatures("image")
    if spec == "judge-video":
        return JudgeFeatures("video")
    if spec == "inception":
        return inception_features(None)
    raise ValueError(f"Feature network must be one of {FEATURE_SPECS}, a weights path or an nn.Module, got {spec!r}.")
