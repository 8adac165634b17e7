"""Bottleneck sampling: stages at the right sizes and noise levels, composition, clear refusals."""

import functools

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import AccelConfig, BlockCacheConfig, BottleneckConfig
from diffaccel.sampling.bottleneck import renoise, stage_sigmas, stage_sizes, stage_steps, unshift
from tiny_pipelines import build, run


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="one entry per stage"):
        BottleneckConfig(scales=(1.0, 0.5, 1.0), step_fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="start and end at 1.0"):
        BottleneckConfig(scales=(0.5, 0.5, 1.0))
    with pytest.raises(ValueError, match="sum to 1"):
        BottleneckConfig(step_fractions=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="start at 1.0"):
        BottleneckConfig(strengths=(0.9, 0.8, 0.6))
    with pytest.raises(ValueError, match="resample"):
        BottleneckConfig(resample="lanczos")
    with pytest.raises(ValueError, match="stage_steps"):
        BottleneckConfig(stage_steps=(2, 10))
    with pytest.raises(ValueError, match="stage_steps"):
        BottleneckConfig(stage_steps=(2, 0, 2))
    config = AccelConfig(sampling=BottleneckConfig(scales=(1.0, 0.75, 1.0)))
    assert AccelConfig.from_dict(config.to_dict()) == config
    counted = AccelConfig(sampling=BottleneckConfig(stage_steps=(1, 5, 2)))
    assert AccelConfig.from_dict(counted.to_dict()) == counted
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="steps_ratio must be"):
            BottleneckConfig(steps_ratio=bad)
    with pytest.raises(ValueError, match="steps_ratio does nothing with stage_steps"):
        BottleneckConfig(stage_steps=(1, 5, 2), steps_ratio=0.5)
    with pytest.raises(ValueError, match="min_stage_tokens must be >= 0"):
        BottleneckConfig(min_stage_tokens=-1)


