"""Reward-guided latent consistency distillation (RG-LCD): LCD plus −β·R on the student's one-step
prediction, R being the expert judge (``mode="direct"``) or the latent proxy trained online (``"lrm"``).
"""

from __future__ import annotations

from typing import Any

import torch

from .config import LCDConfig, RewardConfig
from .lcd import LCDBatch, LCDTrainer, average_gradients
from .reward import JudgeReward, LatentRewardModel, preference_loss
from .teacher import FlowTeacher, sequence_embeds


class RGLCDTrainer(LCDTrainer):
    """An ``LCDTrainer`` whose objective adds the reward term, and which updates the latent proxy reward
    model after every student step on (student prediction, LCD target, data latent) triples scored by
    the expert. Reward statistics of the last step are in ``last_rewards``."""

    def __init__(self, teacher: FlowTeacher, config: LCDConfig, reward: RewardConfig, expert: torch.nn.Module,
                 **kwargs: Any) -> None:
        """``expert``: the reward module (``ClipReward``, or anything scoring (images in [0, 1], captions)),
        or the reference ``ImageJudge``, which is wrapped in a ``JudgeReward``."""
        if teacher.makes_clips:
            raise ValueError("rg-lcd rewards single images; a video teacher distils with lcd or tdm.")
        super().__init__(teacher, config, **kwargs)
        self.reward = reward
        from diffaccel.pipelines.reference.judge import ImageJudge

        self.expert = (JudgeReward(expert) if isinstance(expert, ImageJudge) else expert).to(teacher.transformer.device)
        channels = teacher.latent_shape[0]
        text_dim = sequence_embeds(teacher.encode([""])[0]).shape[-1]  # the family's text width
        with torch.random.fork_rng():
            torch.manual_seed(config.seed + 17)
            self.proxy = LatentRewardModel(channels, text_dim).to(teacher.transformer.device)
        self.proxy_optimizer = torch.optim.AdamW(self.proxy.parameters(), lr=reward.proxy_lr, weight_decay=1e-2)
        self.last_rewards: dict[str, float] = {}

    def expert_score(self, latents: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """The expert's reward of decoded latents (differentiable in ``latents``)."""
        pixels = self.teacher.decode_latents(latents)
        return self.expert(((pixels + 1.0) / 2.0).clamp(0.0, 1.0), captions)

    def objective(self, batch: LCDBatch) -> torch.Tensor:
        loss = batch.distill_loss
        if self.step < self.reward.reward_warmup or self.reward.reward_scale == 0:
            return loss
        if self.reward.mode == "direct":
            score = self.expert_score(batch.prediction, batch.captions)
        else:
            self.proxy.requires_grad_(False)
            score = self.proxy(batch.prediction, sequence_embeds(batch.prompt_embeds))
            self.proxy.requires_grad_(True)
        self.last_rewards["student_reward"] = float(score.detach().mean())
        return loss - self.reward.reward_scale * score.mean()

    def after_update(self, batch: LCDBatch) -> None:
        if self.reward.mode != "lrm":
            return
        k = min(self.reward.proxy_batch, len(batch.captions))
        captions = batch.captions[:k]
        candidates = torch.stack([batch.prediction[:k].detach(), batch.target[:k], batch.latents[:k]], dim=1)
        with torch.no_grad():
            flat = candidates.flatten(0, 1)
            expert = self.expert_score(flat, [c for c in captions for _ in range(3)]).reshape(k, 3)
        embeds = sequence_embeds(batch.prompt_embeds[:k]).repeat_interleave(3, dim=0)
        proxy = self.proxy(candidates.flatten(0, 1), embeds).reshape(k, 3)
        loss = preference_loss(proxy, expert, self.reward.temperature)
        self.proxy_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self, list(self.proxy.parameters()))  # one proxy for all processes' preferences
        self.proxy_optimizer.step()
        self.last_rewards.update(proxy_loss=float(loss.detach()), expert_student=float(expert[:, 0].mean()),
                                 expert_target=float(expert[:, 1].mean()), expert_data=float(expert[:, 2].mean()))

    def extra_state(self) -> dict[str, Any]:
        return {"reward": self.reward.to_dict(), "proxy": self.proxy.state_dict(),
                "proxy_optimizer": self.proxy_optimizer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = RewardConfig(**state["reward"])
        if saved != self.reward:
            raise ValueError(f"The checkpoint was made with another reward config ({saved}), not {self.reward}.")
        self.proxy.load_state_dict(state["proxy"])
        self.proxy_optimizer.load_state_dict(state["proxy_optimizer"])
