"""OmniZip: golden cases of the official 2026 code and properties of the engine form."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_tokenzip.methods.base import Need, VideoInputs, kept_count_rounded
from vllm_tokenzip.methods.omnizip import (
    METHOD,
    allocate_frames,
    audio_saliency,
    dpc_knn_scores,
    istc_mask,
    merge_plan,
    omnizip_audio_stage,
    omnizip_engine,
    omnizip_kept_counts,
    omnizip_reference,
    runs,
    select_audio,
    select_video,
    window_ratios,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
AUDIO_ID, VIDEO_ID, TEXT_ID = 151646, 151656, 1000
CASE = "omnizip_vllm2s_45pct"
FAST = settings(max_examples=30, deadline=None)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((GOLDEN / "omnizip_reference.json").read_text())


@pytest.fixture(scope="module")
def golden_inputs() -> dict[str, torch.Tensor]:
    with np.load(GOLDEN / "omnizip_inputs.npz") as arrays:
        return {key: torch.from_numpy(arrays[key]) for key in arrays.files}


@pytest.fixture(scope="module")
def golden_case(golden_inputs) -> tuple[torch.Tensor, ...]:
    names = ("input_ids", "embeds", "attn_scores", "video_grid_thw")
    return tuple(golden_inputs[f"{CASE}__{name}"] for name in names)


def run_reference(case, **params) -> tuple[torch.Tensor, torch.Tensor]:
    params = {"rho_audio": 0.3, "rho_video": 0.6} | params
    return omnizip_reference(*case, audio_token_id=AUDIO_ID, video_token_id=VIDEO_ID, **params)


def run_engine(case, **params) -> tuple[torch.Tensor, torch.Tensor]:
    return omnizip_engine(*case, audio_token_id=AUDIO_ID, video_token_id=VIDEO_ID, **params)


def make_case(
    seed: int, grid_t: int, grid_hw: tuple[int, int], audio_len: int, layout: str, dim: int = 16
) -> tuple[torch.Tensor, ...]:
    """Qwen2.5-Omni use_audio_in_video layout: per chunk its video steps, then its audio.

    layout "2s": 2 grid steps + 50 audio tokens per chunk; "1s": 1 step + 25. Leftover audio
    follows the last chunk; 3 text tokens before and 4 after. Returns (input_ids [1, L],
    embeds [1, L, D], saliency [N_a], video_grid_thw [1, 3]).
    """
    gen = torch.Generator().manual_seed(seed)
    tpf = (grid_hw[0] // 2) * (grid_hw[1] // 2)
    steps, per_chunk = (2, 50) if layout == "2s" else (1, 25)
    ids, audio_left = [TEXT_ID] * 3, audio_len
    for t0 in range(0, grid_t, steps):
        ids += [VIDEO_ID] * (min(steps, grid_t - t0) * tpf)
        ids += [AUDIO_ID] * min(per_chunk, audio_left)
        audio_left -= min(per_chunk, audio_left)
    ids += [AUDIO_ID] * audio_left + [TEXT_ID] * 4
    embeds = torch.randn(1, len(ids), dim, generator=gen)
    saliency = torch.rand(audio_len, generator=gen)
    return torch.tensor([ids]), embeds, saliency, torch.tensor([[grid_t, *grid_hw]])


def scene_video(seed: int, frames: int, tpf: int, dim: int) -> torch.Tensor:
    """Video rows [frames * tpf, dim] of the golden generator (numpy PCG64, first scene for the
    first half of the frames), as drawn for the ISTC golden check."""
    rng = np.random.default_rng(seed)
    scenes = [0] * (frames // 2) + [1] * (frames - frames // 2)
    base = rng.standard_normal((2, tpf, dim))
    rows = [base[s] + 0.35 * rng.standard_normal((tpf, dim)) for s in scenes]
    return torch.from_numpy(np.concatenate(rows).astype(np.float32))


@st.composite
def omni_cases(draw) -> tuple[tuple[torch.Tensor, ...], dict]:
    grid_t = draw(st.integers(1, 6))
    grid_hw = (draw(st.sampled_from([2, 4, 6])), draw(st.sampled_from([2, 4])))
    audio_len = draw(st.integers(0, 25 * grid_t + 40))
    layout = draw(st.sampled_from(["2s", "1s"]))
    case = make_case(draw(st.integers(0, 2**16)), grid_t, grid_hw, audio_len, layout)
    ratio = st.floats(0.0, 0.95)
    return case, {"rho_audio": draw(ratio), "rho_video": draw(ratio)}


def modality_masks(case, keep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(audio, video, text) slices of keep [1, L] in sequence order."""
    ids = case[0][0]
    return keep[0, ids == AUDIO_ID], keep[0, ids == VIDEO_ID], keep[0, ids == TEXT_ID]