def test_schedule_maths():
    assert stage_steps((0.2, 0.55, 0.25), 20) == [4, 11, 5]
    assert stage_steps((0.2, 0.55, 0.25), 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 3 steps"):
        stage_steps((0.2, 0.55, 0.25), 2)
    assert stage_sigmas(0.8, 4) == pytest.approx([0.8, 0.6, 0.4, 0.2])
    from diffusers import FlowMatchEulerDiscreteScheduler

    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = unshift(0.6, static, None)
    assert 3.0 * u / (1 + 2.0 * u) == pytest.approx(0.6)
    for kind in ("exponential", "linear"):
        dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=kind)
        u = unshift(0.8, dynamic, 0.7)
        assert float(dynamic.time_shift(0.7, 1.0, np.array([u]))[0]) == pytest.approx(0.8)
    x0 = torch.ones(2, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(renoise(x0, 0.0, g), x0)


@pytest.mark.parametrize("name", ["sd3", "wan", "hunyuan_video", "easyanimate", "skyreels_v2"])
def test_stages_run_at_their_sizes_and_levels_and_remove_restores(name):
    """SkyReels V2 samples with UniPC on flow sigmas (Wan's own pipelines ship that scheduler too): a solver
    that takes a sigma schedule runs each stage's ramp like FlowMatchEuler."""
    case = build(name)
    baseline = run(case, seed=0, num_inference_steps=6)
    shapes, starts = [], []
    hook = case.denoiser.register_forward_pre_hook(  # EasyAnimate passes its latents positionally
        lambda m, a, k: shapes.append(tuple(k.get("hidden_states", a[0] if a else None).shape[-2:])), with_kwargs=True)
    scheduler = case.pipe.scheduler
    original = scheduler.set_timesteps

    @functools.wraps(original)
    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        starts.append(float(scheduler.sigmas[0]))
        return result

    scheduler.set_timesteps = spy
    diffaccel.accelerate(case.pipe, sampling="bottleneck")
    out = run(case, seed=0, num_inference_steps=6)
    hook.remove()
    assert out.shape == baseline.shape and np.isfinite(out).all()
    # each stage starts at its strength (UniPC starts its first at 1 - 1e-6)
    assert starts == pytest.approx([1.0, 0.8, 0.6], abs=1e-5)
    full = shapes[0]
    half = tuple(s // 2 for s in full)
    assert half in shapes and shapes[-1] == full, shapes
    stats = diffaccel.stats(case.pipe)
    assert stats["steps"] == 6 and stats["bottleneck_stages"] == 3
    assert isinstance(case.pipe, type(case.pipe).__mro__[1])  # a subclass of the original class
    diffaccel.remove(case.pipe)
    del scheduler.set_timesteps
    assert not hasattr(type(case.pipe), "_diffaccel_base_class")
    assert np.array_equal(run(case, seed=0, num_inference_steps=6), baseline)


def _latent_tokens(args, kwargs) -> int:
    """Latent tokens of a denoiser call: packed (B, S, C) tokens, or Z-Image's list of (C, F, H, W) latents
    (passed positionally)."""
    latents = kwargs.get("hidden_states", args[0] if args else None)
    if isinstance(latents, list):
        return int(np.prod(latents[0].shape[-2:]))
    return latents.shape[1]


@pytest.mark.parametrize("name", ["flux", "chroma", "qwenimage", "z_image", "flux2_klein", "ltx", "longcat_image",
                                  "qwenimage21"])
def test_packed_and_listed_latents_are_resized_in_the_pipelines_own_layout(name):
    """Flux, Chroma and Qwen-Image hand 2x2-packed tokens between stages, Z-Image plain latents that its
    transformer takes as a list, FLUX.2 2x2-patchified latents (its latent output unpatchified), LTX video
    patch tokens: each stage runs at its token count, one full stage is the plain call."""
    case = build(name)
    size = dict(height=128, width=128, num_inference_steps=6)
    baseline = run(case, seed=0, **size)
    tokens = []
    hook = case.denoiser.register_forward_pre_hook(lambda m, a, k: tokens.append(_latent_tokens(a, k)), with_kwargs=True)
    try:
        diffaccel.accelerate(case.pipe, sampling=BottleneckConfig(stage_steps=(1, 3, 2)))
        out = run(case, seed=0, **size)
    finally:
        hook.remove()
    assert out.shape == baseline.shape and np.isfinite(out).all() and not np.array_equal(out, baseline)
    full, low = max(tokens), min(tokens)
    assert low * 4 == full
    branches = len(tokens) // 6
    assert tokens[::branches] == [full] + [low] * 3 + [full] * 2
    stats = diffaccel.stats(case.pipe)
    assert stats["steps"] == 6 and stats["bottleneck_stages"] == 3
    diffaccel.accelerate(case.pipe, sampling=BottleneckConfig(scales=(1.0,), step_fractions=(1.0,), strengths=(1.0,)))
    assert np.array_equal(run(case, seed=0, **size), baseline)
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0, **size), baseline)


