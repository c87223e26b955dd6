"""Video methods: EVS, VisionZip, VidCom2, DyCoke, HoliTom, PruneVid and the baselines."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_tokenzip.methods import baselines, dycoke, evs, holitom, prunevid, vidcom2, visionzip
from vllm_tokenzip.methods._common import even_positions, largest_remainder
from vllm_tokenzip.methods.base import Method, VideoInputs

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        evs.METHOD,
        visionzip.METHOD,
        vidcom2.METHOD,
        dycoke.METHOD,
        holitom.METHOD,
        prunevid.METHOD,
        baselines.UNIFORM_TEMPORAL,
        baselines.UNIFORM_SPATIAL,
        baselines.RANDOM,
    )
}
NAMES = sorted(METHODS)


def compress_visionzip(inputs: VideoInputs, num_keep: int):
    return visionzip.visionzip_compress(inputs.embeds, inputs.encoder_attention, num_keep)


def compress_holitom(inputs: VideoInputs, num_keep: int):
    return holitom.holitom_compress(inputs.embeds, inputs.encoder_attention, num_keep, inputs.seed)


def compress_prunevid(inputs: VideoInputs, num_keep: int):
    return prunevid.prunevid_compress(inputs.embeds, num_keep, inputs.seed)


COMPRESS = {
    "visionzip": compress_visionzip,
    "holitom": compress_holitom,
    "prunevid": compress_prunevid,
}
PROPERTY = settings(max_examples=20, deadline=None)


def make_inputs(
    frames: int,
    height: int,
    width: int,
    dim: int,
    seed: int = 0,
    change: float = 0.5,
    attention: bool = True,
) -> VideoInputs:
    """Frames = one shared frame + ``change`` * noise (0: a still video); softmax attention."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(1, height * width, dim, generator=gen)
    video = first + change * torch.randn(frames, height * width, dim, generator=gen)
    received = torch.randn(frames, height * width, generator=gen).softmax(-1)
    query = torch.randn(4, dim, generator=gen)
    return VideoInputs(video, (height, width), received if attention else None, query, seed)


videos = st.builds(
    make_inputs,
    frames=st.integers(1, 6),
    height=st.integers(1, 4),
    width=st.integers(1, 4),
    dim=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    change=st.sampled_from([0.0, 0.05, 0.5, 2.0]),
    attention=st.booleans(),
)
ratios = st.floats(0.0, 0.95)


def check_indices(indices: torch.Tensor, num_keep: int, total: int) -> None:
    assert indices.dtype == torch.long
    assert indices.shape == (num_keep,)
    assert (indices.diff() > 0).all(), "indices must be sorted and unique"
    assert int(indices.min()) >= 0 and int(indices.max()) < total


def shape_of(inputs: VideoInputs) -> tuple[int, int]:
    return inputs.embeds.shape[0], inputs.embeds.shape[1]


# ---------------------------------------------------------------- properties of every method


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(inputs=videos, ratio=ratios)
def test_select_meets_kept_count(name: str, inputs: VideoInputs, ratio: float) -> None:
    frames, per_frame = shape_of(inputs)
    method = METHODS[name]
    num_keep = method.kept_count(frames, per_frame, ratio)
    assert 1 <= num_keep <= frames * per_frame
    check_indices(method.select(inputs, num_keep), num_keep, frames * per_frame)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(inputs=videos, data=st.data())
def test_select_meets_any_budget(name: str, inputs: VideoInputs, data: st.DataObject) -> None:
    frames, per_frame = shape_of(inputs)
    num_keep = data.draw(st.integers(1, frames * per_frame))
    check_indices(METHODS[name].select(inputs, num_keep), num_keep, frames * per_frame)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(inputs=videos)
def test_ratio_zero_keeps_everything(name: str, inputs: VideoInputs) -> None:
    frames, per_frame = shape_of(inputs)
    method = METHODS[name]
    assert method.kept_count(frames, per_frame, 0.0) == frames * per_frame
    kept = method.select(inputs, frames * per_frame)
    assert torch.equal(kept, torch.arange(frames * per_frame))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None)
