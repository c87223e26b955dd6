"""PruneVid (Huang et al., ACL 2025), outer stage only (no text-guided KV pruning inside the LLM).

Published outer stage, on the visual tokens before the LLM:

1. segmentation: DPC-kNN (``knn = 7``) clusters the per-frame mean tokens into
   ``int(T * 0.25)`` clusters; each cluster keeps its longest run of consecutive frames, the
   other frames are reassigned, giving contiguous segments;
2. per segment of W >= 2 frames, a cell is *static* if its mean pairwise cosine similarity over
   the segment's frames, ``(||sum_t x_t / ||x_t|| ||^2 - W) / (W (W - 1))``, exceeds ``tau``;
   static cells are averaged over time;
3. the averaged static tokens of a segment, and each frame's dynamic tokens, are clustered by
   DPC-kNN (``knn = 5``) into ``int(n * 0.5)`` clusters (groups of at most 14 static tokens
   stay as they are) and replaced by the cluster means.

Engine form (``window_compress``), because the published count is data-dependent:

* the budget is ``max(1, TN - round(ratio * TN))``, apportioned over the groups in proportion
  to their sizes by largest remainder, instead of the fixed cluster ratio 0.5 and the
  14-token exemption;
* reassignment in step 1: frames outside their cluster's longest run join the run before them
  (frames before the first kept run join it);
* when the budget exceeds the tokens left after averaging, the extra slots restore
  averaged-away tokens, least similar to the previous frame first; ratio 0 keeps every token;
* a cluster mean takes the index of its centre token (an averaged static token: its segment's
  first frame); DPC noise comes from ``inputs.seed``.

``prunevid_compress`` returns the merged embeddings; ``select`` returns its indices.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from vllm_tokenzip.methods import register
from vllm_tokenzip.methods._common import Window, dpc_knn, group_mean, window_compress
from vllm_tokenzip.methods.base import Method, Need, VideoInputs, kept_count_rounded

SEGMENT_RATIO = 0.25
SEGMENT_KNN = 7
TOKEN_KNN = 5
TAU = 0.8


def prunevid_segments(
    video: torch.Tensor, seed: int = 0, segment_ratio: float = SEGMENT_RATIO, knn: int = SEGMENT_KNN
) -> list[tuple[int, int]]:
    """Contiguous segments from DPC-kNN clusters of the frame means.

    video: [T, N, D]. Returns (start, end) pairs covering 0..T-1 in order.
    """
    num_frames = video.shape[0]
    clusters = max(1, int(num_frames * segment_ratio))
    label = dpc_knn(video.float().mean(1), clusters, min(knn, num_frames), seed)[1].tolist()
    longest: dict[int, tuple[int, int]] = {}  # cluster -> its first longest run of frames
    first = 0
    for t in range(1, num_frames + 1):
        if t < num_frames and label[t] == label[first]:
            continue
        start, end = longest.get(label[first], (0, -1))
        if t - 1 - first > end - start:
            longest[label[first]] = (first, t - 1)
        first = t
    starts = sorted(start for start, _ in longest.values())
    starts[0] = 0
    return list(zip(starts, [s - 1 for s in starts[1:]] + [num_frames - 1], strict=True))


def static_cells(frames: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Cells whose mean pairwise cosine similarity over the frames exceeds ``tau``.

    frames: [W, N, D]. Returns [N] bool (all False when W == 1).
    """
    width = frames.shape[0]
    if width == 1:
        return torch.zeros(frames.shape[1], dtype=torch.bool, device=frames.device)
    total = F.normalize(frames.float(), dim=-1).sum(0)
    return (total.pow(2).sum(-1) - width) / (width * (width - 1)) > tau


def _cluster_means(
    ids: torch.Tensor, feats: torch.Tensor, quota: int, static: bool, *, knn: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN into ``quota`` clusters, each replaced by its mean at its centre's index.

    ids: [n]; feats: [n, D]. Returns ([quota], [quota, D]). Static and dynamic groups alike.
    """
    centres, assign = dpc_knn(feats, quota, min(knn, ids.numel()), seed)
    return ids[centres], group_mean(feats, assign, quota)


def prunevid_compress(
    video: torch.Tensor, num_keep: int, seed: int = 0, tau: float = TAU
) -> tuple[torch.Tensor, torch.Tensor]:
    """PruneVid outer stage with an exact budget.

    video: [T, N, D]. Returns (indices LongTensor [num_keep] sorted into the flattened T * N,
    embeds [num_keep, D]).
    """
    windows: list[Window] = [
        (start, end, static_cells(video[start : end + 1], tau))
        for start, end in prunevid_segments(video, seed)
    ]
    reduce = partial(_cluster_means, knn=TOKEN_KNN, seed=seed)
    return window_compress(video, windows, num_keep, reduce)


def select(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """Engine form: indices of :func:`prunevid_compress`; sorted LongTensor [num_keep]."""
    return prunevid_compress(inputs.embeds, num_keep, inputs.seed)[0]


METHOD = register(
    Method(
        name="prunevid",
        needs=frozenset({Need.EMBEDDINGS}),
        count_known_in_advance=False,
        kept_count=kept_count_rounded,
        select=select,
        summary="PruneVid outer stage: segment, average static cells, cluster means",
    )
)
