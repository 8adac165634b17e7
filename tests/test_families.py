"""Every supported family's tiny pipeline: off is bit-identical, remove() restores the baseline,
the block cache skips blocks, repeated calls are deterministic, and new sizes / step counts right
after a call start from clean state."""

import numpy as np
import torch
import pytest

import diffaccel
from diffaccel import BlockCacheConfig
from tiny_pipelines import FAMILIES, build, run

TRANSFORMER_FAMILIES = [name for name in FAMILIES if name not in ("sd15", "sdxl")]
UNET_FAMILIES = ["sd15", "sdxl"]

# Reuse whenever possible after one warm-up step, so skipping is certain even on random weights.
EAGER_CACHE = BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=None)

_cases: dict = {}


def case_and_baseline(name):
    """Build each family once per session; its unaccelerated output is the baseline."""
    if name not in _cases:
        case = build(name)
        _cases[name] = (case, run(case, seed=0))
    case, baseline = _cases[name]
    diffaccel.remove(case.pipe)
    return case, baseline


def other_size(case) -> dict:
    """A different latent size (and frame count for video) that the family accepts."""
    kwargs = case.call_kwargs
    changed = {"height": kwargs["height"] * 2}
    if case.is_video and "num_frames" in kwargs:
        changed["num_frames"] = kwargs["num_frames"] + 4
    return changed


@pytest.mark.parametrize("name", list(FAMILIES))
def test_off_is_bit_identical_and_remove_restores(name):
    case, baseline = case_and_baseline(name)
    diffaccel.accelerate(case.pipe, "off")
    assert np.array_equal(run(case, seed=0), baseline)
    stats = diffaccel.stats(case.pipe)
    steps = case.call_kwargs["num_inference_steps"]
    assert stats["steps"] == steps
    # CFG is on in every tiny case that has it (one call per branch); guidance-distilled models run one
    assert stats["denoiser_calls"] == case.calls_per_step * steps
    assert stats["blocks_skipped"] == 0
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


@pytest.mark.parametrize("name", TRANSFORMER_FAMILIES)
def test_block_cache_skips_blocks_and_remove_restores(name):
    case, baseline = case_and_baseline(name)
    same = diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    assert same is case.pipe
    first = run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    assert stats["blocks_skipped"] > 0, stats
    assert stats["cache_hits"] > 0
    assert np.isfinite(first).all()
    assert first.shape == baseline.shape
    assert np.array_equal(run(case, seed=0), first), "same seed, same accelerated output"

    # Another size and another step count right after: no stale state, no shape crash. The output
    # must equal a freshly accelerated pipe's at that size, bit for bit.
    changed = other_size(case)
    resized = run(case, seed=1, num_inference_steps=3, **changed)
    assert np.isfinite(resized).all()
    assert diffaccel.stats(case.pipe)["steps"] == 3
    diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    assert np.array_equal(run(case, seed=1, num_inference_steps=3, **changed), resized)

    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


@pytest.mark.parametrize("name", TRANSFORMER_FAMILIES)
def test_threshold_zero_block_cache_is_bit_identical(name):
    case, baseline = case_and_baseline(name)
    diffaccel.accelerate(case.pipe, cache=BlockCacheConfig(threshold=0.0))
    assert np.array_equal(run(case, seed=0), baseline)
    assert diffaccel.stats(case.pipe)["blocks_skipped"] == 0
    diffaccel.remove(case.pipe)


@pytest.mark.parametrize("name", UNET_FAMILIES)
def test_block_cache_on_a_unet_is_a_clear_error(name):
    case, baseline = case_and_baseline(name)
    with pytest.raises(ValueError, match=r"cache='block' cannot apply to UNet2DConditionModel"):
        diffaccel.accelerate(case.pipe, cache="block")
    assert not hasattr(case.pipe, "_diffaccel_runtime")
    assert np.array_equal(run(case, seed=0), baseline)


