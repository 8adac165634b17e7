"""LoRA weights a user puts on a pipeline before accelerating it (``--lora PATH[:SCALE]`` in the CLI).

Each LoRA goes through the pipeline's own diffusers loader (``load_lora_weights``; the denoiser's
``load_lora_adapter`` where the pipeline has none, as PixArt's), takes its scale with ``set_adapters``
and is then fused into the weights and unloaded. Fusing is deliberate: the accelerated model runs plain
layers (no LoRA branch in every linear layer), so hooks, caches, sparse attention, ``torch.compile`` and
the farm's replicas see the model they would see without a LoRA, and a call costs what it cost before.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("diffaccel")

ADAPTER_PREFIX = "user_lora_"
DEFAULT_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name for a saved LoRA
_SCALE = re.compile(r"^(?P<source>.+):(?P<scale>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)$")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA: ``source`` is a folder holding ``pytorch_lora_weights.safetensors`` (or the file named by
    ``weight_name``), a ``.safetensors`` file, or a hub id in the local cache; ``scale`` weights it."""

    source: str
    scale: float = 1.0
    weight_name: str | None = None
    # for the second expert (``transformer_2``, the low-noise steps of Wan 2.2 A14B), whose LoRAs come as
    # a file of their own; diffusers' ``load_into_transformer_2``
    second_expert: bool = False

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("A LoRA needs a source: a folder, a .safetensors file or a hub id.")
        if not math.isfinite(self.scale):
            raise ValueError(f"LoRA scale must be a finite number, got {self.scale} for {self.source!r}.")

    @classmethod
    def parse(cls, text: str, second_expert: bool = False) -> "LoraSpec":
        """``PATH`` or ``PATH:SCALE`` (a trailing ``:number``; any other colon belongs to the path)."""
        match = _SCALE.match(text)
        source, scale = (match["source"], float(match["scale"])) if match else (text, 1.0)
        path = Path(source).expanduser()
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise ValueError(f"LoRA file {source!r} does not exist.")
            return cls(str(path.resolve().parent), scale, path.name, second_expert)
        if path.exists():
            return cls(str(path.resolve()), scale, None, second_expert)
        return cls(source, scale, None, second_expert)  # a hub id: diffusers resolves it (from the local cache)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def revision(self) -> str | None:
        """A content hash of the local weight file(s), so a retrained LoRA under the same path is a new job."""
        folder = Path(self.source)
        if not folder.is_dir():
            return None
        files = [folder / self.weight_name] if self.weight_name else sorted(folder.glob("*.safetensors"))
        digest = hashlib.sha256()
        for path in files:
            if path.is_file():
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return "sha256:" + digest.hexdigest()[:16]


FUSED_ATTRIBUTE = "_diffaccel_loras"  # on a pipeline: the LoRAs ``apply_loras`` fused into it, in order


def lora_record(lora: LoraSpec) -> dict[str, Any]:
    """What identifies a fused LoRA for a student distilled on top of it: its spec and content hash."""
    return {**lora.to_dict(), "revision": lora.revision()}


def same_loras(a: Sequence[dict], b: Sequence[dict]) -> bool:
    """Whether two lists of ``lora_record``s fuse the same weights: by content hash where both have one (a
    moved file is the same LoRA), else by source; scale, file name and expert always."""
    def key(record: dict) -> tuple:
        where = record.get("revision") or (record["source"], record.get("weight_name"))
        return where, float(record["scale"]), bool(record.get("second_expert"))

    return [key(r) for r in a] == [key(r) for r in b]


def fused_loras(pipe: Any) -> list[dict]:
    """The ``lora_record``s of what ``apply_loras`` fused into ``pipe`` (empty for a plain pipeline)."""
    return list(getattr(pipe, FUSED_ATTRIBUTE, ()))


def parse_loras(texts: Sequence[str] | None, second_expert_texts: Sequence[str] | None = None) -> tuple[LoraSpec, ...]:
    """The CLI's repeated ``--lora`` values, then its ``--lora-2`` ones (the second expert's)."""
    return (tuple(LoraSpec.parse(text) for text in texts or ())
            + tuple(LoraSpec.parse(text, second_expert=True) for text in second_expert_texts or ()))


def describe_loras(loras: Sequence[LoraSpec]) -> str:
    """What a result's model name gains from its LoRAs: `` + LoRA SOURCE×SCALE`` each."""
    return "".join(f" + LoRA{'-2' if lora.second_expert else ''} "
                   f"{lora.source}{'/' + lora.weight_name if lora.weight_name else ''}×{lora.scale:g}" for lora in loras)


def add_lora_option(parser: Any) -> None:
    """The CLI's ``--lora PATH[:SCALE]`` (repeatable)."""
    parser.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                        help="a LoRA to fuse into the model first (diffusers format: a folder, a .safetensors file "
                        "or a cached hub id; SCALE default 1); repeat for several")
    parser.add_argument("--lora-2", action="append", default=None, metavar="PATH[:SCALE]",
                        help="a LoRA for the second expert (transformer_2: Wan 2.2 A14B's low-noise steps), as --lora")


