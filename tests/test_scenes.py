"""Procedural scenes: seeded, captions state every attribute and parse back."""

import numpy as np
import pytest

from diffaccel.pipelines.reference import scenes


def test_sampling_and_rendering_are_seeded():
    a, captions_a, _ = scenes.sample_batch(np.random.default_rng(3), 6, 64)
    b, captions_b, _ = scenes.sample_batch(np.random.default_rng(3), 6, 64)
    assert np.array_equal(a, b) and captions_a == captions_b
    assert a.shape == (6, 64, 64, 3) and a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("clip", [False, True])
def test_captions_parse_back_to_their_scene(clip):
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = scenes.sample_scene(rng, clip=clip)
        parsed = scenes.parse_caption(scenes.caption(scene))
        assert parsed.objects == scene.objects and parsed.background == scene.background
        assert all(o.color != scene.background for o in scene.objects)
        assert set(scenes.caption(scene).replace(",", " , ").split()) <= set(scenes.vocabulary())


def test_the_attribute_space_is_covered():
    rng = np.random.default_rng(1)
    seen = {"shape": set(), "color": set(), "position": set(), "background": set(), "direction": set(), "count": set()}
    for _ in range(2000):
        scene = scenes.sample_scene(rng)
        seen["background"].add(scene.background)
        seen["count"].add(len(scene.objects))
        for o in scene.objects:
            seen["shape"].add(o.shape), seen["color"].add(o.color), seen["position"].add(o.position)
        seen["direction"].add(scenes.sample_scene(rng, clip=True).objects[0].direction)
    assert seen["shape"] == set(scenes.SHAPES) and seen["color"] == set(scenes.COLORS)
    assert seen["background"] == set(scenes.COLORS) and seen["position"] == set(scenes.POSITIONS)
    assert seen["direction"] == set(scenes.DIRECTIONS) and seen["count"] == {1, 2}


def test_clips_move_in_the_stated_direction():
    scene = scenes.Scene(objects=(scenes.Shape("square", "red", "large", direction="right", speed="quickly"),), background="black")
    clip = scenes.render_clip(scene, 64, 9)
    red = clip[..., 0] - clip[..., 1]
    columns = [np.nonzero(red[f].max(axis=0) > 0.5)[0].mean() for f in (0, 8)]
    assert columns[1] - columns[0] > 20  # half the frame: 32 px at 64 px


def test_prompt_set_is_fixed_and_parse_rejects_nonsense():
    assert scenes.prompt_set(5) == scenes.prompt_set(5)
    assert scenes.prompt_set(5) != scenes.prompt_set(5, clip=True)
    with pytest.raises(ValueError, match="No shape description"):
        scenes.parse_caption("a photo of a cat")
