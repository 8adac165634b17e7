"""Configs: presets, validation errors that name the field, serialisation round trips."""

import json

import pytest

import diffaccel
from diffaccel import AccelConfig, BlockCacheConfig
from diffaccel.config import available_methods


def test_presets_resolve_and_grow_from_off():
    assert set(diffaccel.PRESETS) >= {"off", "safe", "fast", "turbo"}
    assert diffaccel.preset("off").methods() == []
    for name in ("safe", "fast", "turbo"):
        assert diffaccel.preset(name).methods(), name


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"Unknown preset 'warp'.*'off'.*'fast'"):
        diffaccel.resolve_config("warp")


def test_unknown_method_name_lists_the_methods():
    with pytest.raises(ValueError, match=r"Unknown cache method 'magic'.*'block'"):
        diffaccel.resolve_config(cache="magic")
    with pytest.raises(ValueError, match=r"Unknown guidance method 'magic'. Available guidance methods: 'adaptive', 'interval', 'linear'"):
        diffaccel.resolve_config(guidance="magic")
    assert "block" in available_methods("cache")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("threshold", -0.1, r"BlockCacheConfig.threshold must be >= 0"),
        ("threshold", "high", r"BlockCacheConfig.threshold must be a number"),
        ("compute_first_blocks", 0, r"BlockCacheConfig.compute_first_blocks must be >= 1"),
        ("compute_last_blocks", -1, r"BlockCacheConfig.compute_last_blocks must be >= 0"),
        ("warmup_steps", 1.5, r"BlockCacheConfig.warmup_steps must be an integer"),
        ("max_consecutive", 0, r"BlockCacheConfig.max_consecutive must be >= 1"),
    ],
)
def test_out_of_range_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        BlockCacheConfig(**{field: value})


def test_unknown_fields_are_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"Unknown field\(s\) \['thresold'\].*threshold"):
        BlockCacheConfig.from_dict({"method": "block", "thresold": 0.1})
    with pytest.raises(ValueError, match=r"Unknown AccelConfig field\(s\) \['cahce'\]"):
        AccelConfig.from_dict({"cahce": None})
    with pytest.raises(ValueError, match=r"Unknown field\(s\) \['speed'\]"):
        BlockCacheConfig().replace(speed=2)


def test_config_in_the_wrong_slot_is_refused():
    with pytest.raises(ValueError, match=r"BlockCacheConfig is a 'cache' config and cannot be passed as guidance="):
        AccelConfig(guidance=BlockCacheConfig())


def test_newer_format_version_is_refused():
    with pytest.raises(ValueError, match="version"):
        AccelConfig.from_dict({"version": 99})


def test_dict_json_yaml_round_trip(tmp_path):
    config = AccelConfig(cache=BlockCacheConfig(threshold=0.1, compute_last_blocks=1, max_consecutive=None))
    assert AccelConfig.from_dict(config.to_dict()) == config
    assert AccelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for suffix in (".json", ".yaml"):
        path = tmp_path / f"cfg{suffix}"
        config.to_file(path)
        assert AccelConfig.from_file(path) == config
        assert diffaccel.resolve_config(str(path)) == config
    with pytest.raises(ValueError, match="unknown format '.toml'"):
        config.to_file(tmp_path / "cfg.toml")
    with pytest.raises(ValueError, match="does not exist"):
        AccelConfig.from_file(tmp_path / "missing.json")


def test_keyword_slots_override_a_preset():
    config = diffaccel.resolve_config("fast", cache=BlockCacheConfig(threshold=0.3))
    assert config.cache.threshold == 0.3
    assert diffaccel.resolve_config(cache="block").cache == BlockCacheConfig()
    assert diffaccel.resolve_config({"cache": {"method": "block", "threshold": 0.2}}).cache.threshold == 0.2


def test_configs_are_frozen():
    config = BlockCacheConfig()
    with pytest.raises(Exception):
        config.threshold = 1.0


def test_yaml_reads_exponent_numbers(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("cache:\n  method: block\n  threshold: 1e9\n  warmup_steps: 1\n")
    assert AccelConfig.from_file(path).cache.threshold == 1e9
