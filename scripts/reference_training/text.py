"""The text-encoder stages (image-text, video-text).

Trained jointly with the denoiser from scratch, the text encoders learned captions slowly: after
4.5k denoiser steps the image model ignored the background word entirely (same image for every
background). So each encoder is first taught to read a caption into the scene's attributes (the
judge's targets, from linear heads on its output) and then frozen while the denoiser trains, the way
real pipelines use a pretrained, frozen text encoder.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from diffaccel.pipelines.reference import build, scenes

from .common import WEIGHTS, log, read_state, write_state

TEXT_OBJECTIVE = "scene attributes (judge targets) from linear heads"


class TextProbe(torch.nn.Module):
    """Linear heads that read the judge's attribute targets from one text embedding per caption."""

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        from diffaccel.pipelines.reference import judge

        if kind == "image":
            slots = len(scenes.POSITIONS)
            self.shapes = {"background": (len(scenes.COLORS),), "slot_shape": (slots, len(judge.SLOT_SHAPES)),
                           "slot_color": (slots, len(scenes.COLORS)), "slot_size": (slots, len(scenes.SIZES))}
        else:
            self.shapes = {"background": (len(scenes.COLORS),), "shape": (len(scenes.SHAPES),),
                           "color": (len(scenes.COLORS),), "size": (len(scenes.SIZES),),
                           "direction": (len(scenes.DIRECTIONS),), "speed": (len(scenes.SPEEDS),)}
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, math.prod(v)) for k, v in self.shapes.items()})

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(pooled).view(-1, *self.shapes[k]) for k, head in self.heads.items()}


def text_features(kind: str, pipe, captions: list[str], rng: np.random.Generator) -> torch.Tensor:
    """The embeddings the pipeline feeds the denoiser, every position, flattened: (positions, dim).

    Each position is trained to carry the whole scene, so whichever text token a denoiser's attention
    finds, it reads every attribute. Image (CogView4: left padding, no attention mask, reads
    ``hidden_states[-2]``): all positions, pads included, after a random number of extra left pads so
    the encoding does not depend on how long the batch was padded. Video (Wan: a mask, the last
    hidden state, pads zeroed): the real tokens.
    """
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    if kind == "image":
        ids = tokenizer(captions, padding="longest", return_tensors="pt").input_ids
        extra = int(rng.integers(0, 33))
        ids = torch.cat([torch.full((ids.shape[0], extra), tokenizer.pad_token_id), ids], dim=1)
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
        return hidden.flatten(0, 1)
    batch = tokenizer(captions, padding="longest", return_tensors="pt")
    hidden = encoder(batch.input_ids, batch.attention_mask).last_hidden_state
    return hidden[batch.attention_mask.bool()]


def positions_per_caption(kind: str, pipe, captions: list[str], features: torch.Tensor) -> torch.Tensor:
    """How many feature rows each caption contributed (to repeat its targets)."""
    if kind == "image":
        return torch.full((len(captions),), features.shape[0] // len(captions))
    return pipe.tokenizer(captions, padding="longest", return_tensors="pt").attention_mask.sum(1)


def train_text_encoder(kind: str, minutes: float, seed: int, batch_size: int = 256, weights: Path = WEIGHTS) -> None:
    from diffaccel.pipelines.reference import judge

    components = build.image_components(seed) if kind == "image" else build.video_components(seed)
    pipe = (build.image_pipeline if kind == "image" else build.video_pipeline)(components)
    out = weights / kind / "text_encoder"
    state = read_state(out)
    resumed = pretrained_text_encoder(kind, pipe.text_encoder, weights, fall_back=False)
    if resumed is not None:
        pipe.text_encoder = resumed
        log(f"resuming the {kind} text encoder after {state['steps']} steps (fresh probe and optimizer)")
    encoder = pipe.text_encoder.train()
    dim = encoder.config.d_model
    probe = TextProbe(kind, dim)
    targets_of = judge.image_targets if kind == "image" else judge.clip_targets
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(probe.parameters()), lr=1e-3)
    rng = np.random.default_rng(seed + 500)
    steps, start = 0, time.time()

    def batch(n: int):
        picked = [scenes.sample_scene(rng, clip=kind == "video") for _ in range(n)]
        captions = [scenes.caption(s) for s in picked]
        features = text_features(kind, pipe, captions, rng)
        repeats = positions_per_caption(kind, pipe, captions, features)
        targets = {k: v.repeat_interleave(repeats, dim=0) for k, v in targets_of(picked).items()}
        return features, targets

    def accuracy() -> float:
        encoder.eval()
        with torch.no_grad():
            features, targets = batch(512)
            logits = probe(features)
            right = [(logits[k].argmax(-1) == t)[t != -100].float() for k, t in targets.items()]
        encoder.train()
        return float(torch.cat([r.flatten() for r in right]).mean())

    while time.time() - start < minutes * 60:
        features, targets = batch(batch_size)
        loss = judge.judge_loss(probe, probe(features), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if steps % 100 == 0:
            log(f"{kind} text step {steps} loss {loss.item():.4f}")
            if loss.item() < 1e-3 and accuracy() == 1.0:
                break
    encoder.eval()
    held_out = accuracy()
    encoder.to(torch.float16).save_pretrained(out)
    steps += state.get("steps", 0) if resumed is not None else 0
    minutes_spent = (time.time() - start) / 60 + (state.get("minutes", 0.0) if resumed is not None else 0.0)
    write_state(out, {"objective": TEXT_OBJECTIVE, "steps": steps, "seed": seed, "frozen_in_denoiser": True,
                      "attribute_accuracy": round(held_out, 4), "minutes": round(minutes_spent, 1)})
    log(f"{kind} text encoder saved: {steps} steps, attribute accuracy {held_out:.4f}")


def pretrained_text_encoder(kind: str, current, weights: Path = WEIGHTS, fall_back: bool = True):
    """The attribute-trained encoder of ``train_text_encoder`` (float32) in ``weights``, else (``fall_back``,
    a candidate folder without one of its own) the shipped one; None if not trained yet."""
    folder = weights / kind / "text_encoder"
    if fall_back and not folder.is_dir():
        folder = WEIGHTS / kind / "text_encoder"
    if read_state(folder).get("objective") != TEXT_OBJECTIVE:
        return None
    return type(current).from_pretrained(folder, dtype=torch.float32)