# --- golden cases of the official 2026 code -------------------------------------------------


def test_golden_keep_mask(golden_case, reference):
    expected = reference["cases"][0]["core_2026"]
    _, keep = run_reference(golden_case)
    audio, video, _ = modality_masks(golden_case, keep)
    assert keep.shape == golden_case[0].shape and keep.dtype == torch.bool
    assert keep[0].nonzero().squeeze(1).tolist() == expected["kept_global_indices"]
    assert audio.nonzero().squeeze(1).tolist() == expected["kept_audio_rel"]
    assert video.nonzero().squeeze(1).tolist() == expected["kept_video_rel"]
    per_run = [
        int(video[a:b].sum()) for a, b in (r["video_rel_range"] for r in expected["video_runs"])
    ]
    assert per_run == [r["kept"] for r in expected["video_runs"]]


def test_golden_embeddings(golden_case, reference):
    expected = reference["cases"][0]["core_2026"]
    ids, embeds = golden_case[:2]
    out, _ = run_reference(golden_case)
    audio_pos = (ids[0] == AUDIO_ID).nonzero().squeeze(1)
    anchors = [int(a) for a in expected["merged_anchor_first4_after"]]
    for anchor, first4 in expected["merged_anchor_first4_after"].items():
        torch.testing.assert_close(
            out[0, audio_pos[int(anchor)], :4], torch.tensor(first4), atol=1e-5, rtol=0
        )
    unchanged = torch.ones(ids.shape[1], dtype=torch.bool)
    unchanged[audio_pos[anchors]] = False
    assert torch.equal(out[0, unchanged], embeds[0, unchanged])
    assert out.sum().item() == pytest.approx(expected["output_embeds_sum"], abs=1e-3)


def test_golden_merge_plan(golden_case, reference):
    expected = reference["cases"][0]["core_2026"]["merge_plan_anchor_to_merged"]
    ids, embeds, saliency, _ = golden_case
    audio, video = embeds[0, ids[0] == AUDIO_ID], embeds[0, ids[0] == VIDEO_ID]
    dominant, anchors = select_audio(saliency, 0.3, 0.05, 3)
    pruned = torch.ones(len(audio), dtype=torch.bool)
    pruned[dominant] = pruned[anchors] = False
    plan = merge_plan(audio, video, anchors, pruned.nonzero().squeeze(1), 3)
    assert {str(a): members.tolist() for a, members, _ in plan} == expected


def test_golden_window_ratios(reference):
    expected = reference["cases"][0]["core_2026"]
    retention = expected["derived_audio_retention_per_guided_chunk"]
    ratios = window_ratios(retention, [32] * 4, 0.6, 128)
    assert ratios == pytest.approx(expected["derived_video_prune_ratio_per_guided_chunk"], abs=1e-6)


@pytest.mark.parametrize("ratio", ["0.35", "0.5", "0.6", "0.75"])
def test_golden_istc_window(reference, ratio):
    video = scene_video(seed=3, frames=2, tpf=16, dim=64)
    count = int(16 * (1 - float(ratio)))
    kept = istc_mask(video, 16, [count, count]).nonzero().squeeze(1).tolist()
    assert kept == reference["istm"]["results"][ratio]["core_2026_kept"]