@pytest.mark.parametrize("name, dual_blocks, pairs", [
    ("chroma", "transformer_blocks", ((0, 2), (1, 3))),  # cond, uncond per step: step 0 computes, step 1 reuses
    ("flux2_klein", "transformer_blocks", ((0, 2), (1, 3))),
    ("aura_flow", "joint_transformer_blocks", ((0, 1),)),  # one doubled batch per step, over BCHW latents
])
def test_a_span_from_dual_stream_into_joined_blocks_replays_both_streams(name, dual_blocks, pairs):
    """FLUX.2, Chroma and AuraFlow join [text, image] before their single-stream blocks. A reused span that
    starts in the dual-stream blocks and ends in a joined one adds, to each stream's input, that stream's
    residual of the last computed step: the joined output of the span is exactly [text_in + Δtext,
    image_in + Δimage]. AuraFlow's latents are BCHW: the split is at its patchified grid's token count."""
    case, _ = case_and_baseline(name)
    denoiser = case.denoiser
    first_middle = getattr(denoiser, dual_blocks)[1]  # block 0 decides; the middle span starts here
    last = denoiser.single_transformer_blocks[-1]
    inputs, outputs = [], []
    handles = [
        first_middle.register_forward_pre_hook(
            lambda m, args, kwargs: inputs.append((kwargs["hidden_states"], kwargs["encoder_hidden_states"])),
            with_kwargs=True),
        last.register_forward_hook(lambda m, args, kwargs, out: outputs.append(out), with_kwargs=True),
    ]
    try:
        diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
        run(case, seed=0)
    finally:
        for handle in handles:
            handle.remove()
        diffaccel.remove(case.pipe)
    image_tokens = inputs[0][0].shape[1]
    for computed, reused in pairs:
        hidden_in, text_in = inputs[computed]
        joined = outputs[computed]
        text = joined.shape[1] - image_tokens
        delta_image, delta_text = joined[:, text:] - hidden_in, joined[:, :text] - text_in
        hidden_in, text_in = inputs[reused]
        expected = torch.cat([text_in + delta_text, hidden_in + delta_image], dim=1)
        torch.testing.assert_close(outputs[reused], expected)


def test_a_joined_block_outside_an_accelerated_forward_is_a_clear_error():
    from diffaccel.pipelines import adapter_for

    case, _ = case_and_baseline("chroma")
    blocks = adapter_for(case.denoiser).find_blocks(case.denoiser)
    joined = [b for b in blocks if b.spec.joined_text]
    assert [b.list_name for b in joined] == ["single_transformer_blocks"] * len(case.denoiser.single_transformer_blocks)
    with pytest.raises(ValueError, match="latent token count of this forward is unknown"):
        joined[0].split_output(torch.zeros(1, 10, 4))


def test_per_branch_calls_without_a_cache_context_are_told_apart_by_their_order():
    """Chroma's pipeline calls cond then uncond with no cache context: each branch keeps its own cache
    state (the first call of a step is cond), so the cached run equals the two branches cached apart."""
    case, baseline = case_and_baseline("chroma")
    diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    steps = case.call_kwargs["num_inference_steps"]
    assert stats["denoiser_calls_by_branch"] == {"cond": steps, "uncond": steps}
    assert stats["cache_misses"] == 2 and stats["cache_hits"] == 2 * (steps - 1)  # one warm-up step per branch
    diffaccel.remove(case.pipe)


