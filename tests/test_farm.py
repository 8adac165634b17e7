"""The render farm: deterministic ids, idempotent outputs, a manifest that survives kills, a job
fingerprint, and the local, torchrun and Ray engines (40 prompts over 2 workers on the reference
image model at 2 steps, 32 px)."""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffaccel.cli import main
from diffaccel.parallel.engines import EngineOptions, RayEngine
from diffaccel.parallel.farm import FarmJob, make_job, read_prompt_lines, run_farm
from diffaccel.parallel.items import PromptLine
from diffaccel.parallel.items import work_items
from diffaccel.parallel.manifest import ManifestRow, ManifestWriter, open_job, read_manifest
from diffaccel.parallel.render import file_sha256

CALL = {"num_inference_steps": 2, "height": 32, "width": 32}
ARGS = ["--steps", "2", "--height", "32", "--width", "32", "--no-progress"]
REPO = Path(__file__).resolve().parents[1]


def scene_prompts(n):
    from diffaccel.pipelines.reference import scenes

    return scenes.prompt_set(n, clip=False)


def write_txt(path, n):
    path.write_text("\n".join(scene_prompts(n)) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores two spinning OpenMP threads run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_thread_env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pipe():
    """The reference image model, loaded once for the in-process runs."""
    from diffaccel.loading import load_model

    return load_model("image", "cpu").pipe


def job(preset="fast", **call):
    return make_job("image", preset, {**CALL, **call})


def done_rows(out):
    rows = [r for r in read_manifest(out) if r.status == "done"]
    return rows, {r.id: r for r in rows}


def check_complete(out, n):
    """n distinct items, each with exactly one done row whose file is on disk with that sha256."""
    rows, by_id = done_rows(out)
    assert len(rows) == len(by_id) == n, "one done row per item, no duplicates"
    outputs = sorted(p for p in Path(out).glob("??/*.png"))
    assert len(outputs) == n
    for row in rows:
        path = Path(out) / row.path
        assert path.parent.name == row.id[:2] and path.stem == row.id
        assert file_sha256(path) == row.sha256
        assert row.seconds["render"] > 0 and row.worker and row.stats["steps"] == 2
    return rows


# --- items, ids, prompt files ---------------------------------------------------------------

def test_txt_prompts_get_seed_plus_index_and_stable_ids(tmp_path):
    lines = read_prompt_lines(write_txt(tmp_path / "p.txt", 3), seed=10)
    assert [line.seed for line in lines] == [10, 11, 12]
    a = work_items(lines, "reference-image", {"c": 1}, CALL)
    b = work_items(lines, "reference-image", {"c": 1}, CALL)
    assert [i.id for i in a] == [i.id for i in b] and len({i.id for i in a}) == 3
    assert all(len(i.id) == 20 and i.shard == i.id[:2] for i in a)
    other_config = work_items(lines, "reference-image", {"c": 2}, CALL)
    other_call = work_items(lines, "reference-image", {"c": 1}, {**CALL, "num_inference_steps": 3})
    other_model = work_items(lines, "reference-video", {"c": 1}, CALL)
    for other in (other_config, other_call, other_model):
        assert not {i.id for i in a} & {i.id for i in other}


def test_jsonl_items_merge_their_params_and_collapse_duplicates(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a red circle", "seed": 7, "guidance_scale": 2},
            {"prompt": "a red circle", "seed": 7, "guidance_scale": 2.0},  # the same item
            {"prompt": "a red circle", "seed": 7},
            {"prompt": "a blue square", "negative_prompt": "green", "height": 64}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    lines = read_prompt_lines(path, seed=100)
    assert [line.seed for line in lines] == [7, 7, 7, 103]
    items = work_items(lines, "m", {}, {**CALL, "guidance_scale": 4.0})
    assert len(items) == 3
    assert items[0].params["guidance_scale"] == 2.0 and items[1].params["guidance_scale"] == 4.0
    assert items[2].negative_prompt == "green" and items[2].params["height"] == 64 and items[2].index == 3


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a"}\n{"prompt": "b"', r"p.jsonl line 2 is not valid JSON"),
    ('["a"]', r"line 1 must be a JSON object"),
    ('{"prompt": "a", "sed": 1}', r"unknown keys \['sed'\]; allowed: \['prompt', 'seed'"),
    ('{"seed": 1}', r"line 1 needs a non-empty 'prompt'"),
    ('{"prompt": "a", "seed": -1}', r"'seed' must be a non-negative integer"),
    ('{"prompt": "a", "height": "64"}', r"'height' must be a positive int"),
    ("\n\n", r"holds no prompts"),
])
def test_bad_prompt_files_are_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompt_lines(path)


