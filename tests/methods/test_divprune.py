"""DivPrune: golden selection order, equivalence with the plain greedy loop, engine form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vllm_tokenzip.methods import divprune
from vllm_tokenzip.methods.base import VideoInputs

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def greedy_reference(tokens: torch.Tensor, num_keep: int) -> list[int]:
    """The greedy loop as the spec states it: full N x N matrix, min over all chosen rows."""
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    dist = 1 - unit @ unit.T
    picks = [int(dist.topk(2, dim=0, largest=False).values[1].argmax())]
    for _ in range(num_keep - 1):
        picks.append(int(dist[picks].min(dim=0).values.argmax()))
    return picks


def video_inputs(frames: int, tokens: int, dim: int, seed: int) -> VideoInputs:
    embeds = torch.randn(frames, tokens, dim, generator=torch.Generator().manual_seed(seed))
    return VideoInputs(embeds=embeds, grid_hw=(1, tokens))


def test_golden_selection_order() -> None:
    reference = json.loads((GOLDEN / "divprune_reference.json").read_text())
    tokens = torch.from_numpy(np.load(GOLDEN / "divprune_inputs.npz")["tokens"])
    for ratio, expected in reference["results"].items():
        num_keep = round(float(ratio) * tokens.shape[0])
        assert num_keep == expected["num_selected"]
        assert divprune.divprune_order(tokens, num_keep).tolist() == expected["selection_order"]
        assert divprune.divprune_select(tokens, num_keep).tolist() == expected["kept_sorted"]


def test_golden_through_engine_form() -> None:
    tokens = torch.from_numpy(np.load(GOLDEN / "divprune_inputs.npz")["tokens"])
    expected = json.loads((GOLDEN / "divprune_reference.json").read_text())["results"]["0.098"]
    num_keep = divprune.kept_count(4, 36, 1 - 0.098)
    inputs = VideoInputs(embeds=tokens.view(4, 36, 64), grid_hw=(6, 6))
    assert divprune.select(inputs, num_keep).tolist() == expected["kept_sorted"]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 60),
    dim=st.integers(2, 16),
    keep=st.integers(1, 60),
    seed=st.integers(0, 2**16),
)
def test_matches_plain_greedy_loop(n: int, dim: int, keep: int, seed: int) -> None:
    tokens = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    keep = min(keep, n)
    expected = greedy_reference(tokens, keep)
    assume(len(set(expected)) == keep)  # the plain loop may re-pick once only ~0 remains
    assert divprune.divprune_order(tokens, keep).tolist() == expected


@settings(max_examples=40, deadline=None)
@given(
    frames=st.integers(1, 7),
    tokens=st.integers(1, 12),
    dim=st.integers(1, 8),
    ratio=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_engine_form_budget(frames: int, tokens: int, dim: int, ratio: float, seed: int) -> None:
    inputs = video_inputs(frames, tokens, dim, seed)
    num_keep = divprune.kept_count(frames, tokens, ratio)
    kept = divprune.select(inputs, num_keep)
    assert kept.dtype == torch.long
    assert kept.numel() == num_keep
    assert torch.equal(kept.unique(), kept)  # sorted and unique
    assert int(kept[0]) >= 0 and int(kept[-1]) < frames * tokens
    assert torch.equal(divprune.select(inputs, num_keep), kept)


@pytest.mark.parametrize(("frames", "tokens"), [(1, 9), (3, 5), (7, 4), (5, 1), (1, 1)])
def test_ratio_zero_keeps_everything(frames: int, tokens: int) -> None:
    num_keep = divprune.kept_count(frames, tokens, 0.0)
    assert num_keep == frames * tokens
    kept = divprune.select(video_inputs(frames, tokens, 4, seed=1), num_keep)
    assert torch.equal(kept, torch.arange(frames * tokens))


@pytest.mark.parametrize(("frames", "tokens", "ratio"), [(1, 16, 0.5), (5, 9, 0.7), (9, 1, 0.4)])
def test_odd_shapes_keep_the_budget(frames: int, tokens: int, ratio: float) -> None:
    num_keep = divprune.kept_count(frames, tokens, ratio)
    assert num_keep == round((1 - ratio) * frames * tokens)
    kept = divprune.select(video_inputs(frames, tokens, 6, seed=2), num_keep)
    assert kept.numel() == num_keep == kept.unique().numel()


def test_duplicate_tokens_still_unique() -> None:
    tokens = torch.ones(10, 4)
    tokens[5] = -1.0
    kept = divprune.divprune_select(tokens, 6)
    assert kept.numel() == 6 == kept.unique().numel()


def test_bfloat16_input() -> None:
    tokens = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    kept = divprune.divprune_select(tokens.bfloat16(), 10)
    assert kept.numel() == 10 == kept.unique().numel()
    assert torch.equal(kept, divprune.divprune_select(tokens.bfloat16().float(), 10))


def test_kept_count_rejects_bad_ratio() -> None:
    with pytest.raises(ValueError, match="ratio"):
        divprune.kept_count(2, 4, 1.0)


def test_registered() -> None:
    from vllm_tokenzip import methods

    try:
        method = methods.get("divprune")
    except ImportError as error:  # other method modules may not exist yet
        pytest.skip(f"registry incomplete: {error}")
    assert method.count_known_in_advance
    assert method.select is divprune.select
