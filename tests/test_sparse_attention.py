"""Block-sparse and sliding-tile attention installed on real diffusers video (and image) transformers."""

import logging

import numpy as np
import pytest
import torch
from tiny_pipelines import build, run

import diffaccel
from diffaccel import AccelConfig, BlockCacheConfig, BlockSparseAttentionConfig, SlidingTileAttentionConfig
from diffaccel.api import runtime_of
from diffaccel.attention import TokenLayout, attention_density, default_tile, sliding_tile_mask
from diffaccel.attention.masks import adaptive_block_mask, block_scores
from diffaccel.attention.sparse import SELF_ATTENTION_NAMES, self_attention_modules
from diffaccel.pipelines.adapters import adapter_for
from diffaccel.registry import AccelTarget

# Tiny pipelines at a size where self-attention spans several 16-token blocks.
SIZES = {"wan": dict(height=128, width=128), "cogvideox": dict(height=128, width=128), "hunyuan_video": {}, "ltx": {},
         "ltx2": dict(height=64, width=64, num_frames=9)}
KEEP_ALL = dict(block_size=16, min_density=1.0, max_density=1.0, dense_steps=0, dense_blocks=())


@pytest.fixture(scope="module", params=sorted(SIZES))
def video_case(request):
    case = build(request.param)
    return case, SIZES[request.param], run(case, **SIZES[request.param])


def _accelerated(case, kwargs, config):
    diffaccel.accelerate(case.pipe, attention=config)
    try:
        out = run(case, **kwargs)
        stats = diffaccel.stats(case.pipe)
    finally:
        diffaccel.remove(case.pipe)
    return out, stats


def test_keeping_every_block_reproduces_dense_attention(video_case):
    """Reordering, gathering and the kernel are exact: all blocks kept = the dense output."""
    case, kwargs, baseline = video_case
    out, stats = _accelerated(case, kwargs, BlockSparseAttentionConfig(**KEEP_ALL))
    assert stats["attention_sparse_calls"] > 0 and stats["attention_kernel_torch"] > 0
    np.testing.assert_allclose(out, baseline, atol=2e-4)


def test_sparse_masks_compute_fewer_blocks_and_stay_close(video_case):
    case, kwargs, baseline = video_case
    for config in (
        BlockSparseAttentionConfig(block_size=16, keep="topk", ratio_or_threshold=0.3, max_density=0.3, dense_steps=0, dense_blocks=()),
        SlidingTileAttentionConfig(block_size=16, tile_window=(1, 1, 1), dense_steps=0, dense_blocks=()),
    ):
        out, stats = _accelerated(case, kwargs, config)
        assert stats["attention_sparse_calls"] > 0
        assert attention_density(stats) < 0.95, stats  # text blocks stay dense, the rest is thinned
        assert not np.array_equal(out, baseline)
        assert np.abs(out - baseline).mean() < 0.1


def test_remove_restores_bit_identical_output(video_case):
    case, kwargs, baseline = video_case
    _accelerated(case, kwargs, BlockSparseAttentionConfig(block_size=16, dense_steps=0))
    np.testing.assert_array_equal(run(case, **kwargs), baseline)
    assert not any("sparse_attention" in str(getattr(m, "_diffusers_hook", "")) for m in case.denoiser.modules())


@pytest.fixture(scope="module")
def wan_case():
    case = build("wan")
    return case, SIZES["wan"], run(case, **SIZES["wan"])


def test_dense_steps_and_blocks_follow_the_config(wan_case):
    case, kwargs, _ = wan_case
    steps, blocks, branches = kwargs_steps(case), len(case.denoiser.blocks), 2
    config = BlockSparseAttentionConfig(block_size=16, dense_steps=1, dense_last_steps=1, dense_blocks=(0,))
    _, stats = _accelerated(case, kwargs, config)
    sparse_steps = steps - 2
    assert stats["attention_sparse_calls"] == sparse_steps * (blocks - 1) * branches
    assert stats["attention_dense_calls"] == (steps * blocks - sparse_steps * (blocks - 1)) * branches
    # A fraction of the steps: 0.5 of 4 steps keeps the first two dense.
    _, stats = _accelerated(case, kwargs, BlockSparseAttentionConfig(block_size=16, dense_steps=0.5, dense_blocks=()))
    assert stats["attention_sparse_calls"] == 2 * blocks * branches


