"""Trajectory distribution matching: the formulas, both updates, resuming, a student that loads and runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel.distill import StudentCard, TDMConfig, distill, load_student, student_call_defaults
from diffaccel.distill.tdm import FAKE, STUDENT, TDMTrainer, diffuse, matching_loss, noise_estimate, renoise
from diffaccel.distill.teacher import teacher_for
from diffaccel.pipelines import reference

TINY = dict(batch_size=2, guidance_scale=4.0, lora_rank=4)


def test_diffuse_keeps_the_flow_marginal_and_renoise_with_eta_one_is_the_euler_step():
    torch.manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8).expand(20000, -1, -1, -1)
    a, b = torch.full((20000,), 0.3), torch.full((20000,), 0.8)
    x_a = (1 - 0.3) * x0 + 0.3 * torch.randn_like(x0)
    x_b = diffuse(x_a, a, b, torch.randn_like(x0))
    noise = (x_b - (1 - 0.8) * x0) / 0.8  # must be standard normal
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 1.0) < 0.01

    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma, nxt = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.6, 0.3, 0.0])
    x0_hat = x - sigma.view(-1, 1, 1, 1) * v
    moved = renoise(x0_hat, noise_estimate(x, sigma, x0_hat), torch.randn_like(x), nxt, eta=1.0)
    assert torch.allclose(moved, x + (nxt - sigma).view(-1, 1, 1, 1) * v, atol=1e-5)
    fresh = torch.randn_like(x)
    lcm = renoise(x0_hat, noise_estimate(x, sigma, x0_hat), fresh, nxt, eta=0.0)
    assert torch.allclose(lcm, (1 - nxt.view(-1, 1, 1, 1)) * x0_hat + nxt.view(-1, 1, 1, 1) * fresh, atol=1e-6)


def test_matching_loss_is_huber_over_the_distance_to_the_teacher():
    x0 = torch.zeros(2, 4, 16, 16, requires_grad=True)
    gap = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1).expand(2, 4, 16, 16)
    real = torch.full((2, 4, 16, 16), 0.25)  # w = mean|x̂0 − x0_real| = 0.25
    loss = matching_loss(x0, x0.detach() + gap, real, 1e-3)
    c = 1e-3 * (1024 / (64 * 64 * 4)) ** 0.5
    want = (torch.sqrt(torch.tensor([0.25, 4.0]) + c * c) - c) / 0.25
    assert torch.allclose(loss, want, atol=1e-5)
    loss.sum().backward()
    assert bool((x0.grad < 0).all())  # every element moves towards the target


def test_each_stage_is_matched_inside_its_own_interval():
    trainer = _trainer()
    sigmas = trainer.sigmas
    stages = torch.arange(4).repeat_interleave(500)
    after, t = trainer.matching_levels(stages, torch.rand(len(stages)))
    assert torch.equal(after, sigmas[stages + 1])
    assert bool((t >= after.clamp(min=0.02)).all()) and bool((t < sigmas[stages]).all())
    wide = _trainer(separate=False)
    _, t = wide.matching_levels(stages, torch.rand(len(stages)))
    assert float(t[stages == 3].max()) > float(sigmas[1])  # Video-BLADE's range: up to max_sigma


def test_config_rejects_bad_values():
    for bad in (dict(eta=0.5), dict(lora_rank=0), dict(fake_updates=0), dict(max_sigma=0.0), dict(student_steps=0),
                dict(guidance_scale=0.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TDMConfig(**bad)
    with pytest.raises(ValueError, match="Unknown TDMConfig fields"):
        TDMConfig.from_dict({"etaa": 1.0})


def _trainer(**changes) -> TDMTrainer:
    torch.manual_seed(0)
    return TDMTrainer(teacher_for(reference.load("image"), 64, 64), TDMConfig(**{**TINY, **changes}))


def test_stages_rollout_and_roles():
    trainer = _trainer()
    assert trainer.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]  # trailing, as the pipeline samples it
    assert trainer.sigmas[0] == 1.0 and trainer.sigmas[-1] == 0.0 and bool((trainer.sigmas.diff() < 0).all())
    batch = trainer.prepare(0)
    cond = batch.cond
    noise = torch.randn(2, *trainer.teacher.latent_shape)
    gen = torch.Generator().manual_seed(0)
    start = trainer.rollout(noise, torch.tensor([0, 0]), cond, gen)
    assert torch.equal(start, noise)  # stage 0 is pure noise
    later = trainer.rollout(noise, torch.tensor([0, 2]), cond, gen)
    assert torch.equal(later[0], noise[0]) and not torch.equal(later[1], noise[1])

    # the adapters start at zero: student and fake are the teacher until trained
    x, sigma = torch.randn(2, *trainer.teacher.latent_shape), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        fake = trainer.fake_velocity(x, sigma, cond)
        trainer._use(None)
        base = trainer.teacher.velocity(trainer.model, x, sigma, cond)
        trainer._use(STUDENT)
        student = trainer.teacher.velocity(trainer.model, x, sigma, cond)
    assert torch.equal(fake, base) and torch.equal(student, base)


def test_each_update_lowers_its_own_loss_on_a_fixed_batch():
    trainer = _trainer(learning_rate=1e-3, fake_learning_rate=1e-3)
    batch = trainer.prepare(0)
    with torch.no_grad():
        x0 = trainer.student_x0(batch.sample, batch.stages, batch.cond)
        noisy, t, _ = trainer._noisy_view(x0, batch.sample, batch.stages, torch.Generator().manual_seed(1))
        fake_before = trainer.fake_loss(noisy, t, x0, batch.cond)
    trainer.fake_update(batch, x0)
    with torch.no_grad():
        fake_after = trainer.fake_loss(noisy, t, x0, batch.cond)
    assert fake_after < fake_before

    student = {k: v.clone() for k, v in trainer.model.named_parameters() if f".{STUDENT}." in k}
    estimate, target, real = trainer.student_target(batch)
    before = (estimate - target).abs().mean()
    trainer.student_update(estimate, target, real)
    with torch.no_grad():
        after = (trainer.student_x0(batch.sample, batch.stages, batch.cond) - target).abs().mean()
    assert after < before
    changed = {k for k, v in trainer.model.named_parameters() if f".{STUDENT}." in k and not torch.equal(v, student[k])}
    assert changed  # the student's own adapter moved ...
    assert all(f".{FAKE}." not in k for k in changed)


def _fake_after_updates(updates: int, **changes):
    """A trainer after ``updates`` fake-score steps on one batch, and on a fixed noisy view of it: (matching
    loss, ‖v_fake − v_real‖² to the teacher's unguided velocity)."""
    trainer = _trainer(fake_learning_rate=1e-2, **changes)
    batch = trainer.prepare(0)
    with torch.no_grad():
        x0 = trainer.student_x0(batch.sample, batch.stages, batch.cond)
    for _ in range(updates):
        trainer.fake_update(batch, x0)
    noisy, t, _ = trainer._noisy_view(x0, batch.sample, batch.stages, torch.Generator().manual_seed(1))
    with torch.no_grad():
        matching = trainer.fake_loss(noisy, t, x0, batch.cond)
        fake = trainer.fake_velocity(noisy, t, batch.cond)
        trainer._use(None)
        real = trainer.teacher.velocity(trainer.model, noisy, t, batch.cond)
    return trainer, float(matching), float((fake - real).pow(2).mean())


def test_the_fake_regulariser_holds_the_fake_score_near_the_teacher():
    """Video-BLADE's --lambda_reg: with λ the fake score trades some of its fit to the student for staying
    near the teacher's unguided velocity."""
    _, free_matching, free_gap = _fake_after_updates(4)
    trainer, held_matching, held_gap = _fake_after_updates(4, fake_regulariser=100.0)
    assert held_gap < 0.85 * free_gap and held_matching > free_matching
    batch = trainer.prepare(1)
    with torch.no_grad():
        x0 = trainer.student_x0(batch.sample, batch.stages, batch.cond)
        noisy, t, _ = trainer._noisy_view(x0, batch.sample, batch.stages, torch.Generator().manual_seed(2))
        matching, regulariser = trainer.fake_losses(noisy, t, x0, batch.cond)
    assert torch.equal(matching, trainer.fake_loss(noisy, t, x0, batch.cond)) and float(regulariser) > 0
    assert _trainer().fake_losses(noisy, t, x0, batch.cond)[1] is None  # λ = 0: no teacher call at all


def test_min_snr_weighting_is_the_ddpm_demos_x0_loss():
    """fake_weighting "min_snr" (the official DDPM demo): per sample x0 MSE × min(((1 − t)/t)², 5) × the
    importance weight exp(−½·mean ε_eff²)/exp(−½·mean z²)."""
    from diffaccel.distill.tdm import min_snr_x0_loss

    g = torch.Generator().manual_seed(0)
    x0, eps, z = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    t = torch.tensor([0.1, 0.8])
    noisy = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    fake_v = torch.randn(2, 4, 3, 3, generator=g)
    fake_x0 = noisy - t.view(-1, 1, 1, 1) * fake_v
    mse = (fake_x0 - x0).pow(2).flatten(1).mean(1)
    snr = torch.tensor([min(81.0, 5.0), (0.2 / 0.8) ** 2])  # t = 0.1 is capped at 5
    importance = torch.exp(-0.5 * (eps.pow(2).flatten(1).mean(1) - z.pow(2).flatten(1).mean(1)))
    expected = (mse * snr * importance).mean()
    torch.testing.assert_close(min_snr_x0_loss(noisy, t, x0, fake_v, z), expected)
    # The fake score's true x0 gives zero loss whatever the weights.
    assert float(min_snr_x0_loss(noisy, t, x0, (noisy - x0) / t.view(-1, 1, 1, 1), z)) < 1e-10


def test_a_min_snr_fake_update_lowers_its_loss_and_bad_weightings_are_refused():
    trainer = _trainer(fake_learning_rate=1e-3, fake_weighting="min_snr")
    batch = trainer.prepare(0)
    with torch.no_grad():
        x0 = trainer.student_x0(batch.sample, batch.stages, batch.cond)
        noisy, t, z = trainer._noisy_view(x0, batch.sample, batch.stages, torch.Generator().manual_seed(1))
        before = trainer.fake_loss(noisy, t, x0, batch.cond, diffusion_noise=z)
        velocity = _trainer().fake_loss(noisy, t, x0, batch.cond)
    assert not torch.allclose(before, velocity)  # another loss than the default's
    trainer.fake_update(batch, x0)
    with torch.no_grad():
        assert trainer.fake_loss(noisy, t, x0, batch.cond, diffusion_noise=z) < before
    with pytest.raises(ValueError, match="needs the diffusion noise"):
        trainer.fake_loss(noisy, t, x0, batch.cond)
    with pytest.raises(ValueError, match="fake_weighting"):
        TDMConfig(fake_weighting="snr")


def test_a_fake_step_above_the_loss_limit_is_skipped_and_counted():
    trainer = _trainer(fake_loss_limit=1e-9)
    fake = {k: v.clone() for k, v in trainer.model.named_parameters() if f".{FAKE}." in k}
    trainer.train_step()
    assert all(torch.equal(v, fake[k]) for k, v in trainer.model.named_parameters() if f".{FAKE}." in k)
    assert trainer.fake_skipped == 1 and trainer.last_rewards["fake_skipped"] == 1.0
    assert trainer.last_rewards["fake_loss"] > 1e-9  # the loss is still reported
    for bad in (dict(fake_regulariser=-0.1), dict(fake_loss_limit=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TDMConfig(**bad)


def test_resume_gives_the_same_next_loss_as_not_stopping(tmp_path):
    config = TDMConfig(**TINY)
    straight = distill("reference:image", tmp_path / "a", config, method="tdm", max_steps=2, progress=False)
    distill("reference:image", tmp_path / "b", config, method="tdm", max_steps=1, progress=False)
    resumed = distill("reference:image", tmp_path / "b", config, method="tdm", max_steps=2, resume=True, progress=False)
    a = json.loads((straight / "losses.json").read_text())
    b = json.loads((resumed / "losses.json").read_text())
    assert len(a) == len(b) == 2 and a == b


def test_bad_runs_get_clear_errors(tmp_path):
    from diffaccel.distill import LCDConfig

    with pytest.raises(ValueError, match="TDMTrainer needs the teacher's CFG scale"):
        TDMTrainer(teacher_for(reference.load("image"), 64, 64), TDMConfig(lora_rank=4))
    with pytest.raises(ValueError, match="trains with a TDMConfig, not a LCDConfig"):
        distill("reference:image", tmp_path / "x", LCDConfig(), method="tdm", max_steps=1)
    distill("reference:image", tmp_path / "a", TDMConfig(**TINY), method="tdm", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="holds another run .*method tdm"):
        distill("reference:image", tmp_path / "a", LCDConfig(batch_size=2, solver_steps=10), max_steps=1, resume=True)
    with pytest.raises(ValueError, match="more than the teacher's own 20 steps"):
        distill("reference:image", tmp_path / "k", TDMConfig(student_steps=30), method="tdm", max_steps=1)


def test_student_loads_offline_generates_and_composes_with_accelerate(tmp_path):
    folder = distill("reference:image", tmp_path / "s", TDMConfig(**TINY, learning_rate=1e-2), method="tdm",
                     max_steps=1, progress=False)
    card = StudentCard.load(folder)
    assert card.method == "tdm" and card.scheduler == "FlowMatchEulerDiscreteScheduler" and card.spacing == "trailing"
    teacher = reference.load("image")
    before = {k: v.clone() for k, v in teacher.transformer.state_dict().items()}
    pipe = load_student(teacher, folder)
    assert any(not torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    call = student_call_defaults(pipe)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw["timestep"][0])),
                                                        with_kwargs=True)
    plain = pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0), output_type="np",
                 **call).images
    handle.remove()
    assert seen == [1000.0, 750.0, 500.0, 250.0]  # the stages it was trained on, one evaluation each
    assert plain.shape == (1, 64, 64, 3) and np.isfinite(plain).all()
    diffaccel.accelerate(pipe, cache="block", attention="sliding_tile")
    accelerated = pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0),
                       output_type="np", **call).images
    assert np.isfinite(accelerated).all()
    diffaccel.remove(pipe)
    again = pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0), output_type="np",
                 **call).images
    assert np.array_equal(again, plain)  # deterministic (η = 1): no global generator needed


