"""User LoRAs fused before acceleration (``--lora PATH[:SCALE]``): parsing, loading through diffusers' loaders
(and PixArt's transformer, which has none), fusing to what the unfused adapter computes, clear errors, and
the farm keeping jobs with other LoRAs apart."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffaccel.lora import LoraSpec, apply_loras, parse_loras

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(pipe, folder, seed: int = 0, targets=TARGETS, std: float = 0.1):
    """A random LoRA of ``pipe``'s transformer, saved as diffusers saves one (``save_lora_weights`` where the
    pipeline has it, our layout otherwise)."""
    from diffaccel.distill.adapters import save_lora, with_adapter_support

    model = with_adapter_support(copy.deepcopy(pipe.transformer))
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets), adapter_name="made")
    with torch.no_grad():
        for i, (name, param) in enumerate(sorted(model.named_parameters())):
            if "lora_" in name:
                param.normal_(std=std, generator=torch.Generator().manual_seed(seed * 1000 + i))
    layers = get_peft_model_state_dict(model, adapter_name="made")
    folder.mkdir(parents=True, exist_ok=True)
    save_lora(folder, "pytorch_lora_weights.safetensors", "transformer", layers, type(pipe))
    return folder


def transformer_output(pipe):
    """The transformer on a fixed input of its own shapes (captured from one pipeline step)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe("a red circle", num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0),
                 **({"use_resolution_binning": False, "clean_caption": False} if "PixArt" in type(pipe).__name__ else {}))
    finally:
        handle.remove()
    args, kwargs = seen["call"]
    with torch.no_grad():
        out = pipe.transformer(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out.sample).clone()


def test_lora_specs_parse_paths_files_scales_and_hub_ids(tmp_path):
    folder = tmp_path / "style"
    folder.mkdir()
    (folder / "mine.safetensors").write_bytes(b"")
    assert LoraSpec.parse(str(folder)) == LoraSpec(str(folder.resolve()), 1.0)
    assert LoraSpec.parse(f"{folder}:0.5").scale == 0.5
    assert LoraSpec.parse(f"{folder}:-1e-1").scale == -0.1
    spec = LoraSpec.parse(f"{folder}/mine.safetensors:2")
    assert (spec.source, spec.weight_name, spec.scale) == (str(folder.resolve()), "mine.safetensors", 2.0)
    assert LoraSpec.parse("owner/some-lora:0.7") == LoraSpec("owner/some-lora", 0.7)  # a hub id, as diffusers takes it
    assert parse_loras(None) == ()
    with pytest.raises(ValueError, match="LoRA file .*missing.safetensors.* does not exist"):
        LoraSpec.parse(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="finite"):
        LoraSpec("x", float("nan"))


@pytest.mark.parametrize("family", ["sd3", "pixart_sigma"])
def test_loras_fuse_to_what_the_unfused_adapters_compute(tmp_path, family):
    """Two LoRAs at their scales, fused: the transformer is plain again (no LoRA layers, its own class) and
    computes what diffusers' unfused adapters at those scales compute. PixArt has no LoRA loader in
    diffusers; its transformer's own loader is used."""
    import tiny_pipelines

    pipe = getattr(tiny_pipelines, family)().pipe
    plain_class = type(pipe.transformer)
    base = transformer_output(pipe)
    loras = [LoraSpec(str(make_lora(pipe, tmp_path / "a", seed=1)), 0.5),
             LoraSpec(str(make_lora(pipe, tmp_path / "b", seed=2, targets=["to_q", "to_v"])), -1.5)]

    reference = copy.deepcopy(pipe)  # the unfused adapters at the same scales
    from diffaccel.distill.adapters import with_adapter_support

    model = with_adapter_support(reference.transformer)
    for i, lora in enumerate(loras):
        model.load_lora_adapter(lora.source, prefix="transformer", adapter_name=f"r{i}",
                                weight_name="pytorch_lora_weights.safetensors")
    model.set_adapters(["r0", "r1"], weights=[0.5, -1.5])
    want = transformer_output(reference)

    apply_loras(pipe, loras)
    assert type(pipe.transformer) is plain_class
    assert not any("lora" in name for name, _ in pipe.transformer.named_modules())
    got = transformer_output(pipe)
    assert (want - base).abs().max() > 1e-2  # the LoRAs change the output
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_a_lora_of_another_model_is_refused_by_name(tmp_path):
    """A LoRA whose keys name no layer of this pipeline is an error, not a silent no-op."""
    import tiny_pipelines

    pixart = tiny_pipelines.pixart_sigma().pipe
    folder = make_lora(pixart, tmp_path / "pixart", targets=["adaln_single.linear"])  # PixArt-only layers
    pipe = tiny_pipelines.sd3().pipe
    with pytest.raises(ValueError, match=r"(matched no layer|Cannot load the LoRA).*pixart"):
        apply_loras(pipe, [LoraSpec(str(folder))])