# --- manifest and fingerprint ---------------------------------------------------------------

def test_manifest_tolerates_a_truncated_last_line_and_appends_after_it(tmp_path):
    row = ManifestRow(id="ab12", status="done", prompt="p", seed=1, negative_prompt=None, params={}, worker="w",
                      path="ab/ab12.png", finished="2026-01-01T00:00:00Z")
    with ManifestWriter(tmp_path, "w") as writer:
        writer.append(row)
    path = tmp_path / "manifest" / "w.jsonl"
    with open(path, "a") as f:
        f.write(row.to_json()[:30])  # a write killed halfway
    assert [r.id for r in read_manifest(tmp_path)] == ["ab12"]
    with ManifestWriter(tmp_path, "w") as writer:  # the same name again (a reused pid): starts a fresh line
        writer.append(ManifestRow(**{**row.__dict__, "id": "cd34", "finished": "2026-01-01T00:00:01Z"}))
    assert [r.id for r in read_manifest(tmp_path)] == ["ab12", "cd34"]


def test_changed_config_or_call_gets_a_new_fingerprint_and_is_refused(tmp_path):
    fast, again = job("fast").record(), job("fast").record()
    assert fast.fingerprint() == again.fingerprint() and fast.diffaccel
    for other, field in ((job("safe").record(), "config"), (job("fast", num_inference_steps=3).record(), "call")):
        assert other.fingerprint() != fast.fingerprint()
        open_job(tmp_path / field, fast)
        open_job(tmp_path / field, again)  # the same job: fine
        with pytest.raises(ValueError, match=rf"holds another farm job .*fields that differ: \['{field}'\]"):
            open_job(tmp_path / field, other)
    stored = json.loads((tmp_path / "config" / "job.json").read_text())
    assert stored["fingerprint"] == fast.fingerprint() and stored["model"] == "reference-image"
    assert stored["revision"].startswith("sha256:")


def test_retrained_weights_in_the_same_folder_are_a_new_job(tmp_path):
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"step 100")
    first = make_job(str(folder), "fast").record()
    assert first.model == str(folder.resolve()) and first.revision.startswith("sha256:")
    weights.write_bytes(b"step 200")
    second = make_job(str(folder), "fast").record()
    assert second.revision != first.revision and second.fingerprint() != first.fingerprint()
    open_job(tmp_path / "out", first)
    with pytest.raises(ValueError, match=r"fields that differ: \['revision'\]"):
        open_job(tmp_path / "out", second)
    assert make_job("some-org/not-in-the-cache", "fast").record().revision is None


# --- local engine ---------------------------------------------------------------------------

def test_local_engine_renders_every_item_once_and_a_rerun_skips_them(pipe, tmp_path):
    prompts = tmp_path / "p.jsonl"
    scenes = scene_prompts(6)
    prompts.write_text("\n".join(json.dumps({"prompt": p, **({"negative_prompt": "blurry"} if i == 2 else {})})
                                 for i, p in enumerate(scenes)) + "\n")
    out = tmp_path / "out"
    summary = run_farm(job(), read_prompt_lines(prompts), out, "local", EngineOptions(progress=False), pipe=pipe)
    assert (summary.total, summary.done, summary.failed, summary.skipped, summary.left) == (6, 6, 0, 0, 0)
    rows = check_complete(out, 6)
    assert {r.prompt for r in rows} == set(scenes) and Image.open(out / rows[0].path).size == (32, 32)
    assert [r.negative_prompt for r in rows if r.negative_prompt] == ["blurry"]
    assert json.loads((out / "summary.json").read_text())["done"] == 6

    again = run_farm(job(), read_prompt_lines(prompts), out, "local", EngineOptions(progress=False), pipe=pipe)
    assert (again.done, again.skipped) == (0, 6)
    assert len(read_manifest(out)) == 6  # nothing rewritten


