"""Content-blind baselines: uniform temporal, uniform spatial and random token selection.

* ``uniform_temporal`` keeps whole frames, evenly spaced (frame ``(2i + 1) * T // (2F)`` for
  ``i < F``), like sampling the video at a lower frame rate. Its count is frame-granular:
  ``F = max(1, T - round(ratio * T))`` frames, ``F * N`` tokens.
* ``uniform_spatial`` keeps the same evenly spread cells of every frame, like a lower
  resolution: an r x c subgrid when ``k`` factors that way, else evenly spaced rows with
  evenly spaced cells. ``k = max(1, N - round(ratio * N))`` per frame, ``T * k`` tokens.
* ``random`` keeps a uniformly random subset drawn from ``inputs.seed``;
  ``max(1, TN - round(ratio * TN))`` tokens.

All three counts are known before the encoders run. ``select`` meets any ``num_keep``: a
uniform-temporal budget that is not a multiple of N takes the rest from an even spread of the
last chosen frame; a uniform-spatial one gives the first ``num_keep % T`` frames one more cell.
"""

from __future__ import annotations

import torch

from vllm_tokenzip.methods import register
from vllm_tokenzip.methods._common import even_positions, split_evenly
from vllm_tokenzip.methods.base import Method, Need, VideoInputs, kept_count_rounded


def uniform_temporal_count(num_frames: int, tokens_per_frame: int, ratio: float) -> int:
    """Whole frames: ``max(1, T - round(ratio * T)) * tpf``."""
    return kept_count_rounded(num_frames, 1, ratio) * tokens_per_frame


def uniform_spatial_count(num_frames: int, tokens_per_frame: int, ratio: float) -> int:
    """Same cells per frame: ``T * max(1, tpf - round(ratio * tpf))``."""
    return num_frames * kept_count_rounded(1, tokens_per_frame, ratio)


def uniform_temporal_select(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """All tokens of ``ceil(num_keep / N)`` evenly spaced frames (the last possibly partial).

    inputs.embeds: [T, N, D]. Returns sorted LongTensor [num_keep] into the flattened T * N.
    """
    num_frames, per_frame = inputs.embeds.shape[:2]
    frames = -(-num_keep // per_frame)
    counts = [per_frame] * (frames - 1) + [num_keep - (frames - 1) * per_frame]
    kept = [
        (2 * i + 1) * num_frames // (2 * frames) * per_frame + even_positions(inputs.grid_hw, k)
        for i, k in enumerate(counts)
    ]
    return torch.cat(kept).to(inputs.embeds.device)


def uniform_spatial_select(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """Evenly spread cells of every frame, ``num_keep`` split evenly over the frames.

    inputs.embeds: [T, N, D]. Returns sorted LongTensor [num_keep] into the flattened T * N.
    """
    num_frames, per_frame = inputs.embeds.shape[:2]
    kept = [
        t * per_frame + even_positions(inputs.grid_hw, k)
        for t, k in enumerate(split_evenly(num_keep, num_frames))
    ]
    return torch.cat(kept).to(inputs.embeds.device)


def random_select(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """A uniformly random subset drawn from ``inputs.seed``.

    inputs.embeds: [T, N, D]. Returns sorted LongTensor [num_keep] into the flattened T * N.
    """
    total = inputs.embeds.shape[0] * inputs.embeds.shape[1]
    draw = torch.randperm(total, generator=torch.Generator().manual_seed(inputs.seed))
    return draw[:num_keep].sort().values.to(inputs.embeds.device)


UNIFORM_TEMPORAL = register(
    Method(
        name="uniform_temporal",
        needs=frozenset({Need.EMBEDDINGS}),
        count_known_in_advance=True,
        kept_count=uniform_temporal_count,
        select=uniform_temporal_select,
        summary="keep whole, evenly spaced frames (lower frame rate)",
    )
)
UNIFORM_SPATIAL = register(
    Method(
        name="uniform_spatial",
        needs=frozenset({Need.EMBEDDINGS}),
        count_known_in_advance=True,
        kept_count=uniform_spatial_count,
        select=uniform_spatial_select,
        summary="keep an even spatial subgrid of every frame (lower resolution)",
    )
)
RANDOM = register(
    Method(
        name="random",
        needs=frozenset({Need.EMBEDDINGS}),
        count_known_in_advance=True,
        kept_count=kept_count_rounded,
        select=random_select,
        summary="keep a seeded uniformly random subset",
    )
)