def test_golden_audio_saliency(golden_inputs, reference):
    expected = reference["audio_saliency"]
    scores = audio_saliency(golden_inputs["audio_saliency__q"], golden_inputs["audio_saliency__k"])
    torch.testing.assert_close(
        scores, torch.tensor(expected["pooled_scores"]), atol=1e-7, rtol=1e-5
    )
    assert scores.topk(10).indices.tolist() == expected["top10_desc"]


# --- stage checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 33, 64])
def test_audio_saliency_blockwise_matches_dense(length):
    gen = torch.Generator().manual_seed(length)
    q, k = torch.randn(2, 5, length, 8, generator=gen)
    attention = (q @ k.transpose(1, 2) / math.sqrt(8)).softmax(-1)
    received = attention.sum((0, 1)) / (5 * length)
    dense = received[: length // 2 * 2].view(-1, 2).mean(1)
    blockwise = audio_saliency(q, k, head_block=2, query_block=7)
    assert blockwise.shape == (length // 2,)
    torch.testing.assert_close(blockwise, dense)


def test_audio_saliency_sixty_seconds():
    q, k = torch.randn(2, 20, 3000, 64, generator=torch.Generator().manual_seed(0))
    scores = audio_saliency(q, k)
    assert scores.shape == (1500,)
    assert scores.sum().item() == pytest.approx(0.5, rel=1e-4)  # received attention sums to 1


def test_runs():
    assert runs(torch.tensor([3, 4, 5, 9, 10, 12])) == [(0, 3), (3, 5), (5, 6)]
    assert runs(torch.zeros(0, dtype=torch.long)) == []


def test_window_ratios_without_normalisation():
    assert window_ratios([1.0, 0.5], [32, 32, 64], 0.6, 128) == pytest.approx([0.35, 0.55, 0.6])


def test_dpc_knn_ranks_isolated_token_second():
    cluster = torch.tensor([1.0, 0.0]) + 0.01 * torch.randn(6, 2, generator=torch.Generator())
    scores = dpc_knn_scores(torch.cat([cluster, torch.tensor([[0.0, 1.0]])]))
    assert scores.topk(2).indices[1].item() == 6  # densest point first, then the outlier


def test_reference_one_second_layout_is_spatial_only():
    case = make_case(5, grid_t=6, grid_hw=(4, 4), audio_len=150, layout="1s")
    _, keep = run_reference(case)
    _, video_keep, _ = modality_masks(case, keep)
    video = case[1][0, case[0][0] == VIDEO_ID]
    for f in range(6):
        frame_keep = video_keep[4 * f : 4 * f + 4]
        best = dpc_knn_scores(video[4 * f : 4 * f + 4]).topk(int(frame_keep.sum())).indices
        assert frame_keep.nonzero().squeeze(1).tolist() == sorted(best.tolist())


def test_reference_audio_shorter_than_video():
    case = make_case(6, grid_t=8, grid_hw=(4, 4), audio_len=60, layout="2s")
    _, keep = run_reference(case, rho_video=0.5)
    audio_keep, video_keep, text_keep = modality_masks(case, keep)
    assert text_keep.all()
    assert int(audio_keep.sum()) == 42 + 3
    # windows: [8 video, 50 audio], [8 video, 10 audio], then 16 unguided video at rho_v
    assert video_keep[16:].view(4, 4).sum(1).tolist() == [2, 2, 2, 2]


# --- engine form --------------------------------------------------------------------------


def test_engine_matches_reference_audio_stage(golden_case):
    ref_out, ref_keep = run_reference(golden_case)
    out, keep = run_engine(golden_case, rho_audio=0.3, rho_video=0.6)
    assert torch.equal(out, ref_out)
    assert torch.equal(
        modality_masks(golden_case, keep)[0], modality_masks(golden_case, ref_keep)[0]
    )
    assert int(modality_masks(golden_case, keep)[1].sum()) == 128 - round(0.6 * 128)


def check_engine_counts(case, ratios) -> None:
    """Exact counts, every text token kept, shapes, determinism."""
    out, keep = run_engine(case, **ratios)
    audio, video, text = modality_masks(case, keep)
    assert (int(audio.sum()), int(video.sum())) == omnizip_kept_counts(
        len(video), len(audio), ratios["rho_audio"], ratios["rho_video"]
    )
    assert text.all() and keep.shape == case[0].shape and out.shape == case[1].shape
    again_out, again_keep = run_engine(case, **ratios)
    assert torch.equal(keep, again_keep) and torch.equal(out, again_out)


def check_window_shares(case, ratios) -> None:
    """A window whose audio run keeps a larger fraction never keeps a smaller video fraction."""
    _, keep = run_engine(case, **ratios)
    audio, video, _ = modality_masks(case, keep)
    ids = case[0][0]
    video_runs = runs((ids == VIDEO_ID).nonzero().squeeze(1))
    audio_runs = runs((ids == AUDIO_ID).nonzero().squeeze(1))
    retention = [audio[a:b].float().mean().item() for a, b in audio_runs[: len(video_runs)]]
    retention += [0.0] * (len(video_runs) - len(retention))
    share = [video[a:b].float().mean().item() for a, b in video_runs]
    for s_i, v_i in zip(retention, share, strict=True):
        for s_j, v_j in zip(retention, share, strict=True):
            assert not (s_i > s_j and v_i < v_j)


EDGE_CASES = [
    pytest.param(1, (2, 2), 10, "2s", id="one-frame-one-token"),
    pytest.param(3, (4, 4), 120, "2s", id="odd-T-audio-longer"),
    pytest.param(8, (4, 4), 60, "2s", id="audio-shorter"),
    pytest.param(5, (2, 2), 0, "1s", id="no-audio"),
    pytest.param(6, (6, 6), 200, "1s", id="1s-audio-longer"),
]
EDGE_RATIOS = [(0.3, 0.6), (0.4, 0.7), (0.9, 0.9)]


@pytest.mark.parametrize("rho_audio,rho_video", EDGE_RATIOS)
@pytest.mark.parametrize("grid_t,grid_hw,audio_len,layout", EDGE_CASES)
def test_engine_edge_layouts(grid_t, grid_hw, audio_len, layout, rho_audio, rho_video):
    case = make_case(grid_t, grid_t, grid_hw, audio_len, layout)
    ratios = {"rho_audio": rho_audio, "rho_video": rho_video}
    check_engine_counts(case, ratios)
    check_window_shares(case, ratios)


@FAST
@given(omni_cases())
def test_engine_keeps_exact_counts(drawn):
    check_engine_counts(*drawn)


@FAST
@given(omni_cases())
def test_engine_ratio_zero_keeps_everything(drawn):
    case, _ = drawn
    out, keep = run_engine(case, rho_audio=0.0, rho_video=0.0)
    assert keep.all() and torch.equal(out, case[1])


@FAST
@given(omni_cases())
def test_engine_window_share_follows_audio_retention(drawn):
    check_window_shares(*drawn)


@FAST
@given(st.integers(0, 2**16), st.integers(1, 5), st.sampled_from([2, 4, 6]), st.floats(0, 0.95))
def test_engine_without_audio_is_video_only_select(seed, grid_t, side, rho_video):
    case = make_case(seed, grid_t, (side, side), 0, "2s")
    _, keep = run_engine(case, rho_audio=0.3, rho_video=rho_video)
    tpf = (side // 2) ** 2
    video = case[1][0, case[0][0] == VIDEO_ID].view(grid_t, tpf, -1)
    num_keep = METHOD.kept_count(grid_t, tpf, rho_video)
    expected = select_video(VideoInputs(video, (side // 2, side // 2)), num_keep)
    assert modality_masks(case, keep)[1].nonzero().squeeze(1).tolist() == expected.tolist()


def test_engine_without_video_is_audio_stage():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[TEXT_ID] * 2 + [AUDIO_ID] * 40 + [TEXT_ID]])
    embeds, saliency = torch.randn(1, 43, 8, generator=gen), torch.rand(40, generator=gen)
    out, keep = run_engine((ids, embeds, saliency, None), rho_audio=0.4, rho_video=0.6)
    audio, audio_keep = omnizip_audio_stage(embeds[0, 2:42], saliency, 0.4)
    assert int(audio_keep.sum()) == omnizip_kept_counts(0, 40, 0.4, 0.6)[0] == 24 + 2
    assert torch.equal(keep[0, 2:42], audio_keep) and torch.equal(out[0, 2:42], audio)
    assert not torch.equal(audio, embeds[0, 2:42])  # anchors consolidated by anchor similarity


@pytest.mark.parametrize("num_audio", [1, 2, 7, 10, 11, 40])
@pytest.mark.parametrize("rho_audio", [0.77, 0.95, 0.999999])
def test_audio_alone_keeps_at_least_one_token(num_audio, rho_audio):
    """An audio item never vanishes (vLLM needs its placeholder): the counts the processor
    promises and the tokens the engine and the audio-only stage keep agree, and are >= 1."""
    gen = torch.Generator().manual_seed(num_audio)
    ids = torch.tensor([[TEXT_ID] + [AUDIO_ID] * num_audio + [TEXT_ID]])
    embeds = torch.randn(1, num_audio + 2, 8, generator=gen)
    saliency = torch.rand(num_audio, generator=gen)
    promised = omnizip_kept_counts(0, num_audio, rho_audio, 0.0)[0]
    _, keep = run_engine((ids, embeds, saliency, None), rho_audio=rho_audio, rho_video=0.0)
    _, alone = omnizip_audio_stage(embeds[0, 1:-1], saliency, rho_audio, min_kept=1)
    assert promised >= 1
    assert int(keep[0, 1:-1].sum()) == int(alone.sum()) == promised
    assert promised == max(1, round((1 - rho_audio) * num_audio) + round(0.05 * num_audio))


@FAST
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=12),
    st.sampled_from([1, 4, 9, 16]),
    st.floats(0, 1),
)
def test_allocate_frames_respects_clamps_when_feasible(density, size, fraction):
    low, high = int(size * 0.25) * len(density), int(size * 0.65) * len(density)
    budget = low + round(fraction * (high - low))
    counts = allocate_frames([size] * len(density), density, budget)
    assert sum(counts) == budget
    assert all(int(size * 0.25) <= c <= int(size * 0.65) for c in counts)


def test_allocate_frames_rejects_budget_over_total():
    with pytest.raises(ValueError):
        allocate_frames([4, 4], [0.5, 0.5], 9)


# --- registry: video-only form --------------------------------------------------------------


def test_method_registration():
    assert METHOD.name == "omnizip" and METHOD.count_known_in_advance
    assert METHOD.needs == {Need.EMBEDDINGS, Need.AUDIO_SALIENCY, Need.LAYOUT}
    assert METHOD.modalities == {"audio", "video"}
    assert METHOD.kept_count(8, 16, 0.6) == kept_count_rounded(8, 16, 0.6) == 51


@FAST
@given(st.integers(1, 6), st.sampled_from([1, 4, 6, 9]), st.floats(0, 0.99), st.integers(0, 99))
def test_select_video_exact_unique_sorted(frames, per_frame, ratio, seed):
    embeds = torch.randn(frames, per_frame, 8, generator=torch.Generator().manual_seed(seed))
    num_keep = METHOD.kept_count(frames, per_frame, ratio)
    kept = METHOD.select(VideoInputs(embeds, (1, per_frame)), num_keep)
    assert len(kept) == num_keep == len(set(kept.tolist()))
    assert (
        torch.equal(kept, kept.sort().values)
        and kept.min() >= 0
        and kept.max() < frames * per_frame
    )
    assert torch.equal(kept, METHOD.select(VideoInputs(embeds, (1, per_frame)), num_keep))


def test_select_video_temporal_frame_keeps_changed_position():
    first = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    second = first.clone()
    second[2] = -first[2]
    kept = select_video(VideoInputs(torch.stack([first, second]), (2, 2)), 3).tolist()
    assert len(kept) == 3 and [i for i in kept if i >= 4] == [4 + 2]