def test_the_same_item_gives_the_same_file(pipe, tmp_path):
    prompts = write_txt(tmp_path / "p.txt", 2)
    for name in ("a", "b"):
        run_farm(job(), read_prompt_lines(prompts), tmp_path / name, "local", EngineOptions(progress=False), pipe=pipe)
    a, b = (sorted(r.path + r.sha256 for r in done_rows(tmp_path / n)[0]) for n in ("a", "b"))
    assert a == b


def failing_first(pipe, monkeypatch, bad_prompt, times):
    """Make the pipeline raise for one prompt the first ``times`` calls (a transient error)."""
    original = type(pipe).__call__
    left = {"n": times}

    @functools.wraps(original)
    def flaky(self, *args, **kwargs):
        if kwargs.get("prompt") == bad_prompt and left["n"] > 0:
            left["n"] -= 1
            raise RuntimeError("simulated device error")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", flaky)


def test_a_failed_item_is_recorded_then_retried_by_a_rerun(pipe, tmp_path, monkeypatch):
    prompts = write_txt(tmp_path / "p.txt", 4)
    bad = scene_prompts(4)[1]
    out = tmp_path / "out"
    failing_first(pipe, monkeypatch, bad, times=1)
    options = EngineOptions(progress=False, retries=0)
    first = run_farm(job(), read_prompt_lines(prompts), out, "local", options, pipe=pipe)
    assert (first.done, first.failed) == (3, 1)
    failed = [r for r in read_manifest(out) if r.status == "failed"]
    assert len(failed) == 1 and failed[0].prompt == bad and failed[0].error == "RuntimeError: simulated device error"
    assert failed[0].path is None and failed[0].sha256 is None

    second = run_farm(job(), read_prompt_lines(prompts), out, "local", EngineOptions(progress=False), pipe=pipe)
    assert (second.done, second.failed, second.skipped, second.retried) == (1, 0, 3, 1)
    check_complete(out, 4)


def test_retries_within_a_run(pipe, tmp_path, monkeypatch):
    prompts = write_txt(tmp_path / "p.txt", 2)
    failing_first(pipe, monkeypatch, scene_prompts(2)[0], times=1)
    summary = run_farm(job(), read_prompt_lines(prompts), tmp_path, "local", EngineOptions(progress=False, retries=1),
                       pipe=pipe)
    assert (summary.done, summary.failed) == (2, 0)
    assert sorted(r.attempts for r in read_manifest(tmp_path)) == [1, 2]


def test_max_items_leaves_the_rest_for_a_later_run(pipe, tmp_path):
    prompts = read_prompt_lines(write_txt(tmp_path / "p.txt", 5))
    first = run_farm(job(), prompts, tmp_path, "local", EngineOptions(progress=False), max_items=2, pipe=pipe)
    assert (first.done, first.left) == (2, 3)
    second = run_farm(job(), prompts, tmp_path, "local", EngineOptions(progress=False), pipe=pipe)
    assert (second.done, second.skipped, second.left) == (3, 2, 0)
    check_complete(tmp_path, 5)


def test_killed_run_then_rerun_finishes_the_rest_without_redoing_any(pipe, tmp_path):
    prompts = write_txt(tmp_path / "p.txt", 20)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "diffaccel.cli", "farm", "--prompts", str(prompts), "--out", str(out), *ARGS]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=one_thread_env())
    try:
        deadline = time.monotonic() + 120
        while len(read_manifest(out)) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before, _ = done_rows(out)
    assert 3 <= len(before) < 20, "killed midway"
    stamps = {r.path: os.stat(out / r.path).st_mtime_ns for r in before}
    summary = run_farm(job(), read_prompt_lines(prompts), out, "local", EngineOptions(progress=False), pipe=pipe)
    assert summary.skipped == len(before) and summary.done == 20 - len(before) and summary.failed == 0
    check_complete(out, 20)
    assert {p: os.stat(out / p).st_mtime_ns for p in stamps} == stamps  # nothing finished before was redone


