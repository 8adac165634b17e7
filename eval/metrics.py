"""Image/clip metrics on torchmetrics: FID and KID in a named feature space, precomputed real
statistics, paired fidelity (PSNR / SSIM / LPIPS), CLIP score, judge adherence.

Conventions (pinned so numbers are reproducible; see shared/methods/evaluation.md):

* Distribution metrics run torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``
  with a feature module (``features.resolve_features``); images are streamed in batches as float
  (N, 3, H, W) in [0, 1]. With any feature network other than Inception the number is a Fréchet
  distance in *that* space — not comparable with published FID; every result records the network
  and ``compare_guard`` refuses to compare results from different networks (or, for FID, different
  sample counts: FID is biased by ~k/N).
* Fidelity follows TeaCache's protocol: pixels in [0, 1], PSNR with MAX = 1 per image / frame,
  capped at 100 dB (identical frames); SSIM = torchmetrics' Gaussian 11x11, sigma 1.5, K = (0.01,
  0.03), data_range 1; clips: per-frame values averaged over frames, then over clips.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .features import feature_name, resolve_features, to_clips, to_images

PSNR_CAP_DB = 100.0
LPIPS_BACKBONE_FILES = {  # torchvision ImageNet weights torchmetrics' LPIPS loads (torch hub checkpoint names)
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}

# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class MetricResult:
    """One distribution metric (``fid`` / ``kid``) of a fake set against a real set."""

    metric: str
    value: float
    feature: str
    n_real: int
    n_fake: int
    std: float | None = None  # KID: std over subsets
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SampleScores:
    """A per-sample metric (PSNR, SSIM, LPIPS, CLIP score, adherence) and its mean."""

    metric: str
    per_sample: np.ndarray
    mean: float
    backend: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_sample"] = [float(v) for v in self.per_sample]
        return out


def compare_guard(a: MetricResult, b: MetricResult, allow_different_n: bool = False) -> None:
    """Raise ValueError unless ``a`` and ``b`` are the same metric in the same feature space (and, for
    FID, from the same sample counts unless ``allow_different_n``: FID's bias ~k/N differs with N)."""
    if a.metric != b.metric:
        raise ValueError(f"Cannot compare a {a.metric!r} result with a {b.metric!r} result.")
    if a.feature != b.feature:
        raise ValueError(
            f"Cannot compare {a.metric} values from different feature networks: {a.feature!r} vs {b.feature!r}. "
            "Recompute both with the same `features`."
        )
    if a.metric == "fid" and not allow_different_n and (a.n_real, a.n_fake) != (b.n_real, b.n_fake):
        raise ValueError(
            f"FID from different sample counts (real/fake {a.n_real}/{a.n_fake} vs {b.n_real}/{b.n_fake}) is not "
            "comparable: its small-N bias differs. Use equal counts, KID, or allow_different_n=True."
        )


# ------------------------------------------------------------------------------------------ streaming


def _batches(pixels, batch_size: int, clips: bool, what: str) -> Iterable[torch.Tensor]:
    """A whole set (array/tensor) in slices of ``batch_size``, or an iterable of batches as given."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    convert = (lambda x: to_clips(x, what)) if clips else (lambda x: to_images(x, what))
    if isinstance(pixels, (np.ndarray, torch.Tensor)):
        for i in range(0, len(pixels), batch_size):
            yield convert(pixels[i : i + batch_size])
    else:
        for batch in pixels:
            yield convert(batch)


class _Adapter(nn.Module):
    """A feature module as torchmetrics wants it: ``num_features`` known, (N, D) float64 out."""

    def __init__(self, module: nn.Module, num_features: int):
        super().__init__()
        self.module = module
        self.num_features = num_features

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        return out.reshape(out.shape[0], -1).double()


def _prepare(features, first: torch.Tensor) -> tuple[_Adapter, str, bool]:
    """(adapter, feature name, clip input?) for a feature spec; dims from ``num_features`` or one batch."""
    module = resolve_features(features)
    clips = getattr(module, "kind", None) == "video"
    dims = getattr(module, "num_features", None)
    if isinstance(dims, torch.Tensor):
        dims = int(dims.item())
    if dims is None:
        with torch.no_grad():
            out = module(first[:2])
        dims = int(out.reshape(out.shape[0], -1).shape[1])
    return _Adapter(module, int(dims)), feature_name(module), clips


def _peek(pixels, batch_size: int, clips: bool, what: str) -> tuple[torch.Tensor, Iterable[torch.Tensor]]:
    it = iter(_batches(pixels, batch_size, clips, what))
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(f"{what} is empty.") from None

    def chained():
        yield first
        yield from it

    return first, chained()


def _metric_inputs(real, fake, features, batch_size):
    """Resolve the feature network once and stream both sets through the right layout."""
    module = resolve_features(features)
    clips = getattr(module, "kind", None) == "video"
    real_first, real_batches = _peek(real, batch_size, clips, "real")
    adapter, name, _ = _prepare(module, real_first)
    _, fake_batches = _peek(fake, batch_size, clips, "fake")
    return adapter, name, real_batches, fake_batches


# ------------------------------------------------------------------------------------------ FID / KID


def _fid_metric(adapter: _Adapter):
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=adapter, normalize=True, reset_real_features=True)


def _fid_value(metric, name: str, params: dict) -> MetricResult:
    n_real, n_fake = int(metric.real_features_num_samples), int(metric.fake_features_num_samples)
    if n_real < 2 or n_fake < 2:
        raise ValueError(f"FID needs at least 2 real and 2 fake samples, got {n_real} real and {n_fake} fake.")
    value = float(metric.compute())
    return MetricResult("fid", value, name, n_real, n_fake, params=params)


def fid(real, fake, features="judge", batch_size: int = 64) -> MetricResult:
    """Fréchet distance of ``fake`` to ``real`` in ``features`` space (torchmetrics FID).

    real, fake: images (N, 3, H, W) / (N, H, W, 3) in [0, 1] or uint8 (clips (N, F, ...) with
    features="judge-video"), or iterables of such batches (streamed).
    """
    adapter, name, real_batches, fake_batches = _metric_inputs(real, fake, features, batch_size)
    metric = _fid_metric(adapter)
    for batch in real_batches:
        metric.update(batch, real=True)
    for batch in fake_batches:
        metric.update(batch, real=False)
    return _fid_value(metric, name, {"batch_size": batch_size})


def kid(
    real, fake, features="judge", subsets: int = 100, subset_size: int | None = None,
    degree: int = 3, seed: int = 0, batch_size: int = 64,
) -> MetricResult:
    """Kernel distance (unbiased MMD², cubic polynomial kernel; torchmetrics KID) with std over subsets.

    ``subset_size`` defaults to min(1000, n_real, n_fake); subsets are drawn with ``seed``.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    adapter, name, real_batches, fake_batches = _metric_inputs(real, fake, features, batch_size)
    real_feats = [adapter(b) for b in real_batches]
    fake_feats = [adapter(b) for b in fake_batches]
    n_real, n_fake = sum(len(f) for f in real_feats), sum(len(f) for f in fake_feats)
    size = min(1000, n_real, n_fake) if subset_size is None else subset_size
    if size < 2 or size > min(n_real, n_fake):
        raise ValueError(
            f"KID subset_size must be in [2, min(n_real, n_fake)] = [2, {min(n_real, n_fake)}], got {size}."
        )
    # features already extracted above: hand torchmetrics an identity extractor over them
    with warnings.catch_warnings():  # "will save all extracted features": yes, that is what KID needs
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=nn.Identity(), subsets=subsets, subset_size=size, degree=degree)
    for f in real_feats:
        metric.update(f, real=True)
    for f in fake_feats:
        metric.update(f, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    params = {"subsets": subsets, "subset_size": size, "degree": degree, "seed": seed}
    return MetricResult("kid", float(mean), name, n_real, n_fake, std=float(std), params=params)


# ------------------------------------------------------------------------------------------ real stats


@dataclass(frozen=True)
class RealStats:
    """Gaussian statistics of a reference set in one feature space (what FID needs of it)."""

    mean: np.ndarray  # (D,) float64
    cov: np.ndarray  # (D, D) float64, unbiased (n - 1)
    n: int
    feature: str

    def __post_init__(self) -> None:
        d = self.mean.shape[0]
        if self.mean.ndim != 1 or self.cov.shape != (d, d):
            raise ValueError(f"RealStats: mean must be (D,) and cov (D, D), got {self.mean.shape} and {self.cov.shape}.")
        if self.n < 2:
            raise ValueError(f"RealStats needs n >= 2 samples, got {self.n}.")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"RealStats are saved as .npz, got {path}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, mean=self.mean, cov=self.cov, n=np.int64(self.n), feature=np.array(self.feature))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RealStats":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"No real statistics at {path}: compute them with real_statistics(...).save(path).")
        with np.load(path, allow_pickle=False) as z:
            missing = {"mean", "cov", "n", "feature"} - set(z.files)
            if missing:
                raise ValueError(f"{path} is not a RealStats file: missing {sorted(missing)}.")
            return cls(z["mean"].astype(np.float64), z["cov"].astype(np.float64), int(z["n"]), str(z["feature"]))


