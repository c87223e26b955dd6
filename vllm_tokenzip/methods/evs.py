"""EVS, Efficient Video Sampling (Bagrov et al., arXiv 2510.14624), as vLLM implements it.

vLLM's ``vllm/multimodal/video_prune/evs.py`` scores every merged video token by its cosine
dissimilarity to the token at the same grid cell of the previous frame, gives frame 0 the
score 255 so that it is always kept, and keeps the first ``max(tpf, int(T * tpf * (1 - q)))``
tokens of a stable descending sort of all scores. This module restates that rule in pure torch
(no vLLM import); ``evs_kept_count`` and ``evs_select(video, evs_kept_count(...))`` give the
same count and the same kept set as vLLM's ``compute_retained_tokens_count`` and
``compute_retention_mask``. The paper's version compares RGB patches (L1) instead of
embeddings. Count known before the encoders run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_tokenzip.methods import register
from vllm_tokenzip.methods.base import Method, Need, VideoInputs, check_ratio

FIRST_FRAME_SCORE = 255.0


def evs_kept_count(num_frames: int, tokens_per_frame: int, ratio: float) -> int:
    """``max(tpf, int(T * tpf * (1 - ratio)))``: at least the whole first frame."""
    check_ratio(ratio)
    return max(tokens_per_frame, int(num_frames * tokens_per_frame * (1 - ratio)))


def evs_dissimilarity(video: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_t, x_{t-1})`` per grid cell, frame 0 set to 255.

    video: [T, N, D]. Returns [T, N] in video's dtype (as vLLM, so bf16 ties match too).
    """
    changed = 1 - F.cosine_similarity(video[1:], video[:-1], dim=-1)
    first = torch.full_like(video[:1, :, 0], FIRST_FRAME_SCORE)
    return torch.cat([first, changed])


def evs_select(video: torch.Tensor, num_keep: int) -> torch.Tensor:
    """The ``num_keep`` most changed tokens (stable descending order, then sorted).

    video: [T, N, D]. Returns sorted LongTensor [num_keep] into the flattened T * N.
    """
    order = torch.argsort(evs_dissimilarity(video).flatten(), descending=True, stable=True)
    return order[:num_keep].sort().values


def select(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """Engine form: :func:`evs_select` on ``inputs.embeds`` [T, N, D]."""
    return evs_select(inputs.embeds, num_keep)


METHOD = register(
    Method(
        name="evs",
        needs=frozenset({Need.EMBEDDINGS}),
        count_known_in_advance=True,
        kept_count=evs_kept_count,
        select=select,
        summary="drop tokens most similar to the previous frame; frame 0 kept (vLLM EVS)",
    )
)
