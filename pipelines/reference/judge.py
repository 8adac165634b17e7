"""The judge: small classifiers that read generated images (or clips) back into scene attributes.

They give *prompt adherence* (the fraction of a caption's stated attributes that the judge reads
back from the pixels) and a feature space for FID (``features``: the penultimate embedding).

* ``ImageJudge``: (B, 3, H, W) in [0, 1] at any H = W (resized to 64 inside) -> logits
  ``background`` (B, 8), ``slot_shape`` (B, 5, 4) = none/circle/square/triangle per position slot
  in ``scenes.POSITIONS`` order, ``slot_color`` (B, 5, 8), ``slot_size`` (B, 5, 2).
* ``ClipJudge``: (B, F, 3, H, W) in [0, 1], any F >= 2 (resampled in time to 9 frames, in space to
  64 px, frames stacked as channels so that motion is read by the first convolution; trained on 9
  frames and on 5-8 kept of 9, it reads F >= 3 reliably, F = 2 poorly) -> logits
  ``background``, ``shape``, ``color``, ``size``, ``direction``, ``speed``.

Weights ship as safetensors with a small JSON config next to them (``load_judge``); they are made by
``python scripts/train_reference.py judge`` (which runs ``scripts/train_judge.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .scenes import COLORS, DIRECTIONS, POSITIONS, SHAPES, SIZES, SPEEDS, Scene, Shape, parse_caption

RESOLUTION = 64  # every input is resized to this inside the judges
CLIP_FRAMES = 9  # clips are resampled in time to this many frames
SLOT_SHAPES = ("none",) + SHAPES
IMAGE_ATTRIBUTES = ("position", "shape", "color", "size", "background")
CLIP_ATTRIBUTES = ("shape", "color", "size", "direction", "speed", "background")
KINDS = ("image", "video")
DEFAULT_DIR = Path(__file__).parent / "weights" / "judge"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ models


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _resize(x: torch.Tensor, size: int = RESOLUTION) -> torch.Tensor:
    """Area downsampling (exact averaging for integer factors); bilinear upsampling below ``size``."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h >= size and w >= size:
        return F.adaptive_avg_pool2d(x, (size, size))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


class _Backbone(nn.Module):
    """Stem at 64 px, four stride-2 stages (two 3x3 convs each) to 4x4, a 1x1 squeeze, flatten, FC.

    The flatten keeps *where* things are (the slots); the FC output (after ReLU) is the embedding.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], squeeze: int, embed_dim: int):
        super().__init__()
        layers = [_conv_bn(in_channels, widths[0])]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [_conv_bn(cin, cout, stride=2), _conv_bn(cout, cout)]
        self.convs = nn.Sequential(*layers)
        self.squeeze = nn.Sequential(nn.Conv2d(widths[-1], squeeze, 1, bias=False), nn.BatchNorm2d(squeeze), nn.ReLU(inplace=True))
        side = RESOLUTION // 2 ** (len(widths) - 1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(squeeze * side * side, embed_dim), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.squeeze(self.convs(x)))


class _Judge(nn.Module):
    kind: str = ""

    def __init__(self, in_channels: int, widths: Sequence[int], squeeze: int, embed_dim: int, dropout: float):
        super().__init__()
        self.config = {"widths": list(widths), "squeeze": squeeze, "embed_dim": embed_dim, "dropout": dropout}
        self.backbone = _Backbone(in_channels, widths, squeeze, embed_dim)
        self.dropout = nn.Dropout(dropout)

    @property
    def embed_dim(self) -> int:
        return self.config["embed_dim"]

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) penultimate embedding (post-ReLU), e.g. for FID."""
        return self.backbone(self._prepare(x))


class ImageJudge(_Judge):
    kind = "image"

    def __init__(self, widths: Sequence[int] = (24, 32, 48, 64, 96), squeeze: int = 48, embed_dim: int = 192, dropout: float = 0.1):
        super().__init__(3, widths, squeeze, embed_dim, dropout)
        n = len(POSITIONS)
        self.heads = nn.ModuleDict(
            {
                "background": nn.Linear(embed_dim, len(COLORS)),
                "slot_shape": nn.Linear(embed_dim, n * len(SLOT_SHAPES)),
                "slot_color": nn.Linear(embed_dim, n * len(COLORS)),
                "slot_size": nn.Linear(embed_dim, n * len(SIZES)),
            }
        )

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ImageJudge expects (B, 3, H, W) pixels in [0, 1], got {tuple(x.shape)}.")
        return (_resize(x.float()) - 0.5) * 4.0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(self.features(x))
        b, n = h.shape[0], len(POSITIONS)
        return {
            "background": self.heads["background"](h),
            "slot_shape": self.heads["slot_shape"](h).view(b, n, len(SLOT_SHAPES)),
            "slot_color": self.heads["slot_color"](h).view(b, n, len(COLORS)),
            "slot_size": self.heads["slot_size"](h).view(b, n, len(SIZES)),
        }