def test_generate_with_lora_changes_the_image_and_fails_clearly_on_a_missing_one(tmp_path, capsys):
    from diffaccel.cli import main
    from diffaccel.pipelines import reference

    folder = make_lora(reference.load("image"), tmp_path / "style", std=0.2)
    common = ["--preset", "off", "--steps", "2", "--seed", "3"]
    assert main(["generate", "a red circle", "-o", str(tmp_path / "plain.png"), *common]) == 0
    assert main(["generate", "a red circle", "-o", str(tmp_path / "lora.png"), "--lora", f"{folder}:0.8", *common]) == 0
    from PIL import Image

    plain, styled = (np.asarray(Image.open(tmp_path / name), dtype=np.float32) for name in ("plain.png", "lora.png"))
    assert np.abs(plain - styled).mean() > 1.0
    assert main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--lora",
                 str(tmp_path / "nothing.safetensors")]) != 0
    assert "nothing.safetensors" in capsys.readouterr().err

    # every other command loads through load_model: the LoRA is fused and named in the results' model name
    from diffaccel.loading import load_model

    plain, styled = load_model("image", "cpu"), load_model("image", "cpu", loras=parse_loras([f"{folder}:0.8"]))
    assert styled.name == f"reference-image + LoRA {folder.resolve()}×0.8"
    changed = [k for k, v in styled.pipe.transformer.state_dict().items()
               if not torch.equal(v, plain.pipe.transformer.state_dict()[k])]
    assert changed and all(any(t in k for t in TARGETS) for k in changed)


def test_farm_jobs_record_their_loras_and_refuse_another(tmp_path):
    """The LoRAs (source, scale, content hash) are part of a farm job's identity: item ids and job.json
    differ, and a job without LoRAs keeps its old fingerprint (no ``loras`` field)."""
    from diffaccel.parallel.job import make_job
    from diffaccel.parallel.manifest import open_job

    folder = tmp_path / "style"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({"transformer.x.lora_A.weight": torch.zeros(1)}, str(folder / "pytorch_lora_weights.safetensors"))
    plain = make_job("image", "off")
    assert "loras" not in plain.record().to_dict()
    styled = make_job("image", "off", loras=parse_loras([f"{folder}:0.8"]))
    record = styled.record().to_dict()
    assert record["loras"][0]["scale"] == 0.8 and record["loras"][0]["revision"].startswith("sha256:")
    assert "LoRA" in styled.name and record["model"] == styled.name
    open_job(tmp_path / "job", styled.record())
    other = make_job("image", "off", loras=parse_loras([f"{folder}:0.5"]))
    with pytest.raises(ValueError, match="fields that differ: .*loras"):
        open_job(tmp_path / "job", other.record())
    assert json.loads((tmp_path / "job" / "job.json").read_text())["loras"][0]["scale"] == 0.8


def test_a_failed_load_leaves_the_pipeline_as_it_was(tmp_path):
    """The second LoRA is of another model: the first, already loaded, is unloaded again, and a pipeline
    that holds adapters of its own is refused rather than having them fused or unloaded behind its back."""
    import tiny_pipelines

    pixart = tiny_pipelines.pixart_sigma().pipe
    foreign = make_lora(tiny_pipelines.sd3().pipe, tmp_path / "sd3", targets=["add_k_proj"])  # SD3's joint attention
    good = make_lora(pixart, tmp_path / "pixart")
    plain_class = type(pixart.transformer)
    before = {k: v.clone() for k, v in pixart.transformer.state_dict().items()}
    with pytest.raises(ValueError, match="sd3"):
        apply_loras(pixart, [LoraSpec(str(good)), LoraSpec(str(foreign))])
    assert type(pixart.transformer) is plain_class and not getattr(pixart.transformer, "peft_config", None)
    assert all(torch.equal(v, before[k]) for k, v in pixart.transformer.state_dict().items())

    sd3 = tiny_pipelines.sd3().pipe
    sd3.load_lora_weights(str(make_lora(sd3, tmp_path / "own")), adapter_name="theirs")
    with pytest.raises(ValueError, match="already holds LoRA adapters.*theirs"):
        apply_loras(sd3, [LoraSpec(str(good))])
    assert "theirs" in sd3.get_list_adapters()["transformer"]


