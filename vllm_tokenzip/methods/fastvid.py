"""FastVID (Shen et al., NeurIPS 2025): segment the video, keep salient + merged context tokens.

* DySeg cuts the video after frame t when the cosine similarity s_t of the mean features of
  frames t and t+1 is among the c-1 smallest or below tau.
* STPrune keeps, per segment, salient tokens (top ViT attention received) and context tokens
  (DPC-kNN cluster centres among the non-salient tokens of a frame).
* DTM merges every other non-salient token of the segment into its most similar context token.

``fastvid_qwen25vl`` follows the sequential Qwen2.5-VL block and ``fastvid_llava_ov`` the
parallel LLaVA-OneVision block of the official code, with these guards where the official code
fails: DySeg takes ``min(c - 1, T - 1)`` smallest similarities (official: ``topk`` error when
T < c), DPC-kNN uses ``min(4, n)`` neighbours, and an OV anchor takes at most its frame's
non-salient tokens. Similarities and densities are computed in float32.

Engine form (``select``, registered as "fastvid") -- Qwen2.5-VL variant at its defaults with
``retention = 1 - ratio``. The official count is only about ``T * int(N * r)``: segment and
anchor caps (``N // 2`` context, ``N - context`` salient on the one frame that keeps a
sub-segment's tokens) and the ``max(., 1)`` context floor move it. The engine form differs:

* ``kept_count`` is the nominal ``T * int(N * (1 - ratio))`` (at least 1);
* ``select`` splits the exact ``num_keep`` over segments in proportion to their length
  (largest remainder; this is the official ``int(N * r) * L`` when ``T`` divides the budget),
  plans each segment as the official code does, then gives any tokens lost to the caps to the
  segment's frames with room left, last frame first, as extra salient (top attention) tokens;
* it returns indices only: the DTM merge changes embeddings, which an index selection cannot
  carry, so the kept tokens keep their original embeddings;
* the density tie-break noise comes from a generator seeded with ``inputs.seed``.

When no cap binds and ``num_keep = T * int(N * r)``, the kept indices equal the official ones.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from vllm_tokenzip.methods import register
from vllm_tokenzip.methods._common import largest_remainder, split_evenly
from vllm_tokenzip.methods.base import Method, Need, VideoInputs, check_ratio

C_CUTS = 8
TAU = 0.84
TAU_IGNORE = 0.95
CONTEXT_SHARE = 0.4
ANCHOR_STRIDE = 4
BETA = 0.6
_NEIGHBOURS = 4
_NOISE = 1e-6
_FLOAT_GUARD = 1e-9


def frame_similarity(frame_global: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of consecutive frame features: [T, D] -> [T - 1] float32."""
    unit = F.normalize(frame_global.float(), dim=-1)
    return (unit[:-1] * unit[1:]).sum(dim=-1)


def lengths_from_cuts(cut_after: torch.Tensor) -> list[int]:
    """Segment lengths when frame t ends a segment iff ``cut_after[t]``: [T - 1] bool -> list."""
    ends = [*cut_after.nonzero().flatten().tolist(), cut_after.numel()]
    return [b - a for a, b in itertools.pairwise([-1, *ends])]


def dyseg(similarity: torch.Tensor, c: int, tau: float) -> list[int]:
    """DySeg segment lengths: cut at the c-1 smallest similarities and wherever s < tau.

    similarity: [T - 1] from :func:`frame_similarity`. Returns lengths summing to T.
    """
    cut = similarity < tau
    num_smallest = max(0, min(c - 1, similarity.numel()))
    cut[similarity.topk(num_smallest, largest=False).indices] = True
    return lengths_from_cuts(cut)