def resample_frames(x: torch.Tensor, frames: int = CLIP_FRAMES) -> torch.Tensor:
    """(B, F, ...) -> (B, frames, ...) by linear interpolation in time (first and last frames kept)."""
    f = x.shape[1]
    if f == frames:
        return x
    if f < 2:
        raise ValueError(f"A clip needs at least 2 frames to show motion, got {f}.")
    t = torch.linspace(0, f - 1, frames, device=x.device, dtype=torch.float32)
    i0 = t.floor().long().clamp(max=f - 2)
    w = (t - i0).view(1, frames, *([1] * (x.ndim - 2))).to(x.dtype)
    return x[:, i0] * (1 - w) + x[:, i0 + 1] * w


class ClipJudge(_Judge):
    kind = "video"

    def __init__(self, widths: Sequence[int] = (32, 32, 48, 64, 96), squeeze: int = 48, embed_dim: int = 192, dropout: float = 0.1):
        super().__init__(3 * CLIP_FRAMES, widths, squeeze, embed_dim, dropout)
        self.heads = nn.ModuleDict(
            {
                "background": nn.Linear(embed_dim, len(COLORS)),
                "shape": nn.Linear(embed_dim, len(SHAPES)),
                "color": nn.Linear(embed_dim, len(COLORS)),
                "size": nn.Linear(embed_dim, len(SIZES)),
                "direction": nn.Linear(embed_dim, len(DIRECTIONS)),
                "speed": nn.Linear(embed_dim, len(SPEEDS)),
            }
        )

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[2] != 3:
            raise ValueError(f"ClipJudge expects (B, F, 3, H, W) pixels in [0, 1], got {tuple(x.shape)}.")
        x = resample_frames(x.float())
        b, f = x.shape[:2]
        x = _resize(x.flatten(0, 1))  # (B*F, 3, 64, 64)
        return ((x - 0.5) * 4.0).reshape(b, f * 3, RESOLUTION, RESOLUTION)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(self.features(x))
        return {name: head(h) for name, head in self.heads.items()}


_CLASSES = {"image": ImageJudge, "video": ClipJudge}


def param_count(judge: nn.Module) -> int:
    return sum(p.numel() for p in judge.parameters())


# ------------------------------------------------------------------------------------------ targets


def image_targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Training targets of ``ImageJudge``; color/size of empty slots are -100 (ignored)."""
    n = len(POSITIONS)
    bg = torch.tensor([COLORS.index(s.background) for s in scenes])
    shape = torch.zeros(len(scenes), n, dtype=torch.long)
    color = torch.full((len(scenes), n), -100, dtype=torch.long)
    size = torch.full((len(scenes), n), -100, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            k = POSITIONS.index(obj.position)
            shape[i, k] = SLOT_SHAPES.index(obj.shape)
            color[i, k] = COLORS.index(obj.color)
            size[i, k] = SIZES.index(obj.size)
    return {"background": bg, "slot_shape": shape, "slot_color": color, "slot_size": size}


def clip_targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Training targets of ``ClipJudge`` (the first object of each scene)."""
    objs = [s.objects[0] for s in scenes]
    return {
        "background": torch.tensor([COLORS.index(s.background) for s in scenes]),
        "shape": torch.tensor([SHAPES.index(o.shape) for o in objs]),
        "color": torch.tensor([COLORS.index(o.color) for o in objs]),
        "size": torch.tensor([SIZES.index(o.size) for o in objs]),
        "direction": torch.tensor([DIRECTIONS.index(o.direction) for o in objs]),
        "speed": torch.tensor([SPEEDS.index(o.speed) for o in objs]),
    }


