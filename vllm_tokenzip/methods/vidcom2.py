"""VidCom2 (Liu et al., EMNLP 2025): frame-adaptive keep of the most distinctive tokens.

Published, on the post-merger embeddings: restrict to the half of the channels with the lowest
variance over the video, L2-normalise each token, and score it by a multi-bandwidth Gaussian
similarity ``G(x, c) = sum_a exp(-||x - c||^2 / (2a))``, ``a in {1/8, 1/4, 1/2, 1, 2}``, to the
video mean (``v``) and to its own frame's mean (``f``). Frames less similar to the video on
average get a larger share: ``p = softmax(-mean_n v / 0.01)``,
``k_t = max(round(min(b * (1 + p_t - mean p), 1) * N), 1)`` with ``b`` the kept fraction. Each
frame keeps its ``k_t`` tokens with the lowest ``v + f``.

Engine form: ``sum_t k_t`` only approximates ``b * T * N`` (rounding, clamps), so, as in the
Aphrodite-engine port, a reconcile step meets the budget exactly: surplus tokens are dropped
in descending ``v + f`` order (a frame's best token only once every frame is down to one),
missing ones are added in ascending ``v + f`` order. ``b = num_keep / (T * N)``; the budget is
``max(T, TN - round(ratio * TN))`` (at least one token per frame, as published). The published
count is not known in advance; this one is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_tokenzip.methods import register
from vllm_tokenzip.methods._common import top_k_sorted
from vllm_tokenzip.methods.base import Method, Need, VideoInputs, kept_count_rounded

BANDWIDTHS = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)
FRAME_TEMPERATURE = 0.01


def gaussian_similarity(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``sum_a exp(-||x - centre||^2 / (2a))`` over :data:`BANDWIDTHS`: [..., C] -> [...]."""
    squared = (x - centre).pow(2).sum(-1)
    return sum(torch.exp(-squared / (2 * a)) for a in BANDWIDTHS)


def vidcom2_scores(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Video-level similarity ``v`` and token score ``v + f`` (lower = more distinctive).

    video: [T, N, D]. Returns ([T, N], [T, N]) float32.
    """
    flat = video.flatten(0, 1).float()
    channels = top_k_sorted(-flat.var(0, correction=0), max(1, flat.shape[-1] // 2))
    x = F.normalize(flat[:, channels], dim=-1).view(*video.shape[:2], -1)
    to_video = gaussian_similarity(x, x.mean((0, 1)))
    to_frame = gaussian_similarity(x, x.mean(1, keepdim=True))
    return to_video, to_video + to_frame


def vidcom2_frame_counts(to_video: torch.Tensor, kept_fraction: float) -> torch.Tensor:
    """Published per-frame counts ``k_t``: to_video [T, N] -> LongTensor [T]."""
    weight = torch.softmax(-to_video.mean(1) / FRAME_TEMPERATURE, dim=0)
    scale = (kept_fraction * (1 + weight - weight.mean())).clamp(max=1)
    return (scale * to_video.shape[1]).round().clamp(min=1).long()


def vidcom2_select(video: torch.Tensor, num_keep: int) -> torch.Tensor:
    """VidCom2 per-frame selection reconciled to exactly ``num_keep`` tokens.

    video: [T, N, D]. Returns sorted LongTensor [num_keep] into the flattened T * N.
    """
    num_frames, per_frame = video.shape[:2]
    to_video, score = vidcom2_scores(video)
    counts = vidcom2_frame_counts(to_video, num_keep / (num_frames * per_frame))
    rank = score.argsort(dim=1, stable=True).argsort(dim=1)  # 0 = the frame's most distinctive
    keep = (rank < counts.unsqueeze(1)).flatten()
    score, rank = score.flatten(), rank.flatten()
    surplus = int(keep.sum()) - num_keep
    if surplus > 0:
        kept = keep.nonzero().squeeze(-1)
        order = torch.argsort(score[kept], descending=True, stable=True)
        # frames' best tokens last, the rest in descending score
        order = order[torch.argsort((rank[kept][order] == 0).long(), stable=True)]
        keep[kept[order[:surplus]]] = False
    elif surplus < 0:
        spare = (~keep).nonzero().squeeze(-1)
        keep[spare[torch.argsort(score[spare], stable=True)[:-surplus]]] = True
    return keep.nonzero().squeeze(-1)


def kept_count(num_frames: int, tokens_per_frame: int, ratio: float) -> int:
    """``max(T, TN - round(ratio * TN))``: at least one token per frame."""
    return max(num_frames, kept_count_rounded(num_frames, tokens_per_frame, ratio))


def select(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """Engine form: :func:`vidcom2_select` on ``inputs.embeds`` [T, N, D]."""
    return vidcom2_select(inputs.embeds, num_keep)


METHOD = register(
    Method(
        name="vidcom2",
        needs=frozenset({Need.EMBEDDINGS}),
        count_known_in_advance=False,
        kept_count=kept_count,
        select=select,
        summary="frame-adaptive keep of the most distinctive tokens, reconciled budget (VidCom2)",
    )
)