def test_z_image_list_latents_with_the_conditional_half_first():
    """Z-Image's transformer takes a list of per-image latents and its CFG batch puts the conditional half
    first: the block cache skips (the doubled list is one state); adaptive guidance runs the conditional
    half alone, so γ = -1 is the run without CFG bit for bit and γ > 1 the plain run; output replay is
    refused by name."""
    from diffaccel import AdaptiveGuidanceConfig, TeaCacheConfig

    case, baseline = case_and_baseline("z_image")
    diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    assert stats["denoiser_calls_by_branch"] == {"cond": 4, "uncond": 4} and stats["blocks_skipped"] > 0
    diffaccel.accelerate(case.pipe, guidance=AdaptiveGuidanceConfig(threshold=2.0))
    assert np.array_equal(run(case, seed=0), baseline)
    diffaccel.accelerate(case.pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0))
    unguided = run(case, seed=0)
    assert diffaccel.stats(case.pipe)["denoiser_calls_by_branch"] == {"cond": 4}
    diffaccel.remove(case.pipe)
    assert np.array_equal(unguided, run(case, seed=0, guidance_scale=0.0))  # Z-Image's own switch for no CFG
    diffaccel.accelerate(case.pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0, min_steps=2))
    late = run(case, seed=0)
    assert diffaccel.stats(case.pipe)["guidance_skipped_uncond"] == 2
    assert not np.array_equal(late, baseline) and not np.array_equal(late, unguided)
    with pytest.raises(ValueError, match=r"reuse='output'\) cannot apply to ZImageTransformer2DModel"):
        diffaccel.accelerate(case.pipe, cache=TeaCacheConfig(reuse="output"))
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


def test_a_cfg_batch_order_must_name_both_branches():
    from diffaccel.pipelines import FamilyAdapter

    with pytest.raises(ValueError, match="must name 'cond' and 'uncond' once each"):
        FamilyAdapter(name="x", block_lists=("blocks",), latent_layout="BCHW", cfg_layout="batched",
                      cfg_batch_order=("cond", "cond"))


def _frames_and_audio(case, **overrides):
    kwargs = {**case.call_kwargs, **overrides, "generator": torch.Generator().manual_seed(0)}
    with torch.no_grad():
        out = case.pipe(**kwargs)
    return np.asarray(out.frames), np.asarray(out.audio)


def test_ltx2_carries_video_and_audio_through_the_cache_and_guidance():
    """LTX-2's blocks carry a video and an audio stream: the block cache replays both; adaptive guidance on its
    doubled batch doubles the audio prediction too, so γ = -1 is the unguided run, video and audio alike."""
    from diffaccel import AdaptiveGuidanceConfig

    case, _ = case_and_baseline("ltx2")
    video, audio = _frames_and_audio(case)
    diffaccel.accelerate(case.pipe, "off")
    assert all(np.array_equal(a, b) for a, b in zip(_frames_and_audio(case), (video, audio)))
    diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    cached = _frames_and_audio(case)
    assert diffaccel.stats(case.pipe)["blocks_skipped"] > 0
    assert not np.array_equal(cached[1], audio) and np.isfinite(cached[1]).all()  # the audio stream was replayed
    diffaccel.remove(case.pipe)
    unguided = _frames_and_audio(case, guidance_scale=1.0, audio_guidance_scale=1.0)
    diffaccel.accelerate(case.pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0))
    skipped = _frames_and_audio(case)
    assert diffaccel.stats(case.pipe)["denoiser_calls_by_branch"] == {"cond": 4}
    assert all(np.array_equal(a, b) for a, b in zip(skipped, unguided))
    diffaccel.remove(case.pipe)


def test_a_deep_copy_of_the_tapped_scheduler_is_untapped():
    """LTX-2 deep-copies its scheduler for the audio latents: the copy steps itself, and its steps are not
    the call's (copied taps would step the video scheduler twice and count every step twice)."""
    import copy

    case, baseline = case_and_baseline("wan")
    diffaccel.accelerate(case.pipe, "off")
    scheduler = case.pipe.scheduler
    scheduler.set_timesteps(4)
    twin = copy.deepcopy(scheduler)
    assert "step" not in vars(twin) and "set_timesteps" not in vars(twin) and "__deepcopy__" not in vars(twin)
    sample = torch.zeros(1, 4, 2, 4, 4)
    twin.step(torch.zeros_like(sample), twin.timesteps[0], sample)
    assert twin.step_index == 1 and scheduler.step_index is None
    assert "step" in vars(scheduler)  # the original stays tapped
    assert np.array_equal(run(case, seed=0), baseline)
    diffaccel.remove(case.pipe)
    assert "__deepcopy__" not in vars(scheduler)