def kwargs_steps(case) -> int:
    return case.call_kwargs["num_inference_steps"]


def test_composes_with_the_block_cache(wan_case):
    case, kwargs, baseline = wan_case
    config = AccelConfig(
        cache=BlockCacheConfig(threshold=0.5, warmup_steps=1),
        attention=BlockSparseAttentionConfig(block_size=16, dense_steps=0),
    )
    diffaccel.accelerate(case.pipe, config)
    try:
        out = run(case, **kwargs)
        stats = diffaccel.stats(case.pipe)
    finally:
        diffaccel.remove(case.pipe)
    assert stats["attention_sparse_calls"] > 0
    assert stats["blocks_skipped"] > 0
    # Skipped blocks run no attention at all.
    assert stats["attention_sparse_calls"] + stats.get("attention_dense_calls", 0) < kwargs_steps(case) * 3 * 2
    assert np.isfinite(out).all()


def test_short_sequences_run_dense_and_say_so(wan_case, caplog):
    case, kwargs, baseline = wan_case
    with caplog.at_level(logging.WARNING, logger="diffaccel"):
        out, stats = _accelerated(case, kwargs, BlockSparseAttentionConfig(dense_steps=0))  # 128-token blocks
    assert stats["attention_dense_short"] > 0 and "attention_sparse_calls" not in stats
    assert "runs dense" in caplog.text
    np.testing.assert_array_equal(out, baseline)


def test_named_selection_and_round_trip():
    config = diffaccel.resolve_config(None, attention="block_sparse")
    assert isinstance(config.attention, BlockSparseAttentionConfig)
    assert isinstance(diffaccel.resolve_config(None, attention="sliding_tile").attention, SlidingTileAttentionConfig)
    custom = AccelConfig(attention=SlidingTileAttentionConfig(tile=(1, 4, 4), tile_window=(3, 1, 1), dense_steps=3))
    assert AccelConfig.from_dict(custom.to_dict()) == custom


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=100), "power of two"),
        (dict(block_size=8), ">= 16"),
        (dict(dense_steps=1.5), "fraction"),
        (dict(keep="random"), "keep"),
        (dict(min_density=0.5, max_density=0.2), "exceeds"),
        (dict(ratio_or_threshold=0.0), "ratio_or_threshold"),
        (dict(implementation="cuda"), "implementation"),
        (dict(reorder="hilbert"), "reorder"),
        (dict(tile=(0, 4, 4)), "tile"),
    ],
)
def test_bad_config_values_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseAttentionConfig(**kwargs)


def test_even_tile_window_is_an_error():
    with pytest.raises(ValueError, match="odd"):
        SlidingTileAttentionConfig(tile_window=(2, 3, 3))


def test_models_it_cannot_serve_get_clear_errors(wan_case):
    unet = build("sd15")
    with pytest.raises(ValueError, match="UNet"):
        diffaccel.accelerate(unet.pipe, attention="block_sparse")
    case, _, _ = wan_case
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        diffaccel.accelerate(case.pipe, attention=BlockSparseAttentionConfig(implementation="triton"))
    with pytest.raises(ValueError, match="out of range"):
        diffaccel.accelerate(case.pipe, attention=BlockSparseAttentionConfig(dense_blocks=(7,)))
    processor = case.denoiser.blocks[0].attn1.processor
    processor._attention_backend = "flash"
    try:
        with pytest.raises(ValueError, match="attention backend 'flash'"):
            diffaccel.accelerate(case.pipe, attention="block_sparse")
    finally:
        processor._attention_backend = None
    assert not hasattr(case.pipe, "_diffaccel_runtime") or case.pipe._diffaccel_runtime is None


