"""Helpers shared by the video methods: ranking, apportioning, grids, clustering, windows.

Pure torch. Index tensors are int64 on the input's device unless stated otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vllm_tokenzip.methods.base import VideoInputs

# (first frame, last frame, static [N] bool): a run of frames whose static positions are
# represented by one time-averaged token each.
Window = tuple[int, int, torch.Tensor]
# reduce(ids [n], feats [n, D], quota, static) -> (kept ids [quota], embeds [quota, D])
GroupReduce = Callable[[torch.Tensor, torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest of ``scores`` [n] in ascending order; ties keep the lower
    position. Returns LongTensor [k]."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:k].sort().values


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal integers; the first ``total % parts`` are one larger."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def largest_remainder(sizes: torch.Tensor, total: int) -> torch.Tensor:
    """Apportion ``total <= sizes.sum()`` over groups in proportion to ``sizes`` [G] (int64).

    Integer largest-remainder method: no quota exceeds its size; ties go to earlier groups.
    Returns LongTensor [G] summing to ``total``.
    """
    share = sizes.cpu() * total
    whole = int(sizes.sum())
    quota = share // whole
    quota[top_k_sorted(share % whole, total - int(quota.sum()))] += 1
    return quota


def even_positions(grid_hw: tuple[int, int], k: int) -> torch.Tensor:
    """Raster indices of ``k`` cells spread evenly over an H x W grid (0 <= k <= H * W).

    Rows are evenly spaced, the cells of each row evenly spaced within it; a k that fits an
    r x c subgrid gives exactly that subgrid. Returns sorted LongTensor [k] (CPU).
    """
    height, width = grid_hw
    rows = max(1, min(height, k, max(-(-k // width), round(math.sqrt(k * height / width)))))
    picked = []
    for i, count in enumerate(split_evenly(k, rows)):
        row = (2 * i + 1) * height // (2 * rows)
        picked += [row * width + (2 * j + 1) * width // (2 * count) for j in range(count)]
    return torch.tensor(picked, dtype=torch.long)


def attention_received(inputs: VideoInputs) -> torch.Tensor:
    """Per-frame attention each token receives: [T, N] float32.

    ``inputs.encoder_attention`` when given; otherwise a stand-in computed from the
    embeddings, the attention of the frame's mean token over the frame:
    ``softmax_n(mean_t . x_{t,n} / sqrt(D))``.
    """
    if inputs.encoder_attention is not None:
        return inputs.encoder_attention.float()
    x = inputs.embeds.float()
    logits = (x @ x.mean(1).unsqueeze(-1)).squeeze(-1) / math.sqrt(x.shape[-1])
    return logits.softmax(-1)


def group_mean(x: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of the rows of ``x`` [n, D] per group id ``groups`` [n]; empty groups give zeros.

    Returns [num_groups, D].
    """
    sums = x.new_zeros(num_groups, x.shape[-1]).index_add_(0, groups, x)
    counts = torch.bincount(groups, minlength=num_groups).clamp(min=1)
    return sums / counts.unsqueeze(-1).to(x.dtype)


def dpc_knn(
    x: torch.Tensor, num_centres: int, knn: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density.

    Distances ``||x_i - x_j|| / sqrt(D)``; density ``exp(-mean of the squared distances to the
    knn nearest, self included)`` plus ``U(0, 1) * 1e-6`` noise from ``seed``; ``delta`` = the
    distance to the nearest denser point (the densest point: the largest distance overall);
    centres = top ``num_centres`` of ``density * delta``. Every point joins its nearest centre.

    x: [n, D], 1 <= num_centres <= n, 1 <= knn <= n. Returns (centres LongTensor [c] sorted,
    assign LongTensor [n] with values in [0, c), each centre assigned to itself).
    """
    x = x.float()
    dist = torch.cdist(x, x) / math.sqrt(x.shape[-1])
    nearest = dist.topk(knn, dim=-1, largest=False).values
    noise = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed)) * 1e-6
    density = torch.exp(-(nearest**2).mean(-1)) + noise.to(x.device)
    denser = density.unsqueeze(0) > density.unsqueeze(1)  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centres = top_k_sorted(delta * density, num_centres)
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(num_centres, device=x.device)
    return centres, assign


def window_compress(
    video: torch.Tensor, windows: list[Window], num_keep: int, reduce: GroupReduce
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge each window's static positions over time, then meet ``num_keep`` exactly.

    A static position of window [s, e] becomes one token, the mean over frames s..e, at the
    index of frame s. If that leaves at most ``num_keep`` tokens, all are kept and the
    remaining slots restore averaged-away tokens, those least like the previous frame first
    (restored tokens leave their window's mean). Otherwise ``num_keep`` is apportioned over
    groups (each window's static tokens; each frame's other tokens) by largest remainder and
    ``reduce`` picks and merges within each group.

    video: [T, N, D]; windows: a partition of the frames (``static`` all False when s == e);
    1 <= num_keep <= T * N. Returns (indices LongTensor [num_keep] sorted, embeds [num_keep, D]).
    """
    num_frames, per_frame, dim = video.shape
    flat = video.reshape(-1, dim).float()
    own = torch.arange(flat.shape[0], device=video.device)
    unit = own.view(num_frames, per_frame).clone()
    for start, end, static in windows:
        unit[start : end + 1, static] = unit[start, static]
    unit = unit.flatten()
    merged = (unit != own).nonzero().squeeze(-1)
    num_units = flat.shape[0] - merged.numel()
    if num_keep >= num_units:
        change = 1 - F.cosine_similarity(flat[merged], flat[merged - per_frame], dim=-1)
        restored = merged[top_k_sorted(change, num_keep - num_units)]
        unit[restored] = restored
        kept = unit.unique()
        return kept, group_mean(flat, unit, flat.shape[0])[kept].to(video.dtype)
    means = group_mean(flat, unit, flat.shape[0])
    groups: list[tuple[torch.Tensor, bool]] = []
    for start, end, static in windows:
        if static.any():
            groups.append((start * per_frame + static.nonzero().squeeze(-1), True))
        dynamic = (~static).nonzero().squeeze(-1)
        groups += [(t * per_frame + dynamic, False) for t in range(start, end + 1)]
    quotas = largest_remainder(torch.tensor([ids.numel() for ids, _ in groups]), num_keep)
    parts = [
        reduce(ids, means[ids], int(quota), is_static)
        for (ids, is_static), quota in zip(groups, quotas, strict=True)
        if quota > 0
    ]
    indices = torch.cat([ids for ids, _ in parts])
    embeds = torch.cat([part for _, part in parts])
    order = indices.argsort()
    return indices[order], embeds[order].to(video.dtype)
