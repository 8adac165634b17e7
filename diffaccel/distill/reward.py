"""Rewards for reward-guided consistency distillation (RG-LCD, Li et al. 2024).

``JudgeReward`` is the expert reward of the reference teacher: the reference judge's prompt adherence made
differentiable (the expected share of the caption's attributes it reads back). ``ClipReward`` is the expert
for a teacher of the user's: a CLIP-architecture reward model from the hub or a folder (CLIPScore with
OpenAI's CLIP, PickScore), the image-text cosine similarity through a differentiable preprocessing. ``LatentRewardModel`` is the paper's latent
proxy: a small network scoring a latent against the prompt embedding, trained online so that its
pairwise preferences match the expert's (``preference_loss``); the student optimises the proxy, which
is smoother than the expert and so less prone to reward hacking.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class JudgeReward(nn.Module):
    """Soft adherence of images (B, 3, H, W) in [0, 1] to their captions under an ``ImageJudge``.

    Per stated object at its slot: P(slot occupied), P(stated shape), P(stated color), P(stated size);
    plus P(stated background). The reward is their mean per image: the expectation of the judge's own
    adherence score, if each attribute were read independently. The judge stays frozen.
    """

    def __init__(self, judge: nn.Module) -> None:
        super().__init__()
        from diffaccel.pipelines.reference.judge import ImageJudge

        if not isinstance(judge, ImageJudge):
            raise ValueError(f"JudgeReward needs an ImageJudge, got {type(judge).__name__}.")
        self.judge = judge.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "JudgeReward":  # the judge's BatchNorm and dropout stay in eval
        super().train(mode)
        self.judge.eval()
        return self

    @staticmethod
    def _stated(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Objects as rows (image, slot, shape, color, size) and the background index per image."""
        from diffaccel.pipelines.reference.judge import POSITIONS, SLOT_SHAPES
        from diffaccel.pipelines.reference.scenes import COLORS, SIZES, parse_caption

        rows, backgrounds = [], []
        for i, caption in enumerate(captions):
            scene = parse_caption(caption)
            for obj in scene.objects:
                rows.append((i, POSITIONS.index(obj.position), SLOT_SHAPES.index(obj.shape), COLORS.index(obj.color),
                             SIZES.index(obj.size)))
            backgrounds.append(COLORS.index(scene.background) if scene.background else -1)
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 5), torch.tensor(backgrounds)

    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        logits = self.judge(images)
        objects, backgrounds = self._stated(captions)
        objects, backgrounds = objects.to(images.device), backgrounds.to(images.device)
        img, slot = objects[:, 0], objects[:, 1]
        shape_p = logits["slot_shape"].softmax(-1)[img, slot]  # (objects, shapes + 1)
        parts = torch.stack([
            1.0 - shape_p[:, 0],
            shape_p.gather(1, objects[:, 2:3])[:, 0],
            logits["slot_color"].softmax(-1)[img, slot].gather(1, objects[:, 3:4])[:, 0],
            logits["slot_size"].softmax(-1)[img, slot].gather(1, objects[:, 4:5])[:, 0],
        ], dim=1)
        n = images.shape[0]
        total = torch.zeros(n, device=images.device).index_add(0, img, parts.sum(1))
        count = torch.zeros(n, device=images.device).index_add(0, img, torch.full_like(img, 4, dtype=torch.float))
        has_bg = backgrounds >= 0
        bg_p = logits["background"].softmax(-1).gather(1, backgrounds.clamp(min=0)[:, None])[:, 0]
        total = total + torch.where(has_bg, bg_p, torch.zeros_like(bg_p))
        count = count + has_bg.float()
        return total / count.clamp(min=1.0)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults, when a folder has no processor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipReward(nn.Module):
    """R = cos(image embedding, caption embedding) of a transformers ``CLIPModel`` (CLIPScore without its
    clipping and weight; PickScore's score up to its logit scale), for images (B, 3, H, W) in [0, 1].

    The processor's steps are redone in torch so gradients reach the pixels: the shorter side resized to
    the model's size (bicubic), a centre crop, the processor's normalisation. The model stays frozen."""

    def __init__(self, model: nn.Module, tokenizer, mean=CLIP_MEAN, std=CLIP_STD) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.size = int(model.config.vision_config.image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, spec: str, device: str | torch.device = "cpu") -> "ClipReward":
        """A hub id or folder holding a ``CLIPModel``, its tokenizer and (optionally) its image processor."""
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        try:
            model = CLIPModel.from_pretrained(spec)
        except (OSError, ValueError) as error:
            raise ValueError(f"Reward model {spec!r}: not a CLIPModel that loads here ({error}). Give the hub id or "
                             f"folder of a transformers CLIP model (CLIPScore: openai/clip-vit-large-patch14; "
                             f"PickScore: yuvalkirstain/PickScore_v1 with its tokenizer saved beside it).") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as error:
            raise ValueError(f"Reward model {spec!r} has no tokenizer ({error}); save the CLIP tokenizer it was "
                             f"trained with into the folder (tokenizer.save_pretrained).") from None
        try:
            processor = CLIPImageProcessor.from_pretrained(spec)
            mean, std = processor.image_mean, processor.image_std
        except (OSError, ValueError):
            mean, std = CLIP_MEAN, CLIP_STD
        return cls(model, tokenizer, mean, std).to(device)

    def train(self, mode: bool = True) -> "ClipReward":
        super().train(mode)
        self.model.eval()
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the model's normalised (B, 3, S, S) input, differentiably."""
        height, width = images.shape[-2:]
        scale = self.size / min(height, width)
        resized = F.interpolate(images.float(), size=(max(self.size, round(height * scale)), max(self.size, round(width * scale))),
                                mode="bicubic", align_corners=False)
        top, left = (resized.shape[-2] - self.size) // 2, (resized.shape[-1] - self.size) // 2
        cropped = resized[..., top:top + self.size, left:left + self.size]
        return (cropped - self.mean) / self.std

    def forward(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt").to(images.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"),
                         pixel_values=self.preprocess(images).to(self.model.dtype))
        return F.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)


