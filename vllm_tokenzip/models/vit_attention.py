"""Attention each post-merger video token receives in the Qwen2.5-VL vision tower.

Feeds ``VideoInputs.encoder_attention`` ([T, N]) to the methods that need it (fastvid,
holitom, visionzip) on Qwen2.5-VL and on the Qwen2.5-Omni thinker, which reuses the tower.

Definition. Let ``q, k`` be the rotated queries and keys ([S, H, d], patches in the tower's
window order) entering the attention kernel of the tower's LAST block, and ``cu_seqlens`` the
segment bounds that block attends within (exactly what vLLM passes to the kernel). In
Qwen2.5-VL / Omni the last block is a full-attention block (``fullatt_block_indexes``) and a
segment is one temporal grid step of one video (``H * W`` patches). For a patch ``j`` of
segment ``s`` (length ``L``)::

    received[j] = 1 / (H * L) * sum_h sum_{i in s} softmax_{j' in s}(q_ih . k_j'h * scale)[j]

i.e. the softmax attention probabilities, averaged over heads and over the segment's queries;
they sum to 1 over each segment. A post-merger token's value is the mean of its
``spatial_merge_size ** 2`` patches, so each frame of the [T, N] result sums to
``1 / spatial_merge_size ** 2``; tokens follow the merger's output order (frame-major, raster
order of the merged grid), the window permutation being undone as the tower undoes it.
Probabilities are computed in float32, a block of queries at a time (at most
``QUERY_BLOCK_ELEMENTS`` logits alive), so the cost is one extra ``q k^T`` of the last block
and its memory stays bounded.

Capture: :func:`capture_last_attention` adds a forward pre-hook to the last block's attention
kernel for the duration of the real tower forward only (requests whose method needs the
attention); other requests run the stock tower untouched. The hook does not survive a
torch.compile'd encoder (``compile_mm_encoder``, off by default) and sees one shard per rank
under the data-parallel encoder: :func:`video_attention` then refuses with a RuntimeError.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

QUERY_BLOCK_ELEMENTS = 1 << 24  # logits per query block: 64 MiB in float32


def segment_received(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention received by each key of one full-attention segment.

    query, key: [L, H, d]. Returns [L] float32, the softmax probabilities averaged over heads
    and queries (sums to 1).
    """
    q = query.float().transpose(0, 1)  # [H, L, d]
    k_t = key.float().permute(1, 2, 0)  # [H, d, L]
    heads, length = q.shape[:2]
    step = max(1, QUERY_BLOCK_ELEMENTS // (heads * length))
    total = q.new_zeros(length)
    for start in range(0, length, step):
        probs = (q[:, start : start + step] @ k_t * scale).softmax(-1)  # [H, b, L]
        total += probs.sum(dim=(0, 1))
    return total / (heads * length)


def received_attention(
    query: torch.Tensor, key: torch.Tensor, cu_seqlens: Sequence[int], scale: float
) -> torch.Tensor:
    """Attention received by each patch, within the segments of ``cu_seqlens``.

    query, key: [S, H, d]; cu_seqlens: [n + 1] segment bounds (repeated bounds, as in padded
    cu_seqlens, give empty segments). Returns [S] float32; patches outside every segment get 0.
    """
    out = torch.zeros(query.shape[0], dtype=torch.float32, device=query.device)
    for start, end in itertools.pairwise(int(b) for b in cu_seqlens):
        if end > start:
            out[start:end] = segment_received(query[start:end], key[start:end], scale)
    return out


def merged_token_attention(
    received: torch.Tensor, merge_unit: int, reverse_indices: torch.Tensor
) -> torch.Tensor:
    """Per-patch attention [S] in window order -> [S / merge_unit] in the merger's output order.

    Consecutive ``merge_unit`` patches form one merge group (as the merger reads them);
    reverse_indices: [S / merge_unit], the tower's inverse window permutation.
    """
    return received.view(-1, merge_unit).mean(dim=1)[reverse_indices.to(received.device)]


def split_videos(
    tokens: torch.Tensor, grid_thw: Sequence[Sequence[int]], merge_size: int
) -> tuple[torch.Tensor, ...]:
    """tokens: [M] over all videos -> one [T, H' * W'] tensor per video of grid (T, H, W)."""
    shapes = [(int(t), int(h) * int(w) // merge_size**2) for t, h, w in grid_thw]
    parts = tokens.split([t * n for t, n in shapes])
    return tuple(part.view(shape) for part, shape in zip(parts, shapes, strict=True))


def reverse_window_indices(
    visual: torch.nn.Module, grid_thw: Sequence[Sequence[int]]
) -> torch.Tensor:
    """The tower's inverse window permutation over the merge groups of all videos: [M] long.

    Built as ``Qwen2_5_VisionTransformer.prepare_encoder_metadata`` builds it.
    """
    parts, offset = [], 0
    for t, h, w in grid_thw:
        t, h, w = int(t), int(h), int(w)
        parts.append(visual.get_window_index_thw(t, h, w)[0] + offset)
        offset += t * h * w // visual.spatial_merge_unit
    return torch.cat(parts).argsort()


@contextmanager
def capture_last_attention(visual: torch.nn.Module) -> Iterator[list[dict[str, object]]]:
    """Collects what enters the last block's attention kernel while the block is active.

    Yields a list that receives one dict per kernel call: query / key [S, H, d] (detached),
    cu_seqlens [n + 1] (on the host) and the kernel's scale.
    """
    kernel = visual.blocks[-1].attn.attn
    captured: list[dict[str, object]] = []

    def hook(module, args, kwargs) -> None:
        named = dict(zip(("query", "key", "value", "cu_seqlens"), args, strict=False)) | kwargs
        captured.append(
            {
                "query": named["query"].detach().squeeze(0),
                "key": named["key"].detach().squeeze(0),
                "cu_seqlens": named["cu_seqlens"].tolist(),
                "scale": module.scale,
            }
        )

    handle = kernel.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def video_attention(
    visual: torch.nn.Module,
    captured: Sequence[dict[str, object]],
    grid_thw: Sequence[Sequence[int]],
) -> tuple[torch.Tensor, ...]:
    """Encoder attention [T, N] of each video from one captured tower forward.

    captured: from :func:`capture_last_attention` around ``visual(pixels, grid_thw)``.
    """
    if len(captured) != 1:
        raise RuntimeError(
            f"tokenzip: expected one capture of the vision tower's last attention, got "
            f"{len(captured)} (data-parallel or compiled encoders are not supported)"
        )
    call = captured[0]
    with torch.no_grad():
        received = received_attention(
            call["query"], call["key"], call["cu_seqlens"], float(call["scale"])
        )
        tokens = merged_token_attention(
            received, visual.spatial_merge_unit, reverse_window_indices(visual, grid_thw)
        )
    return split_videos(tokens, grid_thw, visual.spatial_merge_size)
