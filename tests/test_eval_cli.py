"""The evaluation commands end to end, offline, on the embedded reference models (few steps)."""

import json

import numpy as np
import pytest
from PIL import Image

from diffaccel.cli import main
from diffaccel.eval.samples import write_sample
from diffaccel.pipelines.reference import scenes


def write_procedural(folder, num, seed, clip=False):
    folder.mkdir(parents=True, exist_ok=True)
    pixels, _, _ = scenes.sample_batch(np.random.default_rng(seed), num, 64, clip=clip)
    for i, sample in enumerate(pixels):
        write_sample(folder / f"{i:08d}.{'npz' if clip else 'png'}", sample)
    return folder


@pytest.fixture(scope="module")
def real_stats(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "real.npz"
    assert main(["eval", "fid-stats", "--procedural", "image", "--num", "128", "-o", str(path)]) == 0
    return path


def test_fid_of_a_folder_against_precomputed_stats(real_stats, tmp_path):
    same = write_procedural(tmp_path / "same", 128, seed=5)
    out = tmp_path / "fid.json"
    assert main(["eval", "fid", "--fake", str(same), "--real-stats", str(real_stats), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["fid"]["feature"].startswith("judge-image") and result["fid"]["n_fake"] == 128
    # the same folder as the real set: FID ~ 0; real stats from a folder give the same number as from renders
    assert main(["eval", "fid-stats", str(same), "-o", str(tmp_path / "same.npz")]) == 0
    assert main(["eval", "fid", "--fake", str(same), "--real-stats", str(tmp_path / "same.npz"), "--out", str(out)]) == 0
    assert abs(json.loads(out.read_text())["fid"]["value"]) < 1e-3


def test_fid_job_generates_resumably(real_stats, tmp_path):
    out, samples = tmp_path / "fid.json", tmp_path / "samples"
    args = ["eval", "fid", "--prompt-set", "reference-image", "--num", "4", "--steps", "2", "--preset", "fast",
            "--real-stats", str(real_stats), "--samples", str(samples), "--out", str(out)]
    assert main(args) == 0
    first = json.loads(out.read_text())
    assert first["config"]["cache"]["method"] == "block" and len(list(samples.glob("*.png"))) == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.png")}
    assert main(args) == 0  # nothing left to generate: same files, same number
    assert {p.name: p.stat().st_mtime_ns for p in samples.glob("*.png")} == stamps
    assert json.loads(out.read_text())["fid"] == first["fid"]
    manifest = json.loads((samples / "manifest.json").read_text())
    assert manifest["model"] == "reference-image" and manifest["seeds"] == [0, 1, 2, 3]


EAGER = "cache:\n  method: block\n  threshold: 1.0e9\n  warmup_steps: 1\n"


def test_fidelity_command(tmp_path):
    out, config = tmp_path / "fidelity.json", tmp_path / "eager.yaml"
    config.write_text(EAGER)
    assert main(["eval", "fidelity", "--config", str(config), "--num", "2", "--steps", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["fidelity"]["psnr"]["per_sample"]) == 2
    assert result["accelerated_stats"]["blocks_skipped"] > 0 and result["baseline_stats"]["blocks_skipped"] == 0


def test_vbench_on_a_folder_of_clips(tmp_path):
    clips = write_procedural(tmp_path / "clips", 4, seed=1, clip=True)
    out = tmp_path / "vbench.json"
    assert main(["eval", "vbench", "--videos", str(clips), "--out", str(out)]) == 0
    dims = json.loads(out.read_text())["dimensions"]
    assert dims["temporal_flickering"]["mean"] > 0.9 and dims["dynamic_degree"]["mean"] == 1.0
    assert all("backend" in d for d in dims.values())


def test_bench_command_on_the_reference_model(tmp_path):
    assert main(["bench", "--configs", "off,turbo", "--num", "2", "--repeats", "1", "--steps", "6", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    off, turbo = report["results"]
    assert off["quality"]["psnr"] == 100.0 and "adherence" in turbo["quality"]
    assert turbo["name"] == "turbo" and off["blocks_skipped"] == 0
    Image.open(tmp_path / "speedup_vs_psnr.png").verify()
    with np.load(tmp_path / "outputs.npz") as saved:  # the samples are kept, so a failed scoring loses no timed run
        assert sorted(saved) == ["off", "turbo"] and saved["off"].dtype == np.uint8 and len(saved["off"]) == 2


def test_eval_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "fid", "--fake", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "exactly one of --real DIR or --real-stats FILE" in capsys.readouterr().err
    assert main(["eval", "fid", "--fake", str(tmp_path), "--real", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert main(["bench", "--prompt-set", "nope", "--out", str(tmp_path)]) == 2
    assert "Unknown prompt set 'nope'" in capsys.readouterr().err


def test_size_options_reach_the_pipeline_call():
    from argparse import Namespace
    from types import SimpleNamespace

    from diffaccel.eval.jobs import _call_kwargs

    args = Namespace(steps=8, guidance=None, height=128, width=96, frames=17)
    video = SimpleNamespace(defaults={"height": 64, "width": 64, "num_frames": 9}, is_video=True, name="video")
    assert _call_kwargs(video, args) == {"height": 128, "width": 96, "num_frames": 17, "num_inference_steps": 8}
    image = SimpleNamespace(defaults={"height": 64, "width": 64}, is_video=False, name="image")
    with pytest.raises(ValueError, match="--frames applies to video models"):
        _call_kwargs(image, args)
