"""diffusers' modular pipelines (Z-Image, Wan, FLUX.3, which has no classic pipeline): their guider runs the CFG
branches as separate calls (without a cache context, as the modular Z-Image denoise step does), and diffaccel
accelerates them like the classic ones."""

import numpy as np
import pytest
import torch
from tiny_pipelines import build

import diffaccel
from diffaccel import AdaptiveGuidanceConfig, BlockCacheConfig, BottleneckConfig

EAGER_CACHE = BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=None)
STEPS = 4


def _modular(name: str):
    """A modular pipeline of the family ``name`` with the tiny classic pipeline's components and a CFG guider."""
    from diffusers import ClassifierFreeGuidance
    from diffusers.modular_pipelines import WanBlocks
    from diffusers.modular_pipelines.z_image.modular_blocks_z_image import ZImageAutoBlocks

    if name == "flux3":  # the tiny FLUX.3 case wraps its modular pipeline in a classic call: taken off here
        from diffusers.modular_pipelines.flux3.modular_pipeline import Flux3ModularPipeline

        pipe = build("flux3").pipe
        pipe.__class__ = Flux3ModularPipeline
        pipe._tiny_family = name
        return pipe
    classic = build(name).pipe
    pipe = {"z_image": ZImageAutoBlocks, "wan": WanBlocks}[name]().init_pipeline()
    pipe.update_components(transformer=classic.transformer, vae=classic.vae, text_encoder=classic.text_encoder,
                           tokenizer=classic.tokenizer, scheduler=classic.scheduler,
                           guider=ClassifierFreeGuidance(guidance_scale=3.0))
    pipe.set_progress_bar_config(disable=True)
    pipe._tiny_family = name
    return pipe


@pytest.fixture(scope="module", params=["z_image", "wan", "flux3"])
def modular_pipe(request):
    """The modular Z-Image pipeline, the modular Wan one (whose text step needs ftfy, in the test extra) and
    FLUX.3's."""
    return _modular(request.param)


def generate(pipe) -> np.ndarray:
    if pipe._tiny_family == "wan":
        videos = pipe(prompt="a red circle", negative_prompt="blurry", num_inference_steps=STEPS, height=32,
                      width=32, num_frames=5, generator=torch.Generator().manual_seed(0), output="videos")
        return np.asarray(videos)
    if pipe._tiny_family == "flux3":
        return np.asarray(pipe(prompt="a red circle", negative_prompt="blurry", num_inference_steps=STEPS, height=64,
                               width=64, text_encoder_out_layers=(0, 1, 2), generator=torch.Generator().manual_seed(0),
                               output="images", output_type="np"))
    images = pipe(prompt="a red circle", negative_prompt="blurry", num_inference_steps=STEPS, height=64,
                  width=64, generator=torch.Generator().manual_seed(0), output="images")
    return np.asarray(images[0])


def test_a_modular_pipeline_is_accelerated_with_a_branch_state_each(modular_pipe):
    pipe = modular_pipe
    baseline = generate(pipe)
    diffaccel.accelerate(pipe, "off")
    assert np.array_equal(generate(pipe), baseline)
    assert diffaccel.stats(pipe)["denoiser_calls_by_branch"] == {"cond": STEPS, "uncond": STEPS}
    diffaccel.accelerate(pipe, cache=EAGER_CACHE)
    generate(pipe)
    stats = diffaccel.stats(pipe)
    # the guider's two calls per step are told apart by their order: one warm-up miss per branch
    assert stats["blocks_skipped"] > 0 and stats["cache_misses"] == 2 and stats["cache_hits"] == 2 * (STEPS - 1)
    diffaccel.remove(pipe)
    assert np.array_equal(generate(pipe), baseline)


def test_adaptive_guidance_skips_the_guiders_unconditional_call(modular_pipe):
    from diffusers import ClassifierFreeGuidance

    pipe = modular_pipe
    unguided = None
    if pipe._tiny_family != "wan":  # diffusers 0.42.1's modular Wan text step fails at guidance 1 (unbound negative)
        guider = pipe.guider
        pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=1.0))
        unguided = generate(pipe)
        pipe.update_components(guider=guider)
    diffaccel.accelerate(pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0))
    out = generate(pipe)
    if unguided is not None:
        assert np.array_equal(out, unguided)
    assert diffaccel.stats(pipe)["denoiser_calls_by_branch"] == {"cond": STEPS}
    diffaccel.accelerate(pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0, min_steps=2))
    generate(pipe)
    assert diffaccel.stats(pipe)["guidance_skipped_uncond"] == STEPS - 2
    diffaccel.remove(pipe)


def test_the_bottleneck_refuses_a_modular_pipeline_by_name():
    """A modular pipeline's call takes no latents or size, so the stages cannot be handed over."""
    pipe = _modular("flux3")
    with pytest.raises(ValueError, match=r"cannot serve Flux3ModularPipeline: its __call__ takes no"):
        diffaccel.accelerate(pipe, sampling=BottleneckConfig())
