"""Δ-DiT (cache="delta_dit"): an oracle toy whose blocks add known numbers shows which span is Δ-cached
before and after the boundary and the exact values replayed; the schedule; per-branch state; the logged
fallback without a step count; every tiny transformer family (interval 1 is bit-identical, an eager
setting skips blocks, a new size / step count starts clean, remove() restores the baseline); clear errors."""

import logging

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import AccelConfig, DeltaDiTConfig
from diffaccel.cache.delta_dit import DETAIL, OUTLINE, boundary_step, delta_dit_schedule, span_of
from diffaccel.pipelines import BlockSpec, register_block_spec
from tiny_pipelines import FAMILIES, build, run
from toy_models import ConstantBlock, CountdownScheduler, TimestepBlock, ToyDenoiser, run_toy

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ toys


class SixBlockToy(ToyDenoiser):
    """blocks: +t, +1, +t, +10, +t, +100 — the output is x + 3t + 111 when everything is computed.

    A subclass of the toy denoiser, so the toy adapter (found along the MRO) describes it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            [
                TimestepBlock(),
                ConstantBlock(1.0),
                TimestepBlock(),
                ConstantBlock(10.0),
                TimestepBlock(),
                ConstantBlock(100.0),
            ]
        )


class DoubleBlock(torch.nn.Module):
    """Doubles its input: its deviation depends on the input, so each CFG branch has its own."""

    def forward(self, hidden_states, temb):
        return hidden_states * 2


register_block_spec(DoubleBlock, BlockSpec())


class DoublingToy(ToyDenoiser):
    """blocks: +1, +t, +10, x2."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([ConstantBlock(1.0), TimestepBlock(), ConstantBlock(10.0), DoubleBlock()])


def six_block_pipe():
    from types import SimpleNamespace

    return SimpleNamespace(transformer=SixBlockToy(), scheduler=CountdownScheduler())


def values(outputs):
    return [float(o.reshape(-1)[0]) for o in outputs]


# ------------------------------------------------------------------------------------------ config


def test_config_defaults_validation_and_round_trip():
    defaults = DeltaDiTConfig(cache_interval=2, cached_blocks=4, boundary_fraction=0.6)
    assert AccelConfig(cache="delta_dit").cache == defaults
    assert "delta_dit" in diffaccel.available_methods("cache")
    config = DeltaDiTConfig(cache_interval=3, cached_blocks=2, boundary_fraction=0.25)
    assert DeltaDiTConfig.from_dict(config.to_dict()) == config
    assert AccelConfig.from_dict(AccelConfig(cache=config).to_dict()).cache == config
    bad_values = [
        dict(cache_interval=0),
        dict(cache_interval=2.0),
        dict(cache_interval=True),
        dict(cached_blocks=0),
        dict(cached_blocks="4"),
        dict(boundary_fraction=-0.1),
        dict(boundary_fraction=1.5),
        dict(boundary_fraction=float("nan")),
    ]
    for bad in bad_values:
        with pytest.raises(ValueError, match=rf"DeltaDiTConfig\.{next(iter(bad))}"):
            DeltaDiTConfig(**bad)


def test_schedule_stages_and_refreshes():
    # The paper's PixArt-α setting: b = 12 of 20 steps.
    assert boundary_step(0.6, 20) == 12 and boundary_step(0.5, 5) == 3 and boundary_step(0.4, 5) == 2
    plan = [delta_dit_schedule(i, 20, 0.6, 2) for i in range(20)]
    assert [stage for stage, _ in plan] == [OUTLINE] * 12 + [DETAIL] * 8
    assert [i for i, (_, full) in enumerate(plan) if full] == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    # Each stage restarts the interval: the detail stage's first step is full even off the global grid.
    plan = [delta_dit_schedule(i, 5, 0.4, 3) for i in range(5)]
    assert plan == [(OUTLINE, True), (OUTLINE, False), (DETAIL, True), (DETAIL, False), (DETAIL, False)]
    assert all(full for _, full in (delta_dit_schedule(i, 7, 0.5, 1) for i in range(7)))
    # No step count: the stage that covers most of the call, for the whole call.
    assert delta_dit_schedule(4, None, 0.6, 2) == (OUTLINE, True)
    assert delta_dit_schedule(3, None, 0.4, 2) == (DETAIL, False)
    assert span_of(OUTLINE, 28, 4) == (24, 27) and span_of(DETAIL, 28, 4) == (0, 3)


# ------------------------------------------------------------------------------------------ oracle


