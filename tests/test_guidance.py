"""Adaptive guidance (guidance="adaptive" / "linear" / "interval").

Oracle toys whose predictions are known numbers show which steps skip the unconditional branch, the
exact values put in its place (the conditional prediction, or LinearAG's affine estimate) and the
forwards that really ran, for both CFG layouts and both call orders. On tiny pipelines of both layouts:
a threshold above 1 is bit-identical to plain CFG; gamma = -1 is, from ``min_steps`` on, bit-identical to a
run that uses the conditional prediction alone; skipped branches never reach the blocks; LinearAG fits
and runs; composition with the caches; configs validate and round-trip."""

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import AccelConfig, AdaptiveGuidanceConfig, IntervalGuidanceConfig, LinearGuidanceConfig
from diffaccel.guidance import fit_linear_guidance
from diffaccel.guidance.rules import (
    COMPUTE,
    DROP,
    ESTIMATE,
    cosine_similarity,
    interval_bounds,
    least_squares,
    linear_ag_estimate,
    linear_features,
    planned_actions,
    saved_fraction,
    uncond_action,
)
from diffaccel.pipelines import adapter_for
from tiny_pipelines import build, run
from toy_models import CountdownScheduler, ToyDenoiser

torch.set_num_threads(1)

OFF = AdaptiveGuidanceConfig(threshold=1.5)  # cosine similarity never exceeds 1: never skips


# ------------------------------------------------------------------------------------------ config


