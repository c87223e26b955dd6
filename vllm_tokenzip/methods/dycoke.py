"""DyCoke (Tao et al., CVPR 2025), stage 1 only: token temporal merging (TTM).

Published TTM, in groups of four frames: frame ``t % 4 == 0`` is an anchor kept whole; an odd
frame keeps its ``m = int((1 - k) * N)`` cells least cosine-similar to the same cell of the
previous frame; a frame ``t % 4 == 2`` keeps its ``m`` cells least similar to frame ``t - 2``.
Similarities use the original (unpruned) reference tokens, and "merging" drops tokens (no
embedding changes), so the kept embeddings are the originals. The decode-time KV pruning
(stage 2) is not part of this module.

Engine form (same structure, a budget instead of ``k``):

* ``ratio`` is the fraction of all T * N tokens pruned, ``max(1, TN - round(ratio * TN))``
  kept, instead of the per-frame merging ratio ``k`` (which prunes only 3/4 of the frames);
* anchors stay whole and the rest of the budget is split evenly over the other frames; when
  the budget cannot even cover the anchors (ratio above about 0.75), only anchors keep tokens,
  an even spatial spread of each (there is no earlier frame to compare with);
* quirks of the official loop are not reproduced: with an odd T the last frame is pruned, not
  dropped whole, and the last ``t % 4 == 2`` frame is pruned, not left whole.

Count known before the encoders run (given T), as for the published TTM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_tokenzip.methods import register
from vllm_tokenzip.methods._common import even_positions, split_evenly, top_k_sorted
from vllm_tokenzip.methods.base import Method, Need, VideoInputs, kept_count_rounded


def dycoke_reference_frames(num_frames: int) -> torch.Tensor:
    """The frame each frame is compared with: ``t - 1`` (odd t), ``t - 2`` (t % 4 == 2), and
    ``-1`` for anchors (t % 4 == 0). Returns LongTensor [T]."""
    frames = torch.arange(num_frames)
    return torch.where(frames % 2 == 1, frames - 1, torch.where(frames % 4 == 2, frames - 2, -1))


def dycoke_frame_counts(num_frames: int, tokens_per_frame: int, num_keep: int) -> list[int]:
    """Tokens kept per frame: anchors whole, the rest of ``num_keep`` split evenly over the
    other frames; if ``num_keep`` is short of the anchors, it is split over anchors alone."""
    anchors = dycoke_reference_frames(num_frames) < 0
    num_anchors = int(anchors.sum())
    if num_keep < num_anchors * tokens_per_frame:
        shares = iter(split_evenly(num_keep, num_anchors))
        return [next(shares) if is_anchor else 0 for is_anchor in anchors.tolist()]
    others = num_frames - num_anchors
    spare = num_keep - num_anchors * tokens_per_frame
    shares = iter(split_evenly(spare, others) if others else [])
    return [tokens_per_frame if is_anchor else next(shares) for is_anchor in anchors.tolist()]


def dycoke_ttm(video: torch.Tensor, grid_hw: tuple[int, int], num_keep: int) -> torch.Tensor:
    """DyCoke TTM with an exact budget.

    video: [T, N, D]; grid_hw: (H', W'), H' * W' == N. Returns sorted LongTensor [num_keep]
    into the flattened T * N.
    """
    num_frames, per_frame = video.shape[:2]
    reference = dycoke_reference_frames(num_frames)
    kept = []
    for t, count in enumerate(dycoke_frame_counts(num_frames, per_frame, num_keep)):
        if reference[t] < 0:
            cells = even_positions(grid_hw, count).to(video.device)
        else:
            similarity = F.cosine_similarity(video[t], video[reference[t]], dim=-1)
            cells = top_k_sorted(-similarity, count)
        kept.append(t * per_frame + cells)
    return torch.cat(kept)


def select(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """Engine form: :func:`dycoke_ttm` on ``inputs.embeds`` [T, N, D]."""
    return dycoke_ttm(inputs.embeds, inputs.grid_hw, num_keep)


METHOD = register(
    Method(
        name="dycoke",
        needs=frozenset({Need.EMBEDDINGS}),
        count_known_in_advance=True,
        kept_count=kept_count_rounded,
        select=select,
        summary="DyCoke TTM: anchors every 4th frame, others drop cells unchanged from a reference",
    )
)