def test_video_items_are_mp4(tmp_path):
    import imageio.v3 as iio

    prompts = tmp_path / "p.txt"
    prompts.write_text("a small red circle moving right, on a blue background\n")
    video = make_job("video", "fast", {"num_inference_steps": 2})
    summary = run_farm(video, read_prompt_lines(prompts), tmp_path, "local", EngineOptions(progress=False))
    (row,) = read_manifest(tmp_path)
    assert summary.done == 1 and row.path.endswith(".mp4") and row.params["num_frames"] == 9
    assert np.asarray(iio.imread(tmp_path / row.path, index=None)).shape[0] == 9


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--prompts", "missing.txt"], "Prompts file 'missing.txt' does not exist"),
    pytest.param(["--devices-per-replica", "2"], r"--devices-per-replica 2 spreads one pipeline over 2 GPUs, but this",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="applies on a CPU machine")),
    (["--workers", "2"], r"--engine local runs one worker in this process, not 2"),
    (["--preset", "warp"], r"warp"),
    (["--batch-size", "0"], r"FarmJob.batch_size must be >= 1, got 0"),
])
def test_cli_errors_before_loading_anything(tmp_path, capsys, extra, message):
    (tmp_path / "p.txt").write_text("a red circle\n")
    args = ["farm", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), *ARGS, *extra]
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "manifest").exists()


def test_a_parallel_config_is_refused():
    config = {**job().config, "parallel": {"method": "cfg", "version": 1}}
    with pytest.raises(ValueError, match="farm runs one pipeline per replica process; a config with parallel='cfg'"):
        FarmJob(model="image", config=config)


def test_cli_refuses_a_changed_job_and_an_unknown_engine(tmp_path, capsys):
    out = tmp_path / "out"
    open_job(out, job("fast").record())
    prompts = write_txt(tmp_path / "p.txt", 1)
    assert main(["farm", "--prompts", str(prompts), "--out", str(out), "--preset", "safe", *ARGS]) == 2
    assert "fields that differ: ['config']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["farm", "--prompts", str(prompts), "--out", str(out), "--engine", "spark"])
    assert "invalid choice: 'spark'" in capsys.readouterr().err


def test_ray_placement_on_cpu():
    engine = SimpleNamespace(options=EngineOptions(devices_per_replica=2))
    with pytest.raises(ValueError, match="but the Ray cluster has none"):
        RayEngine._placement(engine, {"CPU": 2})
    engine = SimpleNamespace(options=EngineOptions(workers=5))
    with pytest.raises(ValueError, match=r"5 CPU replicas at 0.5 CPU each need 2.5 CPUs; the Ray cluster has 2"):
        RayEngine._placement(engine, {"CPU": 2})
    engine = SimpleNamespace(options=EngineOptions(workers=2))
    assert RayEngine._placement(engine, {"CPU": 2}) == (2, {"num_cpus": 0.5})
    engine = SimpleNamespace(options=EngineOptions(devices_per_replica=2))
    assert RayEngine._placement(engine, {"CPU": 16, "GPU": 8}) == (4, {"num_gpus": 2, "num_cpus": 1})


# --- multi-process engines: 40 prompts over 2 workers -----------------------------------------

def check_two_workers(out, prefix):
    rows = check_complete(out, 40)
    workers = {r.worker for r in rows}
    assert len(workers) == 2 and all(w.startswith(prefix) for w in workers)
    assert len(list((Path(out) / "manifest").glob("*.jsonl"))) == 2
    summary = json.loads((Path(out) / "summary.json").read_text())
    assert (summary["done"], summary["failed"]) == (40, 0) and summary["items_per_second"] > 0


def test_torchrun_engine_splits_40_prompts_over_2_ranks(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    prompts = write_txt(tmp_path / "p.txt", 40)
    out = tmp_path / "out"
    command = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "diffaccel.cli", "farm", "--prompts",
               str(prompts), "--out", str(out), "--engine", "torchrun", "--batch-size", "4", *ARGS]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=one_thread_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "farm: 40 items: 40 done, 0 skipped" in done.stdout
    check_two_workers(out, "rank-")
    per_rank = {}
    for row in read_manifest(out):
        per_rank[row.worker] = per_rank.get(row.worker, 0) + 1
    assert sorted(per_rank.values()) == [20, 20]
    assert {row.batch for row in read_manifest(out)} == {4}  # each rank's 20 items in 5 calls