def test_names_defaults_and_round_trip(tmp_path):
    assert diffaccel.available_methods("guidance") == ["adaptive", "interval", "linear"]
    ag, linear, interval = (AccelConfig(guidance=name).guidance for name in ("adaptive", "linear", "interval"))
    assert ag == AdaptiveGuidanceConfig() and ag.mode == "ag" and ag.threshold == 0.994 and ag.min_steps == 0
    assert isinstance(linear, LinearGuidanceConfig) and linear.mode == "linear" and linear.min_steps == 1
    assert linear.refresh_every == 2 and linear.coefficients == ()
    assert isinstance(interval, IntervalGuidanceConfig) and interval.mode == "interval"
    assert interval.interval == (0.0, 0.5)
    configs = [
        AdaptiveGuidanceConfig(threshold=0.99, min_steps=3),
        AdaptiveGuidanceConfig(mode="linear", coefficients=((1, -1, 1, 0), (0.5, 0.25, 2.0, -1e-3))),
        LinearGuidanceConfig(threshold=-1.0, refresh_every=3, coefficients=[[1, 2, 3, 4]]),
        IntervalGuidanceConfig(interval=(0.1, 0.6)),
        AdaptiveGuidanceConfig(mode="interval", interval=[0, 1]),
    ]
    for config in configs:
        assert type(config).from_dict(config.to_dict()) == config
        assert AccelConfig.from_dict(AccelConfig(guidance=config).to_dict()).guidance == config
        path = tmp_path / f"{config.method}.json"
        AccelConfig(guidance=config).to_file(path)
        assert AccelConfig.from_file(path).guidance == config
    assert configs[2].coefficients == ((1.0, 2.0, 3.0, 4.0),)  # lists become tuples of floats


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="fast"), r"AdaptiveGuidanceConfig\.mode must be one of \['ag', 'linear', 'interval'\]"),
        (dict(threshold=-1.5), r"AdaptiveGuidanceConfig\.threshold must be >= -1"),
        (dict(threshold="high"), r"AdaptiveGuidanceConfig\.threshold must be a number"),
        (dict(threshold=float("nan")), r"AdaptiveGuidanceConfig\.threshold must be a number, got NaN"),
        (dict(min_steps=-1), r"AdaptiveGuidanceConfig\.min_steps must be >= 0"),
        (dict(min_steps=1.5), r"AdaptiveGuidanceConfig\.min_steps must be an integer"),
        (dict(mode="linear", refresh_every=0), r"AdaptiveGuidanceConfig\.refresh_every must be >= 1"),
        (dict(mode="linear", coefficients=((1, 2, 3),)), r"AdaptiveGuidanceConfig\.coefficients\[0\] must be 4"),
        (dict(mode="linear", coefficients=((1, 2, 3, math.inf),)), r"coefficients\[0\] must be 4 finite numbers"),
        (dict(mode="linear", coefficients=3), r"AdaptiveGuidanceConfig\.coefficients must be a sequence"),
        (dict(mode="interval", interval=(0.6, 0.4)), r"AdaptiveGuidanceConfig\.interval must be \(start, end\)"),
        (dict(mode="interval", interval=(0.0, 1.5)), r"AdaptiveGuidanceConfig\.interval must be"),
        (dict(mode="interval", interval=(0.5,)), r"AdaptiveGuidanceConfig\.interval must be"),
        # A field the mode does not read is refused rather than silently ignored.
        (dict(interval=(0.2, 0.8)), r"AdaptiveGuidanceConfig\.interval does nothing in mode='ag'.*'interval'"),
        (dict(coefficients=((1, -1, 1, 0),)), r"\.coefficients does nothing in mode='ag'.*'linear'"),
        (dict(mode="interval", threshold=0.9), r"\.threshold does nothing in mode='interval'.*'ag' / 'linear'"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveGuidanceConfig(**kwargs)


def test_named_subclasses_keep_their_mode():
    with pytest.raises(ValueError, match=r"LinearGuidanceConfig is mode='linear', got mode='ag'.*AdaptiveGuidanceConfig"):
        LinearGuidanceConfig(mode="ag")
    with pytest.raises(ValueError, match=r"IntervalGuidanceConfig is mode='interval'"):
        IntervalGuidanceConfig(mode="linear")
    with pytest.raises(ValueError, match=r"Unknown field\(s\) \['gamma'\]"):
        AccelConfig.from_dict({"guidance": {"method": "adaptive", "gamma": 0.9}})


# ------------------------------------------------------------------------------------------ rules


def test_actions_per_mode():
    def plan(mode, n=8, **kw):
        return [uncond_action(mode, i, n, **kw) for i in range(n)]

    C, D, E = COMPUTE, DROP, ESTIMATE
    assert plan("ag") == [C] * 8
    assert plan("ag", truncated=True) == [D] * 8
    assert plan("ag", truncated=True, min_steps=3) == [C] * 3 + [D] * 5
    assert plan("ag", truncated=True, min_steps=3, final_steps=2) == [C] * 3 + [D] * 3 + [C] * 2
    assert uncond_action("ag", 7, None, truncated=True, final_steps=2) == D  # no step count: no tail
    assert plan("linear") == [C, E] * 4
    assert plan("linear", min_steps=3, refresh_every=3) == [C, C, C, C, E, E, C, E]
    assert plan("linear", truncated=True, min_steps=1) == [C] + [D] * 7
    assert plan("linear", can_estimate=False) == [C] * 8
    assert plan("interval", interval=(0.25, 0.75)) == [D, D, C, C, C, C, D, D]
    assert plan("interval", interval=(0.0, 1.0)) == [C] * 8
    assert uncond_action("interval", 5, None, interval=(0.0, 0.1)) == C  # no step count: guidance everywhere
    assert interval_bounds(20, (0.0, 0.5)) == (0, 10) and interval_bounds(5, (0.1, 0.5)) == (1, 3)

    # Truncation on the step after the similarity first reaches the threshold, not before min_steps.
    sims = [0.5, 0.9, 0.97, 0.99, 0.999, 0.999]
    assert planned_actions("ag", 6, similarities=sims, threshold=0.98) == [C, C, C, C, D, D]
    assert planned_actions("ag", 6, similarities=sims, threshold=0.98, min_steps=5) == [C] * 5 + [D]
    assert planned_actions("ag", 6, similarities=sims, threshold=-1.0, min_steps=2) == [C, C, D, D, D, D]
    assert planned_actions("ag", 6, similarities=sims, threshold=1.5) == [C] * 6
    assert planned_actions("ag", 6, similarities=sims, threshold=0.98, final_steps=1) == [C, C, C, C, D, C]
    linear = planned_actions("linear", 6, similarities=sims, threshold=0.98, min_steps=1)
    assert linear == [C, E, C, E, C, D]  # step 3 is estimated, so step 4 measures first
    assert saved_fraction(linear) == 3 / 12 and saved_fraction([C] * 4) == 0.0


def test_pick_refresh_keeps_guidance_and_meets_the_saving():
    from diffaccel.guidance.tune import GuidanceRecording, pick_refresh

    recording = GuidanceRecording(similarities=[[0.5, 0.999, 0.999, 0.999, 0.999, 0.999, 0.999, 0.999, 0.999, 0.999]],
                                  num_steps=10)
    never = LinearGuidanceConfig(threshold=2.0, min_steps=1)
    # every 2nd step: steps 1, 3, 5, 7, 9 estimated = 5 of 20 evaluations
    assert pick_refresh(recording, 0.25, never) == (2, 0.25)
    k, saving = pick_refresh(recording, 0.4, never)
    assert saving >= 0.4 and k == 5  # steps 0 and 5 computed, the other 8 estimated
    actions = planned_actions("linear", 10, similarities=recording.similarities[0], threshold=2.0, min_steps=1,
                              refresh_every=k)
    assert DROP not in actions  # guidance is never dropped, only estimated


def test_similarity_estimate_and_least_squares_exact():
    cond = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    uncond = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert cosine_similarity(cond, uncond) == pytest.approx(1 / math.sqrt(2))  # the worst sample decides
    c, cp, up, x = (torch.full((1, 3), v) for v in (2.0, 4.0, 8.0, 16.0))
    assert torch.equal(linear_ag_estimate((0.5, 0.25, 2.0, -1.0), c, cp, up, x), torch.full((1, 3), 1 + 1 + 16 - 16.0))
    assert torch.equal(linear_ag_estimate((1, -1, 1, 0), c, cp, up, x), torch.full((1, 3), 6.0))
    # x_t only enters where it has the prediction's shape (learned-variance outputs have more channels).
    assert torch.equal(linear_ag_estimate((0, 0, 0, 1), torch.ones(1, 4), cp, up, torch.ones(1, 2)), torch.zeros(1, 4))

    generator = torch.Generator().manual_seed(0)
    terms = [torch.randn(2, 5, 6, generator=generator) for _ in range(4)]
    truth = (0.7, -0.4, 1.1, 0.05)
    target = linear_ag_estimate(truth, *terms)
    features = linear_features(*terms)
    row = least_squares(features.T @ features, features.T @ target.reshape(-1).double())
    assert row == pytest.approx(truth, abs=1e-6)


# ------------------------------------------------------------------------------------------ oracle toys


class CondToy(ToyDenoiser):
    """Prediction = latents + text embedding + t/100; records the batch size of every real forward."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=False):
        self.batches.append(hidden_states.shape[0])
        out = hidden_states + encoder_hidden_states + timestep.reshape(-1, 1, 1) / 100
        return (out,)


COND = torch.tensor([[[1.0, 0.0]] * 4])  # (1, 4, 2)
UNCOND = torch.tensor([[[0.0, 1.0]] * 4])


def toy_pipe():
    return SimpleNamespace(transformer=CondToy(), scheduler=CountdownScheduler())


def latents_at(step: int) -> torch.Tensor:
    return torch.full((1, 4, 2), float(step))


def cfg_loop(pipe, num_steps, order=("cond", "uncond"), doubled=False, embeds=None):
    """A pipeline's CFG loop; returns per step the prediction each branch got. ``embeds(step, branch)``
    may replace the text embedding of a call."""
    model = pipe.transformer
    pipe.scheduler.set_timesteps(num_steps)
    steps = []
    for i, t in enumerate(pipe.scheduler.timesteps):
        x = latents_at(i)
        text = {"cond": COND, "uncond": UNCOND}
        if embeds is not None:
            text = {branch: embeds(i, branch) for branch in text}
        if doubled:
            out = model(torch.cat([x, x]), t.expand(2), encoder_hidden_states=torch.cat([text["uncond"], text["cond"]]))
            got = {"uncond": out[0][:1], "cond": out[0][1:]}
        else:
            got = {}
            for branch in order:
                with model.cache_context(branch):
                    got[branch] = model(x, t.expand(1), encoder_hidden_states=text[branch])[0]
        steps.append(got)
        pipe.scheduler.step(None, t, None)
    return steps


def real(step: int, branch: str, num_steps: int) -> torch.Tensor:
    t = (num_steps - 1 - step) * 100.0
    return latents_at(step) + (COND if branch == "cond" else UNCOND) + t / 100


@pytest.mark.parametrize("doubled", [False, True], ids=["per_branch", "doubled"])
def test_ag_truncates_after_the_similarity_reaches_the_threshold(doubled):
    # cos(cond, uncond) at step i is cos((i+1+s, i+s), (i+s, i+1+s)) with s = t/100 = 5 - i: 0.983 at every step,
    # so the threshold decides: 0.98 passes at step 0 (skip from 1 on, or from min_steps).
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, guidance=AdaptiveGuidanceConfig(threshold=0.98, min_steps=3))
    steps = cfg_loop(pipe, 6, doubled=doubled)
    for i, got in enumerate(steps):
        assert torch.equal(got["cond"], real(i, "cond", 6))
        assert torch.equal(got["uncond"], real(i, "uncond" if i < 3 else "cond", 6)), i
    stats = diffaccel.stats(pipe)
    assert stats["guidance_skipped_uncond"] == 3 and "guidance_estimated_uncond" not in stats
    assert stats["denoiser_calls_by_branch"] == {"cond": 6, "uncond": 3}
    if doubled:
        assert pipe.transformer.batches == [2, 2, 2, 1, 1, 1] and stats["denoiser_forwards"] == 6
    else:
        assert pipe.transformer.batches == [1] * 9 and stats["denoiser_forwards"] == 9
    # A threshold no step reaches never skips; a new call starts un-truncated.
    diffaccel.accelerate(pipe, guidance=AdaptiveGuidanceConfig(threshold=0.99))
    steps = cfg_loop(pipe, 6, doubled=doubled)
    assert all(torch.equal(got["uncond"], real(i, "uncond", 6)) for i, got in enumerate(steps))
    assert diffaccel.stats(pipe).get("guidance_skipped_uncond", 0) == 0


@pytest.mark.parametrize("doubled", [False, True], ids=["per_branch", "doubled"])
def test_linear_ag_estimate_exact_values(doubled):
    rows = ((1.0, -1.0, 1.0, 0.0),) + ((0.5, 0.25, 2.0, 1.0),) * 4
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, guidance=LinearGuidanceConfig(threshold=1.5, coefficients=rows))
    steps = cfg_loop(pipe, 5, doubled=doubled)
    for i, got in enumerate(steps):
        assert torch.equal(got["cond"], real(i, "cond", 5))
        if i % 2 == 0:
            assert torch.equal(got["uncond"], real(i, "uncond", 5)), i
        else:  # estimated from this step's cond and the previous (evaluated) step
            expected = (real(i, "cond", 5) * 0.5 + real(i - 1, "cond", 5) * 0.25 + real(i - 1, "uncond", 5) * 2.0
                        + latents_at(i) * 1.0)
            assert torch.equal(got["uncond"], expected), i
    stats = diffaccel.stats(pipe)
    assert stats["guidance_skipped_uncond"] == stats["guidance_estimated_uncond"] == 2
    assert stats["denoiser_calls_by_branch"] == {"cond": 5, "uncond": 3}


def test_linear_with_another_step_count_warns_and_carries_the_guidance(caplog):
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, guidance=LinearGuidanceConfig(threshold=1.5, coefficients=((0, 0, 0, 0),) * 4))
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        steps = cfg_loop(pipe, 3)
    # carry-over estimate: cond_1 - cond_0 + uncond_0, which is exact for this toy
    assert torch.equal(steps[1]["uncond"], real(1, "cond", 3) - real(0, "cond", 3) + real(0, "uncond", 3))
    warnings = [r.getMessage() for r in caplog.records if "fitted for 4 steps" in r.getMessage()]
    assert len(warnings) == 1 and "this call has 3" in warnings[0]


def test_uncond_first_pipelines_compute_cond_once_per_step():
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0, min_steps=1))
    steps = cfg_loop(pipe, 4, order=("uncond", "cond"))
    for i, got in enumerate(steps):
        assert torch.equal(got["cond"], real(i, "cond", 4))
        assert torch.equal(got["uncond"], real(i, "uncond" if i < 1 else "cond", 4)), i
    # step 0 runs both; steps 1-3 run the conditional branch once (during the "uncond" call)
    assert pipe.transformer.batches == [1] * 5
    stats = diffaccel.stats(pipe)
    assert stats["denoiser_forwards"] == 5 and stats["denoiser_calls_by_branch"] == {"cond": 4, "uncond": 1}
    assert stats["guidance_skipped_uncond"] == 3


def test_uncond_first_with_changed_arguments_recomputes_and_warns(caplog):
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0, min_steps=1))

    def embeds(step, branch):  # from step 2 on the conditional call gets another (equal-valued) embedding
        if branch == "uncond":
            return UNCOND
        return COND if step < 2 else COND * 2

    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        steps = cfg_loop(pipe, 4, order=("uncond", "cond"), embeds=embeds)
    assert torch.equal(steps[2]["cond"], latents_at(2) + COND * 2 + 1.0)  # recomputed with its own arguments
    assert torch.equal(steps[3]["uncond"], real(3, "uncond", 4))  # no longer skipped first-in-step calls
    assert any("arguments changed" in r.getMessage() for r in caplog.records)


def test_interval_without_a_step_count_guides_every_step_and_says_so(caplog):
    pipe = toy_pipe()
    diffaccel.accelerate(pipe, guidance=IntervalGuidanceConfig(interval=(0.0, 0.1)))
    model = pipe.transformer
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        for t in (300.0, 200.0):  # no set_timesteps: the clock has no step count
            for branch, text in (("cond", COND), ("uncond", UNCOND)):
                with model.cache_context(branch):
                    model(latents_at(0), torch.tensor([t]), encoder_hidden_states=text)
            pipe.scheduler.step(None, t, None)
    assert diffaccel.stats(pipe)["denoiser_calls_by_branch"] == {"cond": 2, "uncond": 2}
    assert sum("needs the call's number of steps" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------ tiny pipelines

BATCHED = ["pixart_alpha", "sd3", "hunyuandit", "mochi", "sana_video", "easyanimate", "allegro", "aura_flow",
           "hidream_image", "bria_fibo", "latte", "ernie_image", "anyflow", "prx", "prx_pixel", "cogview3plus",
           "sana_wm"]
# Wan's CFG, Flux's true CFG; Chroma and Lumina 2 open no cache context; HunyuanVideo 1.5 runs CFG through a
# diffusers guider (contexts "pred_cond" / "pred_uncond").
PER_BRANCH = ["wan", "wan_vace", "skyreels_v2", "flux", "flux2_klein", "chroma", "lumina2", "hunyuan_video15", "hunyuan_image",
              "longcat_image", "ovis_image", "cosmos", "qwenimage21", "kandinsky5", "motif_video", "flux3", "krea2",
              "bria_fibo2", "kandinsky6", "helios", "chronoedit", "cosmos3_omni", "glm_image", "nucleusmoe_image",
              "wan_animate", "framepack", "wan_animate_2"]
FAMILIES = BATCHED + PER_BRANCH
# The guidance scale of an unguided call, where it is not 1: Krea 2 guides as cond + s·(cond − uncond).
UNGUIDED_SCALE = {"krea2": 0.0}
# Families whose blocks see their tokens sequence-first, (tokens, batch, channels).
SEQUENCE_FIRST = {"ernie_image"}
STEPS = 4

_cases: dict = {}


def case_and_baseline(name):
    if name not in _cases:
        case = build(name)
        _cases[name] = (case, run(case, seed=0))
    case, baseline = _cases[name]
    diffaccel.remove(case.pipe)
    return case, baseline


def _second_half(value, full, name=None):
    if name == "encoder_hidden_states_llama3":  # HiDream-I1: (layers, batch, tokens, channels)
        return value[:, full // 2 :]
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == full:
        return value[full // 2 :]
    if isinstance(value, dict):
        return {k: _second_half(v, full) for k, v in value.items()}
    if isinstance(value, list):  # Bria FIBO: one text tensor per block
        return [_second_half(v, full) for v in value]
    return value


def cond_only_reference(case, from_step: int) -> np.ndarray:
    """The unaccelerated pipeline, but from ``from_step`` on the unconditional prediction is replaced by the
    conditional one: per-branch, the "uncond" call returns the "cond" call's output; a doubled batch returns
    [c, c] with c computed by a forward of the conditional half alone (as the accelerated run does)."""
    seen = []
    auxiliary = adapter_for(case.denoiser).auxiliary_forward  # Wan Animate 2's KV-cache extraction: no branch

    def hook(module, args, kwargs, output):
        if auxiliary and kwargs.get(auxiliary[0]) == auxiliary[1]:
            return output
        index = len(seen)
        seen.append(index)
        if case.cfg_layout == "batched":
            if index < from_step:
                return output
            full = args[0].shape[0] if args else kwargs["hidden_states"].shape[0]
            half = module.forward(*[_second_half(a, full) for a in args],
                                  **{k: _second_half(v, full, k) for k, v in kwargs.items()})
            c = half[0]
            return (torch.cat([c, c]),) + tuple(half[1:]) if isinstance(half, tuple) else type(half)(torch.cat([c, c]))
        step, is_uncond = divmod(index, 2)
        if not is_uncond:
            hook.cond = output
            return output
        return hook.cond if step >= from_step else output

    handle = case.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        return run(case, seed=0)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", FAMILIES)
def test_threshold_above_one_is_bit_identical_to_plain_cfg(name):
    case, baseline = case_and_baseline(name)
    diffaccel.accelerate(case.pipe, guidance=OFF)
    assert np.array_equal(run(case, seed=0), baseline)
    stats = diffaccel.stats(case.pipe)
    assert stats["denoiser_calls_by_branch"] == {"cond": STEPS, "uncond": STEPS}
    assert "guidance_skipped_uncond" not in stats
    diffaccel.remove(case.pipe)
    assert np.array_equal(run(case, seed=0), baseline)


@pytest.mark.parametrize("name", FAMILIES)
def test_minus_one_after_min_steps_equals_the_conditional_prediction_alone(name):
    case, baseline = case_and_baseline(name)
    expected = cond_only_reference(case, from_step=2)
    diffaccel.accelerate(case.pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0, min_steps=2))
    out = run(case, seed=0)
    assert np.array_equal(out, expected)
    assert not np.array_equal(out, baseline)
    stats = diffaccel.stats(case.pipe)
    assert stats["guidance_skipped_uncond"] == STEPS - 2
    assert stats["denoiser_calls_by_branch"] == {"cond": STEPS, "uncond": 2}
    diffaccel.remove(case.pipe)


@pytest.mark.parametrize("name", FAMILIES)
def test_minus_one_from_the_start_equals_running_without_guidance(name):
    case, _ = case_and_baseline(name)
    guider = getattr(case.pipe, "guider", None)
    if guider is not None:  # the scale lives in the pipeline's guider
        from diffusers import ClassifierFreeGuidance

        case.pipe.guider = ClassifierFreeGuidance(guidance_scale=1.0)
        unguided = run(case, seed=0)
        case.pipe.guider = guider
    else:
        scale = "true_cfg_scale" if "true_cfg_scale" in case.call_kwargs else "guidance_scale"
        unguided = run(case, seed=0, **{scale: UNGUIDED_SCALE.get(name, 1.0)})
    diffaccel.accelerate(case.pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0))
    assert np.array_equal(run(case, seed=0), unguided)
    assert diffaccel.stats(case.pipe)["denoiser_calls_by_branch"] == {"cond": STEPS}
    diffaccel.remove(case.pipe)


@pytest.mark.parametrize("name", FAMILIES)
def test_skipped_branches_are_not_executed(name):
    case, _ = case_and_baseline(name)
    adapter = adapter_for(case.denoiser)
    first_block = adapter.find_blocks(case.denoiser)[0]
    batches, auxiliary = [], []

    def denoiser_call(module, args, kwargs):  # Wan Animate 2's KV-cache extraction forward is no CFG branch
        auxiliary[:] = [bool(adapter.auxiliary_forward) and kwargs.get(adapter.auxiliary_forward[0])
                        == adapter.auxiliary_forward[1]]

    def count(module, args, kwargs):
        if auxiliary and auxiliary[0]:
            return
        hidden, _ = first_block.stream_inputs(args, kwargs)
        # Cosmos 3's blocks take (tokens, channels): one sample, no batch axis
        batches.append(1 if hidden.dim() == 2 else hidden.shape[1 if name in SEQUENCE_FIRST else 0])

    handle = first_block.module.register_forward_pre_hook(count, with_kwargs=True)
    outer = case.denoiser.register_forward_pre_hook(denoiser_call, with_kwargs=True)
    try:
        diffaccel.accelerate(case.pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0, min_steps=1))
        run(case, seed=0)
    finally:
        handle.remove()
        outer.remove()
        diffaccel.remove(case.pipe)
    unit = batches[-1]  # one branch's batch as the block sees it (Latte's spatial blocks: one sample per frame)
    if name in BATCHED:  # one forward per step; the doubled batch only at step 0
        assert [b // unit for b in batches] == [2, 1, 1, 1] and unit == (4 if name == "latte" else 1)
    else:  # cond + uncond at step 0, then cond alone
        assert batches == [1] * (STEPS + 1)


@pytest.mark.parametrize("name", ["pixart_alpha", "wan"])
def test_final_steps_guide_again_after_the_truncation(name):
    case, baseline = case_and_baseline(name)
    diffaccel.accelerate(case.pipe, guidance=AdaptiveGuidanceConfig(threshold=-1.0, min_steps=1, final_steps=1))
    out = run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    assert stats["denoiser_calls_by_branch"] == {"cond": STEPS, "uncond": 2}  # steps 0 and 3
    assert stats["guidance_skipped_uncond"] == STEPS - 2
    assert not np.array_equal(out, cond_only_reference(case, from_step=1))  # the last step is guided
    diffaccel.remove(case.pipe)


@pytest.mark.parametrize("name", ["pixart_alpha", "wan"])
def test_interval_guides_only_inside_the_interval(name):
    case, _ = case_and_baseline(name)
    diffaccel.accelerate(case.pipe, guidance=IntervalGuidanceConfig(interval=(0.25, 0.75)))
    out = run(case, seed=0)
    assert np.isfinite(out).all()
    stats = diffaccel.stats(case.pipe)
    assert stats["denoiser_calls_by_branch"] == {"cond": STEPS, "uncond": 2}  # steps 1 and 2
    assert stats["guidance_skipped_uncond"] == 2
    diffaccel.remove(case.pipe)


@pytest.mark.parametrize("name", ["pixart_alpha", "wan"])
def test_linear_fit_on_a_tiny_pipeline_gives_finite_coefficients_and_runs(name, tmp_path):
    case, baseline = case_and_baseline(name)
    kwargs = {k: v for k, v in case.call_kwargs.items() if k != "prompt"}
    config, report = fit_linear_guidance(
        case.pipe, ["a red circle", "a blue square"], [1, 2], kwargs,
        base=LinearGuidanceConfig(threshold=1.5), return_report=True,
    )
    assert not hasattr(case.pipe, "_diffaccel_runtime"), "fitting leaves the pipeline as it found it"
    assert isinstance(config, LinearGuidanceConfig) and config.threshold == 1.5
    assert len(config.coefficients) == STEPS
    assert all(math.isfinite(v) for row in config.coefficients for v in row)
    assert report["num_steps"] == STEPS and set(report["fit_relative_error"]) == {1, 2, 3}
    # Least squares is never worse than the training-free row on the data it was fitted on.
    for step, error in report["fit_relative_error"].items():
        assert error <= report["carry_relative_error"][step] + 1e-6

    path = tmp_path / "linear.json"
    AccelConfig(guidance=config).to_file(path)
    diffaccel.accelerate(case.pipe, str(path))
    out = run(case, seed=0)
    stats = diffaccel.stats(case.pipe)
    assert stats["guidance_estimated_uncond"] == 2  # steps 1 and 3
    assert stats["denoiser_calls_by_branch"] == {"cond": STEPS, "uncond": 2}
    assert np.isfinite(out).all() and out.shape == baseline.shape
    diffaccel.remove(case.pipe)


def test_fit_keeps_the_pipelines_own_acceleration():
    case, _ = case_and_baseline("wan")
    diffaccel.accelerate(case.pipe, cache="block")
    kwargs = {k: v for k, v in case.call_kwargs.items() if k != "prompt"}
    config = fit_linear_guidance(case.pipe, ["a red circle"], [0], kwargs, base=AdaptiveGuidanceConfig(), target_saving=0.2)
    assert isinstance(config, AdaptiveGuidanceConfig) and config.mode == "ag"
    assert diffaccel.config_of(case.pipe).cache.method == "block" and diffaccel.config_of(case.pipe).guidance is None
    with pytest.raises(ValueError, match=r"For mode 'ag' there are no coefficients to fit; give target_saving"):
        fit_linear_guidance(case.pipe, ["x"], [0], kwargs, base=AdaptiveGuidanceConfig())
    diffaccel.remove(case.pipe)


@pytest.mark.parametrize("name, cache", [("wan", "block"), ("pixart_alpha", "block"), ("sd15", "deep")])
def test_composes_with_caching(name, cache):
    """A skipped branch never reaches the cache: one cache decision per forward that really ran, and the
    conditional-only forwards of a doubled batch get their own (fresh) cache state."""
    case, baseline = case_and_baseline(name) if name != "sd15" else (build(name), None)
    diffaccel.accelerate(case.pipe, cache=cache, guidance=AdaptiveGuidanceConfig(threshold=-1.0, min_steps=2))
    out = run(case, seed=0, num_inference_steps=6)
    stats = diffaccel.stats(case.pipe)
    assert np.isfinite(out).all()
    assert stats["guidance_skipped_uncond"] == 4
    assert stats["cache_hits"] + stats["cache_misses"] == stats["denoiser_forwards"]
    assert stats["denoiser_forwards"] == (6 if case.cfg_layout == "batched" else 8)
    diffaccel.remove(case.pipe)


def test_tune_guidance_cli_writes_a_loadable_config(tmp_path, capsys):
    from diffaccel.cli import main

    out = tmp_path / "guidance.json"
    assert main(["tune", "guidance", "--num", "2", "--steps", "3", "--target-saving", "0.3", "--out", str(out)]) == 0
    config = AccelConfig.from_file(out).guidance
    assert isinstance(config, LinearGuidanceConfig) and len(config.coefficients) == 3
    assert "fit_relative_error" in capsys.readouterr().out
    assert main(["tune", "guidance", "--num", "1", "--steps", "3", "--out", str(tmp_path / "x.txt")]) == 2
    assert "use a .json, .yaml or .yml" in capsys.readouterr().err


def test_a_call_without_cfg_is_told_it_has_nothing_to_skip(caplog):
    """MiniMax H3 is guidance-distilled: one forward per step, no unconditional branch. Adaptive guidance changes
    nothing there, and says so once instead of running as a silent no-op."""
    case, baseline = case_and_baseline("minimax_h3")
    diffaccel.accelerate(case.pipe, guidance="adaptive")
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        out = run(case, seed=0)
    assert np.array_equal(out, baseline)
    assert sum("has nothing to skip in this call" in r.getMessage() for r in caplog.records) == 1
    assert diffaccel.stats(case.pipe)["denoiser_calls_by_branch"] == {"cond": case.call_kwargs["num_inference_steps"]}
    diffaccel.remove(case.pipe)