def apply_loras(pipe: Any, loras: Sequence[LoraSpec]) -> None:
    """Load, weight and fuse ``loras`` into ``pipe`` (in place). A LoRA that attaches to no component of
    the pipeline is an error, not a silent no-op."""
    if not loras:
        return
    from diffaccel.distill.adapters import fuse_and_unload_lora, with_adapter_support

    from .api import find_denoiser

    names = [f"{ADAPTER_PREFIX}{i}" for i in range(len(loras))]
    has_loader = hasattr(pipe, "load_lora_weights")
    component = None
    if not has_loader:
        component = next((name for name in ("transformer", "unet") if getattr(pipe, name, None) is find_denoiser(pipe)),
                         None)
        if component is None:
            raise ValueError(f"{type(pipe).__name__} has no LoRA loader and no transformer or UNet to load a LoRA into.")
    if any(lora.second_expert for lora in loras) and getattr(pipe, "transformer_2", None) is None:
        raise ValueError(f"A LoRA for the second expert (--lora-2) needs a pipeline with a transformer_2 (Wan 2.2 "
                         f"A14B); {type(pipe).__name__} has none.")
    held = {part: names_ for part, names_ in _attached_adapters(pipe, component).items() if names_}
    if held:
        raise ValueError(f"{type(pipe).__name__} already holds LoRA adapters ({held}); fuse or unload them before "
                         f"adding LoRAs with diffaccel, which fuses its own and unloads every adapter afterwards.")
    if component is not None:
        with_adapter_support(getattr(pipe, component))
    try:
        _load_all(pipe, loras, names, component)
    except Exception:
        _unload(pipe, component)  # nothing half-loaded stays behind
        raise
    scales = [lora.scale for lora in loras]
    if has_loader:
        pipe.set_adapters(names, adapter_weights=scales)
        # every component a LoRA went into: a loader's default list can be ["transformer"] alone (Wan's)
        components = [part for part, held in pipe.get_list_adapters().items() if held]
        pipe.fuse_lora(components=components, adapter_names=names)
        pipe.unload_lora_weights()
    else:
        getattr(pipe, component).set_adapters(names, weights=scales)
        fuse_and_unload_lora(pipe, component)
    setattr(pipe, FUSED_ATTRIBUTE, (*fused_loras(pipe), *(lora_record(lora) for lora in loras)))
    logger.info("diffaccel: fused %s", ", ".join(f"{lora.source} ×{lora.scale:g}" for lora in loras))


def _load_all(pipe: Any, loras: Sequence[LoraSpec], names: list[str], component: str | None) -> None:
    from diffaccel.distill.adapters import load_lora_into

    has_loader = component is None
    for name, lora in zip(names, loras):
        weight_name = lora.weight_name or (None if has_loader else _weight_file(lora))
        options = {"weight_name": weight_name} if weight_name else {}
        try:
            if lora.second_expert:
                options["load_into_transformer_2"] = True
            load_lora_into(pipe, component, lora.source, adapter_name=name, **options)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"Cannot load the LoRA {lora.source!r} into {type(pipe).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
        if not any(name in attached for attached in _attached_adapters(pipe, component).values()):
            raise ValueError(f"The LoRA {lora.source!r} matched no layer of {type(pipe).__name__} (its keys name "
                             f"modules this pipeline does not have): is it a LoRA of another model family?")


def _unload(pipe: Any, component: str | None) -> None:
    from diffaccel.distill.adapters import remove_adapter_support

    if component is None:
        pipe.unload_lora_weights()
        return
    denoiser = getattr(pipe, component)
    if getattr(denoiser, "peft_config", None):
        denoiser.unload_lora()
    remove_adapter_support(denoiser)


def _weight_file(lora: LoraSpec) -> str | None:
    """The weight file of a LoRA folder, as the pipelines' loaders guess it: diffusers' default name, else the
    folder's only ``.safetensors`` file (a model's own ``load_lora_adapter`` does not guess)."""
    folder = Path(lora.source)
    if not folder.is_dir():
        return None
    if (folder / DEFAULT_WEIGHTS).is_file():
        return DEFAULT_WEIGHTS
    files = sorted(path.name for path in folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"The LoRA folder {lora.source!r} holds {len(files)} .safetensors files ({', '.join(files)}); "
                         f"name one: --lora {lora.source}/FILE.safetensors.")
    return files[0]


def _attached_adapters(pipe: Any, component: str | None) -> dict[str, list[str]]:
    """Adapter names per component that holds any."""
    if component is None:
        return pipe.get_list_adapters()
    return {component: list(getattr(getattr(pipe, component), "peft_config", {}) or {})}