class LatentRewardModel(nn.Module):
    """A CLIP-style proxy reward on latents: score = <image tower(latent), text tower(pooled prompt)> / √d."""

    def __init__(self, latent_channels: int, text_dim: int, width: int = 32, embed_dim: int = 128) -> None:
        super().__init__()
        self.config = {"latent_channels": latent_channels, "text_dim": text_dim, "width": width, "embed_dim": embed_dim}
        self.image = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, embed_dim),
        )
        self.text = nn.Sequential(nn.Linear(text_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, latents: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        prompt_embeds = prompt_embeds.float()  # the text encoder may run in half precision
        pooled = prompt_embeds.mean(dim=1) if prompt_embeds.ndim == 3 else prompt_embeds
        return (self.image(latents) * self.text(pooled)).sum(-1) / self.config["embed_dim"] ** 0.5


def preference_loss(proxy_scores: torch.Tensor, expert_scores: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """RG-LCD's LRM objective: for every pair of candidates of a prompt, the KL divergence from the expert's
    preference softmax([R_i, R_j] / τ) to the proxy's softmax([r_i, r_j]). Scores are (B, K) for K
    candidates of each of B prompts (the paper's K = 3: student, LCD target, ground truth)."""
    k = proxy_scores.shape[1]
    i, j = torch.triu_indices(k, k, offset=1)
    proxy = torch.stack([proxy_scores[:, i], proxy_scores[:, j]], dim=-1).log_softmax(-1)
    expert = (torch.stack([expert_scores[:, i], expert_scores[:, j]], dim=-1) / temperature).softmax(-1)
    return F.kl_div(proxy, expert, reduction="batchmean") / i.numel()
