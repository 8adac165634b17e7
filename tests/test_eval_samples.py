"""Resumable sample sets: an interrupted job, rerun, equals an uninterrupted one file for file."""

import json

import numpy as np
import pytest

from diffaccel.eval.samples import SampleJob, generate_samples, list_samples, load_samples, open_folder
from tiny_pipelines import build


class Interrupting:
    """Wraps a pipeline and dies after a number of calls, like a killed job."""

    def __init__(self, pipe, calls):
        self.pipe, self.calls = pipe, calls

    def __call__(self, *args, **kwargs):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return self.pipe(*args, **kwargs)


@pytest.fixture(scope="module")
def case():
    return build("pixart_alpha")


def job(case, n=5):
    kwargs = {k: v for k, v in case.call_kwargs.items() if k not in ("prompt", "output_type")}
    return SampleJob(model="tiny-pixart", prompts=tuple(f"a red circle {i}" for i in range(n)),
                     seeds=tuple(range(100, 100 + n)), call_kwargs=kwargs, chunk_size=2)


def test_resumed_job_equals_uninterrupted(case, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    generate_samples(job(case), full, case.pipe, progress=False)
    with pytest.raises(KeyboardInterrupt):
        generate_samples(job(case), resumed, Interrupting(case.pipe, calls=1), progress=False)
    assert len(list_samples(resumed)) == 2  # one complete chunk survived, nothing half-written
    generate_samples(job(case), resumed, Interrupting(case.pipe, calls=2), progress=False)  # only 2 chunks left
    a, b = list_samples(full), list_samples(resumed)
    assert [p.name for p in a] == [p.name for p in b] == [f"{s:08d}.png" for s in range(100, 105)]
    assert np.array_equal(load_samples(a), load_samples(b))
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["seeds"] == list(range(100, 105)) and "diffusers" in manifest["versions"]


def test_a_folder_of_another_job_is_refused(case, tmp_path):
    open_folder(job(case), tmp_path)
    with pytest.raises(ValueError, match=r"holds a different job \(fields that differ: \['prompts', 'seeds'\]\)"):
        open_folder(job(case, n=3), tmp_path)


def test_job_validation():
    with pytest.raises(ValueError, match="one seed per prompt"):
        SampleJob(model="m", prompts=("a",), seeds=(1, 2))
    with pytest.raises(ValueError, match="unique"):
        SampleJob(model="m", prompts=("a", "b"), seeds=(1, 1))
