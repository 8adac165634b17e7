"""CFG parallel: the conditional and unconditional branches on two ranks, one all-gather per step.

The hook sits on the denoiser below guidance and the caches' denoiser hooks (so those see whole CFG
batches and decide the same on both ranks) and above the blocks (so each rank's block caches only
ever see its own branch).

* Doubled batch (PixArt, SD3, CogVideoX, LTX, Z-Image's list of latents, ...): rank 0 runs the first
  half, rank 1 the second; the halves are all-gathered back into the doubled output.
* Separate calls (``cache_context("cond")`` then ``("uncond")``: Wan, CogView4, Flux true CFG): the
  two calls of a step come one after the other in every rank, and the unconditional one's arguments
  are not known at the conditional call. They are predictable, though: the unconditional call gets
  the same latents and timestep as the conditional one and the same (constant) negative conditioning
  as at the previous step. From the second step on, at the conditional call rank 0 computes the
  conditional prediction and rank 1 the *speculated* unconditional one; one all-gather gives both to
  both. The unconditional call then checks its real arguments against the speculation and returns the
  gathered prediction without computing; on any mismatch both ranks (which see identical arguments)
  compute it, so a wrong guess costs time, never correctness. The first step runs on both ranks.
* When adaptive guidance stops the unconditional branch (or a pipeline runs without CFG), the
  speculated prediction is not asked for: from then on rank 1 stops speculating and computes the same
  conditional prediction as rank 0 — it idles, in effect. Serving another sample instead would need a
  second latent stream through the pipeline's own loop, which a hook cannot start.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks.hooks import ModelHook

from diffaccel.guidance.layout import half_arguments, prediction_of, same_value, with_other_outputs, with_prediction
from diffaccel.runtime.context import COND, COND_UNCOND, UNCOND

from .context import ParallelGroups


def _as_kwargs(args: tuple, kwargs: dict, names: list[str]) -> dict:
    merged = dict(zip(names, args))
    merged.update(kwargs)
    return merged


class CfgParallelHook(ModelHook):
    _is_stateful = False

    def __init__(self, runtime, groups: ParallelGroups, denoiser: torch.nn.Module) -> None:
        super().__init__()
        self.runtime = runtime
        self.groups = groups
        self.group = groups.cfg_group
        self.rank = groups.cfg_rank
        forward = inspect.unwrap(type(denoiser).forward)
        self.names = list(inspect.signature(forward).parameters)[1:]
        self._reset()

    def _reset(self) -> None:
        self.call_index = None
        self.previous: dict[str, dict] = {}  # branch -> the last call's arguments (as keywords)
        self.stashed: tuple[dict, Any] | None = None  # (speculated uncond arguments, gathered output)
        self.speculate = True

    # ------------------------------------------------------------------ dispatch

    def new_forward(self, module, *args, **kwargs):
        ctx = self.runtime.clock.current
        if ctx.call_index != self.call_index:
            self._reset()
            self.call_index = ctx.call_index
        if ctx.branch == COND_UNCOND:
            return self._split_batch(args, kwargs)
        if ctx.branch == COND:
            return self._conditional_call(args, kwargs)
        if ctx.branch == UNCOND:
            return self._unconditional_call(args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    def _gather(self, prediction: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(prediction) for _ in range(self.groups.cfg)]
        dist.all_gather(parts, prediction.contiguous(), group=self.group)
        self.runtime.count("parallel_cfg_exchanges")
        return parts

    # ------------------------------------------------------------------ doubled batch

    def _split_batch(self, args, kwargs):
        full = self.runtime.clock.current.batch_size
        listed = self.runtime.adapter.latent_layout == "CFHW_LIST"  # per-image latents (Z-Image)
        half_args, half_kwargs = half_arguments(args, kwargs, full, self.names, self.rank, per_sample_lists=listed)
        output = self.fn_ref.original_forward(*half_args, **half_kwargs)
        parts = self._gather(prediction_of(output))
        half = full // 2
        return with_other_outputs(  # further predictions (LTX-2's audio) are gathered alike
            with_prediction(output, torch.cat(parts, 0)),
            lambda x: torch.cat(self._gather(x), 0) if x.dim() and x.shape[0] == half else x,
        )

    # ------------------------------------------------------------------ separate calls

    def _conditional_call(self, args, kwargs):
        call = _as_kwargs(args, kwargs, self.names)
        speculated = self._speculated_uncond(call) if self.speculate else None
        if self.stashed is not None:  # the last speculation was never asked for: guidance stopped the branch
            self.speculate = False
            speculated = None
        self.stashed = None
        self.previous[COND] = call
        if speculated is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.rank == 0:
            output = self.fn_ref.original_forward(*args, **kwargs)
        else:
            output = self._run_as_uncond(speculated)
        cond, uncond = self._gather(prediction_of(output))
        self.stashed = (speculated, with_prediction(output, uncond))
        self.runtime.count("parallel_cfg_speculated")
        return with_prediction(output, cond)

    def _unconditional_call(self, args, kwargs):
        call = _as_kwargs(args, kwargs, self.names)
        self.previous[UNCOND] = call
        stashed, self.stashed = self.stashed, None
        if stashed is not None and same_value(call, stashed[0]):
            return stashed[1]
        if stashed is not None:
            self.runtime.count("parallel_cfg_mispredicted")
        return self.fn_ref.original_forward(*args, **kwargs)

    def _speculated_uncond(self, call: dict) -> dict | None:
        """This step's unconditional arguments, guessed from the last step's pair of calls: what differed
        between them (the negative conditioning) is taken from the last unconditional call, the rest
        (latents, timestep, ...) from this conditional call."""
        last_cond, last_uncond = self.previous.get(COND), self.previous.get(UNCOND)
        if last_cond is None or last_uncond is None or last_cond.keys() != last_uncond.keys() or call.keys() != last_cond.keys():
            return None
        return {
            key: (last_uncond[key] if not same_value(last_cond[key], last_uncond[key]) else call[key]) for key in call
        }

    def _run_as_uncond(self, call: dict):
        """Run the speculated unconditional forward with the runtime describing it as the uncond branch,
        so the block caches below use (and update) this rank's unconditional state."""
        runtime = self.runtime
        saved = runtime.clock.current
        runtime.clock.current = dataclasses.replace(saved, branch=UNCOND, branches_in_batch=(UNCOND,))
        try:
            return self.fn_ref.original_forward(**call)
        finally:
            runtime.clock.current = saved
