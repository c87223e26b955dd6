"""Shared vocabulary of the compression methods: what a method needs, how many it keeps.

Every method module defines pure torch functions and registers one :class:`Method`
describing them. Nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import torch


class Need(StrEnum):
    """Inputs a method reads besides the token embeddings."""

    EMBEDDINGS = "embeddings"  # post-merger video (and audio) embeddings, always given
    ENCODER_ATTENTION = "encoder_attention"  # per-frame ViT attention received, [T, N]
    AUDIO_SALIENCY = "audio_saliency"  # per-audio-token saliency, [N_a]
    LAYOUT = "layout"  # input_ids / grid layout of the interleaved sequence
    QUERY = "query"  # text query embeddings, [Q, D]


@dataclass(frozen=True)
class VideoInputs:
    """What a video method may read.

    embeds: [T, N, D] post-merger embeddings, frame-major (T temporal grid steps,
        N tokens per step in raster order of the merged grid).
    grid_hw: (H', W') merged grid, H' * W' == N.
    encoder_attention: [T, N] attention each token receives in the vision encoder, or None.
    query: [Q, D] text query embeddings, or None.
    seed: seed for methods that draw random numbers.
    """

    embeds: torch.Tensor
    grid_hw: tuple[int, int]
    encoder_attention: torch.Tensor | None = None
    query: torch.Tensor | None = None
    seed: int = 0


@dataclass(frozen=True)
class Method:
    """A registered video compression method (engine-facing form).

    kept_count(num_frames, tokens_per_frame, ratio) -> int: the exact number of
        tokens ``select`` keeps; ``ratio`` is the fraction to prune, 0 <= ratio < 1.
    select(inputs, num_keep) -> LongTensor[num_keep]: sorted unique indices into the
        flattened T * N tokens; exactly ``num_keep`` of them.
    count_known_in_advance: whether the published method's own count is known before
        the encoders run. When False, ``select`` is the engine form that meets
        ``kept_count`` exactly and the module docstring says how it differs.
    """

    name: str
    needs: frozenset[Need]
    count_known_in_advance: bool
    kept_count: Callable[[int, int, float], int]
    select: Callable[[VideoInputs, int], torch.Tensor]
    modalities: frozenset[str] = field(default_factory=lambda: frozenset({"video"}))
    summary: str = ""


def kept_count_rounded(num_frames: int, tokens_per_frame: int, ratio: float) -> int:
    """Default budget: ``N - round(ratio * N)`` of ``N = T * tokens_per_frame``, at least 1."""
    check_ratio(ratio)
    total = num_frames * tokens_per_frame
    return max(1, total - round(ratio * total))


def check_ratio(ratio: float) -> None:
    """Raise ValueError unless 0 <= ratio < 1 (the fraction of tokens to prune)."""
    if not (0.0 <= ratio < 1.0):
        raise ValueError(f"ratio must satisfy 0 <= ratio < 1, got {ratio!r}")
