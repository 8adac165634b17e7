"""Distillation data parallel under torchrun (gloo, 2 CPU processes): each process its own batches,
one set of weights, one writer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffaccel.distill import LCDConfig, StudentCard


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill_parallel")
    worker = Path(__file__).with_name("distill_worker.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker),
                           str(folder)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return folder, [json.loads((folder / f"rank{i}.json").read_text()) for i in range(2)]


def test_ranks_draw_different_batches_and_keep_one_set_of_weights(two_ranks):
    _, ranks = two_ranks
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["captions"] != ranks[1]["captions"]  # data parallel, not the same batch twice
    assert ranks[0]["losses"] != ranks[1]["losses"]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # gradients averaged: the LoRA weights agree


def test_ranks_stop_together_and_one_writes_the_student(two_ranks):
    folder, _ = two_ranks
    assert (folder / "done0").exists() and (folder / "done1").exists()  # nobody hung waiting for the other
    card = StudentCard.load(folder / "student")
    assert card.training["processes"] == 2 and card.training["steps"] >= 1
    assert len(json.loads((folder / "student" / "losses.json").read_text())) == card.training["steps"]


def test_single_process_stream_is_unchanged(tmp_path):
    """Rank 0 of one process draws batch `step` as before: resumed single-process runs stay exact."""
    from diffaccel.distill.lcd import LCDTrainer, stream_index
    from diffaccel.distill.teacher import teacher_for
    from diffaccel.pipelines import reference

    trainer = LCDTrainer(teacher_for(reference.load("image"), 64, 64),
                         LCDConfig(lora_rank=4, batch_size=2, solver_steps=10, warmup_steps=0, guidance_scale=4.0))
    assert [stream_index(trainer, s) for s in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("method, parts", [("tdm", ("student", "fake")), ("rg-lcd", ("student", "proxy"))])
def test_tdm_and_rglcd_run_data_parallel(two_ranks, method, parts):
    """No DDP wrapper for these: the all-reduced gradients must keep every trained part (TDM's student and
    fake score, RG-LCD's student and latent proxy reward) identical on both ranks, from different batches."""
    folder, _ = two_ranks
    ranks = [json.loads((folder / f"others{i}.json").read_text())[method] for i in range(2)]
    assert ranks[0]["losses"] != ranks[1]["losses"]
    if "captions" in ranks[0]:
        assert ranks[0]["captions"] != ranks[1]["captions"]
    for part in parts:
        assert ranks[0][part] == ranks[1][part], part


def test_tdm_distill_runs_on_two_processes(two_ranks):
    folder, _ = two_ranks
    card = StudentCard.load(folder / "tdm-student")
    assert card.method == "tdm" and card.training["processes"] == 2 and card.training["steps"] == 1


def test_gradients_average_over_processes_only_when_there_are_several():
    """One process: the gradients stay as they are (no collective call, which would need a process group)."""
    import torch

    from diffaccel.distill.lcd import average_gradients

    class One:
        class accelerator:
            num_processes = 1

    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.tensor([1.0, 2.0, 3.0])
    average_gradients(One(), [param])
    assert param.grad.tolist() == [1.0, 2.0, 3.0]
