"""The method registry: names, lookup errors, declarations, and every video method's budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_tokenzip.methods import available, get
from vllm_tokenzip.methods.base import Need, VideoInputs

EXPECTED = (
    "omnizip",
    "divprune",
    "fastvid",
    "visionzip",
    "evs",
    "vidcom2",
    "dycoke",
    "holitom",
    "prunevid",
    "uniform_temporal",
    "uniform_spatial",
    "random",
)


def test_available_lists_every_method() -> None:
    names = available()
    assert names == sorted(names)
    assert set(EXPECTED) <= set(names)


def test_unknown_name_raises_key_error_listing_methods() -> None:
    with pytest.raises(KeyError) as raised:
        get("nope")
    message = str(raised.value)
    assert "nope" in message
    assert all(name in message for name in available())


@pytest.mark.parametrize("name", EXPECTED)
def test_method_declarations(name: str) -> None:
    method = get(name)
    assert method.name == name
    assert isinstance(method.needs, frozenset) and method.needs
    assert all(isinstance(need, Need) for need in method.needs)
    assert isinstance(method.count_known_in_advance, bool)
    assert callable(method.kept_count) and callable(method.select)
    assert method.modalities and method.modalities <= {"audio", "video"}
    if "video" in method.modalities:
        assert method.kept_count(3, 4, 0.0) == 12
        assert 1 <= method.kept_count(3, 4, 0.5) <= 12
    with pytest.raises(ValueError):
        method.kept_count(3, 4, 1.0)


def synthetic_inputs(frames: int, height: int, width: int, dim: int, seed: int) -> VideoInputs:
    """Redundant frames, softmax encoder attention per frame, a 4-token text query."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(1, height * width, dim, generator=gen)
    video = first + 0.3 * torch.randn(frames, height * width, dim, generator=gen)
    attention = torch.randn(frames, height * width, generator=gen).softmax(-1)
    query = torch.randn(4, dim, generator=gen)
    return VideoInputs(video, (height, width), attention, query, seed)


@pytest.mark.parametrize("name", EXPECTED)
@settings(max_examples=15, deadline=None)
@given(
    inputs=st.builds(
        synthetic_inputs,
        frames=st.integers(1, 6),
        height=st.integers(1, 4),
        width=st.integers(1, 4),
        dim=st.integers(2, 8),
        seed=st.integers(0, 2**16),
    ),
    ratio=st.floats(0.0, 0.95),
)
def test_every_method_keeps_exactly_its_video_budget(
    name: str, inputs: VideoInputs, ratio: float
) -> None:
    method = get(name)
    assert "video" in method.modalities
    frames, per_frame = inputs.embeds.shape[:2]
    num_keep = method.kept_count(frames, per_frame, ratio)
    kept = method.select(inputs, num_keep)
    assert kept.dtype == torch.long and kept.shape == (num_keep,)
    assert (kept.diff() > 0).all(), "indices must be sorted and unique"
    assert int(kept.min()) >= 0 and int(kept.max()) < frames * per_frame