@pytest.mark.parametrize("method, first_cached", [("block", 1), ("teacache", 0), ("delta_dit", 1)])
def test_controlnet_residuals_added_between_blocks_are_not_replayed_twice(method, first_cached):
    """FluxControlNetPipeline adds ControlNet residuals to the hidden stream after each Flux block, outside the
    blocks. A cached span's residual is what its blocks added (the sum of their own residuals): on a reused
    step the fresh ControlNet residuals come on top of it once, not a second time inside it. The block cache
    replays blocks 1 on (block 0 decides), TeaCache the whole stack, Δ-DiT its rear span (4 of 5 blocks) on
    the step after a full one."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from PIL import Image

    from diffaccel import DeltaDiTConfig, TeaCacheConfig

    config = {"block": EAGER_CACHE, "teacache": TeaCacheConfig(threshold=1e9, force_last_step=False),
              "delta_dit": DeltaDiTConfig(cached_blocks=4, boundary_fraction=1.0, cache_interval=2)}[method]

    case = build("flux")
    flux = case.pipe
    torch.manual_seed(0)
    controlnet = FluxControlNetModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=True).eval()
    with torch.no_grad():  # its output projections start at zero: make the residuals it adds non-zero
        for param in controlnet.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    pipe = FluxControlNetPipeline(scheduler=flux.scheduler, vae=flux.vae, text_encoder=flux.text_encoder,
                                  tokenizer=flux.tokenizer, text_encoder_2=flux.text_encoder_2,
                                  tokenizer_2=flux.tokenizer_2, transformer=flux.transformer, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    control = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))
    middle = [*flux.transformer.transformer_blocks, *flux.transformer.single_transformer_blocks][first_cached:]
    seen = {i: [] for i in range(len(middle))}
    hooks = [block.register_forward_hook(
        lambda m, args, kwargs, out, i=i: seen[i].append((kwargs["hidden_states"], out[1])), with_kwargs=True)
        for i, block in enumerate(middle)]
    try:
        diffaccel.accelerate(pipe, cache=config)
        pipe(prompt="a red circle", control_image=control, num_inference_steps=3, height=64, width=64,
             guidance_scale=3.5, max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0))
        assert diffaccel.stats(pipe)["blocks_skipped"] > 0
    finally:
        for hook in hooks:
            hook.remove()
        diffaccel.remove(pipe)
    step = lambda i, s: seen[i][s]  # noqa: E731  (block i's (input, output) hidden at step s)
    own = sum(step(i, 0)[1] - step(i, 0)[0] for i in seen)  # step 0 computes: what the blocks added
    between = [step(i + 1, 0)[0] - step(i, 0)[1] for i in range(len(middle) - 1)]
    assert max(float(g.abs().max()) for g in between) > 1e-3  # ControlNet really adds between the blocks
    # step 1 reuses: the span adds its cached residual, the ControlNet residuals of step 1 come on top once
    fresh = sum(step(i + 1, 1)[0] - step(i, 1)[1] for i in range(len(middle) - 1))
    replayed = step(len(middle) - 1, 1)[1] - step(0, 1)[0] - fresh
    torch.testing.assert_close(replayed, own, atol=1e-5, rtol=1e-4)


def test_vace_hints_added_between_blocks_are_not_replayed_twice():
    """Wan VACE adds its hints to the hidden stream after blocks 0 and 1, outside the blocks: the block cache's
    replayed span (blocks 1 and 2) carries what those blocks added, and the fresh hint after block 1 once."""
    case, _ = case_and_baseline("wan_vace")
    blocks = case.denoiser.blocks
    seen = {i: [] for i in (1, 2)}
    hooks = [blocks[i].register_forward_hook(lambda m, args, out, i=i: seen[i].append((args[0], out)))
             for i in seen]
    try:
        diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
        run(case, seed=0)
        assert diffaccel.stats(case.pipe)["blocks_skipped"] > 0
    finally:
        for hook in hooks:
            hook.remove()
        diffaccel.remove(case.pipe)
    # forwards run cond, uncond per step: [0] is step 0's cond (computed), [2] step 1's cond (reused)
    (in1, out1), (in2, out2) = seen[1][0], seen[2][0]
    own = (out1 - in1) + (out2 - in2)
    assert float((in2 - out1).abs().max()) > 1e-4  # the hint after block 1
    (in1, out1), (in2, out2) = seen[1][2], seen[2][2]
    torch.testing.assert_close(out2 - in1 - (in2 - out1), own, atol=1e-5, rtol=1e-4)


def test_hidream_non_square_latents_split_at_the_padded_token_count():
    """HiDream-I1 pads non-square latents' tokens to ``max_seq`` before its blocks, so its single-stream blocks'
    [image, text, Llama] sequences hold max_seq image tokens: split there (``padded_latent_tokens``), a span from
    the dual-stream into the single-stream blocks keeps one residual shape and is reused. At the grid's count
    the shapes would differ and no span would ever be stored."""
    case, _ = case_and_baseline("hidream_image")
    size = dict(height=128, width=64, num_inference_steps=6)  # the pipeline keeps the aspect ratio: non-square
    baseline = run(case, seed=0, **size)
    diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    out = run(case, seed=0, **size)
    stats = diffaccel.stats(case.pipe)
    diffaccel.remove(case.pipe)
    assert baseline.shape[1] != baseline.shape[2]
    assert stats["cache_hits"] > 0 and stats["blocks_skipped"] > 0, stats
    assert np.isfinite(out).all() and not np.array_equal(out, baseline)


def test_motif_video_decoder_blocks_always_run():
    """Motif-Video's last single blocks decode from a copy of the embedded input, not from the block before
    them: they are left out of the blocks the methods see (``uncached_tail``), so a reused step still runs them
    while the cached span before them is skipped."""
    case, _ = case_and_baseline("motif_video")
    decoder = case.denoiser.single_transformer_blocks[-1]
    calls = []
    handle = decoder.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
        run(case, seed=0)
        stats = diffaccel.stats(case.pipe)
    finally:
        handle.remove()
        diffaccel.remove(case.pipe)
    assert stats["blocks_skipped"] > 0
    assert len(calls) == stats["denoiser_forwards"]
    assert decoder not in [b.module for b in diffaccel.pipelines.adapter_for(case.denoiser).find_blocks(case.denoiser)]


def test_the_image_pipeline_of_a_video_family_makes_images():
    """Cosmos Predict 2's text-to-image pipeline runs the same 3D transformer as its video pipelines: the CLI,
    farm and evaluation must treat it as an image pipeline (its call takes no frame count), not write videos."""
    from diffaccel.loading import is_video_pipeline
    from tiny_pipelines import cosmos2_t2i

    case = cosmos2_t2i()
    assert not is_video_pipeline(case.pipe) and run(case).ndim == 4
    assert is_video_pipeline(build("cosmos").pipe) and is_video_pipeline(build("sana_video").pipe)  # `frames`
    assert not is_video_pipeline(build("flux").pipe)


def test_a_denoiser_examined_and_left_out_is_refused_with_the_reason():
    """AnyFlow FAR writes a KV cache in an extra forward per chunk, which a skipped block would leave empty: the
    unsupported-model error says so."""
    from tiny_pipelines import anyflow_far

    with pytest.raises(ValueError, match=r"AnyFlowFARTransformer3DModel \(after each chunk .* KV cache"):
        diffaccel.accelerate(anyflow_far().pipe, "fast")


def test_ideogram4s_unconditional_model_is_accelerated_as_the_unconditional_branch():
    """Ideogram 4 runs each CFG branch through a model of its own: the second one (``unconditional_transformer``)
    gets a runtime of its own whose every forward is the unconditional branch, so both models' blocks are cached,
    each with its own state; guidance methods and parallelism, which work on one model's branches, are refused."""
    case, baseline = case_and_baseline("ideogram4")
    diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    out = run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    steps = case.call_kwargs["num_inference_steps"]
    assert stats["denoiser_calls_by_branch"] == {"cond": steps, "uncond": steps}
    cond_model, uncond_model = stats["models"]["transformer"], stats["models"]["unconditional_transformer"]
    assert cond_model["denoiser_calls_by_branch"] == {"cond": steps} and cond_model["blocks_skipped"] > 0
    assert uncond_model["denoiser_calls_by_branch"] == {"uncond": steps} and uncond_model["blocks_skipped"] > 0
    assert np.isfinite(out).all() and not np.array_equal(out, baseline)
    for slots in (dict(guidance="adaptive"), dict(parallel="cfg")):
        with pytest.raises(ValueError, match=r"cannot serve Ideogram4Pipeline with a second denoiser "
                                             r"\(unconditional_transformer\)"):
            diffaccel.accelerate(case.pipe, **slots)
    diffaccel.accelerate(case.pipe, "turbo")  # a preset leaves guidance out, with a warning
    assert diffaccel.stats(case.pipe).get("guidance_skipped_uncond") is None
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


