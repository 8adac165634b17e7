"""diffusers' modular pipelines: their guider runs the CFG branches as separate calls (here without a cache
context, as the modular Z-Image denoise step does), and diffaccel accelerates them like the classic ones."""

import numpy as np
import pytest
import torch
from tiny_pipelines import build

import diffaccel
from diffaccel import AdaptiveGuidanceConfig, BlockCacheConfig

EAGER_CACHE = BlockCacheConfig(threshold=1e9, warmup_steps=1, max_consecutive=None)
STEPS = 4


@pytest.fixture(scope="module")
def modular_z_image():
    from diffusers import ClassifierFreeGuidance
    from diffusers.modular_pipelines.z_image.modular_blocks_z_image import ZImageAutoBlocks

    classic = build("z_image").pipe
    pipe = ZImageAutoBlocks().init_pipeline()
    pipe.update_components(transformer=classic.transformer, vae=classic.vae, text_encoder=classic.text_encoder,
                           tokenizer=classic.tokenizer, scheduler=classic.scheduler,
                           guider=ClassifierFreeGuidance(guidance_scale=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> np.ndarray:
    images = pipe(prompt="a red circle", negative_prompt="blurry", num_inference_steps=STEPS, height=64, width=64,
                  generator=torch.Generator().manual_seed(0), output="images")
    return np.asarray(images[0])


def test_a_modular_pipeline_is_accelerated_with_a_branch_state_each(modular_z_image):
    pipe = modular_z_image
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


def test_adaptive_guidance_skips_the_guiders_unconditional_call(modular_z_image):
    from diffusers import ClassifierFreeGuidance

    pipe = modular_z_image
    guider = pipe.guider
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=1.0))
    unguided = generate(pipe)
    pipe.update_components(guider=guider)
    diffaccel.accelerate(pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0))
    assert np.array_equal(generate(pipe), unguided)
    assert diffaccel.stats(pipe)["denoiser_calls_by_branch"] == {"cond": STEPS}
    diffaccel.accelerate(pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0, min_steps=2))
    generate(pipe)
    assert diffaccel.stats(pipe)["guidance_skipped_uncond"] == STEPS - 2
    diffaccel.remove(pipe)
