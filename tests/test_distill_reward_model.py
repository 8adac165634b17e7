"""RG-LCD for a teacher of the user's: a CLIP-architecture expert reward (CLIPScore, PickScore) from a folder
(tiny and random here, built offline), differentiable down to the pixels, driving the reward term and the
latent proxy of a Stable Diffusion teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distill_helpers import colour_images, saved_tiny_pipeline
from PIL import Image

from diffaccel.distill import LCDConfig, RewardConfig, StudentCard, distill

SIZE = 32


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from tiny_pipelines import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(0)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=VOCAB_SIZE, max_position_embeddings=77, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                          pad_token_id=PAD_ID)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=SIZE, patch_size=8)
    folder = tmp_path_factory.mktemp("clip") / "my-pickscore"
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return saved_tiny_pipeline(tmp_path_factory, "sd15")


def test_clip_reward_preprocesses_as_its_processor_and_is_differentiable(clip_folder):
    from transformers import CLIPImageProcessor

    from diffaccel.distill.reward import ClipReward

    reward = ClipReward.from_pretrained(str(clip_folder))
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    theirs = CLIPImageProcessor.from_pretrained(clip_folder)(images=Image.fromarray(pixels), return_tensors="pt")
    ours = reward.preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0)
    assert torch.allclose(ours, theirs["pixel_values"], atol=1e-5)
    images = torch.rand(2, 3, 48, 64, requires_grad=True)  # any size: resized on the shorter side, centre-cropped
    score = reward(images, ["a red circle", "a blue square"])
    assert score.shape == (2,) and torch.all(score.abs() <= 1.0)
    score.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_rglcd_of_an_own_teacher_with_a_clip_expert(clip_folder, sd_folder, tmp_path):
    from diffaccel.distill import CaptionedImages
    from diffaccel.distill.reward import ClipReward
    from diffaccel.distill.rglcd import RGLCDTrainer
    from diffaccel.distill.run import load_teacher
    from diffaccel.distill.teacher import teacher_for

    images = colour_images(tmp_path / "images")
    config = LCDConfig(lora_rank=4, batch_size=2, solver_steps=10, height=64, width=64, guidance_scale=7.5)
    pipe, _, _ = load_teacher(str(sd_folder))
    trainer = RGLCDTrainer(teacher_for(pipe, 64, 64, "pipeline"), config,
                           RewardConfig(expert=str(clip_folder), reward_warmup=0, proxy_batch=2),
                           ClipReward.from_pretrained(str(clip_folder)), data=CaptionedImages(str(images)))
    proxy = {k: v.clone() for k, v in trainer.proxy.state_dict().items()}
    trainer.train_step()
    assert {"student_reward", "proxy_loss", "expert_student", "expert_data"} <= set(trainer.last_rewards)
    assert any(not torch.equal(proxy[k], v) for k, v in trainer.proxy.state_dict().items())  # the proxy learns

    with pytest.raises(ValueError, match="Give a CLIP reward model"):
        distill(str(sd_folder), tmp_path / "judge", config, method="rg-lcd", data=images, max_steps=1)
    out = distill(str(sd_folder), tmp_path / "s", config, method="rg-lcd", data=images, max_steps=1, progress=False,
                  reward=RewardConfig(expert=str(clip_folder), mode="direct", reward_warmup=0))
    card = StudentCard.load(out)
    assert card.method == "rg-lcd" and card.training["reward"]["expert"] == str(clip_folder)
