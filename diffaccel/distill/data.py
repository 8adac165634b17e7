"""Training images for distillation: a deterministic stream, batch ``step`` drawn from (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ProceduralScenes:
    """The reference models' own training distribution: rendered shape scenes and their captions."""

    resolution: int = 64

    def batch(self, seed: int, step: int, size: int) -> tuple[torch.Tensor, list[str]]:
        """(size, 3, H, W) pixels in [-1, 1] and their captions."""
        from diffaccel.pipelines.reference import scenes

        rng = np.random.default_rng([seed, 7919, step])
        pixels, captions, _ = scenes.sample_batch(rng, size, self.resolution)
        x = torch.from_numpy(pixels).float().permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0
        return x, captions