def test_rear_span_before_the_boundary_front_span_after_exact_values():
    pipe = six_block_pipe()
    assert values(run_toy(pipe, 5)) == [3 * t + 111 for t in (400, 300, 200, 100, 0)]
    diffaccel.accelerate(pipe, cache=DeltaDiTConfig(cache_interval=3, cached_blocks=2, boundary_fraction=0.4))
    # 5 steps, t = 400, 300, 200, 100, 0; boundary b = 2. Rear span = blocks 4, 5 (+t, +100); front = 0, 1 (+t, +1).
    # step 0 (outline, full):   3*400 + 111 = 1311; stores Δ_rear = 400 + 100 = 500
    # step 1 (outline, cached): fresh front 300+1+300+10 = 611, + Δ_rear 500 = 1111 (an output replay would give 1311)
    # step 2 (detail, forced full although 2 % 3 != 0: Δ_rear is the wrong span): 3*200 + 111 = 711; Δ_front = 201
    # step 3 (detail, cached):  0 + Δ_front 201, then 100 + 10 + 100 + 100 = 511
    # step 4 (detail, cached):  201 + 0 + 10 + 0 + 100 = 311
    assert values(run_toy(pipe, 5)) == [1311, 1111, 711, 511, 311]
    stats = diffaccel.stats(pipe)
    assert stats["cache_hits"] == 3 and stats["cache_misses"] == 2
    assert stats["blocks_skipped"] == 3 * 2 and stats["blocks_computed"] == 5 * 6 - 6


def test_interval_one_is_exact_and_a_new_call_starts_clean():
    pipe = six_block_pipe()
    diffaccel.accelerate(pipe, cache=DeltaDiTConfig(cache_interval=1, cached_blocks=6))
    assert values(run_toy(pipe, 4)) == [3 * t + 111 for t in (300, 200, 100, 0)]
    assert diffaccel.stats(pipe)["blocks_skipped"] == 0 and diffaccel.stats(pipe)["cache_misses"] == 4
    # The whole stack as the span (N_c = number of blocks), rear stage throughout: out = x + Δ of the last full step.
    diffaccel.accelerate(pipe, cache=DeltaDiTConfig(cache_interval=2, cached_blocks=6, boundary_fraction=1.0))
    assert values(run_toy(pipe, 4)) == [1011, 1011, 411, 411]
    # Another step count right after: its first step is computed, not replayed from the last call.
    assert values(run_toy(pipe, 3)) == [711, 711, 111]
    assert diffaccel.stats(pipe)["blocks_skipped"] == 6


def test_branches_keep_their_own_deviation():
    from types import SimpleNamespace

    pipe = SimpleNamespace(transformer=DoublingToy(), scheduler=CountdownScheduler())
    diffaccel.accelerate(pipe, cache=DeltaDiTConfig(cache_interval=3, cached_blocks=2, boundary_fraction=1.0))
    pipe.scheduler.set_timesteps(3)
    seen = {"cond": [], "uncond": []}
    for t in pipe.scheduler.timesteps:
        for branch, offset in (("cond", 0.0), ("uncond", 1000.0)):
            with pipe.transformer.cache_context(branch):
                x = torch.full((1, 4, 2), offset)
                seen[branch].append(float(pipe.transformer(x, t.expand(1)).reshape(-1)[0]))
        pipe.scheduler.step(None, t, None)
    # Rear span = (+10, x2): input h, output 2(h + 10), Δ = h + 20 with h = x + 1 + t at the full step (t = 200).
    # cond:   201 -> 422, Δ = 221; then 101 + 221 = 322, 1 + 221 = 222
    # uncond: 1201 -> 2422, Δ = 1221; then 1101 + 1221 = 2322, 1001 + 1221 = 2222 (a shared Δ would break cond)
    assert seen["cond"] == [422, 322, 222]
    assert seen["uncond"] == [2422, 2322, 2222]
    assert diffaccel.stats(pipe)["cache_hits"] == 4


