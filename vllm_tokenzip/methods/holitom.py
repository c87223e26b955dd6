"""HoliTom (Shao et al., NeurIPS 2025), outer-LLM stage only (no inner-LLM merge at layer K).

Published stage, on the merged video tokens and the attention each token receives in the
vision encoder:

1. segmentation: a cell is *static* over a window of frames if its cosine similarity between
   every pair of consecutive frames of the window exceeds ``tau``; a dynamic programme over the
   frames picks the windows (length 2..``max_window``, or single frames) that maximise the total
   saving ``#static * (length - 1)`` (ties: single frame, then the shortest window);
2. each window's static cells are averaged over time (one token per cell); the retained
   fraction is rescaled to ``r' = r * TN / (tokens left)``;
3. per window, the averaged static tokens are clustered by DPC-kNN into ``round(n * r')``
   centres (``knn = min(7, centres)``), each centre becoming
   ``beta * centre + (1 - beta) * mean(non-centre members)``; per frame, the ``ceil(n * r')``
   dynamic tokens receiving the most encoder attention are kept (``D = 0``: no contextual ones).

Engine form (``window_compress``), because the published count is data-dependent:

* the budget is ``max(1, TN - round(ratio * TN))``, apportioned over the groups (each window's
  static tokens, each frame's dynamic tokens) in proportion to their sizes by largest remainder,
  instead of ``round``/``ceil`` of ``n * r'`` per group (same ``r' = budget / tokens left``);
* when the budget exceeds the tokens left after averaging (low ratios on static video, where the
  published method would keep fewer), the extra slots restore averaged-away tokens, those least
  similar to the previous frame first; ratio 0 therefore keeps every token unchanged;
* an averaged or merged token takes the index of its window's first frame (its original
  position there); DPC noise comes from ``inputs.seed``;
* attention: ``Need.ENCODER_ATTENTION`` (the published SigLIP attention received, averaged over
  heads and queries, has the same meaning); without it, ``_common.attention_received``'s
  stand-in.

``holitom_compress`` returns the merged embeddings; ``select`` returns its indices.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from vllm_tokenzip.methods import register
from vllm_tokenzip.methods._common import (
    Window,
    attention_received,
    dpc_knn,
    group_mean,
    top_k_sorted,
    window_compress,
)
from vllm_tokenzip.methods.base import Method, Need, VideoInputs, kept_count_rounded

TAU = 0.8
BETA = 0.6
KNN = 7
MAX_WINDOW = 1024


def holitom_windows(
    video: torch.Tensor, tau: float = TAU, max_window: int = MAX_WINDOW
) -> list[Window]:
    """HoliTom's saving-maximising partition of the frames into windows.

    video: [T, N, D]. Returns windows (start, end, static [N] bool) covering 0..T-1 in order.
    """
    num_frames, per_frame = video.shape[:2]
    still = F.cosine_similarity(video[1:], video[:-1], dim=-1) > tau  # [T-1, N]
    run = torch.zeros_like(still, dtype=torch.long)  # run[t]: steps still up to step t
    for t in range(num_frames - 1):
        run[t] = ((run[t - 1] if t else 0) + 1) * still[t]
    best = torch.zeros(num_frames + 1, dtype=torch.long)  # best[i]: best saving of frames < i
    start = list(range(num_frames))
    for end in range(1, num_frames):
        lengths = torch.arange(1, min(end, max_window - 1) + 1)
        counts = torch.bincount(run[end - 1].cpu(), minlength=num_frames)
        still_for = counts.flip(0).cumsum(0).flip(0)  # [L]: cells still for >= L steps
        gains = best[end - lengths] + still_for[lengths] * lengths
        pick = int(gains.argmax())
        best[end + 1] = max(int(best[end]), int(gains[pick]))
        if gains[pick] > best[end]:
            start[end] = end - int(lengths[pick])
    windows = []
    end = num_frames - 1
    while end >= 0:
        first = start[end]
        if end > first:
            static = run[end - 1] >= end - first
        else:
            static = torch.zeros(per_frame, dtype=torch.bool, device=video.device)
        windows.append((first, end, static))
        end = first - 1
    return windows[::-1]


def _reduce_group(
    ids: torch.Tensor,
    feats: torch.Tensor,
    quota: int,
    static: bool,
    *,
    attention: torch.Tensor,
    beta: float,
    knn: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static group: DPC-kNN centres with beta-merge; dynamic group: top encoder attention.

    ids: [n] token indices; feats: [n, D]; attention: [T * N]. Returns ([quota], [quota, D]).
    """
    if not static:
        keep = top_k_sorted(attention[ids], quota)
        return ids[keep], feats[keep]
    centres, assign = dpc_knn(feats, quota, min(knn, quota), seed)
    member = torch.ones_like(assign, dtype=torch.bool)
    member[centres] = False
    absorbed = group_mean(feats[member], assign[member], quota)
    has_members = torch.bincount(assign[member], minlength=quota).unsqueeze(-1) > 0
    merged = beta * feats[centres] + (1 - beta) * absorbed
    return ids[centres], torch.where(has_members, merged, feats[centres])


def holitom_compress(
    video: torch.Tensor,
    attention: torch.Tensor,
    num_keep: int,
    seed: int = 0,
    tau: float = TAU,
    beta: float = BETA,
    knn: int = KNN,
    max_window: int = MAX_WINDOW,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HoliTom outer stage with an exact budget.

    video: [T, N, D]; attention: [T, N] attention received. Returns (indices LongTensor
    [num_keep] sorted into the flattened T * N, embeds [num_keep, D]).
    """
    reduce = partial(
        _reduce_group, attention=attention.flatten().float(), beta=beta, knn=knn, seed=seed
    )
    return window_compress(video, holitom_windows(video, tau, max_window), num_keep, reduce)


def select(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """Engine form: indices of :func:`holitom_compress`; sorted LongTensor [num_keep]."""
    return holitom_compress(inputs.embeds, attention_received(inputs), num_keep, inputs.seed)[0]


METHOD = register(
    Method(
        name="holitom",
        needs=frozenset({Need.EMBEDDINGS, Need.ENCODER_ATTENTION}),
        count_known_in_advance=False,
        kept_count=kept_count_rounded,
        select=select,
        summary="HoliTom outer stage: DP static windows, DPC merge of static, attention top-k",
    )
)
