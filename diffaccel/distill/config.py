"""Typed, validated settings of a distillation run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from dataclasses import fields as fields_of
from typing import Any


def sparse_attention_config(fields: dict[str, Any]):
    """The ``BlockSparseAttentionConfig`` a sparsity-aware student attends with, from its fields (as a
    config or a JSON card gives them: lists become tuples). A student trained sparse attends sparsely at
    every stage, so it has no dense warm-up steps: ``dense_steps`` and ``dense_last_steps`` are 0."""
    from diffaccel.attention import BlockSparseAttentionConfig

    values = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(fields).items()}
    for name in ("dense_steps", "dense_last_steps"):
        if values.get(name, 0):
            raise ValueError(f"sparse_attention.{name}={values[name]}: a sparsity-aware student attends sparsely at "
                             f"every stage it is trained at; leave the dense steps to samplers of dense models.")
    known = {f.name for f in fields_of(BlockSparseAttentionConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"sparse_attention: unknown BlockSparseAttentionConfig fields {unknown}; known: {sorted(known)}.")
    return BlockSparseAttentionConfig(**{**values, "dense_steps": 0, "dense_last_steps": 0})


class _Serialisable:
    """A dataclass config that round-trips through a dict (checkpoints, student cards), refusing unknown
    fields by name, and whose checks raise errors naming the field and why."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} fields {unknown}; known: {sorted(known)}.")
        return cls(**data)

    def _need(self, ok: bool, field: str, why: str) -> None:
        if not ok:
            raise ValueError(f"{type(self).__name__}.{field}={getattr(self, field)!r}: {why}.")

    def _check_common(self) -> None:
        """The fields every student config shares."""
        need = self._need
        need(self.student_steps >= 1, "student_steps", "the student needs at least one step")
        need(self.guidance_scale is None or self.guidance_scale >= 1.0, "guidance_scale",
             "a CFG scale below 1 extrapolates away from the prompt")
        need(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "must be positive")
        for field in ("huber_c", "learning_rate", "grad_clip"):
            need(getattr(self, field) > 0, field, "must be positive")
        need(self.warmup_steps >= 0, "warmup_steps", "must be ≥ 0")
        need(self.batch_size >= 1, "batch_size", "must be ≥ 1")
        for field in ("height", "width", "frames"):
            need(getattr(self, field) is None or getattr(self, field) > 0, field, "must be positive")
        if self.sizes is not None:  # JSON gives lists; configs compare equal only as tuples
            object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
            need(len(self.sizes) >= 1 and all(s > 0 for s in self.sizes), "sizes",
                 "give positive square sizes in pixels, the student's default size first")
            need(len(set(self.sizes)) == len(self.sizes), "sizes", "each size once")
            need(self.height in (None, self.sizes[0]) and self.width in (None, self.sizes[0]), "sizes",
                 f"the first size is the student's default, so height and width must be None or {self.sizes[0]}")
        need(self.init_student is None or bool(str(self.init_student)), "init_student",
             "give a student folder or a shipped student's name, or None")