def test_a_two_expert_pipeline_takes_a_lora_per_expert(tmp_path):
    """Wan 2.2 A14B's LoRAs come in pairs: ``--lora`` goes into ``transformer`` (high-noise steps) and
    ``--lora-2`` into ``transformer_2`` (low-noise steps), each fused at its scale: W + scale·B·A."""
    import tiny_pipelines
    from safetensors.torch import load_file

    pipe = tiny_pipelines.wan22().pipe
    high = make_lora(pipe, tmp_path / "high", seed=1)
    low = make_lora(pipe, tmp_path / "low", seed=2)
    layer = "blocks.0.attn1.to_q"
    before = {name: getattr(pipe, name).state_dict()[f"{layer}.weight"].clone() for name in ("transformer", "transformer_2")}
    apply_loras(pipe, parse_loras([f"{high}:1.0"], [f"{low}:0.5"]))
    for name, folder, scale in (("transformer", high, 1.0), ("transformer_2", low, 0.5)):
        state = load_file(str(folder / "pytorch_lora_weights.safetensors"))
        delta = state[f"transformer.{layer}.lora_B.weight"].float() @ state[f"transformer.{layer}.lora_A.weight"].float()
        got = getattr(pipe, name).state_dict()[f"{layer}.weight"]
        assert torch.allclose(got, before[name] + scale * delta, atol=1e-5), name
    with pytest.raises(ValueError, match="--lora-2.*transformer_2.*StableDiffusion3Pipeline has none"):
        apply_loras(tiny_pipelines.sd3().pipe, parse_loras([], [str(low)]))


def test_a_student_of_a_lora_teacher_learns_it_and_asks_for_it(tmp_path):
    """`distill --lora`: the LoRA is fused into the teacher, so a full student starts from the LoRA'd weights
    (not the base ones); the card records it, and the student loads only on a pipeline with the same LoRA
    fused (by content: a moved copy is the same LoRA; another scale is not). A resume with another LoRA is
    another run."""
    from safetensors.torch import load_file

    from diffaccel.distill import LCDConfig, StudentCard, distill, load_student
    from diffaccel.pipelines import reference

    base = reference.load("image")
    style = make_lora(base, tmp_path / "style", std=0.2)
    loras = parse_loras([f"{style}:0.8"])
    tiny = dict(batch_size=2, solver_steps=10, warmup_steps=0, guidance_scale=4.0)
    folder = distill("reference:image", tmp_path / "student", LCDConfig(lora_rank=0, **tiny), max_steps=1,
                     progress=False, loras=loras)
    card = StudentCard.load(folder)
    assert "LoRA" in card.teacher and card.teacher_loras[0]["scale"] == 0.8
    assert card.teacher_loras[0]["revision"].startswith("sha256:")

    styled = reference.load("image")
    apply_loras(styled, loras)
    student = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    key = "transformer_blocks.0.attn1.to_q.weight"
    to_styled = (student[key].float() - styled.transformer.state_dict()[key]).abs().max()
    to_base = (student[key].float() - base.transformer.state_dict()[key]).abs().max()
    assert to_styled < 0.01 < to_base  # one step of lr 1e-5 from the LoRA'd teacher, far from the base model

    with pytest.raises(ValueError, match="samples on that teacher with the same LoRA.*has 0 LoRA"):
        load_student(reference.load("image"), folder)
    other_scale = reference.load("image")
    apply_loras(other_scale, parse_loras([f"{style}:0.5"]))
    with pytest.raises(ValueError, match="that differ"):
        load_student(other_scale, folder)
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "pytorch_lora_weights.safetensors").write_bytes((style / "pytorch_lora_weights.safetensors").read_bytes())
    copy_of_it = reference.load("image")
    apply_loras(copy_of_it, parse_loras([f"{moved}:0.8"]))
    load_student(copy_of_it, folder)  # the same weights at the same scale
    with pytest.raises(ValueError, match="holds another run"):
        distill("reference:image", tmp_path / "student", LCDConfig(lora_rank=0, **tiny), max_steps=2, resume=True,
                progress=False, loras=parse_loras([f"{style}:0.5"]))


def test_generate_with_a_student_of_a_lora_teacher(tmp_path, capsys):
    """The CLI end to end: `distill --lora` then `generate --distilled` with the same `--lora` (fused before
    the student, as in training) makes an image; without it the student is refused, naming the LoRA."""
    from diffaccel.cli import main

    from diffaccel.pipelines import reference

    style = make_lora(reference.load("image"), tmp_path / "style")
    out = tmp_path / "student"
    assert main(["distill", "--method", "lcd", "--lora-rank", "2", "--steps", "2", "--batch-size", "2", "--max-steps", "1",
                 "--out", str(out), "--lora", f"{style}:0.7", "--no-progress"]) == 0
    image = tmp_path / "a.png"
    assert main(["generate", "a red circle", "-o", str(image), "--distilled", str(out), "--lora", f"{style}:0.7",
                 "--preset", "off", "--height", "32", "--width", "32"]) == 0
    assert image.is_file()
    assert main(["generate", "a red circle", "-o", str(tmp_path / "b.png"), "--distilled", str(out), "--preset", "off",
                 "--height", "32", "--width", "32"]) == 2
    assert "style" in capsys.readouterr().err
