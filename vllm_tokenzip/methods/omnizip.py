"""OmniZip (Tao et al., CVPR 2026): audio-guided pruning of interleaved audio/video tokens.

Stages (ALGORITHMS.md section 1, the official 2026 ``omnizip_core`` behaviour):

1. audio saliency: attention each audio-encoder token receives under global attention over the
   last layer's Q/K, pooled in pairs to the LLM's audio tokens (:func:`audio_saliency`);
2. audio selection: the ``round((1 - rho_a) * N_a)`` most salient tokens plus
   ``round(cr * N_a)`` anchors spaced uniformly over the global list of the others;
3. anchor consolidation: each pruned token joins its most similar anchor; an anchor averages in
   its ``merge_size`` best members, softmax-weighted by their best cosine to any video token;
4. windows: maximal runs of video and of audio tokens in the layout, paired in order; a window's
   audio retention S is the kept fraction of its audio run;
5. per-window video prune ratio from S, normalised by the official heuristic;
6. ISTC inside each video run: even frames keep their DPC-kNN top tokens (spatial), odd frames
   the positions that changed most from the previous frame (temporal); the rest are dropped.

:func:`omnizip_reference` reproduces the official code, quirks included. :func:`omnizip_engine`
is the serving form; it differs from the official code as follows:

* the video total is fixed in advance, exactly ``N_v - round(rho_v * N_v)`` (at least 1 when
  there is video), :func:`omnizip_kept_counts`; the official total only approximates
  ``rho_v * N_v`` (clamps, per-frame floor, no normalisation with at most 2 windows);
* stage 5 is replaced by one rule over all frames (:func:`allocate_frames`): a frame keeps about
  ``size * clamp(1 - c + 0.4 * S, 0.25, 0.65)`` tokens, one shift ``c`` for the whole video
  chosen so the total is exact (rounded by ranking single tokens). A window with a higher audio
  retention fraction never keeps a smaller fraction of its video; the official heuristic freezes
  the most and least audio-dense windows and can invert this order. The clamps (rho_min, rho_max
  = 0.35, 0.75) are left only when the budget lies outside their range;
* video runs without audio (audio shorter than the video) count as windows with S = 0 (prune
  most) instead of taking ``rho_v``, so the order above holds for them too;
* frames of one window may keep counts differing by one (earlier frames first), whereas the
  official code keeps ``int(tpf * (1 - ratio))`` in every frame;
* ``N_v`` is the number of video tokens in ``input_ids`` (the official code uses the first
  ``video_grid_thw`` row); without audio every frame has S = 0 (an even split), without video
  only stages 2-3 run (:func:`omnizip_audio_stage`, merge weights from the cosine to the anchor
  as in the official fallback) and keep at least one token, so that an audio item never
  vanishes (vLLM needs its placeholder; video methods keep one token per video likewise). The
  official model calls OmniZip only with both modalities.

Both forms break score ties towards the lower index (stable sorts) so every device agrees; the
official code uses ``topk``, whose order among exactly equal scores is unspecified.
Differences from the paper, shared by both forms (section 1.13): cosine DPC-kNN with unsquared
distances; temporally redundant tokens are dropped, not averaged; 2-frame windows from the layout;
anchors spaced over the global non-dominant list; cross-modal score against the whole video;
heuristic (reference) or fixed-total (engine) normalisation instead of the paper's exact budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from itertools import pairwise

import torch
import torch.nn.functional as F

from vllm_tokenzip.methods import register
from vllm_tokenzip.methods.base import (
    Method,
    Need,
    VideoInputs,
    check_ratio,
    kept_count_rounded,
)

RHO_MIN = 0.35  # least video pruning of a window (hard-coded in the official code)
RHO_MAX = 0.75  # most video pruning of a window
DPC_NEIGHBOURS = 5
SPATIAL_MERGE = 2  # Qwen merger: a grid step of H x W patches gives (H // 2) * (W // 2) tokens

Run = tuple[int, int]
VideoStage = Callable[[torch.Tensor, list[Run], list[float]], torch.Tensor]


def audio_saliency(
    q: torch.Tensor, k: torch.Tensor, *, head_block: int = 4, query_block: int = 512
) -> torch.Tensor:
    """Stage 1: attention received by each audio token, pooled to LLM audio tokens.

    q, k: [H, T, d] last audio-encoder layer queries/keys of all audio, attended globally.
    Returns [T // 2]: the received attention summed over heads and queries / (H * T), last
    element dropped when T is odd, adjacent pairs averaged. Works on [head_block, query_block, T]
    blocks of attention.
    """
    heads, length, dim = q.shape
    q = q.float() / math.sqrt(dim)
    keys_t = k.float().transpose(1, 2)
    received = q.new_zeros(length)
    for h in range(0, heads, head_block):
        for i in range(0, length, query_block):
            logits = q[h : h + head_block, i : i + query_block] @ keys_t[h : h + head_block]
            received += logits.softmax(-1).sum((0, 1))
    received /= heads * length
    return received[: length // 2 * 2].view(-1, 2).mean(1)


def _top(scores: torch.Tensor, count: int, *, largest: bool = True) -> torch.Tensor:
    """Indices [count] of the largest (or smallest) of scores [n]; ties to the lower index."""
    return torch.sort(scores, descending=largest, stable=True).indices[:count]


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of x [n, D] divided by their norm + 1e-6, in float32."""
    x = x.float()
    return x / (x.norm(dim=-1, keepdim=True) + 1e-6)


def audio_split_counts(
    num_audio: int,
    rho_audio: float,
    contextual_ratio: float,
    merge_size: int,
    *,
    min_kept: int = 0,
) -> tuple[int, int]:
    """Stage 2 counts for N_a audio tokens: (dominant, anchors), together at least
    ``min(min_kept, N_a)`` (extra dominant tokens)."""
    dominant = int(min(max(round((1 - rho_audio) * num_audio), 0), num_audio))
    anchors = max(0, round(contextual_ratio * num_audio)) if merge_size > 0 else 0
    anchors = min(anchors, num_audio - dominant)
    return max(dominant, min(min_kept, num_audio) - anchors), anchors


def select_audio(
    saliency: torch.Tensor,
    rho_audio: float,
    contextual_ratio: float,
    merge_size: int,
    *,
    min_kept: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: dominant and anchor audio tokens (counts: :func:`audio_split_counts`).

    saliency: [N_a]. Returns (dominant [n_dom], anchors [n_ctx]) audio indices: the most salient
    tokens, then tokens spaced every ``|R| // n_ctx`` along the ascending list R of the others.
    """
    num_dominant, num_anchors = audio_split_counts(
        saliency.numel(), rho_audio, contextual_ratio, merge_size, min_kept=min_kept
    )
    dominant = _top(saliency, num_dominant)
    rest = torch.ones_like(saliency, dtype=torch.bool)
    rest[dominant] = False
    rest = rest.nonzero().squeeze(1)
    step = max(1, rest.numel() // max(num_anchors, 1))
    return dominant, rest[::step][:num_anchors]


def merge_plan(
    audio: torch.Tensor,
    video: torch.Tensor | None,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    merge_size: int,
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Stage 3 plan: which pruned audio tokens fold into which anchor.

    audio: [N_a, D], video: [N_v, D] or None, anchors: [n_ctx] and candidates: [P] audio
    indices. Each candidate joins the anchor of highest cosine; its score is its best cosine to
    any video token (without video: to its anchor). Returns (anchor, members [m], scores [m])
    for anchors with members, members by descending score, m <= merge_size.
    """
    if anchors.numel() == 0 or candidates.numel() == 0:
        return []
    pruned = _unit(audio[candidates])
    to_anchor = pruned @ _unit(audio[anchors]).T
    owner = to_anchor.argmax(1)
    if video is not None and video.numel():
        score = (pruned @ _unit(video).T).max(1).values
    else:
        score = to_anchor.max(1).values
    plan = []
    for slot, anchor in enumerate(anchors.tolist()):
        members = (owner == slot).nonzero().squeeze(1)
        if members.numel():
            best = members[_top(score[members], merge_size)]
            plan.append((anchor, candidates[best], score[best]))
    return plan


def consolidate(
    audio: torch.Tensor, plan: list[tuple[int, torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Stage 3: anchor a <- (a + sum_p w_p a_p) / (1 + sum w), w = softmax(scores).

    audio: [N_a, D]; plan from :func:`merge_plan`. Returns the updated copy [N_a, D].
    """
    out = audio.clone()
    for anchor, members, scores in plan:
        weights = scores.softmax(0)
        pooled = (audio[members].float() * weights[:, None]).sum(0)
        out[anchor] = ((audio[anchor].float() + pooled) / (1 + weights.sum())).to(out.dtype)
    return out


def omnizip_audio_stage(
    audio: torch.Tensor,
    saliency: torch.Tensor,
    rho_audio: float,
    *,
    video: torch.Tensor | None = None,
    contextual_ratio: float = 0.05,
    merge_size: int = 3,
    min_kept: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 2-3; alone (``video=None, min_kept=1``), the audio-only form, which keeps
    ``omnizip_kept_counts(0, N_a, ...)[0]`` tokens.

    audio: [N_a, D]; saliency: [N_a]; video: [N_v, D] or None. Returns (audio [N_a, D] with
    consolidated anchors, keep mask [N_a] bool).
    """
    dominant, anchors = select_audio(
        saliency, rho_audio, contextual_ratio, merge_size, min_kept=min_kept
    )
    keep = torch.zeros(len(audio), dtype=torch.bool, device=audio.device)
    keep[dominant] = True
    keep[anchors] = True
    plan = merge_plan(audio, video, anchors, (~keep).nonzero().squeeze(1), merge_size)
    return consolidate(audio, plan), keep


def runs(positions: torch.Tensor) -> list[Run]:
    """Maximal runs of consecutive sequence positions.

    positions: [n] ascending positions of one modality's tokens. Returns [start, end) ranges
    into ``positions``.
    """
    if positions.numel() == 0:
        return []
    breaks = ((positions[1:] - positions[:-1]) != 1).nonzero().squeeze(1) + 1
    edges = [0, *breaks.tolist(), positions.numel()]
    return list(pairwise(edges))


def audio_retention(keep_audio: torch.Tensor, audio_runs: list[Run]) -> list[float]:
    """Stage 4: kept fraction S (a float32 mean) of each audio run; keep_audio: [N_a] bool."""
    return [keep_audio[start:end].float().mean().item() for start, end in audio_runs]


def _clamp_ratio(ratio: float) -> float:
    """ratio clamped to [RHO_MIN, RHO_MAX]."""
    return min(max(ratio, RHO_MIN), RHO_MAX)


def window_ratios(
    retention: list[float], run_sizes: list[int], rho_video: float, num_video: int
) -> list[float]:
    """Stage 5 (official heuristic): prune ratio of every video run.

    retention: S of the guided runs (the first ``len(retention)`` video runs); run_sizes: tokens
    of every video run; num_video: N_v from the grid. Unguided runs take rho_video. With more
    than two guided runs, all but the first least and first most pruned are rescaled towards the
    discard target, then shifted once, clamping each time.
    """
    guided = len(retention)
    base = [_clamp_ratio(RHO_MAX - (RHO_MAX - RHO_MIN) * s) for s in retention]
    ratios = base + [rho_video] * (len(run_sizes) - guided)
    target = rho_video * num_video - rho_video * sum(run_sizes[guided:])
    total = sum(b * n for b, n in zip(base, run_sizes[:guided], strict=True))
    if guided <= 2 or abs(total - target) <= 1e-3 or total <= 0:
        return ratios
    low, high = base.index(min(base)), base.index(max(base))
    others = [i for i in range(guided) if i not in (low, high)]
    others_total = sum(base[i] * run_sizes[i] for i in others)
    if not others or others_total <= 0:
        return ratios
    fixed = base[low] * run_sizes[low] + base[high] * run_sizes[high]
    factor = (target - fixed) / others_total
    for i in others:
        ratios[i] = _clamp_ratio(base[i] * factor)
    residual = target - sum(ratios[i] * run_sizes[i] for i in range(guided))
    if abs(residual) > 1e-3:
        shift = residual / sum(run_sizes[i] for i in others)
        for i in others:
            ratios[i] = _clamp_ratio(ratios[i] + shift)
    return ratios


def dpc_knn_scores(frame: torch.Tensor, neighbours: int = DPC_NEIGHBOURS) -> torch.Tensor:
    """DPC-kNN score density * delta of each token (cosine distance), frame: [n, D] -> [n].

    density = exp(-mean distance to the k nearest others); delta = distance to the nearest
    denser token, or to the farthest token for the densest. Needs n >= 2.
    """
    unit = F.normalize(frame.float(), dim=-1)
    dist = 1 - unit @ unit.T
    self_pair = torch.eye(len(frame), dtype=torch.bool, device=frame.device)
    nearest = dist.masked_fill(self_pair, math.inf).topk(min(neighbours, len(frame) - 1), 1, False)
    density = (-nearest.values.mean(1)).exp()
    denser = density[None, :] > density[:, None]
    to_denser = dist.masked_fill(~denser, math.inf).min(1).values
    farthest = dist.masked_fill(self_pair, 0.0).max(1).values
    return density * torch.where(denser.any(1), to_denser, farthest)


def _frame_keep(frame: torch.Tensor, previous: torch.Tensor | None, count: int) -> torch.Tensor:
    """Indices of the ``count`` tokens one ISTC frame keeps; frame: [m, D], previous: [>=m, D].

    Spatial (previous None): top DPC-kNN scores. Temporal: lowest cosine to the previous frame's
    token at the same position.
    """
    size = len(frame)
    if count >= size:
        return torch.arange(size, device=frame.device)
    if count <= 0:
        return torch.zeros(0, dtype=torch.long, device=frame.device)
    if previous is None:
        return _top(dpc_knn_scores(frame), count)
    unit, previous_unit = F.normalize(frame.float(), dim=-1), F.normalize(previous.float(), dim=-1)
    similarity = F.cosine_similarity(unit, previous_unit[:size], dim=-1)
    return _top(similarity, count, largest=False)


def istc_mask(run: torch.Tensor, frame_size: int, frame_keep: list[int]) -> torch.Tensor:
    """Stage 6: ISTC keep mask of one video run.

    run: [n, D] frame-major video tokens; frame f is rows [f * frame_size, (f + 1) * frame_size)
    (the last may be shorter) and keeps frame_keep[f] tokens, spatially for even f, temporally
    for odd f. Rows past ``len(frame_keep)`` frames are dropped. Returns bool [n].
    """
    mask = torch.zeros(len(run), dtype=torch.bool, device=run.device)
    for f, count in enumerate(frame_keep):
        start = f * frame_size
        frame = run[start : start + frame_size]
        previous = run[start - frame_size : start] if f % 2 else None
        mask[start + _frame_keep(frame, previous, count)] = True
    return mask


def _reference_video(
    video: torch.Tensor,
    video_runs: list[Run],
    retention: list[float],
    *,
    tokens_per_frame: int,
    rho_video: float,
    num_video: int,
) -> torch.Tensor:
    """Official stages 5-6: keep mask [N_v] of video [N_v, D] by per-run ratios and ISTC."""
    sizes = [end - start for start, end in video_runs]
    ratios = window_ratios(retention, sizes, rho_video, num_video)
    masks = []
    for (start, end), ratio in zip(video_runs, ratios, strict=True):
        size = end - start
        if size < tokens_per_frame:
            masks.append(istc_mask(video[start:end], size, [size]))
        else:
            count = int(tokens_per_frame * (1 - ratio))
            frames = [count] * (size // tokens_per_frame)
            masks.append(istc_mask(video[start:end], tokens_per_frame, frames))
    return torch.cat(masks) if masks else video.new_zeros(0, dtype=torch.bool)


def allocate_frames(frame_sizes: list[int], density: list[float], budget: int) -> list[int]:
    """Engine stage 5: split exactly ``budget`` kept video tokens over frames.

    frame_sizes: tokens per frame; density: audio retention S of each frame's window (0 without
    audio). Token u (0-based) of a frame of size m ranks by 0.4 * S - (u + 1) / m inside tiers
    u < int(0.25 m), u < int(0.65 m), rest, and the top ``budget`` are kept: the counts follow
    ``m * clamp(1 - c + 0.4 * S, 0.25, 0.65)`` for one shift c, leaving the clamps only when the
    budget does not fit them. Same-size frames with higher S never keep fewer; ties go to
    earlier frames. Returns kept counts per frame.
    """
    sizes = torch.tensor(frame_sizes, dtype=torch.long)
    if not 0 <= budget <= int(sizes.sum()):
        raise ValueError(f"budget {budget} outside [0, {int(sizes.sum())}]")
    frame_of = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    token = torch.arange(len(frame_of)) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    size = sizes[frame_of].double()
    tier = (token >= (size * (1 - RHO_MAX)).floor()).double()
    tier += (token >= (size * (1 - RHO_MIN)).floor()).double()
    spread = (RHO_MAX - RHO_MIN) * torch.tensor(density, dtype=torch.double)
    rank = spread[frame_of] - (token + 1) / size - 2 * tier
    kept = frame_of[_top(rank, budget)]
    return torch.bincount(kept, minlength=len(sizes)).tolist()


def _engine_video(
    video: torch.Tensor,
    video_runs: list[Run],
    retention: list[float],
    *,
    tokens_per_frame: int,
    budget: int,
) -> torch.Tensor:
    """Engine stages 5-6: keep mask [N_v] of video [N_v, D] with exactly ``budget`` True."""
    frames_per_run = [math.ceil((end - start) / tokens_per_frame) for start, end in video_runs]
    run_density = retention + [0.0] * (len(video_runs) - len(retention))
    sizes, density = [], []
    for (start, end), frames, s in zip(video_runs, frames_per_run, run_density, strict=True):
        sizes += [min(tokens_per_frame, end - start - f * tokens_per_frame) for f in range(frames)]
        density += [s] * frames
    counts = allocate_frames(sizes, density, budget)
    masks, first = [], 0
    for (start, end), frames in zip(video_runs, frames_per_run, strict=True):
        run_counts = counts[first : first + frames]
        masks.append(istc_mask(video[start:end], tokens_per_frame, run_counts))
        first += frames
    return torch.cat(masks) if masks else video.new_zeros(0, dtype=torch.bool)


def grid_tokens_per_frame(video_grid_thw: torch.Tensor) -> int:
    """LLM tokens per temporal grid step of the first video; video_grid_thw: [n_videos, 3]."""
    _, height, width = video_grid_thw[0].tolist()
    return (height // SPATIAL_MERGE) * (width // SPATIAL_MERGE)


def _omnizip(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    saliency: torch.Tensor,
    *,
    audio_token_id: int,
    video_token_id: int,
    rho_audio: float,
    contextual_ratio: float,
    merge_size: int,
    video_stage: VideoStage,
    min_audio_kept: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 2-4 shared by both forms, then ``video_stage(video, video_runs, retention)``.

    input_ids: [1, L]; embeds: [1, L, D]; saliency: [N_a]. Returns (embeds [1, L, D] with
    consolidated anchors, keep mask [1, L] bool).
    """
    ids = input_ids[0]
    audio_pos = (ids == audio_token_id).nonzero().squeeze(1)
    video_pos = (ids == video_token_id).nonzero().squeeze(1)
    if saliency.numel() != audio_pos.numel():
        raise ValueError(f"{saliency.numel()} saliency scores for {audio_pos.numel()} audio tokens")
    video = embeds[0, video_pos]
    audio, keep_audio = omnizip_audio_stage(
        embeds[0, audio_pos],
        saliency,
        rho_audio,
        video=video,
        contextual_ratio=contextual_ratio,
        merge_size=merge_size,
        min_kept=min_audio_kept,
    )
    out = embeds.clone()
    out[0, audio_pos] = audio
    video_runs, audio_runs = runs(video_pos), runs(audio_pos)
    retention = audio_retention(keep_audio, audio_runs[: len(video_runs)])
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[audio_pos] = keep_audio
    keep[video_pos] = video_stage(video, video_runs, retention)
    return out, keep[None]


def omnizip_reference(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    audio_saliency: torch.Tensor,
    video_grid_thw: torch.Tensor,
    *,
    audio_token_id: int,
    video_token_id: int,
    rho_audio: float,
    rho_video: float,
    contextual_ratio: float = 0.05,
    merge_size: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OmniZip as the official 2026 code runs it (one video, batch 1).

    input_ids: [1, L]; embeds: [1, L, D]; audio_saliency: [N_a] (:func:`audio_saliency`);
    video_grid_thw: [n_videos, 3], the first row sets tokens per frame and N_v.
    Returns (embeds [1, L, D] with consolidated anchors, keep mask [1, L] bool); the caller
    keeps ``embeds[:, mask]`` and the original positions ``positions[..., mask]``.
    """
    tpf = grid_tokens_per_frame(video_grid_thw)
    stage = partial(
        _reference_video,
        tokens_per_frame=tpf,
        rho_video=rho_video,
        num_video=int(video_grid_thw[0, 0]) * tpf,
    )
    return _omnizip(
        input_ids,
        embeds,
        audio_saliency,
        audio_token_id=audio_token_id,
        video_token_id=video_token_id,
        rho_audio=rho_audio,
        contextual_ratio=contextual_ratio,
        merge_size=merge_size,
        video_stage=stage,
    )


def video_budget(num_video: int, rho_video: float) -> int:
    """Engine video total: N_v - round(rho_v * N_v), at least 1 when N_v > 0."""
    return max(1, num_video - round(rho_video * num_video)) if num_video else 0


def omnizip_kept_counts(
    num_video: int,
    num_audio: int,
    rho_audio: float,
    rho_video: float,
    *,
    contextual_ratio: float = 0.05,
    merge_size: int = 3,
) -> tuple[int, int]:
    """(kept audio, kept video) of :func:`omnizip_engine` or, without video, of the audio-only
    form (at least one audio token), known before any encoder runs."""
    check_ratio(rho_audio)
    check_ratio(rho_video)
    dominant, anchors = audio_split_counts(
        num_audio, rho_audio, contextual_ratio, merge_size, min_kept=0 if num_video else 1
    )
    return dominant + anchors, video_budget(num_video, rho_video)


def omnizip_engine(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    audio_saliency: torch.Tensor,
    video_grid_thw: torch.Tensor | None,
    *,
    audio_token_id: int,
    video_token_id: int,
    rho_audio: float,
    rho_video: float,
    contextual_ratio: float = 0.05,
    merge_size: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OmniZip serving form: the reference stages with the counts of :func:`omnizip_kept_counts`.

    input_ids: [1, L]; embeds: [1, L, D]; audio_saliency: [N_a]; video_grid_thw: [n_videos, 3]
    (first row sets tokens per frame; may be None without video tokens). Returns (embeds
    [1, L, D] with consolidated anchors, keep mask [1, L] bool) keeping exactly the counted
    audio and video tokens and every other token.
    """
    num_video = int((input_ids == video_token_id).sum())
    _, budget = omnizip_kept_counts(
        num_video,
        audio_saliency.numel(),
        rho_audio,
        rho_video,
        contextual_ratio=contextual_ratio,
        merge_size=merge_size,
    )
    tpf = grid_tokens_per_frame(video_grid_thw) if num_video else 1
    return _omnizip(
        input_ids,
        embeds,
        audio_saliency,
        audio_token_id=audio_token_id,
        video_token_id=video_token_id,
        rho_audio=rho_audio,
        contextual_ratio=contextual_ratio,
        merge_size=merge_size,
        video_stage=partial(_engine_video, tokens_per_frame=tpf, budget=budget),
        min_audio_kept=0 if num_video else 1,
    )


def select_video(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """Video-only OmniZip (no audio: one window, S = 0 everywhere) keeping exactly num_keep.

    inputs.embeds: [T, N, D]. Returns sorted indices [num_keep] into the T * N tokens.
    """
    frames, per_frame, dim = inputs.embeds.shape
    counts = allocate_frames([per_frame] * frames, [0.0] * frames, num_keep)
    mask = istc_mask(inputs.embeds.reshape(frames * per_frame, dim), per_frame, counts)
    return mask.nonzero().squeeze(1)


METHOD = register(
    Method(
        name="omnizip",
        needs=frozenset({Need.EMBEDDINGS, Need.AUDIO_SALIENCY, Need.LAYOUT}),
        count_known_in_advance=True,
        kept_count=kept_count_rounded,
        select=select_video,
        modalities=frozenset({"audio", "video"}),
        summary=(
            "OmniZip: audio saliency picks audio tokens and anchors, audio density per 2-s "
            "window sets the video share, ISTC prunes frames spatially/temporally "
            "(engine form: exact totals)"
        ),
    )
)
