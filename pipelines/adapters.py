"""Model-family adapters: what the runtime must know about a denoiser, as data.

A ``FamilyAdapter`` row says where a denoiser's block lists are, what its forward takes (timestep
and latent argument names, latent layout), how its pipeline runs classifier-free guidance, and a
``BlockSpec`` per block class says which block arguments and outputs carry the residual streams.
Adding a model is adding rows (see ``families.py``); users add their own with ``register_adapter``,
which checks the row against the model's real forward signature.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# "CFHW_LIST": a list of per-image (C, F, H, W) latents instead of one batched tensor (Z-Image).
LatentLayout = Literal["BCHW", "BCFHW", "BFCHW", "BFHWC", "BSC", "CFHW_LIST"]
CfgLayout = Literal["batched", "separate"]

def is_tensor_list(value: Any) -> bool:
    """A non-empty list or tuple of tensors: per-image latents or predictions (the CFHW_LIST layout, Z-Image)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, torch.Tensor) for item in value)


HIDDEN = "hidden"
ENCODER = "encoder"


@dataclass(frozen=True)
class BlockSpec:
    """How one block class carries the residual streams.

    ``returns`` lists the block's outputs in order: ``("hidden",)`` for a block returning one tensor,
    ``("encoder", "hidden")`` for Flux-style dual-stream blocks that return a tuple.

    ``joined_text="prefix"`` describes a single-stream block that the model feeds one tensor holding the
    text tokens and then the latent tokens (the model concatenated the two streams before it, as FLUX.2 and
    Chroma do): its streams are that tensor's two parts, split at the forward's latent token count, so a
    cached span that starts in the dual-stream blocks and ends here keeps residuals of one shape.
    ``joined_text="suffix"``: the latent tokens come first, then the text (HiDream-I1).
    """

    returns: tuple[str, ...] = (HIDDEN,)
    hidden_arg: str = "hidden_states"
    encoder_arg: str | None = None  # set when the block updates and returns the encoder stream
    joined_text: str | None = None  # "prefix": the hidden argument is [text, latent tokens]; "suffix": [latent, text]

    def __post_init__(self) -> None:
        if HIDDEN not in self.returns:
            raise ValueError(f"BlockSpec.returns must contain {HIDDEN!r}, got {self.returns}.")
        if (ENCODER in self.returns) != (self.encoder_arg is not None):
            raise ValueError("BlockSpec: encoder_arg must be set exactly when 'encoder' is among the returns.")
        if self.joined_text not in (None, "prefix", "suffix"):
            raise ValueError(f"BlockSpec.joined_text must be None, 'prefix' or 'suffix', got {self.joined_text!r}.")
        if self.joined_text is not None and self.returns != (HIDDEN,):
            raise ValueError("BlockSpec: a joined_text block returns its one joined tensor, so returns must be ('hidden',).")

    @property
    def returns_tuple(self) -> bool:
        return len(self.returns) > 1


