"""An oracle toy: a denoiser whose blocks add known numbers, so every cached output is predictable.

Registered through the public user-side adapter API, which is also what it tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers.models.cache_utils import CacheMixin

from diffaccel.pipelines import BlockSpec, FamilyAdapter, register_adapter, register_block_spec


class ConstantBlock(torch.nn.Module):
    """Adds a constant: its residual never changes."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, hidden_states, temb):
        return hidden_states + self.value


class TimestepBlock(torch.nn.Module):
    """Adds the timestep: its residual changes every step, so a reused one is visible."""

    def forward(self, hidden_states, temb):
        return hidden_states + temb


class ToyDenoiser(torch.nn.Module, CacheMixin):
    """blocks: +1, +t, +t, +10 — the output is x + 11 + 2t when everything is computed."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([ConstantBlock(1.0), TimestepBlock(), TimestepBlock(), ConstantBlock(10.0)])

    def forward(self, hidden_states, timestep):
        temb = timestep.reshape(-1, 1, 1).to(hidden_states.dtype)
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return hidden_states


class CountdownScheduler:
    """Timesteps n-1, ..., 0 (times 100); ``step`` returns the model output as the next sample."""

    def __init__(self) -> None:
        self.timesteps = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        self.timesteps = torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.float32) * 100.0

    def step(self, model_output, timestep, sample):
        return SimpleNamespace(prev_sample=model_output)


register_block_spec(ConstantBlock, BlockSpec())
register_block_spec(TimestepBlock, BlockSpec())
register_adapter(
    ToyDenoiser, FamilyAdapter(name="toy", block_lists=("blocks",), latent_layout="BSC", cfg_layout="batched")
)


def toy_pipe() -> SimpleNamespace:
    return SimpleNamespace(transformer=ToyDenoiser(), scheduler=CountdownScheduler())


def run_toy(pipe, num_steps: int, tokens: int = 4, batch: int = 1, doubled: bool = False, shape_at=None,
            input_step: float = 0.0):
    """A denoising loop like a pipeline's; returns each step's denoiser output (x = i·input_step at step i,
    0 by default)."""
    pipe.scheduler.set_timesteps(num_steps)
    outputs = []
    for i, t in enumerate(pipe.scheduler.timesteps):
        n = shape_at[1] if shape_at is not None and i >= shape_at[0] else tokens
        x = torch.full((batch, n, 2), i * input_step)
        if doubled:
            x = torch.cat([x, x])
        out = pipe.transformer(x, t.expand(x.shape[0]))
        outputs.append(out)
        pipe.scheduler.step(out, t, x)
    return outputs