def test_ray_engine_with_fractional_cpus(tmp_path):
    pytest.importorskip("ray")
    prompts = read_prompt_lines(write_txt(tmp_path / "p.txt", 40))
    options = EngineOptions(workers=2, progress=False, ray_address="local")
    batched = make_job("image", "fast", CALL, batch_size=3)
    summary = run_farm(batched, prompts, tmp_path, "ray", options)
    assert (summary.done, summary.failed) == (40, 0)
    check_two_workers(tmp_path, "ray-")
    assert sorted(row.batch for row in read_manifest(tmp_path)).count(3) == 39  # 13 calls of 3, one of 1
    again = run_farm(batched, prompts, tmp_path, "local", EngineOptions(progress=False))  # nothing left: loads nothing
    assert (again.done, again.skipped) == (0, 40)


def test_a_preset_job_gives_a_unet_its_unet_recipe(tmp_path):
    import diffaccel
    from diffaccel import DeepCacheConfig
    from diffaccel.parallel.render import Renderer
    from tiny_pipelines import build

    case = build("sd15")
    renderer = Renderer(make_job("image", "fast"), tmp_path, "w0", pipe=case.pipe)
    assert isinstance(diffaccel.config_of(renderer.pipe).cache, DeepCacheConfig)
    diffaccel.preset("fast").to_file(tmp_path / "cfg.yaml")
    assert make_job("image", str(tmp_path / "cfg.yaml")).preset is None  # a config file is applied as written


def test_a_compiled_job_compiles_each_replica_and_is_its_own_job(tmp_path):
    """--compile reaches every replica (its denoiser's blocks compiled after acceleration) and is part of the
    job's identity (compiled kernels round differently); a job without it keeps its old fingerprint."""
    import torch

    from diffaccel.parallel.render import Renderer
    from tiny_pipelines import build

    plain = make_job("image", "fast")
    assert "compile" not in plain.record().to_dict()
    compiled = make_job("image", "fast", compile="blocks", compile_backend="aot_eager")
    assert compiled.record().to_dict()["compile"] == {"mode": "blocks", "backend": "aot_eager"}
    assert compiled.record().fingerprint() != plain.record().fingerprint()
    with pytest.raises(ValueError, match="FarmJob.compile must be one of"):
        make_job("image", "fast", compile="max")
    case = build("pixart_alpha")
    torch._dynamo.reset()
    try:
        renderer = Renderer(compiled, tmp_path, "w0", pipe=case.pipe)
        blocks = renderer.pipe.transformer.transformer_blocks
        assert all(getattr(block, "_compiled_call_impl", None) is not None for block in blocks)
    finally:
        torch._dynamo.reset()


# --- batching ---------------------------------------------------------------------------------

def counting_calls(pipe, monkeypatch, fails=lambda prompts: False):
    """Record how many prompts each pipeline call took; raise where ``fails(prompts)``."""
    sizes = []
    original = type(pipe).__call__

    @functools.wraps(original)
    def counted(self, *args, **kwargs):
        prompts = kwargs["prompt"] if isinstance(kwargs.get("prompt"), list) else [kwargs.get("prompt")]
        sizes.append(len(prompts))
        if fails(prompts):
            raise RuntimeError("simulated device error")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", counted)
    return sizes


def test_batches_are_runs_of_items_with_the_same_call():
    from diffaccel.parallel.items import batches

    lines = [{}, {}, {}, {"guidance_scale": 2.0}, {}, {"negative_prompt": "blurry"}, {"negative_prompt": "dark"}]
    prompts = [PromptLine(f"p{i}", i, line.pop("negative_prompt", None), line, i) for i, line in enumerate(lines)]
    items = work_items(prompts, "m", {}, {"num_inference_steps": 2})
    assert [[item.index for item in batch] for batch in batches(items, 2)] == [[0, 1], [2], [3], [4], [5, 6]]
    assert [len(batch) for batch in batches(items, 1)] == [1] * 7
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        batches(items, 0)