def judge_loss(judge: nn.Module, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the cross-entropies of every head (empty image slots: shape only)."""
    total = 0.0
    for name, lg in logits.items():
        tg = targets[name].to(lg.device)
        total = total + F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100)
    return total


# ------------------------------------------------------------------------------------------ reading


def _kind(judge: nn.Module) -> str:
    if isinstance(judge, ImageJudge):
        return "image"
    if isinstance(judge, ClipJudge):
        return "video"
    raise TypeError(f"Not a judge: {type(judge).__name__}.")


def _as_tensor(pixels, clip: bool) -> torch.Tensor:
    """Pixels (numpy or torch; channels-last as ``scenes`` renders them, or channels-first) -> float
    tensor (B, 3, H, W) / (B, F, 3, H, W) in [0, 1]. uint8 is scaled by 1/255."""
    x = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, torch.Tensor) else pixels)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    x = x.float()
    want = 5 if clip else 4
    if x.ndim == want - 1:
        x = x.unsqueeze(0)
    if x.ndim != want:
        layout = "(B, F, 3, H, W) or (B, F, H, W, 3)" if clip else "(B, 3, H, W) or (B, H, W, 3)"
        raise ValueError(f"Expected pixels shaped {layout}, got {tuple(x.shape)}.")
    channel_axis = want - 3
    if x.shape[channel_axis] != 3 and x.shape[-1] == 3:
        x = x.movedim(-1, channel_axis)
    return x


@torch.no_grad()
def predict(judge: nn.Module, pixels, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Arg-max predictions of every head as integer arrays (images: (N, 5) per slot head)."""
    clip = _kind(judge) == "video"
    x = _as_tensor(pixels, clip)
    device = next(judge.parameters()).device
    was_training = judge.training
    judge.eval()
    out: dict[str, list[np.ndarray]] = {}
    try:
        for i in range(0, max(x.shape[0], 1), batch_size):  # an empty batch still gives (0, ...) arrays
            logits = judge(x[i : i + batch_size].to(device))
            for name, lg in logits.items():
                out.setdefault(name, []).append(lg.argmax(-1).cpu().numpy())
    finally:
        judge.train(was_training)
    return {name: np.concatenate(v) for name, v in out.items()}


@torch.no_grad()
def features(judge: nn.Module, pixels, batch_size: int = 128) -> np.ndarray:
    """(N, D) float64 embeddings of pixels (numpy or torch, any layout ``predict`` accepts)."""
    x = _as_tensor(pixels, _kind(judge) == "video")
    device = next(judge.parameters()).device
    was_training = judge.training
    judge.eval()
    try:
        parts = [
            judge.features(x[i : i + batch_size].to(device)).double().cpu().numpy()
            for i in range(0, max(x.shape[0], 1), batch_size)
        ]
    finally:
        judge.train(was_training)
    return np.concatenate(parts)


def _decode(kind: str, pred: dict[str, np.ndarray], i: int) -> Scene:
    background = COLORS[pred["background"][i]]
    if kind == "video":
        obj = Shape(
            shape=SHAPES[pred["shape"][i]],
            color=COLORS[pred["color"][i]],
            size=SIZES[pred["size"][i]],
            direction=DIRECTIONS[pred["direction"][i]],
            speed=SPEEDS[pred["speed"][i]],
        )
        return Scene(objects=(obj,), background=background)
    objects = tuple(
        Shape(
            shape=SLOT_SHAPES[pred["slot_shape"][i, k]],
            color=COLORS[pred["slot_color"][i, k]],
            size=SIZES[pred["slot_size"][i, k]],
            position=position,
        )
        for k, position in enumerate(POSITIONS)
        if pred["slot_shape"][i, k] != 0
    )
    return Scene(objects=objects, background=background)


def read_scene(judge: nn.Module, pixels) -> list[Scene]:
    """What the judge sees: images -> one object per slot judged non-empty (may be none at all);
    clips -> the one moving shape."""
    kind = _kind(judge)
    pred = predict(judge, pixels)
    return [_decode(kind, pred, i) for i in range(len(pred["background"]))]


def _matches(kind: str, pred: dict[str, np.ndarray], i: int, stated: Scene) -> list[tuple[str, bool]]:
    """(attribute, matched) for every attribute the caption states."""
    out: list[tuple[str, bool]] = []
    for obj in stated.objects:
        if kind == "video":
            out += [
                ("shape", SHAPES[pred["shape"][i]] == obj.shape),
                ("color", COLORS[pred["color"][i]] == obj.color),
                ("size", SIZES[pred["size"][i]] == obj.size),
            ]
            if obj.direction is not None:
                out.append(("direction", DIRECTIONS[pred["direction"][i]] == obj.direction))
            if obj.speed is not None:
                out.append(("speed", SPEEDS[pred["speed"][i]] == obj.speed))
        else:
            k = POSITIONS.index(obj.position)
            occupied = pred["slot_shape"][i, k] != 0
            out += [
                ("position", bool(occupied)),
                ("shape", bool(occupied) and SLOT_SHAPES[pred["slot_shape"][i, k]] == obj.shape),
                ("color", bool(occupied) and COLORS[pred["slot_color"][i, k]] == obj.color),
                ("size", bool(occupied) and SIZES[pred["slot_size"][i, k]] == obj.size),
            ]
    if stated.background:
        out.append(("background", COLORS[pred["background"][i]] == stated.background))
    return out


def _all_matches(judge: nn.Module, pixels, captions: Sequence[str | Scene]) -> list[list[tuple[str, bool]]]:
    kind = _kind(judge)
    pred = predict(judge, pixels)
    n = len(pred["background"])
    if len(captions) != n:
        raise ValueError(f"{n} samples but {len(captions)} captions.")
    stated = [c if isinstance(c, Scene) else parse_caption(c) for c in captions]
    return [_matches(kind, pred, i, s) for i, s in enumerate(stated)]


def adherence(judge: nn.Module, pixels, captions: Sequence[str | Scene]) -> np.ndarray:
    """(N,) per-sample fraction of the caption's stated attributes that the judge reads back.

    Images: per stated object its position (that slot judged occupied), shape, color and size at
    that slot (all unmatched if the slot is judged empty), plus the background. Clips: shape,
    color, size, direction, speed, background. Shapes the caption does not mention are not counted.
    """
    return np.array([np.mean([m for _, m in ms]) if ms else 0.0 for ms in _all_matches(judge, pixels, captions)])


def attribute_accuracy(judge: nn.Module, pixels, captions: Sequence[str | Scene]) -> dict[str, float]:
    """Match rate of each stated attribute over the set (plus ``adherence``, the per-sample mean, and
    ``exact``, the fraction of samples with every stated attribute matched)."""
    all_matches = _all_matches(judge, pixels, captions)
    names = CLIP_ATTRIBUTES if _kind(judge) == "video" else IMAGE_ATTRIBUTES
    hits: dict[str, list[bool]] = {name: [] for name in names}
    for ms in all_matches:
        for name, m in ms:
            hits[name].append(m)
    out = {name: float(np.mean(v)) for name, v in hits.items() if v}
    per_sample = [np.mean([m for _, m in ms]) if ms else 0.0 for ms in all_matches]
    out["adherence"] = float(np.mean(per_sample)) if per_sample else 0.0
    out["exact"] = float(np.mean([all(m for _, m in ms) for ms in all_matches])) if all_matches else 0.0
    return out


# ------------------------------------------------------------------------------------------ weights


def default_path(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"Judge kind must be one of {KINDS}, got {kind!r}.")
    return DEFAULT_DIR / f"{kind}.safetensors"


def _config_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_judge(judge: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Weights to ``path`` (safetensors, float32) and the config to ``path`` with a .json suffix."""
    from safetensors.torch import save_file

    kind = _kind(judge)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in judge.state_dict().items()
    }
    save_file(state, str(path), metadata={"kind": kind, "format_version": str(FORMAT_VERSION)})
    path.chmod(0o644)
    config = {"kind": kind, "class": type(judge).__name__, "format_version": FORMAT_VERSION, "config": judge.config}
    config.update(extra or {})
    _config_path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def load_judge(kind: str, path: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """A trained judge in eval mode; ValueError if its weights are missing."""
    from safetensors.torch import load_file

    if kind not in KINDS:
        raise ValueError(f"Judge kind must be one of {KINDS}, got {kind!r}.")
    path = Path(path) if path is not None else default_path(kind)
    config_path = _config_path(path)
    if not path.is_file() or not config_path.is_file():
        missing = path if not path.is_file() else config_path
        raise ValueError(
            f"No trained {kind} judge: {missing} does not exist. "
            "Train the judges with `python scripts/train_reference.py judge`."
        )
    config = json.loads(config_path.read_text())
    if config.get("kind") != kind:
        raise ValueError(f"{path} holds a {config.get('kind')!r} judge, not a {kind!r} one.")
    judge = _CLASSES[kind](**config["config"])
    judge.load_state_dict(load_file(str(path)))
    return judge.to(device).eval()
