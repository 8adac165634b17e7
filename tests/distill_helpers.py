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


def saved_tiny_pipeline(tmp_path_factory, family: str):
    """A tiny pipeline of ``tiny_pipelines`` (random weights, offline tokenizers) saved as a pipeline folder:
    a teacher "of the user's"."""
    import tiny_pipelines

    folder = tmp_path_factory.mktemp(family) / f"my-{family}"
    tiny_pipelines.build(family).pipe.save_pretrained(folder)
    return folder


def colour_images(folder, colours=("red", "green", "blue"), size=(64, 64)):
    """Plain images of ``colours`` with ``.txt`` captions: training data for a tiny teacher."""
    from PIL import Image

    folder.mkdir()
    for i, colour in enumerate(colours):
        Image.new("RGB", size, colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} picture")
    return folder


def cli_lcd_one_step_then_resume(teacher, images, out) -> list[str]:
    """``diffaccel distill`` of a tiny LoRA LCD student of ``teacher`` on ``images``: one step, then resumed to
    two (each call must succeed); returns the command line, for further calls."""
    from diffaccel.cli import main

    base = ["distill", "--teacher", str(teacher), "--data", str(images), "--resolution", "64", "--lora-rank", "4",
            "--batch-size", "2", "--solver-steps", "10", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(base + ["--max-steps", "1"]) == 0
    assert main(base + ["--max-steps", "2", "--resume"]) == 0
    return base
