"""Our pure-torch EVS keeps exactly what vLLM's own EVS keeps (vLLM is installed for CI)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_tokenzip.methods.evs import evs_kept_count, evs_select

vllm_evs = pytest.importorskip("vllm.multimodal.video_prune.evs")


@settings(max_examples=40, deadline=None)
@given(
    frames=st.integers(1, 6),
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    q=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_same_count_and_kept_set_as_vllm(frames, rows, cols, q, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(frames, rows * cols, 16, generator=generator).to(dtype)
    video[1:, ::2] = video[:-1, ::2].clone()  # exact repeats: ties go by the stable order
    count = evs_kept_count(frames, rows * cols, q)
    assert count == vllm_evs.compute_retained_tokens_count(rows * cols, frames, q)
    # vLLM takes the pre-merge grid (2x2 merge) and flattened [T*N, D] embeddings.
    mask = vllm_evs.compute_retention_mask(video.flatten(0, 1), (frames, 2 * rows, 2 * cols), 2, q)
    assert torch.equal(evs_select(video, count), mask.nonzero().flatten())