def real_statistics(images, features="judge", batch_size: int = 64) -> RealStats:
    """Mean / covariance of ``images`` in ``features`` space, accumulated by torchmetrics' FID states."""
    module = resolve_features(features)
    clips = getattr(module, "kind", None) == "video"
    first, batches = _peek(images, batch_size, clips, "images")
    adapter, name, _ = _prepare(module, first)
    metric = _fid_metric(adapter)
    for batch in batches:
        metric.update(batch, real=True)
    n = int(metric.real_features_num_samples)
    if n < 2:
        raise ValueError(f"Real statistics need at least 2 images, got {n}.")
    total = metric.real_features_sum.double()
    mean = total / n
    cov = (metric.real_features_cov_sum.double() - n * torch.outer(mean, mean)) / (n - 1)  # as torchmetrics' compute
    return RealStats(mean.numpy(), cov.numpy(), n, name)


def fid_from_stats(stats: RealStats, fake, features="judge", batch_size: int = 64) -> MetricResult:
    """FID of ``fake`` against precomputed ``stats``: torchmetrics' real-feature states are filled from
    them (sum = n·mean, cov_sum = (n−1)·cov + n·meanᵀmean), so the formula stays torchmetrics'."""
    module = resolve_features(features)
    name = feature_name(module)
    if name != stats.feature:
        raise ValueError(
            f"Real statistics were computed with feature network {stats.feature!r}, but features is {name!r}: "
            "recompute the statistics with the same network."
        )
    clips = getattr(module, "kind", None) == "video"
    first, batches = _peek(fake, batch_size, clips, "fake")
    adapter, _, _ = _prepare(module, first)
    if adapter.num_features != stats.mean.shape[0]:
        raise ValueError(f"Real statistics have {stats.mean.shape[0]} dims, the feature network {adapter.num_features}.")
    metric = _fid_metric(adapter)
    mean = torch.from_numpy(stats.mean).double()
    metric.real_features_sum = mean * stats.n
    metric.real_features_cov_sum = torch.from_numpy(stats.cov).double() * (stats.n - 1) + stats.n * torch.outer(mean, mean)
    metric.real_features_num_samples = torch.tensor(stats.n, dtype=torch.long)
    for batch in batches:
        metric.update(batch, real=False)
    return _fid_value(metric, name, {"batch_size": batch_size, "real": "precomputed"})