def test_cli_distills_with_tdm_and_refuses_options_of_other_methods(tmp_path, capsys):
    from diffaccel.cli import main

    out = tmp_path / "student"
    base = ["distill", "--method", "tdm", "--lora-rank", "4", "--batch-size", "2", "--out", str(out), "--no-progress",
            "--threads", "1"]
    assert main(base + ["--max-steps", "1"]) == 0
    assert StudentCard.load(out).training["config"]["lora_rank"] == 4
    assert main(base + ["--max-steps", "1", "--solver-steps", "10"]) == 2
    assert "--solver-steps is an option of the consistency methods" in capsys.readouterr().err
    assert main(["distill", "--eta", "0", "--out", str(tmp_path / "l"), "--max-steps", "1"]) == 2
    assert "--eta is an option of --method tdm" in capsys.readouterr().err
    assert main(["distill", "--fake-loss-limit", "2", "--out", str(tmp_path / "l"), "--max-steps", "1"]) == 2
    assert "--fake-loss-limit is an option of --method tdm" in capsys.readouterr().err
    tuned = tmp_path / "tuned"
    assert main([*base[:-4], str(tuned), "--no-progress", "--threads", "1", "--max-steps", "1",
                 "--fake-regulariser", "0.02", "--fake-loss-limit", "2", "--fake-weighting", "min_snr"]) == 0
    config = StudentCard.load(tuned).training["config"]
    assert config["fake_regulariser"] == 0.02 and config["fake_loss_limit"] == 2.0
    assert config["fake_weighting"] == "min_snr"
    assert main(["distill", "--fake-weighting", "min_snr", "--out", str(tmp_path / "l"), "--max-steps", "1"]) == 2
    assert "--fake-weighting is an option of --method tdm" in capsys.readouterr().err
