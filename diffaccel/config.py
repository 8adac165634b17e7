"""Typed, validated, serialisable configs.

Every method has a ``MethodConfig`` subclass registered under a *slot* (``cache``, ``guidance``,
``sampling``, ``attention``) and a *name* (``"block"``). ``AccelConfig`` holds at most one method
per slot. Configs are never mutated by the code that applies them, and round-trip through
``to_dict`` / ``from_dict`` (and JSON / YAML files) with a format version.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

CONFIG_FORMAT_VERSION = 1

# Application order: "parallel" first, so its denoiser hook sits innermost (below guidance and caches,
# which then see whole CFG batches and decide the same on every rank).
SLOTS = ("parallel", "cache", "guidance", "sampling", "attention")

# (slot, name) -> config class; filled by @register_config.
_CONFIG_CLASSES: dict[tuple[str, str], type["MethodConfig"]] = {}


def register_config(cls: type["MethodConfig"]) -> type["MethodConfig"]:
    """Class decorator: make a method config selectable by ``slot=name`` and loadable from dicts."""
    if cls.slot not in SLOTS:
        raise ValueError(f"{cls.__name__}.slot must be one of {SLOTS}, got {cls.slot!r}")
    key = (cls.slot, cls.method)
    if key in _CONFIG_CLASSES and _CONFIG_CLASSES[key] is not cls:
        raise ValueError(f"A config for {cls.slot}={cls.method!r} is already registered: {_CONFIG_CLASSES[key].__name__}")
    _CONFIG_CLASSES[key] = cls
    return cls


def available_methods(slot: str) -> list[str]:
    """Names selectable in ``slot`` (e.g. ``available_methods("cache") == ["block"]``)."""
    return sorted(name for (s, name) in _CONFIG_CLASSES if s == slot)


def config_class(slot: str, name: str) -> type["MethodConfig"]:
    """The config class registered as ``slot=name``; a ``ValueError`` listing the choices otherwise."""
    if slot not in SLOTS:
        raise ValueError(f"Unknown config slot {slot!r}; the slots are {list(SLOTS)}.")
    try:
        return _CONFIG_CLASSES[(slot, name)]
    except KeyError:
        choices = available_methods(slot)
        listed = ", ".join(repr(c) for c in choices) if choices else "none yet in this version"
        raise ValueError(f"Unknown {slot} method {name!r}. Available {slot} methods: {listed}.") from None


# ---------------------------------------------------------------------------------------------
# Small validators used by every config's __post_init__: the message names the field and the fix.


def check_int(owner: str, name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an integer, got {value!r} ({type(value).__name__}).")
    _check_bounds(owner, name, value, minimum, maximum)


def check_float(
    owner: str, name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r} ({type(value).__name__}).")
    if value != value:  # NaN
        raise ValueError(f"{owner}.{name} must be a number, got NaN.")
    _check_bounds(owner, name, value, minimum, maximum)


def check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}.")


def _check_bounds(owner: str, name: str, value, minimum, maximum) -> None:
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value!r}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{owner}.{name} must be <= {maximum}, got {value!r}.")


# ---------------------------------------------------------------------------------------------


# Field metadata: leave the field out of ``to_dict`` while it holds its default.
OMIT_WHEN_DEFAULT = "diffaccel.omit_when_default"


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config.

    Subclasses set the class variables ``slot`` and ``method`` and validate their fields in
    ``__post_init__``. Frozen, so applying a config can never change it behind the user's back.
    """

    slot: ClassVar[str] = ""
    method: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        data = {"method": self.method, "version": self.version}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get(OMIT_WHEN_DEFAULT) and value == f.default:
                continue  # a field added later: configs written before it read and hash (farm job ids) the same
            data[f.name] = _plain(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        """Build from ``to_dict`` output. ``method`` selects the subclass when called on the base."""
        if not isinstance(data, dict):
            raise ValueError(f"A method config must be a mapping, got {type(data).__name__}.")
        data = dict(data)
        name = data.pop("method", None)
        version = data.pop("version", None)
        target = cls
        if cls.method == "":
            raise ValueError("MethodConfig.from_dict needs a concrete config class; use AccelConfig.from_dict.")
        if name is not None and name != cls.method:
            raise ValueError(f"{cls.__name__} describes method {cls.method!r}, but the data says method={name!r}.")
        if version is not None and version > cls.version:
            raise ValueError(
                f"{cls.__name__} data has version {version}, newer than this diffaccel understands "
                f"({cls.version}); upgrade diffaccel."
            )
        allowed = {f.name for f in fields(target)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(
                f"Unknown field(s) {unknown} for {target.__name__}; allowed fields: {sorted(allowed)}."
            )
        kwargs = {}
        for f in fields(target):
            if f.name in data:
                value = data[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        return target(**kwargs)

    def for_expert(self, name: str) -> "MethodConfig":
        """This config as it applies to an expert denoiser of the pipeline (``name``: its pipeline attribute,
        e.g. Wan 2.2's ``"transformer_2"``). Most methods apply alike to every denoiser; a method with
        per-expert settings returns them here."""
        return self

    def expert_names(self) -> tuple[str, ...]:
        """The experts this config has settings for; each must be one of the pipeline's (``accelerate`` checks)."""
        return ()

    def replace(self, **changes) -> "MethodConfig":
        """A copy with some fields changed (validated again)."""
        allowed = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValueError(f"Unknown field(s) {unknown} for {type(self).__name__}; allowed fields: {sorted(allowed)}.")
        return dataclasses.replace(self, **changes)


def _yaml_load(text: str) -> Any:
    """PyYAML's safe loader, but reading ``1e9`` / ``1.0e9`` as numbers (YAML 1.2), not strings."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"),
        list("-+0123456789."),
    )
    return yaml.load(text, Loader=Loader)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, MethodConfig):
        return value.to_dict()
    return value


def coerce_method(slot: str, value: Any) -> MethodConfig | None:
    """Turn what a user may pass for a slot (None, a name, a dict, a config) into a config."""
    if value is None:
        return None
    if isinstance(value, str):
        return config_class(slot, value)()
    if isinstance(value, dict):
        if "method" not in value:
            raise ValueError(
                f"The {slot} entry needs a 'method' key naming one of {available_methods(slot)}, got keys {sorted(value)}."
            )
        return config_class(slot, value["method"]).from_dict(value)
    if isinstance(value, MethodConfig):
        if value.slot != slot:
            raise ValueError(
                f"{type(value).__name__} is a {value.slot!r} config and cannot be passed as {slot}=; "
                f"use {value.slot}={type(value).__name__}(...)."
            )
        return value
    raise ValueError(
        f"{slot}= accepts a method name, a dict or a config object, got {type(value).__name__}."
    )


@dataclass(frozen=True)
class AccelConfig:
    """The full acceleration recipe: at most one method per slot. ``AccelConfig()`` changes nothing.

    ``optional`` names slots whose method is left out, with a warning that says why, on a pipeline it
    cannot apply to (a preset is a recipe for any pipeline, so presets mark all of theirs); a method in
    any other slot that cannot apply is an error. Replacing a slot (``with_methods``) makes it required.
    """

    cache: MethodConfig | None = None
    guidance: MethodConfig | None = None
    sampling: MethodConfig | None = None
    attention: MethodConfig | None = None
    parallel: MethodConfig | None = None
    optional: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for slot in SLOTS:
            object.__setattr__(self, slot, coerce_method(slot, getattr(self, slot)))
        if isinstance(self.optional, str) or not all(isinstance(s, str) for s in self.optional):
            raise ValueError(f"AccelConfig.optional must be a list of slot names, got {self.optional!r}.")
        unknown = sorted(set(self.optional) - set(SLOTS))
        if unknown:
            raise ValueError(f"AccelConfig.optional names unknown slot(s) {unknown}; the slots are {list(SLOTS)}.")
        object.__setattr__(self, "optional", tuple(s for s in SLOTS if s in self.optional))

    def methods(self) -> list[MethodConfig]:
        """The configured methods in application order (slot order)."""
        return [m for m in (getattr(self, s) for s in SLOTS) if m is not None]

    def with_methods(self, **slots: Any) -> "AccelConfig":
        """A copy in which the given slots are replaced (names, dicts or configs)."""
        unknown = sorted(set(slots) - set(SLOTS))
        if unknown:
            raise ValueError(f"Unknown config slot(s) {unknown}; the slots are {list(SLOTS)}.")
        optional = tuple(s for s in self.optional if s not in slots)
        return dataclasses.replace(self, optional=optional, **slots)

    def for_expert(self, name: str) -> "AccelConfig":
        """Every method as it applies to the expert denoiser ``name`` (``MethodConfig.for_expert``)."""
        return dataclasses.replace(self, **{slot: getattr(self, slot).for_expert(name)
                                            for slot in SLOTS if getattr(self, slot) is not None})

    def without(self, *slots: str) -> "AccelConfig":
        """A copy with these slots empty (how an optional method is left out)."""
        return dataclasses.replace(self, optional=tuple(s for s in self.optional if s not in slots),
                                   **{slot: None for slot in slots})

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": CONFIG_FORMAT_VERSION}
        for slot in SLOTS:
            method = getattr(self, slot)
            data[slot] = None if method is None else method.to_dict()
        if self.optional:  # absent when empty, so configs written before the field read and hash the same
            data["optional"] = list(self.optional)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AccelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"AccelConfig.from_dict expects a mapping, got {type(data).__name__}.")
        data = dict(data)
        version = data.pop("version", CONFIG_FORMAT_VERSION)
        if not isinstance(version, int) or version > CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"AccelConfig data has version {version!r}; this diffaccel reads versions <= {CONFIG_FORMAT_VERSION}."
            )
        unknown = sorted(set(data) - set(SLOTS) - {"optional"})
        if unknown:
            raise ValueError(f"Unknown AccelConfig field(s) {unknown}; allowed fields: {list(SLOTS)}, 'optional' "
                             f"and 'version'.")
        return cls(**{slot: data.get(slot) for slot in SLOTS}, optional=tuple(data.get("optional") or ()))

    @classmethod
    def from_file(cls, path: str | Path) -> "AccelConfig":
        """Load a config saved as ``.json``, ``.yaml`` or ``.yml``."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Config file {str(path)!r} does not exist.")
        text = path.read_text()
        suffix = path.suffix.lower()
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = _yaml_load(text)
        else:
            raise ValueError(f"Config file {str(path)!r}: unknown format {suffix!r}; use .json, .yaml or .yml.")
        return cls.from_dict(data)

    def to_file(self, path: str | Path) -> None:
        """Save as JSON or YAML, chosen by the file suffix."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        elif suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            raise ValueError(f"Config file {str(path)!r}: unknown format {suffix!r}; use .json, .yaml or .yml.")