def test_kandinsky5_channels_last_latents_get_their_condition_channels_back():
    """Kandinsky 5 hands channels-last (B, F, H, W, C) latents over, and its model takes [latents, visual
    condition, mask] channels that its latent output leaves out: between stages the latents are resized as
    channels-last and the (zero, for text-to-video) condition channels are put back after the re-noising."""
    case = build("kandinsky5")
    size = dict(height=128, width=128, num_inference_steps=6)
    baseline = run(case, seed=0, **size)
    inputs = []
    hook = case.denoiser.register_forward_pre_hook(
        lambda m, a, k: inputs.append(k.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    try:
        diffaccel.accelerate(case.pipe, sampling=BottleneckConfig(stage_steps=(1, 3, 2)))
        out = run(case, seed=0, **size)
    finally:
        hook.remove()
    channels = case.denoiser.config.in_visual_dim
    first = inputs[::2]  # cond, uncond per step
    assert [tuple(x.shape[2:4]) for x in first] == [(16, 16)] + [(8, 8)] * 3 + [(16, 16)] * 2
    assert all(x.shape[-1] == 2 * channels + 1 for x in first)
    assert all(torch.count_nonzero(x[..., channels:]) == 0 for x in first[1:])  # the condition stays zero
    assert np.isfinite(out).all() and diffaccel.stats(case.pipe)["bottleneck_stages"] == 3
    diffaccel.accelerate(case.pipe, sampling=BottleneckConfig(scales=(1.0,), step_fractions=(1.0,), strengths=(1.0,)))
    assert np.array_equal(run(case, seed=0, **size), baseline)
    diffaccel.remove(case.pipe)


def test_flux2_stage_output_becomes_its_latents_input():
    """[klein] returns unpatchified, de-normalised latents and [dev] packed tokens; both come back as the
    normalised, patchified latents its ``latents=`` takes (the pipeline's own helpers define the forms)."""
    from diffaccel.sampling.bottleneck import flux2_stage_latents, patchify_2x2

    case = build("flux2_klein")
    pipe, cls = case.pipe, type(case.pipe)
    bn = pipe.vae.bn
    bn.running_mean.normal_()  # statistics that are not the identity
    bn.running_var.uniform_(0.5, 2.0)
    latents = torch.randn(2, 16, 3, 5)  # (B, 4C, h, w) as `latents=` takes them
    mean = bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    klein_output = cls._unpatchify_latents(latents * std + mean)
    torch.testing.assert_close(flux2_stage_latents(pipe, klein_output, (3, 5)), latents)
    dev_output = cls._pack_latents(latents)
    assert torch.equal(flux2_stage_latents(pipe, dev_output, (3, 5)), latents)
    assert torch.equal(patchify_2x2(klein_output), cls._patchify_latents(klein_output))
    with pytest.raises(ValueError, match=r"returned latents of shape \(2, 3, 6, 10\)"):
        flux2_stage_latents(pipe, torch.randn(2, 3, 6, 10), (3, 5))


def test_video_tokens_are_ltx_packing():
    from diffusers import LTXPipeline

    from diffaccel.sampling.bottleneck import pack_video_tokens, unpack_video_tokens

    latents = torch.randn(2, 4, 6, 8, 4)
    for patch, patch_t in [(1, 1), (2, 1), (2, 2)]:
        tokens = pack_video_tokens(latents, patch, patch_t)
        assert torch.equal(tokens, LTXPipeline._pack_latents(latents, patch, patch_t))
        assert torch.equal(unpack_video_tokens(tokens, 8, 4, patch, patch_t), latents)


def test_two_by_two_packing_is_flux_packing():
    from diffusers import FluxPipeline

    from diffaccel.sampling.bottleneck import pack_2x2, unpack_2x2

    latents = torch.randn(2, 4, 6, 8)
    assert torch.equal(pack_2x2(latents), FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(unpack_2x2(pack_2x2(latents), 6, 8), latents)
    assert torch.equal(unpack_2x2(pack_2x2(latents), 6, 8), FluxPipeline._unpack_latents(pack_2x2(latents), 48, 64, 8))


def test_stage_steps_set_the_steps_at_each_token_count():
    case = build("sd3")
    tokens = []
    hook = case.denoiser.register_forward_pre_hook(
        lambda m, a, k: tokens.append(int(np.prod(k["hidden_states"].shape[-2:]))), with_kwargs=True)
    diffaccel.accelerate(case.pipe, sampling=BottleneckConfig(stage_steps=(1, 5, 2)))
    out = run(case, seed=0, num_inference_steps=20)  # replaced by the stage counts
    hook.remove()
    assert np.isfinite(out).all()
    full, low = max(tokens), min(tokens)
    assert low * 4 == full
    branches = len(tokens) // 8  # one call per CFG branch, or one batched call per step
    assert [t for t in tokens[::branches]] == [full] + [low] * 5 + [full] * 2
    assert diffaccel.stats(case.pipe)["steps"] == 8


def test_steps_ratio_scales_the_stage_counts_to_the_call():
    case = build("sd3")
    tokens = []
    hook = case.denoiser.register_forward_pre_hook(
        lambda m, a, k: tokens.append(int(np.prod(k["hidden_states"].shape[-2:]))), with_kwargs=True)
    thirteenths = (1 / 13, 10 / 13, 2 / 13)
    diffaccel.accelerate(case.pipe, sampling=BottleneckConfig(step_fractions=thirteenths, steps_ratio=0.65))
    run(case, seed=0, num_inference_steps=20)  # 13 steps: 1 / 10 / 2
    hook.remove()
    full, low = max(tokens), min(tokens)
    branches = len(tokens) // 13
    assert [t for t in tokens[::branches]] == [full] + [low] * 10 + [full] * 2
    assert diffaccel.stats(case.pipe)["steps"] == 13


def test_an_image_conditioned_call_runs_at_full_resolution_with_a_warning(caplog):
    """LTX image-to-video pins the image's latents as the first frame at the call's size: a half-size stage and
    the re-noising would leave that frame noisy, so such calls run whole (the plain call, bit for bit)."""
    from diffusers import LTXImageToVideoPipeline
    from PIL import Image

    case = build("ltx")
    pipe = LTXImageToVideoPipeline(**case.pipe.components)
    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    call = dict(case.call_kwargs, image=image, height=128, width=128, num_inference_steps=6)

    def frames():
        return pipe(**call, generator=torch.Generator().manual_seed(0)).frames

    baseline = frames()
    diffaccel.accelerate(pipe, sampling="bottleneck")
    with caplog.at_level("WARNING", logger="diffaccel"):
        out = frames()
    assert np.array_equal(out, baseline)
    assert diffaccel.stats(pipe)["bottleneck_full_resolution_calls"] == 1
    assert any("LTXImageToVideoPipeline given image runs at full resolution" in r.getMessage() for r in caplog.records)


def test_a_call_too_small_for_min_stage_tokens_runs_at_full_resolution_with_a_warning(caplog):
    case = build("sd3")  # 64 px: 4x4 tokens at full size, 2x2 in the half-size stage
    baseline = run(case, seed=0, num_inference_steps=5)
    diffaccel.accelerate(case.pipe, sampling=BottleneckConfig(min_stage_tokens=16))
    with caplog.at_level("WARNING", logger="diffaccel"):
        out = run(case, seed=0, num_inference_steps=5)
        run(case, seed=0, num_inference_steps=5)
    assert np.array_equal(out, baseline)
    stats = diffaccel.stats(case.pipe)
    assert stats["steps"] == 5 and stats["bottleneck_full_resolution_calls"] == 1 and "bottleneck_stages" not in stats
    warnings = [r.getMessage() for r in caplog.records if "min_stage_tokens" in r.getMessage()]
    assert len(warnings) == 1 and "64x64" in warnings[0] and "4 latent tokens" in warnings[0]
    run(case, seed=0, num_inference_steps=6, height=128, width=128)  # 4x4 tokens at half size: staged
    assert diffaccel.stats(case.pipe)["bottleneck_stages"] == 3


@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_one_full_resolution_stage_is_the_plain_pipeline_bit_for_bit(name):
    case = build(name)
    baseline = run(case, seed=0, num_inference_steps=5)
    one_stage = BottleneckConfig(scales=(1.0,), step_fractions=(1.0,), strengths=(1.0,))
    diffaccel.accelerate(case.pipe, sampling=one_stage)
    assert np.array_equal(run(case, seed=0, num_inference_steps=5), baseline)
    stats = diffaccel.stats(case.pipe)
    assert stats["steps"] == 5 and stats["bottleneck_stages"] == 1


def test_a_size_a_stage_cannot_divide_is_a_clear_error():
    case = build("sd3")
    diffaccel.accelerate(case.pipe, sampling=BottleneckConfig(scales=(1.0, 0.6, 1.0)))
    with pytest.raises(ValueError, match=r"height 64 at stage scale 0.6 gives 38.4 px, not a multiple of 16 px"):
        run(case, seed=0, num_inference_steps=6)
    diffaccel.accelerate(case.pipe, sampling="bottleneck")
    with pytest.raises(ValueError, match=r"width 48 at stage scale 0.5 gives 24 px, not a multiple of 16 px.*"
                                         r"a width that is a multiple of 32 px"):
        run(case, seed=0, num_inference_steps=6, width=48)
    assert stage_sizes((1.0, 0.5, 1.0), 128, 64, 16) == [(128, 64), (64, 32), (128, 64)]


def test_composes_with_caching_which_resets_at_each_stage():
    case = build("sd3")
    diffaccel.accelerate(case.pipe, cache=BlockCacheConfig(threshold=10.0, warmup_steps=1), sampling="bottleneck")
    out = run(case, seed=0, num_inference_steps=9)
    stats = diffaccel.stats(case.pipe)
    assert np.isfinite(out).all() and stats["blocks_skipped"] > 0
    # one warm-up (computed) step per stage: the cache state never crosses a transition
    assert stats["cache_misses"] >= 3


def test_pipelines_it_cannot_serve_are_refused_with_the_reason():
    import dataclasses

    from diffaccel.registry import AccelTarget
    from diffaccel.sampling.bottleneck import BottleneckHandler

    case = build("sd15")
    with pytest.raises(ValueError, match="sampling='bottleneck' cannot serve .*flow matching"):
        diffaccel.accelerate(case.pipe, sampling="bottleneck")
    case = build("hidream_image")  # flow matching, but every call is rescaled to one area
    with pytest.raises(ValueError, match="cannot serve HiDreamImagePipeline: it rescales every call to the area"):
        diffaccel.accelerate(case.pipe, sampling="bottleneck")
    case = build("mochi")  # flow matching, but its scheduler inverts the sigmas
    with pytest.raises(ValueError, match="cannot serve MochiPipeline: its scheduler reshapes sigmas .*inverted"):
        diffaccel.accelerate(case.pipe, sampling="bottleneck")
    case = build("helios")  # chunk by chunk, each chunk from its own noise; latents= is not taken
    with pytest.raises(ValueError, match="cannot serve HeliosPipeline: it generates the video chunk by chunk"):
        diffaccel.accelerate(case.pipe, sampling="bottleneck")
    case = build("glm_image")  # its AR prior would be sampled anew at every stage
    with pytest.raises(ValueError, match="cannot serve GlmImagePipeline: its AR model samples the prior image tokens"):
        diffaccel.accelerate(case.pipe, sampling="bottleneck")
    case = build("prx_pixel")  # pixel space from noise of std 2
    with pytest.raises(ValueError, match="cannot serve PRXPixelPipeline: it samples in pixel space from noise of std"):
        diffaccel.accelerate(case.pipe, sampling="bottleneck")
    case = build("anyflow")  # a flow-map scheduler (source and target time per step)
    with pytest.raises(ValueError, match="cannot serve AnyFlowPipeline: its scheduler is FlowMapEulerDiscreteScheduler"):
        diffaccel.accelerate(case.pipe, sampling="bottleneck")
    # a family whose pipeline hands over tokens in a packing the bottleneck does not know
    case = build("flux")
    adapter = dataclasses.replace(diffaccel.pipelines.adapter_for(case.denoiser), pipeline_latents="")
    with pytest.raises(ValueError, match=r"cannot serve FluxPipeline yet: .*packed tokens \(BSC\)"):
        BottleneckHandler().validate(BottleneckConfig(), AccelTarget(case.pipe, case.denoiser, adapter))


def test_ltx2_stages_carry_the_audio_and_its_copied_scheduler_runs_the_stage_schedule():
    """LTX-2 takes its de-normalised video latents back with the audio latents and re-noises both itself
    (noise_scale); the audio scheduler, a deep copy of the video one made inside each stage, runs the same
    ramp (before, the copy ran the full schedule from pure noise)."""
    case = build("ltx2")
    scheduler_cls = type(case.pipe.scheduler)
    original = scheduler_cls.set_timesteps
    schedules = []

    @functools.wraps(original)
    def record(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        schedules.append((id(self), [round(float(s), 4) for s in self.sigmas]))
        return result

    size = dict(height=128, width=128, num_inference_steps=6)
    video, audio = [], []
    hook = case.denoiser.register_forward_pre_hook(
        lambda m, a, k: video.append(k["hidden_states"].shape[1]) or audio.append(k["audio_hidden_states"].shape[1]),
        with_kwargs=True)
    scheduler_cls.set_timesteps = record
    noised = []
    create = case.pipe._create_noised_state
    case.pipe._create_noised_state = lambda latents, noise_scale, generator=None: (
        noised.append((latents.shape[1], noise_scale)) or create(latents, noise_scale, generator))
    try:
        diffaccel.accelerate(case.pipe, sampling=BottleneckConfig(stage_steps=(1, 3, 2)))
        kwargs = dict(case.call_kwargs, **size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = case.pipe(**kwargs)
    finally:
        scheduler_cls.set_timesteps = original
        hook.remove()
    assert video == [video[0]] + [video[0] // 4] * 3 + [video[0]] * 2 and len(set(audio)) == 1
    assert np.isfinite(np.asarray(out.frames)).all() and torch.isfinite(out.audio).all()
    assert len(schedules) == 6  # per stage: the audio copy, then the video scheduler
    for (audio_id, audio_sigmas), (video_id, video_sigmas), start in zip(schedules[::2], schedules[1::2], (1.0, 0.8, 0.6)):
        assert audio_id != video_id and audio_sigmas == video_sigmas and video_sigmas[0] == start
    assert [len(s) - 1 for _, s in schedules[1::2]] == [1, 3, 2]
    # stages 2 and 3 start from the resized video latents and the audio latents, both re-noised to the stage level
    assert noised == [(video[0] // 4, 0.8), (audio[0], 0.8), (video[0], 0.6), (audio[0], 0.6)]
    diffaccel.remove(case.pipe)


def test_kandinsky6_stages_carry_its_audio_renoised_to_each_stage_level():
    """Kandinsky 6 denoises video and audio in one model and takes both back (``latents=``, ``audio_latents=``):
    stages 2 and 3 start from the stage output's audio re-noised to the stage level, as the video is (before, they
    drew fresh audio noise and ran it on the stage's shortened ramp); its audio scheduler, a copy of the video one
    made after ``set_timesteps``, steps on the stage schedule too."""
    from diffaccel.sampling import bottleneck

    case = build("kandinsky6")
    scheduler_cls = type(case.pipe.scheduler)
    original_step = scheduler_cls.step
    steps, levels, sizes = [], [], []

    @functools.wraps(original_step)
    def record(self, *args, **kwargs):
        steps.append((id(self), round(float(self.sigmas[0]), 4)))
        return original_step(self, *args, **kwargs)

    renoise = bottleneck.renoise
    hook = case.denoiser.register_forward_pre_hook(lambda m, a, k: sizes.append(tuple(k["hidden_states"].shape[1:4])),
                                                   with_kwargs=True)
    scheduler_cls.step = record
    bottleneck.renoise = lambda x, strength, generator=None: levels.append((x.dim(), strength)) or renoise(
        x, strength, generator)
    try:
        diffaccel.accelerate(case.pipe, sampling=BottleneckConfig(stage_steps=(1, 3, 2)))
        out = run(case, seed=0, height=128, width=128, num_inference_steps=6)
    finally:
        scheduler_cls.step = original_step
        bottleneck.renoise = renoise
        hook.remove()
    assert np.isfinite(out).all()
    full, half = sizes[0], sizes[2]
    assert half[1] * 2 == full[1] and half[2] * 2 == full[2]
    assert levels == [(5, 0.8), (3, 0.8), (5, 0.6), (3, 0.6)]  # video (B, F, H, W, C) and audio (B, C, L) per stage
    assert [level for _, level in steps] == [1.0] * 2 + [0.8] * 6 + [0.6] * 4  # video, then audio, every step
    assert all(steps[i][0] != steps[i + 1][0] for i in range(0, len(steps), 2))  # two schedulers step
    diffaccel.remove(case.pipe)