@dataclass(frozen=True)
class FamilyAdapter:
    """Everything the runtime needs to know about one denoiser class."""

    name: str  # short family name, e.g. "flux"
    block_lists: tuple[str, ...]  # attribute names of the block ModuleLists, in forward order
    latent_layout: LatentLayout
    cfg_layout: CfgLayout
    timestep_arg: str = "timestep"
    hidden_arg: str = "hidden_states"
    is_video: bool = False
    block_cache: bool = True  # False where the residual block cache cannot apply (UNets)
    # Where text tokens sit in the blocks' self-attention sequence: "none" (video/image tokens only),
    # "prefix" ([text, latent], e.g. Flux, CogVideoX) or "suffix" ([latent, text], e.g. SD3, HunyuanVideo).
    joint_text: str = "none"
    # The halves of a doubled CFG batch, in order: diffusers' pipelines put the unconditional half first;
    # Z-Image puts the conditional one first.
    cfg_batch_order: tuple[str, str] = ("uncond", "cond")
    # The layout of the pipeline's ``latents=`` argument and of its ``output_type="latent"`` output, where it is
    # not the denoiser's input layout: "packed2x2" (2x2 latent patches packed into tokens, (B, h/2·w/2, 4C):
    # Flux, Chroma, Qwen-Image), "patchified2x2" (2x2 latent patches as channels, (B, 4C, h/2, w/2), normalised:
    # FLUX.2), "packed_video" (pt x p x p video patches as tokens, frame-major, (B, F·h·w/(pt·p·p), C·pt·p·p): LTX)
    # "flat_tokens" (unpatched latents flattened to (B, h·w, C): Qwen-Image 2.1) or "BCHW" (Z-Image, whose pipeline
    # unbinds one tensor into its list).
    pipeline_latents: str = ""
    # A denoiser attribute holding the token count that non-square latents are padded to before the blocks
    # (HiDream-I1's ``max_seq``): the latent part of its joined sequences, in place of the grid's count.
    padded_latent_tokens: str = ""
    # Blocks at the end of a list that the methods leave alone (they always run, uncounted): (list name, config
    # attribute holding their number). Motif-Video's last single blocks are decoder blocks that restart from the
    # embedded input, so no cached span may reach into them.
    uncached_tail: tuple[tuple[str, str], ...] = ()
    # (keyword argument, value): a forward called with it is not a denoising step but an auxiliary pass (Wan
    # Animate 2's kv_cache_mode="extract" writes the driving video's keys and values into a KV cache): it runs
    # with every method passed through (a skipped block would leave its cache empty), outside the step count.
    auxiliary_forward: tuple[str, Any] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        if self.auxiliary_forward and (len(self.auxiliary_forward) != 2 or not isinstance(self.auxiliary_forward[0], str)):
            raise ValueError(f"FamilyAdapter '{self.name}': auxiliary_forward must be (argument name, value), got "
                             f"{self.auxiliary_forward!r}.")
        if sorted(self.cfg_batch_order) != ["cond", "uncond"]:
            raise ValueError(f"FamilyAdapter '{self.name}': cfg_batch_order {self.cfg_batch_order} must name "
                             f"'cond' and 'uncond' once each.")

    def count_blocks(self, denoiser: torch.nn.Module) -> int:
        """Number of blocks a full forward runs that the methods see (for statistics); needs no block specs."""
        return sum(len(self._methods_blocks(denoiser, name)) for name in self.block_lists)

    def _methods_blocks(self, denoiser: torch.nn.Module, list_name: str) -> list:
        blocks = list(getattr(denoiser, list_name, None) or ())
        for name, attribute in self.uncached_tail:
            if name == list_name:
                tail = int(getattr(denoiser.config, attribute, 0) or 0)
                blocks = blocks[: len(blocks) - tail]
        return blocks

    def find_blocks(self, denoiser: torch.nn.Module) -> list["BoundBlock"]:
        """The denoiser's blocks, flattened across its block lists in forward order."""
        bound: list[BoundBlock] = []
        for list_name in self.block_lists:
            blocks = getattr(denoiser, list_name, None)
            if blocks is None:
                continue  # optional list (e.g. a model configured without single-stream blocks)
            if not isinstance(blocks, torch.nn.ModuleList):
                raise ValueError(
                    f"{type(denoiser).__name__}.{list_name} is a {type(blocks).__name__}, not a ModuleList; "
                    f"the '{self.name}' adapter does not match this model."
                )
            for index, block in enumerate(self._methods_blocks(denoiser, list_name)):
                bound.append(BoundBlock(module=block, spec=block_spec_for(block), list_name=list_name, index=index,
                                        owner=weakref.ref(denoiser)))
        return bound