# ------------------------------------------------------------------------------------------ fidelity


def _paired(baseline, accelerated) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Both sets as (M, 3, H, W) frames plus the (N,) or (N, F) shape to fold per-frame values back."""
    ndim = _as_ndim(baseline)
    if ndim != _as_ndim(accelerated):
        raise ValueError(f"baseline and accelerated must both be images or both clips, got {ndim}-d and {_as_ndim(accelerated)}-d.")
    if ndim == 5:
        a, b = to_clips(baseline, "baseline"), to_clips(accelerated, "accelerated")
    elif ndim == 4:
        a, b = to_images(baseline, "baseline"), to_images(accelerated, "accelerated")
    else:
        raise ValueError(f"Expected images (N, 3, H, W) / (N, H, W, 3) or clips (N, F, ...), got {ndim}-d input.")
    if a.shape != b.shape:
        raise ValueError(f"baseline and accelerated shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}.")
    lead = tuple(a.shape[: ndim - 3])
    return a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:]), lead


def _as_ndim(x) -> int:
    return x.ndim if isinstance(x, (np.ndarray, torch.Tensor)) else np.asarray(x).ndim


def _fold(per_frame: torch.Tensor, lead: tuple[int, ...]) -> np.ndarray:
    """Per-frame values -> per-sample (clips: mean over frames)."""
    v = per_frame.double().reshape(lead)
    return (v.mean(dim=1) if len(lead) == 2 else v).numpy()


def _scores(metric: str, per_sample: np.ndarray, backend: str, **params) -> SampleScores:
    return SampleScores(metric, per_sample, float(per_sample.mean()) if len(per_sample) else float("nan"), backend, params)


def psnr(baseline, accelerated) -> SampleScores:
    """Per-sample PSNR (dB, MAX = 1, per image / per frame then mean over frames), capped at 100 dB."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b, lead = _paired(baseline, accelerated)
    per_frame = peak_signal_noise_ratio(b.double(), a.double(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    per_frame = torch.nan_to_num(per_frame, posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB)
    return _scores("psnr", _fold(per_frame, lead), "torchmetrics", data_range=1.0, cap_db=PSNR_CAP_DB)


def ssim(baseline, accelerated, batch_size: int = 16, precision: torch.dtype = torch.float64) -> SampleScores:
    """Per-sample SSIM (torchmetrics: Gaussian 11x11, sigma 1.5, data_range 1; clips: mean over frames).

    Frames go through in batches: torchmetrics stacks five padded copies of its whole input, which for
    a dozen long clips is tens of GB. ``precision=torch.float32`` is ~25x faster on a CPU and reads up
    to ~5e-4 lower on flat-coloured images (cancellation where the variance is ~0)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b, lead = _paired(baseline, accelerated)
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM's 11x11 window needs frames of at least 11 px, got {tuple(a.shape[-2:])}.")
    per_frame = torch.cat([
        structural_similarity_index_measure(
            b[i : i + batch_size].to(precision), a[i : i + batch_size].to(precision), data_range=1.0, reduction="none"
        ).reshape(-1)
        for i in range(0, len(a), batch_size)
    ])
    return _scores("ssim", _fold(per_frame, lead), "torchmetrics", data_range=1.0, kernel=11, sigma=1.5,
                   precision=str(precision).removeprefix("torch."))


def lpips_unavailable_reason(net: str = "alex") -> str | None:
    """Why LPIPS cannot run offline here (None when it can): torchvision and the local backbone file."""
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {tuple(LPIPS_BACKBONE_FILES)}, got {net!r}.")
    if importlib.util.find_spec("torchvision") is None:
        return "LPIPS needs torchvision (`pip install torchvision`) and its ImageNet backbone weights."
    ckpt = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
    if not ckpt.is_file():
        return (
            f"LPIPS ({net}) needs torchvision's ImageNet backbone weights at {ckpt}, which diffaccel never downloads: "
            f"copy `{LPIPS_BACKBONE_FILES[net]}` (from https://download.pytorch.org/models/) there, or point "
            "$TORCH_HOME at a folder whose hub/checkpoints holds it."
        )
    return None


def lpips(baseline, accelerated, net: str = "alex", batch_size: int = 32) -> SampleScores:
    """Per-sample LPIPS (torchmetrics, inputs [0, 1]; clips: mean over frames); ValueError when the
    backbone weights are not on this machine."""
    reason = lpips_unavailable_reason(net)
    if reason is not None:
        raise ValueError(reason)
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    a, b, lead = _paired(baseline, accelerated)
    model = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True, reduction="none")
    with torch.no_grad():
        parts = [model(b[i : i + batch_size], a[i : i + batch_size]).reshape(-1) for i in range(0, len(a), batch_size)]
    return _scores("lpips", _fold(torch.cat(parts), lead), f"torchmetrics-lpips-{net}", net=net)


def fidelity(baseline, accelerated, lpips_net: str | None = "alex", require_lpips: bool = False) -> dict[str, Any]:
    """Paired fidelity of an accelerated run to its baseline: {"psnr", "ssim", "lpips"} each a
    ``SampleScores`` — "lpips" is {"available": False, "reason": ...} when it cannot run offline
    (ValueError instead with ``require_lpips``; skipped entirely with ``lpips_net=None``)."""
    out: dict[str, Any] = {"psnr": psnr(baseline, accelerated), "ssim": ssim(baseline, accelerated)}
    if lpips_net is None:
        return out
    reason = lpips_unavailable_reason(lpips_net)
    if reason is None:
        out["lpips"] = lpips(baseline, accelerated, net=lpips_net)
    elif require_lpips:
        raise ValueError(reason)
    else:
        out["lpips"] = {"available": False, "reason": reason}
    return out


# ------------------------------------------------------------------------------------------ text


def clip_score(images, captions: Sequence[str], model_path: str | Path | None = None) -> SampleScores:
    """Per-sample CLIP score (torchmetrics CLIPScore: 100·max(cos, 0)) with a CLIP model from a *local*
    folder (transformers format: config.json, weights, tokenizer/processor files)."""
    if model_path is None:
        raise ValueError(
            "clip_score needs a local CLIP model folder (model_path), e.g. a copy of openai/clip-vit-large-patch14 "
            "saved with `CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained`; diffaccel never downloads it."
        )
    folder = Path(model_path).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"No CLIP model at {folder}: expected a transformers model folder with config.json.")
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        return (CLIPModel.from_pretrained(folder, local_files_only=True),
                CLIPProcessor.from_pretrained(folder, local_files_only=True))

    x = to_images(images, "images")
    if len(captions) != len(x):
        raise ValueError(f"{len(x)} images but {len(captions)} captions.")
    metric = CLIPScore(model_name_or_path=load)
    u8 = (x * 255).round().to(torch.uint8)
    with torch.no_grad():
        per = np.array([float(metric(u8[i : i + 1], [captions[i]])) for i in range(len(x))])
    return _scores("clip_score", per, f"torchmetrics-clipscore:{folder.name}", model=str(folder))


def judge_adherence(pixels, captions: Sequence[str], kind: str = "image") -> SampleScores:
    """Per-sample fraction of each caption's stated attributes the shipped judge reads back
    (``params["attributes"]``: per-attribute match rates, incl. direction/speed for clips)."""
    from diffaccel.pipelines.reference import judge as judge_mod

    from .features import JudgeFeatures

    jf = JudgeFeatures(kind)
    x = to_clips(pixels, "clips") if kind == "video" else to_images(pixels, "images")
    per = judge_mod.adherence(jf.judge, x, captions)
    attributes = judge_mod.attribute_accuracy(jf.judge, x, captions)
    return _scores("judge_adherence", np.asarray(per, dtype=np.float64), jf.feature_name, attributes=attributes)
