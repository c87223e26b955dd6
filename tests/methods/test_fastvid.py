"""FastVID: golden Qwen2.5-VL case, segment planning, LLaVA-OV form, exact-budget engine form."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_tokenzip.methods import fastvid
from vllm_tokenzip.methods.base import VideoInputs

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def golden_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(embeds [300, 64], video [8, 36, 64], vit_attn [8, 36], reference)."""
    arrays = np.load(GOLDEN / "fastvid_inputs.npz")
    reference = json.loads((GOLDEN / "fastvid_reference.json").read_text())["qwen25vl_defaults"]
    embeds = torch.from_numpy(arrays["embeds"])[0]
    video = torch.from_numpy(arrays["video"]).view(8, 36, 64)
    return embeds, video, torch.from_numpy(arrays["vit_attn"]), reference


def scene_video(
    frames: int, tokens: int, dim: int, seed: int, scenes: int, noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames drawn around a few scene vectors (redundant in time) and softmax attention.

    Returns video [T, N, D] and attention [T, N].
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(scenes, tokens, dim, generator=gen)
    scene_of_frame = torch.arange(frames) * scenes // frames
    video = base[scene_of_frame] + noise * torch.randn(frames, tokens, dim, generator=gen)
    attn = torch.randn(frames, tokens, generator=gen).softmax(dim=-1)
    return video, attn


def engine_inputs(video: torch.Tensor, attn: torch.Tensor, seed: int = 0) -> VideoInputs:
    return VideoInputs(embeds=video, grid_hw=(1, video.shape[1]), encoder_attention=attn, seed=seed)


def test_golden_qwen25vl_defaults() -> None:
    embeds, video, attn, reference = golden_case()
    torch.manual_seed(1234)
    kept, merged = fastvid.fastvid_qwen25vl(video, attn)
    assert kept.tolist() == reference["kept_video_rel"]
    assert [int(n) for n in torch.bincount(kept // 36, minlength=8)] == reference["per_frame_kept"]
    total = embeds[:5].sum() + merged.sum() + embeds[293:].sum()
    assert float(total) == pytest.approx(reference["output_embeds_sum"], abs=1e-3)
    assert (torch.arange(5).tolist() + (kept + 5).tolist() + torch.arange(293, 300).tolist()) == (
        reference["kept_global_indices"]
    )


def test_golden_with_explicit_generator() -> None:
    _, video, attn, _ = golden_case()
    torch.manual_seed(1234)
    expected = fastvid.fastvid_qwen25vl(video, attn)
    got = fastvid.fastvid_qwen25vl(video, attn, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


def test_engine_form_reproduces_golden_indices() -> None:
    _, video, attn, reference = golden_case()
    num_keep = fastvid.kept_count(8, 36, 1 - 0.27)
    assert num_keep == reference["num_kept_video"]
    kept = fastvid.select(engine_inputs(video, attn, seed=1234), num_keep)
    assert kept.tolist() == reference["kept_video_rel"]


def test_dyseg_cuts() -> None:
    similarity = torch.tensor([0.99, 0.5, 0.97, 0.98, 0.96, 0.2, 0.99])
    assert fastvid.dyseg(similarity, c=3, tau=0.9) == [2, 4, 2]
    assert fastvid.dyseg(similarity, c=4, tau=0.9) == [2, 3, 1, 2]
    assert fastvid.dyseg(similarity, c=20, tau=0.0) == [1] * 8  # fewer frames than c
    assert fastvid.dyseg(torch.empty(0), c=8, tau=0.84) == [1]


def test_segment_plan_spreads_over_sub_segments() -> None:
    salient, context = fastvid.qwen_segment_plan([2, 1, 3, 1, 1], 72, 36, 0.4, 4)
    assert context == [0, 14, 0, 0, 0, 0, 0, 14]  # anchors counted from the last sub-segment
    assert salient == [0, 9, 9, 0, 0, 9, 9, 8]
    assert sum(salient) + sum(context) == 72


def test_segment_plan_caps_and_engine_fill() -> None:
    salient, context = fastvid.qwen_segment_plan([4], 120, 36, 0.4, 4)
    assert (salient, context) == ([0, 0, 0, 18], [0, 0, 0, 18])  # N // 2 and N - context caps
    assert fastvid.fill_to_budget(salient, context, 120, 36) == [12, 36, 36, 18]


def test_qwen25vl_multi_frame_segments() -> None:
    video, attn = scene_video(24, 30, 16, seed=4, scenes=3, noise=0.05)
    gen = torch.Generator().manual_seed(0)
    kept, merged = fastvid.fastvid_qwen25vl(video, attn, generator=gen)
    assert kept.numel() == merged.shape[0] <= 24 * int(30 * 0.27)
    assert torch.equal(kept.unique(), kept)
    unmerged = fastvid.fastvid_qwen25vl(video, attn, beta=1.0, generator=gen.manual_seed(0))
    assert torch.equal(unmerged[0], kept)
    assert torch.equal(unmerged[1], video.flatten(0, 1)[kept])
    frames_with_tokens = torch.bincount(kept // 30, minlength=24)
    assert (frames_with_tokens == 0).any()  # only sub-segment ends keep tokens


def test_merge_weights() -> None:
    tokens = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.9, 0.0], [0.1, 1.0]])
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    merged = fastvid.merge_into(tokens, unit, torch.tensor([0, 1]), torch.tensor([2, 3, 4]), 0.3)
    mean_first = (tokens[2] + tokens[3]) / 2
    assert torch.allclose(merged[0], tokens[0] / 3 + 2 / 3 * mean_first)
    assert torch.allclose(merged[1], 0.5 * tokens[1] + 0.5 * tokens[4])


@pytest.mark.parametrize(("frames", "scenes", "p"), [(8, 8, 4), (20, 2, 4), (21, 3, 2), (1, 1, 4)])
def test_llava_ov_count(frames: int, scenes: int, p: int) -> None:
    video, attn = scene_video(frames, 49, 16, seed=frames, scenes=scenes, noise=0.05)
    per_frame = int(49 * 0.2)
    salient = per_frame - int(per_frame * 0.4)
    context = per_frame - salient
    features = video.mean(dim=1)
    lengths = fastvid.dyseg(fastvid.frame_similarity(features), 8, 0.9)
    anchors = [-(-n // p) for n in lengths]
    expected = frames * salient + sum(
        a * (context * n // a) for n, a in zip(lengths, anchors, strict=True)
    )
    kept, merged = fastvid.fastvid_llava_ov(
        video, attn, retention=0.2, p=p, generator=torch.Generator().manual_seed(0)
    )
    assert kept.numel() == merged.shape[0] == expected
    assert torch.equal(kept.unique(), kept)
    assert torch.equal(
        torch.bincount(kept // 49, minlength=frames) >= salient, torch.ones(frames) > 0
    )


def test_engine_requires_encoder_attention() -> None:
    video, _ = scene_video(4, 9, 8, seed=0, scenes=2, noise=0.1)
    with pytest.raises(ValueError, match="encoder_attention"):
        fastvid.select(VideoInputs(embeds=video, grid_hw=(3, 3)), 4)


@settings(max_examples=40, deadline=None)
@given(
    frames=st.integers(1, 12),
    tokens=st.integers(1, 20),
    ratio=st.floats(0.0, 0.99),
    scenes=st.integers(1, 4),
    noise=st.sampled_from([0.0, 0.05, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_engine_form_budget(
    frames: int, tokens: int, ratio: float, scenes: int, noise: float, seed: int
) -> None:
    video, attn = scene_video(frames, tokens, 8, seed, min(scenes, frames), noise)
    inputs = engine_inputs(video, attn, seed)
    num_keep = fastvid.kept_count(frames, tokens, ratio)
    kept = fastvid.select(inputs, num_keep)
    assert kept.dtype == torch.long
    assert kept.numel() == num_keep
    assert torch.equal(kept.unique(), kept)
    assert int(kept[0]) >= 0 and int(kept[-1]) < frames * tokens
    assert torch.equal(fastvid.select(inputs, num_keep), kept)


@settings(max_examples=30, deadline=None)
@given(
    frames=st.integers(1, 10),
    tokens=st.integers(1, 16),
    fraction=st.floats(0.0, 1.0),
    noise=st.sampled_from([0.0, 0.02, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_engine_form_any_budget(
    frames: int, tokens: int, fraction: float, noise: float, seed: int
) -> None:
    video, attn = scene_video(frames, tokens, 8, seed, 1 + frames // 4, noise)
    num_keep = round(fraction * frames * tokens)
    kept = fastvid.select(engine_inputs(video, attn, seed), num_keep)
    assert kept.numel() == num_keep == kept.unique().numel()


@pytest.mark.parametrize(("frames", "tokens"), [(1, 9), (5, 6), (7, 1), (9, 16)])
def test_ratio_zero_keeps_everything(frames: int, tokens: int) -> None:
    video, attn = scene_video(frames, tokens, 8, seed=3, scenes=2 if frames > 1 else 1, noise=0.01)
    num_keep = fastvid.kept_count(frames, tokens, 0.0)
    assert num_keep == frames * tokens
    kept = fastvid.select(engine_inputs(video, attn), num_keep)
    assert torch.equal(kept, torch.arange(frames * tokens))


@pytest.mark.parametrize(("frames", "tokens", "ratio"), [(1, 16, 0.5), (7, 9, 0.7), (9, 1, 0.4)])
def test_odd_shapes_keep_the_budget(frames: int, tokens: int, ratio: float) -> None:
    video, attn = scene_video(frames, tokens, 8, seed=5, scenes=1, noise=0.01)
    num_keep = fastvid.kept_count(frames, tokens, ratio)
    assert num_keep == max(1, frames * int(tokens * (1 - ratio)))
    kept = fastvid.select(engine_inputs(video, attn), num_keep)
    assert kept.numel() == num_keep == kept.unique().numel()


def test_bfloat16_engine_form() -> None:
    video, attn = scene_video(6, 16, 8, seed=6, scenes=2, noise=0.1)
    num_keep = fastvid.kept_count(6, 16, 0.65)
    kept = fastvid.select(engine_inputs(video.bfloat16(), attn.bfloat16()), num_keep)
    assert kept.numel() == num_keep == kept.unique().numel()


def test_kept_count_guards_float_error() -> None:
    assert fastvid.kept_count(2, 100, 0.9) == 20  # 1 - 0.9 = 0.0999...
    with pytest.raises(ValueError, match="ratio"):
        fastvid.kept_count(2, 4, -0.1)


def test_registered() -> None:
    from vllm_tokenzip import methods
    from vllm_tokenzip.methods.base import Need

    try:
        method = methods.get("fastvid")
    except ImportError as error:  # other method modules may not exist yet
        pytest.skip(f"registry incomplete: {error}")
    assert not method.count_known_in_advance
    assert Need.ENCODER_ATTENTION in method.needs


@pytest.mark.parametrize("form", [fastvid.fastvid_qwen25vl, fastvid.fastvid_llava_ov])
def test_bfloat16_official_forms(form: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    video, attn = scene_video(12, 36, 16, seed=7, scenes=3, noise=0.05)
    expected, _ = form(video, attn, generator=torch.Generator().manual_seed(0))
    kept, merged = form(video.bfloat16(), attn, generator=torch.Generator().manual_seed(0))
    assert merged.dtype == torch.bfloat16
    assert kept.numel() == merged.shape[0] == expected.numel()