def test_processor_without_sdpa_is_reported():
    """Sana's linear attention never calls SDPA: block-sparse attention cannot apply, and says so when
    accelerated; a processor it does not know by name that bypasses SDPA is reported at the first call."""
    config = BlockSparseAttentionConfig(block_size=16, dense_steps=0, dense_blocks=())
    case = build("sana")
    with pytest.raises(ValueError, match="linear attention .*SanaLinearAttnProcessor2_0"):
        diffaccel.accelerate(case.pipe, attention=config)
    linear = type(case.denoiser.transformer_blocks[0].attn1.processor)
    custom = type("CustomProcessor", (linear,), {})  # the same computation under a name that says nothing
    for block in case.denoiser.transformer_blocks:
        block.attn1.processor = custom()
    diffaccel.accelerate(case.pipe, attention=config)
    try:
        with pytest.raises(RuntimeError, match="without it"):
            run(case)
    finally:
        diffaccel.remove(case.pipe)


# ------------------------------------------------------------------------------ masks and layout


def test_tile_major_order_makes_each_block_one_tile():
    layout = TokenLayout(grid=(4, 16, 16), tile=(2, 8, 8))
    perm = layout.permutation(torch.device("cpu"))
    assert sorted(perm.tolist()) == list(range(4 * 16 * 16))
    coords = torch.stack(torch.unravel_index(perm, (4, 16, 16)), -1).reshape(-1, 128, 3)
    spans = coords.amax(1) - coords.amin(1)
    assert (spans == torch.tensor([1, 7, 7])).all()  # every 128-token block is one 2x8x8 tile
    assert default_tile(128, 3) == (2, 8, 8) and default_tile(64, 2) == (8, 8)


def test_text_stays_in_place_and_marks_its_blocks():
    layout = TokenLayout(grid=(2, 4, 4), text_tokens=10, text_position="prefix", tile=(1, 2, 2))
    perm = layout.permutation(torch.device("cpu"))
    assert perm[:10].tolist() == list(range(10))
    assert layout.text_blocks(16).tolist() == [True, False, False]
    suffix = TokenLayout(grid=(2, 4, 4), text_tokens=10, text_position="suffix", tile=(1, 2, 2))
    assert suffix.permutation(torch.device("cpu"))[32:].tolist() == list(range(32, 42))
    assert suffix.text_blocks(16).tolist() == [False, False, True]


def test_sliding_tile_windows_are_clamped_at_borders():
    layout = TokenLayout(grid=(4, 8, 8), tile=(1, 4, 4))  # 4x2x2 tiles of 16 tokens
    mask = sliding_tile_mask(layout.block_tile_coords(16), layout.tiles_per_axis(), (3, 1, 1))
    assert mask.shape == (16, 16)
    assert (mask.sum(-1) == 3).all()  # every query tile sees 3 tiles, also at the first and last frame
    assert mask.diagonal().all()


def test_adaptive_mask_follows_the_attention_mass():
    """Queries that match one key block get that block; mass mode keeps more when mass is spread."""
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 64, 16)
    queries = keys.clone() * 4  # each query block looks like its own key block
    mask = adaptive_block_mask(queries, keys, 16, "topk", 0.25)
    assert mask.sum(-1).eq(1).all() and mask[0, 0].diagonal().all()
    flat = adaptive_block_mask(torch.zeros(1, 1, 64, 16), keys, 16, "mass", 0.9)
    assert flat.sum(-1).eq(4).all()  # uniform scores: 90% of the mass needs all four blocks
    clamped = adaptive_block_mask(torch.zeros(1, 1, 64, 16), keys, 16, "mass", 0.9, max_density=0.5)
    assert clamped.sum(-1).eq(2).all()
    torch.testing.assert_close(block_scores(queries, keys, 16).sum(-1), torch.ones(1, 1, 4))


def test_doubled_batch_groups_average_scores_into_one_mask():
    torch.manual_seed(1)
    q, k = torch.randn(4, 2, 96, 8), torch.randn(4, 2, 96, 8)
    mask = adaptive_block_mask(q, k, 16, "topk", 0.5, groups=2)
    assert mask.shape == (4, 2, 6, 6)
    assert torch.equal(mask[:2], mask[2:])
    # The shared mask keeps the top blocks of the branches' mean scores.
    mean_scores = block_scores(q, k, 16).unflatten(0, (2, -1)).mean(0)
    top = mean_scores.topk(3, -1).indices
    assert mask[:2].gather(-1, top).all()
    with pytest.raises(ValueError, match="stacked groups"):
        adaptive_block_mask(q[:3], k[:3], 16, "topk", 0.5, groups=2)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])  # per-branch calls, doubled batch