def test_helios_pyramid_stages_each_start_clean():
    """Helios' pyramid pipeline denoises each chunk in resolution stages, each with a schedule of its own: every
    stage starts the caches clean at its size, off is bit-identical and remove gives the plain pipeline back."""
    from tiny_pipelines import helios_pyramid

    case = helios_pyramid()
    baseline = run(case, seed=0)
    diffaccel.accelerate(case.pipe, "off")
    assert np.array_equal(run(case, seed=0), baseline)
    diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
    out = run(case, seed=0)
    stats = diffaccel.stats(case.pipe, cumulative=True)
    assert np.isfinite(out).all() and stats["blocks_skipped"] > 0
    assert stats["calls"] == 3 and stats["cache_misses"] == 3 * 2  # a warm-up per stage and branch
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


def test_an_auxiliary_forward_runs_every_block_outside_the_step_count():
    """Wan Animate 2 runs one reference-extraction forward per segment (``kv_cache_mode="extract"``) that writes every
    layer's keys and values into a KV cache: with the most eager cache, that forward still runs all its blocks (a
    skipped one would leave its cache empty) and counts as no CFG branch; the denoising forwards are cached."""
    case, baseline = case_and_baseline("wan_animate_2")
    blocks = diffaccel.pipelines.adapter_for(case.denoiser).find_blocks(case.denoiser)
    calls, extracting = [], []
    outer = case.denoiser.register_forward_pre_hook(
        lambda m, a, k: extracting.__setitem__(slice(None), [k.get("kv_cache_mode") == "extract"]), with_kwargs=True)
    inner = [b.module.register_forward_pre_hook(lambda m, a, k: calls.append(extracting[0]), with_kwargs=True)
             for b in blocks]
    try:
        diffaccel.accelerate(case.pipe, cache=EAGER_CACHE)
        out = run(case, seed=0)
    finally:
        outer.remove()
        for handle in inner:
            handle.remove()
    stats = diffaccel.stats(case.pipe)
    steps = case.call_kwargs["num_inference_steps"]
    assert calls.count(True) == len(blocks)  # the extraction forward ran every block
    assert stats["auxiliary_forwards"] == 1 and stats["denoiser_calls_by_branch"] == {"cond": steps, "uncond": steps}
    assert stats["blocks_skipped"] > 0 and np.isfinite(out).all()
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)