@dataclass
class BoundBlock:
    """One block instance with its spec and where it sits."""

    module: torch.nn.Module
    spec: BlockSpec
    list_name: str
    index: int
    owner: Any = field(default=None, repr=False)  # weak reference to the denoiser (for joined_text blocks)
    _positions: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def qualified_name(self) -> str:
        return f"{self.list_name}.{self.index}"

    def stream_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden and (where the block carries one) encoder stream this call receives."""
        spec = self.spec
        hidden = get_argument(args, kwargs, spec.hidden_arg, self.position_of(spec.hidden_arg))
        if spec.joined_text is not None:
            return self._split_joined(hidden)
        encoder = None
        if spec.encoder_arg is not None:
            encoder = get_argument(args, kwargs, spec.encoder_arg, self.position_of(spec.encoder_arg))
        return hidden, encoder

    def split_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, encoder) from what the block returned, in its spec's order."""
        if self.spec.joined_text is not None:
            return self._split_joined(output)
        if not self.spec.returns_tuple:
            return output, None
        values = dict(zip(self.spec.returns, output))
        return values[HIDDEN], values.get(ENCODER)

    def join_output(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        """What the block would return for these streams (used when a skipped block passes through)."""
        if self.spec.joined_text is not None:
            if encoder is None:
                return hidden
            parts = [encoder, hidden] if self.spec.joined_text == "prefix" else [hidden, encoder]
            return torch.cat(parts, dim=1)
        if not self.spec.returns_tuple:
            return hidden
        values = {HIDDEN: hidden, ENCODER: encoder}
        return tuple(values[name] for name in self.spec.returns)

    def _split_joined(self, joined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent tokens, text tokens) of a joined [text, latent] (prefix) or [latent, text] (suffix) sequence."""
        denoiser = self.owner() if self.owner is not None else None
        tokens = _LATENT_TOKENS.get(denoiser) if denoiser is not None else None
        if tokens is None or tokens <= 0:
            raise ValueError(
                f"diffaccel: block {self.qualified_name} ({type(self.module).__name__}) takes text and latent tokens "
                f"joined in one sequence of {joined.shape[1]}, and the latent token count of this forward is "
                f"{'unknown' if tokens is None else tokens}; the block can only be split inside an accelerated "
                "denoiser's forward."
            )
        # A sequence shorter than the forward's latent input holds latent tokens only (Qwen-Image 2.1's steps after
        # its KV cache took the text and any condition images).
        text = max(joined.shape[1] - tokens, 0)
        if self.spec.joined_text == "suffix":
            latent = joined.shape[1] - text
            return joined[:, :latent], joined[:, latent:]
        return joined[:, text:], joined[:, :text]

    def position_of(self, arg: str) -> int | None:
        """Position of a named forward argument (None if it has none)."""
        if arg not in self._positions:
            self._positions[arg] = argument_position(self.module, arg)
        return self._positions[arg]


def token_grid(adapter: "FamilyAdapter", denoiser: torch.nn.Module, latent_grid: tuple[int, ...],
               kwargs: dict) -> tuple[int, ...]:
    """The post-patchify token grid of this forward: ``(F, H, W)``, ``(H, W)`` or ``(tokens,)``."""
    config = getattr(denoiser, "config", {})
    patch = config.get("patch_size", 1) if hasattr(config, "get") else 1
    layout = adapter.latent_layout
    if layout in ("BCFHW", "BFCHW", "BFHWC") and len(latent_grid) == 3:
        frames, height, width = latent_grid
        if isinstance(patch, (tuple, list)):
            pt, ph, pw = patch
        else:
            pt, ph, pw = (config.get("patch_size_t") or 1), patch, patch
        return (-(-frames // pt), height // ph, width // pw)
    if layout == "CFHW_LIST" and len(latent_grid) == 3:  # Z-Image: patch sizes per mode, the first is text-to-image
        frames, height, width = latent_grid
        pf = (config.get("all_f_patch_size") or (1,))[0] if hasattr(config, "get") else 1
        p = (config.get("all_patch_size") or (1,))[0] if hasattr(config, "get") else 1
        return (-(-frames // pf), height // p, width // p)
    if layout == "BCHW" and len(latent_grid) == 2:
        ph, pw = (patch, patch) if not isinstance(patch, (tuple, list)) else tuple(patch)[-2:]
        return (latent_grid[0] // ph, latent_grid[1] // pw)
    if layout == "BSC":
        if all(isinstance(kwargs.get(key), int) for key in ("num_frames", "height", "width")):  # LTX
            return (kwargs["num_frames"], kwargs["height"], kwargs["width"])
        ids = kwargs.get("img_ids")  # Flux: (tokens, 3) rows of (0, row, col)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[-1] == 3 and ids.shape[0] > 0:
            height, width = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
            if height * width == ids.shape[0]:
                return (height, width)
    return tuple(latent_grid[-1:]) if layout == "BSC" else tuple(latent_grid)


def argument_position(module: torch.nn.Module, arg: str) -> int | None:
    """Index of ``arg`` among the positional parameters of ``module.forward`` (None if keyword-only/absent)."""
    forward = inspect.unwrap(type(module).forward)
    params = list(inspect.signature(forward).parameters.values())[1:]  # drop self
    for i, p in enumerate(params):
        if p.name == arg:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                return i
            return None
    return None


def get_argument(args: tuple, kwargs: dict, name: str, position: int | None) -> Any:
    if name in kwargs:
        return kwargs[name]
    if position is not None and position < len(args):
        return args[position]
    return None


def set_argument(args: tuple, kwargs: dict, name: str, position: int | None, value: Any) -> tuple[tuple, dict]:
    if name in kwargs or position is None or position >= len(args):
        kwargs = dict(kwargs)
        kwargs[name] = value
        return args, kwargs
    args = list(args)
    args[position] = value
    return tuple(args), kwargs


# ---------------------------------------------------------------------------------------------
# Registries. Keys are classes; lookups walk the MRO so subclasses of a known class work too.

_ADAPTERS: dict[type, FamilyAdapter] = {}
_BLOCK_SPECS: dict[type, BlockSpec] = {}
_BLOCK_WRAPPERS: dict[type, str] = {}  # wrapper class -> attribute holding the described block
# The latent token count of the forward each accelerated denoiser is running (set by its runtime), which
# splits joined_text blocks' sequences.
_LATENT_TOKENS: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


def set_latent_tokens(denoiser: torch.nn.Module, tokens: int | None) -> None:
    """Record (or with None forget) the latent token count of ``denoiser``'s forward in progress."""
    if tokens is None:
        _LATENT_TOKENS.pop(denoiser, None)
    else:
        _LATENT_TOKENS[denoiser] = tokens


def register_block_spec(block_cls: type, spec: BlockSpec) -> None:
    """Describe a block class; checked against its forward signature."""
    params = inspect.signature(inspect.unwrap(block_cls.forward)).parameters
    for arg in (spec.hidden_arg, spec.encoder_arg):
        if arg is not None and arg not in params:
            raise ValueError(
                f"BlockSpec for {block_cls.__name__} names argument {arg!r}, but its forward takes {list(params)[1:]}."
            )
    _BLOCK_SPECS[block_cls] = spec


def register_block_wrapper(wrapper_cls: type, inner: str) -> None:
    """Describe a wrapper class by the block it holds in attribute ``inner`` (HiDream-I1's ``HiDreamBlock`` holds
    a dual-stream or a single-stream block): its spec is the held block's, and the wrapper must forward the
    spec's arguments by the same names."""
    _BLOCK_WRAPPERS[wrapper_cls] = inner


def described_block(block: torch.nn.Module) -> torch.nn.Module:
    """The block a registered wrapper holds (HiDream-I1's ``HiDreamBlock.block``), else the block itself."""
    for cls in type(block).__mro__:
        if cls in _BLOCK_WRAPPERS:
            return described_block(getattr(block, _BLOCK_WRAPPERS[cls]))
    return block


def block_spec_for(block: torch.nn.Module) -> BlockSpec:
    for cls in type(block).__mro__:
        if cls in _BLOCK_WRAPPERS:
            return block_spec_for(getattr(block, _BLOCK_WRAPPERS[cls]))
        if cls in _BLOCK_SPECS:
            return _BLOCK_SPECS[cls]
    raise ValueError(
        f"Block class {type(block).__name__} has no BlockSpec; describe it with "
        f"diffaccel.pipelines.register_block_spec({type(block).__name__}, BlockSpec(...))."
    )


def register_adapter(denoiser_cls: type, adapter: FamilyAdapter) -> None:
    """Add (or replace) the adapter for a denoiser class, after checking it against the forward."""
    if not (isinstance(denoiser_cls, type) and issubclass(denoiser_cls, torch.nn.Module)):
        raise ValueError(f"register_adapter needs an nn.Module subclass, got {denoiser_cls!r}.")
    params = inspect.signature(inspect.unwrap(denoiser_cls.forward)).parameters
    for what, arg in (("timestep_arg", adapter.timestep_arg), ("hidden_arg", adapter.hidden_arg)):
        if arg not in params:
            raise ValueError(
                f"FamilyAdapter '{adapter.name}': {what}={arg!r} is not an argument of "
                f"{denoiser_cls.__name__}.forward {list(params)[1:]}."
            )
    _ADAPTERS[denoiser_cls] = adapter


def supported_denoisers() -> list[str]:
    return sorted(cls.__name__ for cls in _ADAPTERS)


def unwrap_denoiser(module: torch.nn.Module) -> torch.nn.Module:
    """The module under a ``torch.compile`` wrapper, if any."""
    return getattr(module, "_orig_mod", module)


# Denoiser class names examined and left unsupported -> the reason the error gives (families.py's rows).
_UNSUPPORTED: dict[str, str] = {}


def register_unsupported(denoiser_class_name: str, why: str) -> None:
    """Say why a denoiser class is not served: the unsupported-model error then gives the reason."""
    _UNSUPPORTED[denoiser_class_name] = why


def adapter_for(denoiser: torch.nn.Module) -> FamilyAdapter:
    """The adapter for a denoiser; a ``ValueError`` naming the class (and why, where it was examined and left out)
    and the supported ones otherwise."""
    for cls in type(unwrap_denoiser(denoiser)).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    name = type(unwrap_denoiser(denoiser)).__name__
    why = f" ({_UNSUPPORTED[name]})" if name in _UNSUPPORTED else ""
    raise ValueError(
        f"diffaccel does not support the denoiser class {type(denoiser).__name__}{why}. Supported: "
        f"{', '.join(supported_denoisers())}. For another model, describe it with "
        f"diffaccel.pipelines.register_adapter(YourModelClass, FamilyAdapter(...))."
    )