def test_batched_calls_keep_each_items_seed_and_file(pipe, tmp_path, monkeypatch):
    """--batch-size 3: 7 items in 4 calls (line 3 has a call of its own); each item's output is the one a
    single call with its seed gives. The items share one prompt, so the batch pads no prompt to another's
    length (CogView4 pads a batch's prompts to its longest, which changes a shorter prompt's conditioning)."""
    prompt = scene_prompts(1)[0]
    lines = tmp_path / "p.jsonl"
    lines.write_text("\n".join(json.dumps({"prompt": prompt, "seed": 10 + i, **({"guidance_scale": 2.0} if i == 3 else {})})
                               for i in range(7)) + "\n")
    single = run_farm(job("off"), read_prompt_lines(lines), tmp_path / "single", "local", EngineOptions(progress=False),
                      pipe=pipe)
    sizes = counting_calls(pipe, monkeypatch)
    batched_job = make_job("image", "off", CALL, batch_size=3)
    batched = run_farm(batched_job, read_prompt_lines(lines), tmp_path / "batched", "local",
                       EngineOptions(progress=False), pipe=pipe)
    assert single.done == batched.done == 7 and sizes == [3, 1, 3]
    rows = check_complete(tmp_path / "batched", 7)
    assert sorted(row.batch for row in rows) == [1, 3, 3, 3, 3, 3, 3]
    pixels = {}
    for name in ("single", "batched"):
        pixels[name] = {row.id: np.asarray(Image.open(tmp_path / name / row.path), dtype=np.int16)
                        for row in done_rows(tmp_path / name)[0]}
    assert pixels["single"].keys() == pixels["batched"].keys()  # the same items, the same files
    for ident, image in pixels["single"].items():
        assert np.abs(image - pixels["batched"][ident]).max() <= 1  # float rounding of a batched matmul at most
    first, second = list(pixels["single"].values())[:2]
    assert np.abs(first - second).max() > 10  # the seeds differ, and so do the outputs


def test_a_failed_batch_is_redone_item_by_item(pipe, tmp_path, monkeypatch):
    prompts = write_txt(tmp_path / "p.txt", 4)
    bad = scene_prompts(4)[1]
    sizes = counting_calls(pipe, monkeypatch, fails=lambda prompts: bad in prompts and len(prompts) > 1)
    summary = run_farm(make_job("image", "fast", CALL, batch_size=2), read_prompt_lines(prompts), tmp_path / "a",
                       "local", EngineOptions(progress=False, retries=0), pipe=pipe)
    assert (summary.done, summary.failed) == (4, 0) and sizes == [2, 1, 1, 2]
    assert sorted(row.batch for row in read_manifest(tmp_path / "a")) == [1, 1, 2, 2]

    monkeypatch.undo()
    counting_calls(pipe, monkeypatch, fails=lambda prompts: bad in prompts)  # the item itself is bad
    summary = run_farm(make_job("image", "fast", CALL, batch_size=2), read_prompt_lines(prompts), tmp_path / "b",
                       "local", EngineOptions(progress=False, retries=0), pipe=pipe)
    assert (summary.done, summary.failed) == (3, 1)
    (failed,) = [row for row in read_manifest(tmp_path / "b") if row.status == "failed"]
    assert failed.prompt == bad and failed.error == "RuntimeError: simulated device error"


def test_the_batch_size_is_part_of_the_job(tmp_path):
    single, batched = make_job("image", "fast", CALL), make_job("image", "fast", CALL, batch_size=4)
    assert "batch_size" not in single.record().to_dict()  # unbatched jobs keep the fingerprint they had
    assert batched.record().to_dict()["batch_size"] == 4
    open_job(tmp_path, single.record())
    with pytest.raises(ValueError, match=r"fields that differ: \['batch_size'\]"):
        open_job(tmp_path, batched.record())


def test_the_batch_size_bench_runs_and_reports_every_size(tmp_path):
    """scripts/bench_farm.py at a toy size: one row per batch size, batch 1 the reference of the others."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_farm

    out = tmp_path / "farm.md"
    assert bench_farm.main(["--num", "3", "--batch-sizes", "1,2", "--repeats", "1", "--steps", "2", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2 and "identical" in rows[0] and " dB |" in rows[1]
    with pytest.raises(SystemExit):
        bench_farm.main(["--batch-sizes", "2,4", "--out", str(out)])
