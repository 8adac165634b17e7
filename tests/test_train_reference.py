"""The reference-model trainer's data stream and its resume path (training itself does not run in CI)."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_reference", ROOT / "scripts" / "train_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_reference"] = module  # the workers' tasks are pickled by module name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("train_reference", None)


def _draw(trainer, loader, steps):
    try:
        return [loader.get() for _ in range(steps)]
    finally:
        loader.close()


def test_vae_batches_from_workers_depend_on_the_step_alone(trainer):
    draw = functools.partial(trainer._vae_loader_batch, "image", 0, 4)
    one = _draw(trainer, trainer.BatchLoader(draw, 3, workers=1), 3)
    two = _draw(trainer, trainer.BatchLoader(draw, 3, workers=2), 3)
    for a, b, step in zip(one, two, range(3, 6)):
        assert a.shape == (4, 64, 64, 3) and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, trainer._vae_loader_batch("image", 0, 4, step))
    assert not np.array_equal(one[0], one[1])
    # Every 8th image batch is 128 px, a quarter as many; model input is channels-first in [-1, 1].
    big = trainer._vae_loader_batch("image", 0, 8, 7)
    assert big.shape == (2, 128, 128, 3)
    x = trainer.pixels_to_model(__import__("torch").from_numpy(big))
    assert tuple(x.shape) == (2, 3, 128, 128) and float(x.min()) >= -1 and float(x.max()) <= 1
    clip = trainer.pixels_to_model(__import__("torch").from_numpy(trainer._vae_loader_batch("video", 0, 1, 0)))
    assert tuple(clip.shape) == (1, 3, 9, 64, 64)


def test_denoiser_batches_from_workers_match_the_step_stream(trainer):
    draw = functools.partial(trainer._loader_batch, "image", 0, 8)
    (pixels, captions), = _draw(trainer, trainer.BatchLoader(draw, 3, workers=1), 1)
    again, captions_again = trainer._loader_batch("image", 0, 8, 3)
    np.testing.assert_array_equal(pixels, again)
    assert captions == captions_again and len(captions) == len(pixels) > 0


def test_a_resumed_vae_warms_its_fresh_optimizer_up(trainer, tmp_path, monkeypatch):
    """Resuming a trained VAE must not undo it: full-size first Adam steps took 27 dB to 16 dB in 7 steps."""
    weights = tmp_path / "weights"
    shutil.copytree(trainer.WEIGHTS / "image" / "vae", weights / "image" / "vae")
    monkeypatch.setattr(trainer, "WEIGHTS", weights)
    before = json.loads((weights / "image" / "vae" / "training_state.json").read_text())
    trainer.train_vae("image", minutes=0.1, seed=0, batch_size=4)
    after = json.loads((weights / "image" / "vae" / "training_state.json").read_text())
    assert after["steps"] > before["steps"]
    assert after["psnr_64px"] > before["psnr_64px"] - 1.0, (before, after)


def test_profile_is_refused_where_there_is_no_denoiser_step_to_time(trainer):
    with pytest.raises(SystemExit, match="--profile times the denoiser stages"):
        trainer.main(["video-vae", "--profile", "--minutes", "0.01"])