@given(inputs=videos, ratio=ratios)
def test_deterministic(name: str, inputs: VideoInputs, ratio: float) -> None:
    method = METHODS[name]
    num_keep = method.kept_count(*shape_of(inputs), ratio)
    again = VideoInputs(
        inputs.embeds.clone(), inputs.grid_hw, inputs.encoder_attention, inputs.query, inputs.seed
    )
    assert torch.equal(method.select(inputs, num_keep), method.select(again, num_keep))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "shape",
    [(1, 3, 4, 8), (3, 2, 3, 8), (5, 1, 1, 8), (1, 1, 1, 4), (7, 2, 2, 1)],
    ids=["one-frame", "odd-frames", "one-token-per-frame", "one-token", "odd-dim-1"],
)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9])
def test_edge_shapes(name: str, shape: tuple[int, int, int, int], ratio: float) -> None:
    inputs = make_inputs(*shape, change=0.3)
    frames, per_frame = shape_of(inputs)
    num_keep = METHODS[name].kept_count(frames, per_frame, ratio)
    check_indices(METHODS[name].select(inputs, num_keep), num_keep, frames * per_frame)


@pytest.mark.parametrize("name", NAMES)
def test_kept_count_rejects_bad_ratio(name: str) -> None:
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError):
            METHODS[name].kept_count(4, 9, ratio)


@pytest.mark.parametrize("name", sorted(COMPRESS))
@PROPERTY
@given(inputs=videos, ratio=ratios)
def test_compress_agrees_with_select(name: str, inputs: VideoInputs, ratio: float) -> None:
    frames, per_frame = shape_of(inputs)
    inputs = VideoInputs(
        inputs.embeds,
        inputs.grid_hw,
        torch.rand(frames, per_frame).softmax(-1),
        inputs.query,
        inputs.seed,
    )
    num_keep = METHODS[name].kept_count(frames, per_frame, ratio)
    indices, embeds = COMPRESS[name](inputs, num_keep)
    assert torch.equal(indices, METHODS[name].select(inputs, num_keep))
    assert embeds.shape == (num_keep, inputs.embeds.shape[-1])
    assert embeds.dtype == inputs.embeds.dtype
    assert torch.isfinite(embeds).all()


@pytest.mark.parametrize("name", sorted(COMPRESS))
@pytest.mark.parametrize("change", [0.0, 0.5])
def test_compress_ratio_zero_returns_original_embeddings(name: str, change: float) -> None:
    inputs = make_inputs(4, 3, 3, 8, change=change)
    indices, embeds = COMPRESS[name](inputs, 36)
    assert torch.equal(indices, torch.arange(36))
    torch.testing.assert_close(embeds, inputs.embeds.flatten(0, 1))


# ---------------------------------------------------------------- shared helpers


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(0, 20), min_size=1, max_size=8), data=st.data())
def test_largest_remainder_apportions_exactly(sizes: list[int], data: st.DataObject) -> None:
    total = data.draw(st.integers(0, sum(sizes)))
    if sum(sizes) == 0:
        return
    quota = largest_remainder(torch.tensor(sizes), total)
    assert int(quota.sum()) == total
    assert (quota <= torch.tensor(sizes)).all() and (quota >= 0).all()