def density_scores(pool: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """DPC-kNN cluster-centre score rho * delta of each token, batched over frames.

    pool: [B, n, D], n >= 1. Distances are L2 / sqrt(D); rho = exp(-mean squared distance to
    the 4 nearest, self included) + U(0, 1) * 1e-6; delta = distance to the nearest denser
    token (the densest: the largest distance of the frame). Returns [B, n] float32.
    """
    x = pool.float()
    dist = torch.cdist(x, x) / pool.shape[-1] ** 0.5  # [B, n, n]
    nearest = dist.topk(min(_NEIGHBOURS, x.shape[1]), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    density = density + torch.rand(density.shape, generator=generator, device=x.device) * _NOISE
    denser = density[:, None, :] > density[:, :, None]  # [B, i, j]: j denser than i
    farthest = dist.flatten(1).amax(dim=-1)[:, None, None]
    return torch.where(denser, dist, farthest).amin(dim=-1) * density


def context_tokens(
    frame: torch.Tensor, salient: torch.Tensor, k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Top-k DPC-kNN centres among a frame's non-salient tokens.

    frame: [N, D]; salient: [S] frame-local indices. Returns ascending LongTensor [k].
    """
    free = torch.ones(frame.shape[0], dtype=torch.bool, device=frame.device)
    free[salient] = False
    rest = free.nonzero().flatten()
    score = density_scores(frame[rest][None], generator)[0]
    return rest[score.topk(k).indices.sort().values]


def merge_into(
    tokens: torch.Tensor,
    unit: torch.Tensor,
    targets: torch.Tensor,
    candidates: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DTM: each candidate joins its most cosine-similar target; targets absorb their mean.

    tokens, unit: [M, D] (unit = rows of unit norm); targets: [k], candidates: [c] indices.
    A target with m members becomes ``w * target + (1 - w) * mean(members)`` with
    ``w = max(1 / (m + 1), beta)``. Returns [k, D] in ``tokens.dtype``.
    """
    owner = (unit[candidates] @ unit[targets].T).argmax(dim=1)  # [c]
    count = torch.bincount(owner, minlength=targets.numel()).to(tokens.dtype)[:, None]
    total = tokens.new_zeros(targets.numel(), tokens.shape[1]).index_add_(
        0, owner, tokens[candidates]
    )
    weight = (1.0 / (count + 1)).clamp(min=beta)
    return weight * tokens[targets] + (1 - weight) * (total / count.clamp(min=1))


def qwen_segments(
    frame_global: torch.Tensor, c: int, tau: float, tau_ignore: float
) -> list[tuple[int, int, list[int]]]:
    """DySeg segments and their tau_ignore sub-segments.

    frame_global: [T, D]. Returns (first frame, length, sub-segment lengths) per segment.
    """
    similarity = frame_similarity(frame_global)
    segments, start = [], 0
    for length in dyseg(similarity, c, tau):
        inner = similarity[start : start + length - 1]
        segments.append((start, length, lengths_from_cuts(inner < tau_ignore)))
        start += length
    return segments


def qwen_segment_plan(
    sub_lengths: list[int], budget: int, tokens_per_frame: int, d: float, p: int
) -> tuple[list[int], list[int]]:
    """Official per-frame (salient, context) counts of one Qwen2.5-VL segment.

    Context ``max(int(budget * d), 1)``, salient the rest. A multi-frame segment splits the
    salient budget evenly over its sub-segments and the context budget over every p-th
    sub-segment counted from the last; only each sub-segment's last frame keeps tokens
    (context at most N // 2, salient at most N - context). Counts may be <= 0 (keep none).
    """
    num_context = max(int(budget * d), 1)
    num_salient = budget - num_context
    length = sum(sub_lengths)
    if length == 1:
        return [num_salient], [num_context]
    salient_parts = split_evenly(num_salient, len(sub_lengths))
    context_parts = split_evenly(num_context, -(-len(sub_lengths) // p))
    salient, context = [0] * length, [0] * length
    for v, end in enumerate(itertools.accumulate(sub_lengths)):
        anchor, offset = divmod(len(sub_lengths) - 1 - v, p)
        ctx = min(context_parts[anchor], tokens_per_frame // 2) if offset == 0 else 0
        context[end - 1] = ctx
        salient[end - 1] = min(salient_parts[v], tokens_per_frame - ctx)
    return salient, context


def fill_to_budget(
    salient: list[int], context: list[int], budget: int, tokens_per_frame: int
) -> list[int]:
    """Salient counts raised so the segment keeps exactly ``budget`` tokens.

    Tokens missing after the official caps go to frames with room left, last frame first.
    Needs 1 <= budget <= L * N and counts >= 0 summing to at most ``budget``.
    """
    filled, missing = list(salient), budget - sum(salient) - sum(context)
    for f in reversed(range(len(filled))):
        extra = min(missing, tokens_per_frame - filled[f] - context[f])
        filled[f] += extra
        missing -= extra
    return filled


def qwen_segment_tokens(
    video: torch.Tensor,
    attn: torch.Tensor,
    salient: list[int],
    context: list[int],
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Salient and context picks of one segment, frame by frame.

    video: [L, N, D]; attn: [L, N]. Returns salient LongTensor [S] and, per frame with context,
    its ascending context LongTensor [k_f]; all indices into the segment's flattened L * N.
    """
    num_tokens = video.shape[1]
    salient_picks, context_picks = [], []
    for f, (n_salient, n_context) in enumerate(zip(salient, context, strict=True)):
        top = attn[f].topk(max(n_salient, 0)).indices
        salient_picks.append(top + f * num_tokens)
        if n_context > 0:
            picks = context_tokens(video[f], top, n_context, generator)
            context_picks.append(picks + f * num_tokens)
    return torch.cat(salient_picks), context_picks


def qwen_merge_segment(
    video: torch.Tensor, salient: torch.Tensor, contexts: list[torch.Tensor], beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept indices and embeddings of one segment after DTM.

    video: [L, N, D]; salient: [S]; contexts: [k_f] each (flattened segment indices). Each
    context set absorbs the segment's tokens that are neither salient nor in that set.
    Returns ascending LongTensor [K] and embeddings [K, D].
    """
    flat = video.flatten(0, 1)
    unit = F.normalize(flat, dim=-1)
    free = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    free[salient] = False
    merged = []
    for targets in contexts:
        candidates = free.clone()
        candidates[targets] = False
        merged.append(merge_into(flat, unit, targets, candidates.nonzero().flatten(), beta))
    kept = torch.cat([salient, *contexts])
    order = kept.argsort()
    return kept[order], torch.cat([flat[salient], *merged])[order]


def fastvid_qwen25vl(
    video: torch.Tensor,
    vit_attn: torch.Tensor,
    *,
    retention: float = 0.27,
    c: int = C_CUTS,
    tau: float = TAU,
    tau_ignore: float = TAU_IGNORE,
    d: float = CONTEXT_SHARE,
    p: int = ANCHOR_STRIDE,
    beta: float = BETA,
    frame_global: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastVID, sequential Qwen2.5-VL form.

    video: [T, N, D] merged embeddings; vit_attn: [T, N] ViT attention received;
    frame_global: [T, D] frame features for DySeg (default: mean of each frame's tokens);
    generator: source of the density tie-break noise (default: torch's global RNG).
    Returns ascending LongTensor [K] into the flattened T * N and the kept (merged)
    embeddings [K, D] in that order.
    """
    num_tokens = video.shape[1]
    per_frame = int(num_tokens * retention)
    features = video.float().mean(dim=1) if frame_global is None else frame_global
    kept, embeds = [], []
    for start, length, sub_lengths in qwen_segments(features, c, tau, tau_ignore):
        salient, context = qwen_segment_plan(sub_lengths, per_frame * length, num_tokens, d, p)
        segment = video[start : start + length]
        picks = qwen_segment_tokens(
            segment, vit_attn[start : start + length], salient, context, generator
        )
        indices, merged = qwen_merge_segment(segment, *picks, beta)
        kept.append(indices + start * num_tokens)
        embeds.append(merged)
    return torch.cat(kept), torch.cat(embeds)


def ov_anchor_frames(start: int, length: int, p: int) -> list[int]:
    """Frames of a segment whose distance from its last frame is a multiple of p."""
    return list(range(start + length - 1, start - 1, -p))


def ov_contexts(
    flat: torch.Tensor,
    rest: torch.Tensor,
    lengths: list[int],
    num_context: int,
    p: int,
    beta: float,
    generator: torch.Generator | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Context tokens of the LLaVA-OV form and their merged embeddings, anchor by anchor.

    flat: [T * N, D] tokens; rest: [T, n] ascending indices of each frame's non-salient tokens;
    lengths: DySeg segment lengths. Returns lists of context indices [k] and embeddings [k, D].
    """
    unit = F.normalize(flat, dim=-1)
    score = density_scores(flat[rest], generator)  # [T, n]
    kept, embeds, start = [], [], 0
    for length in lengths:
        count = num_context * length // -(-length // p)
        pool = None if count == num_context else rest[start : start + length].flatten()
        for anchor in ov_anchor_frames(start, length, p):
            targets = rest[anchor, score[anchor].topk(min(count, rest.shape[1])).indices]
            candidates = rest[anchor] if pool is None else pool
            embeds.append(merge_into(flat, unit, targets, candidates, beta))
            kept.append(targets)
        start += length
    return kept, embeds


def fastvid_llava_ov(
    video: torch.Tensor,
    vit_attn: torch.Tensor,
    *,
    retention: float = 0.10,
    c: int = C_CUTS,
    tau: float = 0.9,
    d: float = CONTEXT_SHARE,
    p: int = ANCHOR_STRIDE,
    beta: float = BETA,
    frame_global: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastVID, parallel LLaVA-OneVision form.

    Every frame keeps ``S = R - int(R * d)`` salient tokens (``R = int(N * retention)``).
    Anchor frames of a segment take ``floor(C * L / ceil(L / p))`` context tokens
    (``C = R - S``) by their own density score. When that equals C (always for L = 1) each
    anchor absorbs its own frame's non-salient tokens, otherwise all the segment's.
    video: [T, N, D]; vit_attn: [T, N]; frame_global: [T, D] (default: frame means).
    Returns ascending LongTensor [K] into the flattened T * N and embeddings [K, D].
    """
    num_frames, num_tokens, _ = video.shape
    per_frame = int(num_tokens * retention)
    num_salient = per_frame - int(per_frame * d)
    num_context = per_frame - num_salient
    offsets = torch.arange(num_frames, device=video.device)[:, None] * num_tokens  # [T, 1]
    top = vit_attn.topk(num_salient, dim=1).indices  # [T, S]
    free = torch.ones(num_frames, num_tokens, dtype=torch.bool, device=video.device)
    free.scatter_(1, top, False)
    rest = free.nonzero()[:, 1].view(num_frames, -1) + offsets  # [T, N - S], ascending
    flat = video.flatten(0, 1)
    salient = (top + offsets).flatten()
    kept, embeds = [salient], [flat[salient]]
    if num_context > 0:
        features = video.float().mean(dim=1) if frame_global is None else frame_global
        lengths = dyseg(frame_similarity(features), c, tau)
        contexts = ov_contexts(flat, rest, lengths, num_context, p, beta, generator)
        kept += contexts[0]
        embeds += contexts[1]
    indices = torch.cat(kept)
    order = indices.argsort()
    return indices[order], torch.cat(embeds)[order]


def kept_count(num_frames: int, tokens_per_frame: int, ratio: float) -> int:
    """Nominal official count ``T * int(N * (1 - ratio))``, at least 1."""
    check_ratio(ratio)
    return max(1, num_frames * int(tokens_per_frame * (1.0 - ratio) + _FLOAT_GUARD))


def select(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """Engine form: FastVID (Qwen2.5-VL defaults) meeting ``num_keep`` exactly.

    inputs.embeds: [T, N, D]; inputs.encoder_attention: [T, N] (required).
    Returns sorted LongTensor [num_keep] into the flattened T * N.
    """
    video, attn = inputs.embeds, inputs.encoder_attention
    num_frames, num_tokens, _ = video.shape
    if attn is None or tuple(attn.shape) != (num_frames, num_tokens):
        raise ValueError(
            "fastvid needs encoder_attention of shape [T, N] = "
            f"{[num_frames, num_tokens]} (ViT attention received per token)"
        )
    if not 0 <= num_keep <= num_frames * num_tokens:
        raise ValueError(f"num_keep={num_keep} outside [0, {num_frames * num_tokens}]")
    generator = torch.Generator(device=video.device).manual_seed(inputs.seed)
    segments = qwen_segments(video.float().mean(dim=1), C_CUTS, TAU, TAU_IGNORE)
    lengths = torch.tensor([length for _, length, _ in segments])
    budgets = largest_remainder(lengths * num_tokens, num_keep).tolist()
    kept = []
    for (start, length, sub_lengths), budget in zip(segments, budgets, strict=True):
        if budget == 0:
            continue
        salient, context = qwen_segment_plan(
            sub_lengths, budget, num_tokens, CONTEXT_SHARE, ANCHOR_STRIDE
        )
        salient = fill_to_budget(salient, context, budget, num_tokens)
        segment = slice(start, start + length)
        picks, contexts = qwen_segment_tokens(
            video[segment], attn[segment], salient, context, generator
        )
        kept.append(torch.cat([picks, *contexts]) + start * num_tokens)
    return torch.cat(kept).sort().values if kept else torch.empty(0, dtype=torch.long)


register(
    Method(
        name="fastvid",
        needs=frozenset({Need.EMBEDDINGS, Need.ENCODER_ATTENTION}),
        count_known_in_advance=False,
        kept_count=kept_count,
        select=select,
        summary="DySeg segments; salient + DPC-kNN context tokens per segment (FastVID)",
    )
)
