"""Procedural scenes: the training data of the reference models and the ground truth of the judge.

A scene is one or two simple shapes (shape, color, size, position) on a colored background; a clip
is one shape moving (direction, speed). Everything is drawn from a seed, nothing is downloaded,
and every caption can be parsed back into the attributes it states.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right", "top", "bottom")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "quickly")

RGB = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.72, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "purple": (0.58, 0.18, 0.80),
    "white": (0.96, 0.96, 0.96),
    "black": (0.05, 0.05, 0.05),
}
CENTERS = {"left": (0.25, 0.5), "center": (0.5, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
RADII = {"small": 0.10, "large": 0.18}  # half-extent as a fraction of the frame
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "center": "in the center",
    "top": "at the top",
    "bottom": "at the bottom",
}
PAIRED_POSITIONS = (("left", "right"), ("top", "bottom"))  # two shapes never overlap
TRAVEL = {"slowly": 0.25, "quickly": 0.5}  # distance covered over a clip, fraction of the frame
STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str
    position: str = "center"  # images; clips move through the center
    direction: str | None = None  # clips only
    speed: str | None = None


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    background: str
    jitter: tuple[float, ...] = field(default=(), compare=False)  # small random offsets, not in the caption

    @property
    def is_clip(self) -> bool:
        return self.objects[0].direction is not None


# ------------------------------------------------------------------------------------------ sampling


def sample_scene(rng: np.random.Generator, clip: bool = False) -> Scene:
    """A random scene (clip=True: one moving shape); colors of shapes differ from the background."""
    background = COLORS[rng.integers(len(COLORS))]
    others = [c for c in COLORS if c != background]
    if clip:
        objects = (
            Shape(
                shape=SHAPES[rng.integers(3)],
                color=others[rng.integers(len(others))],
                size=SIZES[rng.integers(2)],
                direction=DIRECTIONS[rng.integers(4)],
                speed=SPEEDS[rng.integers(2)],
            ),
        )
    elif rng.random() < 0.5:
        objects = (
            Shape(
                shape=SHAPES[rng.integers(3)],
                color=others[rng.integers(len(others))],
                size=SIZES[rng.integers(2)],
                position=POSITIONS[rng.integers(len(POSITIONS))],
            ),
        )
    else:
        pair = PAIRED_POSITIONS[rng.integers(len(PAIRED_POSITIONS))]
        objects = tuple(
            Shape(
                shape=SHAPES[rng.integers(3)],
                color=others[rng.integers(len(others))],
                size=SIZES[rng.integers(2)],
                position=position,
            )
            for position in pair
        )
    jitter = tuple(float(v) for v in rng.uniform(-1.0, 1.0, size=4 * len(objects)))
    return Scene(objects=objects, background=background, jitter=jitter)


# ------------------------------------------------------------------------------------------ captions


def describe(obj: Shape) -> str:
    words = f"a {obj.size} {obj.color} {obj.shape}"
    if obj.direction is not None:
        return f"{words} moving {obj.direction} {obj.speed}"
    return f"{words} {POSITION_PHRASES[obj.position]}"


def caption(scene: Scene) -> str:
    """'a large red circle on the left, on a blue background'."""
    return " and ".join(describe(o) for o in scene.objects) + f", on a {scene.background} background"


_OBJECT = re.compile(
    r"an? (?P<size>small|large) (?P<color>\w+) (?P<shape>circle|square|triangle)"
    r"(?: (?P<where>on the left|on the right|in the center|at the top|at the bottom))?"
    r"(?: moving (?P<direction>left|right|up|down)(?: (?P<speed>slowly|quickly))?)?"
)
_BACKGROUND = re.compile(r"on an? (\w+) background")
_PHRASE_TO_POSITION = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}


def parse_caption(text: str) -> Scene:
    """The attributes a caption states (the inverse of ``caption``); ValueError if it states none."""
    text = text.lower().strip()
    background_match = _BACKGROUND.search(text)
    body = text[: background_match.start()] if background_match else text
    objects = []
    for m in _OBJECT.finditer(body):
        if m["color"] not in COLORS:
            continue
        objects.append(
            Shape(
                shape=m["shape"],
                color=m["color"],
                size=m["size"],
                position=_PHRASE_TO_POSITION.get(m["where"] or "", "center"),
                direction=m["direction"],
                speed=m["speed"] or ("slowly" if m["direction"] else None),
            )
        )
    if not objects:
        raise ValueError(f"No shape description found in caption {text!r}.")
    background = background_match.group(1) if background_match and background_match.group(1) in COLORS else None
    return Scene(objects=tuple(objects), background=background or "")


# ------------------------------------------------------------------------------------------ drawing


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        side = r * 0.886  # same area as the circle
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    # upward equilateral triangle inscribed in a circle of radius 1.2 r
    R = r * 1.2
    top_y, base_y = cy - R, cy + R / 2
    half_base = R * np.sqrt(3) / 2
    inside_base = ys <= base_y
    frac = (ys - top_y) / (base_y - top_y)
    return inside_base & (ys >= top_y) & (np.abs(dx) <= frac * half_base)


def _draw(scene: Scene, resolution: int, centers: list[tuple[float, float]], supersample: int = 2) -> np.ndarray:
    n = resolution * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    xs, ys = np.meshgrid(coords, coords)
    image = np.empty((n, n, 3), dtype=np.float32)
    image[:] = RGB[scene.background]
    for obj, (cx, cy), k in zip(scene.objects, centers, range(len(scene.objects))):
        scale = 1.0 + 0.08 * (scene.jitter[4 * k + 2] if scene.jitter else 0.0)
        mask = _shape_mask(obj.shape, xs, ys, cx, cy, RADII[obj.size] * scale)
        image[mask] = RGB[obj.color]
    return image.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))


def _jittered_center(scene: Scene, k: int, base: tuple[float, float]) -> tuple[float, float]:
    jx, jy = (scene.jitter[4 * k], scene.jitter[4 * k + 1]) if scene.jitter else (0.0, 0.0)
    return base[0] + 0.04 * jx, base[1] + 0.04 * jy


def render_image(scene: Scene, resolution: int = 64) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    centers = [_jittered_center(scene, k, CENTERS[o.position]) for k, o in enumerate(scene.objects)]
    return _draw(scene, resolution, centers)


def render_clip(scene: Scene, resolution: int = 64, frames: int = 9) -> np.ndarray:
    """(F, H, W, 3) float32 in [0, 1]: the shape travels through the center along its direction."""
    out = np.empty((frames, resolution, resolution, 3), dtype=np.float32)
    for f in range(frames):
        progress = f / max(frames - 1, 1) - 0.5  # -0.5 .. 0.5
        centers = []
        for k, obj in enumerate(scene.objects):
            sx, sy = STEP[obj.direction]
            travel = TRAVEL[obj.speed]
            base = (0.5 + sx * travel * progress, 0.5 + sy * travel * progress)
            centers.append(_jittered_center(scene, k, base))
        out[f] = _draw(scene, resolution, centers)
    return out


# ------------------------------------------------------------------------------------------ batches


def sample_batch(
    rng: np.random.Generator, n: int, resolution: int = 64, clip: bool = False, frames: int = 9
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n rendered scenes: pixels in [0, 1] ((n, H, W, 3) or (n, F, H, W, 3)), captions, scenes."""
    scenes = [sample_scene(rng, clip=clip) for _ in range(n)]
    if clip:
        pixels = np.stack([render_clip(s, resolution, frames) for s in scenes])
    else:
        pixels = np.stack([render_image(s, resolution) for s in scenes])
    return pixels, [caption(s) for s in scenes], scenes


def prompt_scenes(num: int = 200, seed: int = 1234, clip: bool = False) -> list[Scene]:
    """The scenes behind ``prompt_set``: rendering them gives the ground truth of each evaluation prompt."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, clip=clip) for _ in range(num)]


def prompt_set(num: int = 200, seed: int = 1234, clip: bool = False) -> list[str]:
    """A fixed evaluation prompt set (different seed stream from training)."""
    return [caption(scene) for scene in prompt_scenes(num, seed, clip)]


def vocabulary() -> list[str]:
    """Every word a caption can contain."""
    words = {"a", "an", "and", "on", "the", "in", "at", "moving", "background", ","}
    words.update(SHAPES, COLORS, SIZES, DIRECTIONS, SPEEDS)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)
