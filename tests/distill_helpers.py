"""Shared checks of the distillation tests."""

import torch


def loss_before_and_after_one_step(trainer) -> tuple[float, float]:
    """The loss of batch 0 under the trainer's weights, before and after one training step on it."""
    with torch.no_grad():
        before = float(trainer.loss_at(0))
    trainer.train_step()
    with torch.no_grad():
        after = float(trainer.loss_at(0))
    return before, after