@dataclass(frozen=True)
class LCDConfig(_Serialisable):
    """Latent consistency distillation of a flow-matching teacher (LCM / LCM-LoRA, Luo et al. 2023).

    ``student_steps``: the student's default number of sampling steps (K). ``solver_steps``: the
    teacher's ODE grid (LCD's 50 DDIM steps), walked one interval of ``skip`` grid steps per training
    pair. ``guidance_scale``: the CFG scale baked into the student (None: the teacher's default), so
    the student runs one evaluation per step. ``lora_rank`` 0 trains every weight with an EMA target
    (``ema_decay``); a rank > 0 trains LoRA adapters whose target is the student itself without
    gradient (LCM-LoRA).
    ``sizes``: square sizes trained in turn, one per iteration (iteration i at ``sizes[i % n]``), the
    first being the student's default; None trains at ``height`` × ``width`` alone. ``init_student``
    starts the student from another student's LoRA (a folder or a shipped name such as "image-tdm", of
    the same method family, teacher and rank), e.g. to teach a 64 px student a second size.
    ``guidance_range`` (low, high): the student gets LCM's guidance-scale embedding (a zero-initialised
    projection of ``guidance_embedding_dim`` sinusoidal features, into the timestep embedder) and each
    training example draws its CFG scale uniformly from the range, so one student samples at any scale
    in it; ``guidance_scale`` is then its default scale. None: the one scale is baked in.
    """

    student_steps: int = 4
    solver_steps: int = 50
    skip: int = 1
    guidance_scale: float | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    ema_decay: float = 0.95
    huber_c: float = 1e-3
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    batch_size: int = 16
    grad_clip: float = 1.0
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    sizes: tuple[int, ...] | None = None
    init_student: str | None = None
    guidance_range: tuple[float, float] | None = None
    guidance_embedding_dim: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_common()
        need = self._need
        if self.guidance_range is not None:  # JSON gives a list
            object.__setattr__(self, "guidance_range", tuple(float(g) for g in self.guidance_range))
            need(len(self.guidance_range) == 2 and 1.0 <= self.guidance_range[0] < self.guidance_range[1],
                 "guidance_range", "give (low, high) CFG scales with 1 ≤ low < high")
            need(self.guidance_scale is None or self.guidance_range[0] <= self.guidance_scale <= self.guidance_range[1],
                 "guidance_scale", f"the default scale must lie in guidance_range {self.guidance_range}")
        need(self.guidance_embedding_dim >= 2 and self.guidance_embedding_dim % 2 == 0, "guidance_embedding_dim",
             "sinusoidal features come in sine/cosine pairs: a positive even number")
        need(self.solver_steps >= 2, "solver_steps", "the teacher's grid needs at least two steps")
        need(1 <= self.skip < self.solver_steps, "skip", f"must lie in [1, solver_steps={self.solver_steps})")
        need(self.lora_rank >= 0, "lora_rank", "0 (full student) or a positive rank")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "must lie in [0, 1)")
        need(self.init_student is None or self.lora_rank > 0, "init_student",
             "students start from a LoRA; a full student (lora_rank 0) has none to load")


@dataclass(frozen=True)
class RewardConfig(_Serialisable):
    """The reward term of RG-LCD (Li et al. 2024): loss = LCD − β·R(student's one-step prediction).

    ``mode`` "lrm" (the paper's default) optimises a latent proxy reward model trained online to match
    the expert judge's pairwise preferences softmax([R_i, R_j] / ``temperature``) among the student's
    prediction, the LCD target and the data latent (``proxy_batch`` prompts per update, ``proxy_lr``);
    "direct" decodes the prediction and optimises the expert itself. Temperature 1 is the paper's (raw
    expert scores): the proxy's score differences then stay on the expert's scale, so β keeps its
    meaning; a smaller temperature magnifies them (τ = 0.1 made the proxy term swamp the LCD loss here).
    The reward term starts after ``reward_warmup`` steps, so the proxy, trained from scratch, has
    learned the expert's preferences before the student follows it. ``expert``: "judge", the reference
    judge (the reference image teacher's), or the hub id or folder of a CLIP-architecture reward model
    (``ClipReward``: CLIPScore, PickScore), which a teacher of the user's needs.
    """

    reward_scale: float = 1.0
    mode: str = "lrm"
    proxy_lr: float = 1e-3
    proxy_batch: int = 4
    temperature: float = 1.0
    reward_warmup: int = 200
    expert: str = "judge"

    def __post_init__(self) -> None:
        if not isinstance(self.expert, str) or not self.expert.strip():
            raise ValueError(f"RewardConfig.expert={self.expert!r}: 'judge' or a CLIP reward model's hub id or folder.")
        if self.reward_scale < 0:
            raise ValueError(f"RewardConfig.reward_scale={self.reward_scale}: must be ≥ 0 (β of −β·R).")
        if self.mode not in ("lrm", "direct"):
            raise ValueError(f"RewardConfig.mode={self.mode!r}: choose 'lrm' (latent proxy) or 'direct' (the judge).")
        for name in ("proxy_lr", "temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RewardConfig.{name}={getattr(self, name)}: must be positive.")
        if self.proxy_batch < 1 or self.reward_warmup < 0:
            raise ValueError("RewardConfig.proxy_batch must be ≥ 1 and reward_warmup ≥ 0.")



FAKE_WEIGHTINGS = ("velocity", "min_snr")  # TDMConfig.fake_weighting