def test_without_a_step_count_one_stage_and_one_warning(caplog):
    pipe = six_block_pipe()
    diffaccel.accelerate(pipe, cache=DeltaDiTConfig(cache_interval=2, cached_blocks=2, boundary_fraction=0.4))
    outputs = []
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        for t in (400.0, 300.0, 200.0):  # set_timesteps never runs: the clock has no step count
            outputs.append(pipe.transformer(torch.zeros(1, 4, 2), torch.tensor([t])))
            pipe.scheduler.step(None, t, None)
    # b = 0.4 < 0.5: the whole call is the detail stage (front span +t, +1). Δ_front = 401 at step 0.
    assert values(outputs) == [1311, 401 + 300 + 10 + 300 + 100, 711]
    warnings = [r for r in caplog.records if "delta_dit" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "number of steps" in warnings[0].getMessage() and "detail stage" in warnings[0].getMessage()


def test_span_larger_than_the_model_is_a_clear_error_and_installs_nothing():
    pipe = six_block_pipe()
    with pytest.raises(ValueError, match=r"DeltaDiTConfig\.cached_blocks=7 is more than SixBlockToy's 6 blocks"):
        diffaccel.accelerate(pipe, cache=DeltaDiTConfig(cached_blocks=7))
    assert not hasattr(pipe, "_diffaccel_runtime")
    for module in pipe.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not registry.hooks


def test_remove_restores_the_toy_exactly():
    pipe = six_block_pipe()
    base = values(run_toy(pipe, 4))
    diffaccel.accelerate(pipe, cache=DeltaDiTConfig(cache_interval=4, cached_blocks=3, boundary_fraction=0.5))
    assert values(run_toy(pipe, 4)) != base
    diffaccel.remove(pipe)
    assert values(run_toy(pipe, 4)) == base
    for module in pipe.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not registry.hooks


# ------------------------------------------------------------------------------------------ pipelines

TRANSFORMER_FAMILIES = [name for name in FAMILIES if name not in ("sd15", "sdxl")]

# 4 steps, b = 2: full (rear), cached (rear), full (front, stage start), cached (front).
# Every tiny model has at least 3 blocks.
EAGER = DeltaDiTConfig(cache_interval=4, cached_blocks=2, boundary_fraction=0.5)

_cases: dict = {}


def case_and_baseline(name):
    """Build each family once per module; its unaccelerated output is the baseline."""
    if name not in _cases:
        case = build(name)
        _cases[name] = (case, run(case, seed=0))
    case, baseline = _cases[name]
    diffaccel.remove(case.pipe)
    return case, baseline


def other_size(case) -> dict:
    kwargs = case.call_kwargs
    changed = {"height": kwargs["height"] * 2}
    if case.is_video and "num_frames" in kwargs:
        changed["num_frames"] = kwargs["num_frames"] + 4
    return changed


@pytest.mark.parametrize("name", TRANSFORMER_FAMILIES)
def test_interval_one_is_bit_identical(name):
    case, baseline = case_and_baseline(name)
    diffaccel.accelerate(case.pipe, cache=DeltaDiTConfig(cache_interval=1, cached_blocks=2))
    assert np.array_equal(run(case, seed=0), baseline)
    stats = diffaccel.stats(case.pipe)
    assert stats["blocks_skipped"] == 0 and stats.get("cache_hits", 0) == 0
    assert stats["cache_misses"] == stats["denoiser_forwards"]
    diffaccel.remove(case.pipe)


@pytest.mark.parametrize("name", TRANSFORMER_FAMILIES)
def test_eager_skips_blocks_new_sizes_start_clean_and_remove_restores(name):
    case, baseline = case_and_baseline(name)
    diffaccel.accelerate(case.pipe, cache=EAGER)
    first = run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    forwards = stats["denoiser_forwards"]
    # Qwen-Image 2.1's first step also runs the text, which its KV cache leaves out of the later ones: the first of
    # those (one per branch) cannot reuse that step's residual and computes.
    prefill = 2 if name == "qwenimage21" else 0
    hits = forwards // 2 - prefill
    assert stats["cache_hits"] == hits and stats["cache_misses"] == forwards - hits, stats
    assert stats["blocks_skipped"] == 2 * hits
    assert np.isfinite(first).all() and first.shape == baseline.shape
    assert not np.array_equal(first, baseline), "Δ-cached steps must change the output"
    assert np.array_equal(run(case, seed=0), first), "same seed, same accelerated output"

    # Another size and step count right after equals a freshly accelerated pipe's output, bit for bit.
    changed = other_size(case)
    resized = run(case, seed=1, num_inference_steps=3, **changed)
    assert np.isfinite(resized).all()
    assert diffaccel.stats(case.pipe)["steps"] == 3
    diffaccel.accelerate(case.pipe, cache=EAGER)
    assert np.array_equal(run(case, seed=1, num_inference_steps=3, **changed), resized)

    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


def test_unet_is_a_clear_error():
    case = build("sd15")
    with pytest.raises(ValueError, match=r"cache='delta_dit' cannot apply to UNet2DConditionModel.*cache='deep'"):
        diffaccel.accelerate(case.pipe, cache="delta_dit")
    assert not hasattr(case.pipe, "_diffaccel_runtime")
