"""diffaccel bench on a tiny pipeline: one run measures every config and writes the report and plots."""

import json

from PIL import Image

from diffaccel.eval.bench import add_quality, run_bench, write_report
from tiny_pipelines import build


def test_bench_writes_report_and_plots(tmp_path):
    case = build("flux")
    kwargs = {k: v for k, v in case.call_kwargs.items() if k not in ("prompt", "output_type")}
    configs = [("off", "off"), ("turbo", "turbo"), ("eager", {"cache": {"method": "block", "threshold": 1e9, "warmup_steps": 1}})]
    prompts = ["a red circle", "a blue square"]
    results, outputs = run_bench(case.pipe, configs, prompts, kwargs, repeats=2, progress=False)
    add_quality(results, outputs, prompts)
    files = write_report(results, outputs, tmp_path, {"model": "tiny-flux", "num_prompts": 2, "repeats": 2, "seed": 0, "call_kwargs": kwargs})

    off, _, eager = results
    assert len(off.seconds) == 4 and off.speedup == 1.0
    assert off.blocks_skipped == 0 and eager.blocks_skipped > 0
    assert eager.blocks_computed < off.blocks_computed
    assert off.denoiser_calls == eager.denoiser_calls == 2 * kwargs["num_inference_steps"]
    assert off.quality["psnr"] == 100.0  # identical to the baseline
    assert eager.quality["psnr"] < 100.0
    assert not hasattr(case.pipe, "_diffaccel_runtime")  # bench leaves the pipeline as it found it

    report = json.loads(files["report.json"].read_text())
    assert [r["name"] for r in report["results"]] == ["off", "turbo", "eager"]
    assert "| eager |" in files["report.md"].read_text()
    for png in ("speedup_vs_psnr.png", "samples.png"):
        Image.open(files[png]).verify()


def test_a_row_can_change_its_call():
    case = build("flux")
    kwargs = {k: v for k, v in case.call_kwargs.items() if k not in ("prompt", "output_type")}
    fewer = kwargs["num_inference_steps"] - 1
    configs = [("off", "off"), ("off, fewer steps", "off", {"num_inference_steps": fewer})]
    results, outputs = run_bench(case.pipe, configs, ["a red circle"], kwargs, repeats=1, progress=False)
    add_quality(results, outputs, ["a red circle"])
    assert results[0].denoiser_calls == 2 * kwargs["num_inference_steps"]
    assert results[1].denoiser_calls == 2 * fewer
    assert results[1].quality["psnr"] < 100.0