@dataclass(frozen=True)
class TDMConfig(_Serialisable):
    """Trajectory distribution matching (TDM, Luo et al. 2025): a data-free few-step student.

    The student samples in ``student_steps`` stages on trailing timesteps (T·(1 − i/K)); between stages
    it re-noises its x0 estimate with ``eta`` of its own noise estimate and √(1 − η²) fresh noise (η = 1:
    deterministic, the flow's Euler step, as the official TDM rollout; η = 0: fresh noise, LCM-style).
    Each student stage is matched to the teacher (with CFG at ``guidance_scale``, None: the teacher's
    default) only at noise levels inside its own interval [σ_{k+1}, σ_k) with ``separate`` (the official
    TDM run), or from σ_{k+1} up to ``max_sigma`` without (Video-BLADE). The student and the fake score (which tracks the student's
    trajectory distribution) are LoRA adapters of the teacher (``lora_rank``, ``fake_rank``: None = the
    same), trained with their own learning rates; ``fake_updates`` fake-score steps per student step.
    ``fake_regulariser``: λ of Video-BLADE's ‖v_fake − v_real‖² term (``--lambda_reg``: the teacher's velocity
    without CFG at the same point), added to the fake score's loss to keep it near the teacher; 0 there, as
    here. ``fake_loss_limit``: a fake-score step whose loss exceeds it is skipped (Video-BLADE's guard, at
    2.0; None: never), counted as ``fake_skipped`` in the progress. ``fake_weighting``: the fake score's
    loss, "velocity" (velocity MSE, the authors' flow-model code) or "min_snr" (x0 MSE × min(SNR, 5) × an
    importance weight, their DDPM demo for PixArt; ``tdm.min_snr_x0_loss``).
    ``sizes``: square sizes trained in turn, one per iteration (iteration i at ``sizes[i % n]``), the
    first being the student's default; None trains at ``height`` × ``width`` alone. ``init_student``
    starts the student from another student's LoRA (a folder or a shipped name such as "image-tdm", of
    the same method family, teacher and rank), e.g. to teach a 64 px student a second size.
    ``sparse_attention``: sparsity-aware TDM (Video-BLADE): the student attends with adaptive block-sparse
    attention (the fields of a ``BlockSparseAttentionConfig``, ``{}`` for its defaults; no dense steps) in
    its rollouts and updates, while the teacher and the fake score attend densely; the student's card
    records it, so it samples as it was trained.
    """

    student_steps: int = 4
    guidance_scale: float | None = None
    eta: float = 1.0
    lora_rank: int = 16
    fake_rank: int | None = None
    lora_alpha: float | None = None
    learning_rate: float = 1e-4
    fake_learning_rate: float = 5e-4
    fake_updates: int = 1
    fake_regulariser: float = 0.0
    fake_loss_limit: float | None = None
    fake_weighting: str = "velocity"
    separate: bool = True
    max_sigma: float = 0.98
    huber_c: float = 1e-3
    batch_size: int = 8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    sizes: tuple[int, ...] | None = None
    init_student: str | None = None
    seed: int = 0
    sparse_attention: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._check_common()
        need = self._need
        if self.sparse_attention is not None:
            need(isinstance(self.sparse_attention, dict), "sparse_attention",
                 "give the fields of a BlockSparseAttentionConfig as a dict ({} for its defaults)")
            object.__setattr__(self, "sparse_attention", asdict(sparse_attention_config(self.sparse_attention)))
        need(self.eta in (0.0, 1.0), "eta", "students sample with a diffusers scheduler: 1 re-noises with the "
             "student's own noise estimate (FlowMatchEulerDiscreteScheduler), 0 with fresh noise "
             "(FlowMatchLCMScheduler); none mixes the two")
        need(self.lora_rank > 0, "lora_rank", "TDM trains LoRA adapters (student and fake score share the teacher)")
        need(self.fake_rank is None or self.fake_rank > 0, "fake_rank", "must be positive")
        need(self.fake_learning_rate > 0, "fake_learning_rate", "must be positive")
        need(self.fake_updates >= 1, "fake_updates", "the fake score must follow the student")
        need(self.fake_regulariser >= 0.0, "fake_regulariser", "a weight of a squared distance must be ≥ 0")
        need(self.fake_loss_limit is None or self.fake_loss_limit > 0, "fake_loss_limit",
             "must be positive (None: no guard)")
        need(0.0 < self.max_sigma <= 1.0, "max_sigma", "must lie in (0, 1]")
        need(self.fake_weighting in FAKE_WEIGHTINGS, "fake_weighting",
             f"must be one of {FAKE_WEIGHTINGS} (velocity MSE, or the DDPM demo's min-SNR x0 MSE)")