def test_cfg_branches_share_one_mask_per_step(family, monkeypatch):
    """With share_cfg_mask both CFG branches attend through the same blocks at every step and call."""
    import diffaccel.attention.sparse as sparse

    case = build(family)
    seen = []
    original = sparse.block_sparse_attention

    def recording(q, k, v, mask, *args, **kwargs):
        ctx = runtime_of(case.pipe).clock.current
        seen.append((ctx.step_index, ctx.branch, mask.expand(q.shape[0], q.shape[1], -1, -1).clone()))
        return original(q, k, v, mask, *args, **kwargs)

    monkeypatch.setattr(sparse, "block_sparse_attention", recording)
    config = dict(block_size=16, keep="topk", ratio_or_threshold=0.3, max_density=0.3, dense_steps=0, dense_blocks=())
    _, stats = _accelerated(case, SIZES[family], BlockSparseAttentionConfig(**config))
    assert stats["attention_masks_shared"] > 0
    if family == "wan":
        by_step = {}
        for step, branch, mask in seen:
            by_step.setdefault((step, branch), []).append(mask)
        for (step, branch), masks in by_step.items():
            if branch == "uncond":
                assert all(torch.equal(a, b) for a, b in zip(masks, by_step[(step, "cond")]))
        assert stats["attention_masks_shared"] == stats["attention_sparse_calls"] // 2
    else:
        for _, branch, mask in seen:
            assert branch == "cond_uncond" and torch.equal(mask[: len(mask) // 2], mask[len(mask) // 2 :])
    seen.clear()
    _, stats = _accelerated(case, SIZES[family], BlockSparseAttentionConfig(**config, share_cfg_mask=False))
    assert "attention_masks_shared" not in stats and seen


@pytest.mark.parametrize("family", ["flux2_klein", "lumina2"])  # [text, image] joined: FLUX.2 blocks, Lumina 2's layers
def test_image_families_with_joined_text_run_sparse(family):
    case = build(family)
    size = dict(height=128, width=128)
    baseline = run(case, **size)
    out, stats = _accelerated(case, size, BlockSparseAttentionConfig(**KEEP_ALL))
    assert stats["attention_sparse_calls"] > 0
    np.testing.assert_allclose(out, baseline, atol=2e-4)
    out, stats = _accelerated(case, size, BlockSparseAttentionConfig(block_size=16, keep="topk", ratio_or_threshold=0.3,
                                                                     max_density=0.3, dense_steps=0, dense_blocks=()))
    assert attention_density(stats) < 0.95, stats
    assert np.isfinite(out).all() and not np.array_equal(out, baseline)


def test_a_text_mask_inside_the_sequence_runs_dense_and_says_so(caplog):
    """Chroma masks its text padding, which sits before the image tokens: not key padding at the end, so
    every call runs dense, logged and counted, never silently."""
    case = build("chroma")
    size = dict(height=128, width=128)
    baseline = run(case, **size)
    with caplog.at_level(logging.INFO, logger="diffaccel"):
        out, stats = _accelerated(case, size, BlockSparseAttentionConfig(block_size=16))
    assert stats.get("attention_sparse_calls", 0) == 0 and stats["attention_dense_masked"] > 0
    assert any("attention mask other than key padding" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(out, baseline)


def test_a_kv_cache_of_the_text_runs_dense_and_says_so(caplog):
    """Qwen-Image 2.1 keeps the text's keys and values from its first step: later steps' image queries attend to
    more keys than themselves, which has no square block layout. Those calls run dense, logged and counted,
    never silently."""
    case = build("qwenimage21")
    size = dict(height=128, width=128)
    baseline = run(case, **size)
    with caplog.at_level(logging.INFO, logger="diffaccel"):
        out, stats = _accelerated(case, size, BlockSparseAttentionConfig(block_size=16, dense_steps=0))
    assert stats["attention_dense_kv_cache"] > 0 and stats.get("attention_sparse_calls", 0) == 0, stats
    assert any("(a KV cache of the text)" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(out, baseline)
    # The KV-cache wording is for the cached steps only: the first step projects the text's keys itself (its image
    # queries attend to the [text, image] keys it is caching), which is text as extra keys.
    blocks, branches = len(case.denoiser.transformer_blocks) - 1, 2  # block 0 stays dense (dense_blocks=(0,))
    assert stats["attention_dense_kv_cache"] == (kwargs_steps(case) - 1) * blocks * branches, stats
    assert stats["attention_dense_extra_keys"] == blocks * branches, stats


@pytest.mark.parametrize("name", ["nucleusmoe_image", "prx"])
def test_text_as_extra_keys_runs_dense_and_says_so(name, caplog):
    """NucleusMoE-Image's and PRX's blocks carry the image tokens only; each block projects the text to extra keys and
    values at every call (image queries over [image, text] / [text, image] keys, no KV cache). No square block
    layout: every call runs dense, logged as text as extra keys (not as a KV cache) and counted. PRX's self-attention
    is its blocks' ``attention``."""
    case = build(name)
    size = dict(height=128, width=128)
    baseline = run(case, **size)
    with caplog.at_level(logging.INFO, logger="diffaccel"):
        out, stats = _accelerated(case, size, BlockSparseAttentionConfig(**KEEP_ALL))
    assert stats["attention_dense_extra_keys"] > 0 and stats.get("attention_sparse_calls", 0) == 0, stats
    assert "attention_dense_kv_cache" not in stats, stats
    messages = [r.getMessage() for r in caplog.records]
    assert any("(text as extra keys:" in m and "not a KV cache" in m for m in messages), messages
    assert not any("(a KV cache of the text)" in m for m in messages), messages
    np.testing.assert_array_equal(out, baseline)


@pytest.mark.parametrize(
    "name, size",
    [("hidream_image", 256), ("kandinsky5", 128), ("latte", 128), ("bria_fibo2", 128), ("kandinsky6", 128)],
)
def test_attention_found_where_a_family_keeps_it_reproduces_dense_with_every_block_kept(name, size):
    """HiDream-I1's block lists hold HiDreamBlock wrappers, whose held block has the attn1 ([image, text] joined
    as a suffix); Kandinsky 5's visual blocks name theirs ``self_attention``; Latte's spatial blocks attend
    within each frame (the frame's grid); Bria FIBO 2's layers name theirs ``attention`` ([gist, image], the gist
    a prefix); Kandinsky 6's fused blocks keep the video stream's at ``video_dec_block.self_attention``. Keeping
    every block, the sparse calls reproduce dense attention."""
    case = build(name)
    size = dict(height=size, width=size)
    baseline = run(case, **size)
    out, stats = _accelerated(case, size, BlockSparseAttentionConfig(**KEEP_ALL))
    assert stats["attention_sparse_calls"] > 0 and stats["attention_blocks_kept"] == stats["attention_blocks_total"]
    np.testing.assert_allclose(out, baseline, atol=2e-4)


def test_a_model_running_its_own_sparse_attention_is_refused_by_name():
    """Kandinsky 5 configured with its NABLA attention (flex attention over fractal-ordered tokens)."""
    case = build("kandinsky5")
    case.denoiser.attention_type = "nabla"
    with pytest.raises(ValueError, match="attention_type='nabla', its own block-sparse attention"):
        diffaccel.accelerate(case.pipe, attention="block_sparse")


@pytest.mark.parametrize("name, size", [("bria_fibo2", 384), ("kandinsky6", 256)])
def test_default_config_runs_block_sparse_where_newly_found(name, size):
    """With the defaults (128-token blocks, the first quarter of the steps and block 0 dense) Bria FIBO 2's and
    Kandinsky 6's self-attention runs block-sparse once the sequence spans several blocks."""
    case = build(name)
    size = dict(height=size, width=size)
    baseline = run(case, **size)
    out, stats = _accelerated(case, size, BlockSparseAttentionConfig())
    assert stats["attention_sparse_calls"] > 0 and stats["attention_dense_calls"] > 0, stats
    assert attention_density(stats) < 1.0, stats
    assert np.isfinite(out).all() and np.abs(out - baseline).mean() < 0.05


# Where each block's self-attention is, for the families whose blocks name it other than attn1 / attn.
EXPECTED_SELF_ATTENTION = {"kandinsky5": "self_attention", "ernie_image": "self_attention", "bria_fibo2": "attention",
                           "prx": "attention", "prx_pixel": "attention", "z_image": "attention", "ideogram4": "attention",
                           "kandinsky6": "video_dec_block.self_attention", "kandinsky6_sr": "self_attention"}


def test_self_attention_lookup_never_takes_a_cross_attention():
    """Every transformer family's blocks get one self-attention each, never a cross-attention (Bria FIBO 2's
    injection layers also hold a ``cross_attention``; Kandinsky 6's fused blocks hold the audio stream's and two
    cross-modal ones); Cosmos 3, whose layers hold no square self-attention, gets none (refused by name)."""
    from tiny_pipelines import FAMILIES

    for name in sorted(FAMILIES):
        case = build(name)
        adapter = adapter_for(case.denoiser)
        if not adapter.block_cache:  # UNets
            continue
        target = AccelTarget(pipe=case.pipe, denoiser=case.denoiser, adapter=adapter)
        found = self_attention_modules(target)
        if name in ("cosmos3_omni", "wan_animate_2"):  # refused by name: no square self-attention
            assert found == [], found
            continue
        assert [index for index, _, _ in found] == list(range(len(target.blocks))), (name, found)
        for _, qualified, module in found:
            path = max((n for n in SELF_ATTENTION_NAMES if qualified.endswith("." + n)), key=len)
            assert path == EXPECTED_SELF_ATTENTION.get(name, path) and path in SELF_ATTENTION_NAMES, (name, qualified)
            assert "cross" not in path and path != "attn2", (name, qualified)
            if name not in EXPECTED_SELF_ATTENTION:
                assert path in ("attn1", "attn"), (name, qualified)
            block = target.blocks[[q for _, q, _ in found].index(qualified)].module
            crosses = [m for n, m in block.named_modules() if "cross" in n or n.endswith("attn2")]
            assert all(module is not m for m in crosses), (name, qualified)


def test_z_image_attention_is_found_and_reproduces_dense():
    """Z-Image's layers name their self-attention ``attention`` (one joint [image, caption] stream, the image's
    token grid its latent grid over the patch size, ``all_patch_size``): keeping every block, the calls run sparse
    and the output equals the dense one."""
    case = build("z_image")
    size = dict(height=128, width=128)
    baseline = run(case, **size)
    out, stats = _accelerated(case, size, BlockSparseAttentionConfig(**KEEP_ALL))
    assert stats.get("attention_sparse_calls", 0) > 0 and not stats.get("attention_dense_layout"), stats
    np.testing.assert_allclose(out, baseline, atol=2e-4)


def test_a_model_without_a_square_self_attention_is_refused_by_name():
    """Cosmos 3's decoder layers attend through one packed MoT attention: a causal text pathway and vision queries
    over [text, vision] keys of one sequence without a batch axis. No call is a square self-attention of the grid."""
    case = build("cosmos3_omni")
    with pytest.raises(ValueError, match=r"self_attn \(Cosmos3PackedMoTAttention\) is no square self-attention.*"
                                         r"causally over the text.*\[text, vision\] keys"):
        diffaccel.accelerate(case.pipe, attention="block_sparse")
    assert getattr(case.pipe, "_diffaccel_runtime", None) is None
    case = build("wan_animate_2")  # attends over a KV cache of the driving video through flex
    with pytest.raises(ValueError, match=r"self_attn \(WanAnimate2Attention\) is no square self-attention.*"
                                         r"KV cache of the driving video"):
        diffaccel.accelerate(case.pipe, attention="block_sparse")
    case = build("kandinsky6_sr")  # its own NABLA block-sparse attention through flex
    with pytest.raises(ValueError, match=r"self_attention \(Kandinsky6SRAttention\) is no square self-attention.*"
                                         r"already block-sparse"):
        diffaccel.accelerate(case.pipe, attention="block_sparse")
    case = build("sana_wm")  # linear attention in most blocks
    with pytest.raises(ValueError, match=r"attn \(BidirectionalGDNUCPESinglePathLiteLA\) is no square self-attention.*"
                                         r"gated delta-net linear attention"):
        diffaccel.accelerate(case.pipe, attention="block_sparse")