def test_even_positions_is_a_subgrid_when_possible() -> None:
    cells = even_positions((8, 8), 16)
    assert sorted({int(c) // 8 for c in cells}) == [1, 3, 5, 7]
    assert sorted({int(c) % 8 for c in cells}) == [1, 3, 5, 7]
    assert torch.equal(even_positions((3, 5), 15), torch.arange(15))


# ---------------------------------------------------------------- EVS


def test_evs_kept_count_matches_vllm_formula() -> None:
    assert evs.evs_kept_count(4, 16, 0.75) == 16
    assert evs.evs_kept_count(1, 10, 0.9) == 10
    assert evs.evs_kept_count(10, 10, 0.33) == 67  # int() truncation, not round()
    assert evs.evs_kept_count(8, 4, 0.9) == 4  # never below one whole frame
    assert evs.evs_kept_count(3, 7, 0.0) == 21


def test_evs_keeps_first_frame_and_drops_repeats_first() -> None:
    gen = torch.Generator().manual_seed(1)
    video = torch.randn(1, 6, 8, generator=gen).repeat(4, 1, 1)
    changed = [(1, 2), (2, 5), (3, 0)]
    for t, cell in changed:
        video[t:, cell] = torch.randn(8, generator=gen)
    kept = evs.evs_select(video, 6 + len(changed))
    assert kept.tolist() == list(range(6)) + sorted(t * 6 + c for t, c in changed)


def test_evs_ties_follow_stable_order() -> None:
    video = torch.eye(5)[:4].repeat(3, 1, 1)  # one-hot cells: later frames' scores exactly 0
    assert evs.evs_select(video, 6).tolist() == [0, 1, 2, 3, 4, 5]


def test_evs_bfloat16() -> None:
    video = torch.randn(4, 6, 8).to(torch.bfloat16)
    check_indices(evs.evs_select(video, 10), 10, 24)


# ---------------------------------------------------------------- baselines


def test_uniform_temporal_keeps_whole_evenly_spaced_frames() -> None:
    inputs = make_inputs(12, 2, 2, 4)
    num_keep = baselines.UNIFORM_TEMPORAL.kept_count(12, 4, 2 / 3)
    assert num_keep == 16
    kept = baselines.UNIFORM_TEMPORAL.select(inputs, num_keep)
    frames = sorted({int(i) // 4 for i in kept})
    assert frames == [1, 4, 7, 10]
    assert torch.equal(kept, (torch.tensor(frames)[:, None] * 4 + torch.arange(4)).flatten())


def test_uniform_spatial_keeps_same_subgrid_in_every_frame() -> None:
    inputs = make_inputs(3, 8, 8, 4)
    num_keep = baselines.UNIFORM_SPATIAL.kept_count(3, 64, 0.75)
    assert num_keep == 48
    kept = baselines.UNIFORM_SPATIAL.select(inputs, num_keep).view(3, 16)
    assert torch.equal(kept - kept[:1], torch.tensor([[0], [64], [128]]).expand(3, 16))
    assert torch.equal(kept[0], even_positions((8, 8), 16))


def test_random_depends_on_seed_only() -> None:
    kept = {
        seed: baselines.RANDOM.select(make_inputs(4, 5, 5, 4, seed=seed), 50) for seed in (0, 1)
    }
    assert not torch.equal(kept[0], kept[1])
    other_video = make_inputs(4, 5, 5, 4, seed=7)
    same_seed = VideoInputs(other_video.embeds, (5, 5), seed=0)
    assert torch.equal(baselines.RANDOM.select(same_seed, 50), kept[0])


# ---------------------------------------------------------------- DyCoke


def test_dycoke_reference_frames() -> None:
    assert dycoke.dycoke_reference_frames(9).tolist() == [-1, 0, 0, 2, -1, 4, 4, 6, -1]


def test_dycoke_drops_cells_unchanged_from_reference() -> None:
    gen = torch.Generator().manual_seed(2)
    video = torch.randn(1, 9, 8, generator=gen).repeat(5, 1, 1)
    video[1, [2, 5]] = torch.randn(2, 8, generator=gen)  # frames 1 and 2 vs frame 0
    video[2, [4, 7]] = torch.randn(2, 8, generator=gen)
    video[3] = video[2]  # frame 3 vs frame 2
    video[3, [0, 8]] = torch.randn(2, 8, generator=gen)
    video[4] = torch.randn(9, 8, generator=gen)  # anchor: kept whole whatever it holds
    kept = dycoke.dycoke_ttm(video, (3, 3), 2 * 9 + 3 * 2)
    changed = [9 + 2, 9 + 5, 18 + 4, 18 + 7, 27 + 0, 27 + 8]
    assert kept.tolist() == [*range(9), *changed, *range(36, 45)]


def test_dycoke_budget_below_anchors_spreads_over_anchors() -> None:
    assert dycoke.dycoke_frame_counts(5, 9, 6) == [3, 0, 0, 0, 3]
    assert dycoke.dycoke_frame_counts(5, 9, 25) == [9, 3, 2, 2, 9]


# ---------------------------------------------------------------- VisionZip


def test_visionzip_keeps_top_attention_as_dominant_and_sums_context() -> None:
    tokens = torch.randn(16, 8)
    attention = torch.full((16,), 0.01)
    attention[[1, 6, 11]] = torch.tensor([0.5, 0.3, 0.2])
    indices, embeds = visionzip.visionzip_frame(tokens, attention, 4)  # 3 dominant + 1 context
    assert indices.tolist() == [0, 1, 6, 11]  # context target: first non-dominant cell
    others = [i for i in range(16) if i not in (0, 1, 6, 11)]
    torch.testing.assert_close(embeds[0], tokens[0] + tokens[others].mean(0))
    torch.testing.assert_close(embeds[1:], tokens[[1, 6, 11]])


def test_visionzip_splits_budget_over_frames() -> None:
    inputs = make_inputs(3, 4, 4, 8)
    indices, _ = visionzip.visionzip_compress(inputs.embeds, inputs.encoder_attention, 10)
    assert torch.bincount(indices // 16, minlength=3).tolist() == [4, 3, 3]


# ---------------------------------------------------------------- VidCom2


def test_vidcom2_frame_counts_favour_distinct_frames() -> None:
    to_video = torch.tensor([[1.0] * 8, [5.0] * 8])
    assert vidcom2.vidcom2_frame_counts(to_video, 0.5).tolist() == [6, 2]


def test_vidcom2_keeps_the_outlier() -> None:
    common = torch.randn(8)
    video = common.repeat(2, 8, 1)
    video[1, 3] = -common
    assert vidcom2.vidcom2_select(video, 2).tolist() == [0, 8 + 3]


# ---------------------------------------------------------------- HoliTom


def test_holitom_windows_follow_still_runs() -> None:
    gen = torch.Generator().manual_seed(3)
    scenes = torch.randn(2, 1, 6, 16, generator=gen)
    video = torch.cat([scenes[0].repeat(3, 1, 1), scenes[1].repeat(3, 1, 1)])
    windows = holitom.holitom_windows(video)
    assert [(start, end) for start, end, _ in windows] == [(0, 2), (3, 5)]
    assert all(bool(static.all()) for _, _, static in windows)


def test_holitom_still_video_collapses_to_first_frame() -> None:
    inputs = make_inputs(4, 3, 3, 16, change=0.0)
    indices, embeds = compress_holitom(inputs, 9)
    assert indices.tolist() == list(range(9))
    torch.testing.assert_close(embeds, inputs.embeds[0])
    indices, _ = compress_holitom(inputs, 4)
    assert int(indices.max()) < 9


def test_holitom_dynamic_frames_keep_top_attention() -> None:
    inputs = make_inputs(3, 2, 4, 64, change=10.0)
    indices, embeds = compress_holitom(inputs, 6)
    expected = torch.cat([t * 8 + inputs.encoder_attention[t].topk(2).indices for t in range(3)])
    assert indices.tolist() == sorted(expected.tolist())
    torch.testing.assert_close(embeds, inputs.embeds.flatten(0, 1)[indices])


# ---------------------------------------------------------------- PruneVid


def test_prunevid_segments_split_scenes() -> None:
    gen = torch.Generator().manual_seed(4)
    scenes = torch.randn(2, 1, 6, 16, generator=gen)
    video = torch.cat([scenes[0].repeat(4, 1, 1), scenes[1].repeat(4, 1, 1)])
    video = video + 0.01 * torch.randn(video.shape, generator=gen)
    assert prunevid.prunevid_segments(video) == [(0, 3), (4, 7)]


def test_prunevid_static_cells() -> None:
    frame = torch.randn(1, 5, 16)
    assert prunevid.static_cells(frame.repeat(3, 1, 1)).all()
    assert not prunevid.static_cells(torch.randn(3, 5, 64)).any()
    assert not prunevid.static_cells(frame).any()


def test_prunevid_cluster_means() -> None:
    values = torch.randn(2, 8)
    video = values.repeat_interleave(4, dim=0).repeat(3, 1, 1)  # cells 0-3 = a, 4-7 = b
    indices, embeds = prunevid.prunevid_compress(video, 2)
    assert int(indices[0]) < 4 <= int(indices[1]) < 8  # one centre per value, in frame 0
    torch.testing.assert_close(embeds, values)
