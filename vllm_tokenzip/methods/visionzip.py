"""VisionZip (Yang et al., CVPR 2025) adapted to encoders without a [CLS] token, per frame.

Published (CLIP, inside the vision tower, layer -2): *dominant* tokens are the patches the
[CLS] token attends to most (plus [CLS] itself); the other patches are summarised by
*contextual* tokens: targets picked at a uniform stride over the non-dominant patches, every
remaining patch assigned to its most similar target (cosine of the layer's head-averaged keys),
and each target replaced by ``target + mean(assigned)``.

Adaptation for Qwen2.5-VL / Qwen2.5-Omni (no [CLS]), applied to each frame's post-merger
tokens, since the video encoder sees frames as separate images:

* dominant score = the attention each merged token *receives* in the vision encoder
  (``Need.ENCODER_ATTENTION``, [T, N]); without it, a stand-in from the embeddings: the
  attention of the frame's mean token (``_common.attention_received``);
* contextual similarity = cosine of the post-merger embeddings (the keys are not kept);
* the budget ``max(1, TN - round(ratio * TN))`` is split evenly over frames; within a frame of
  budget k, ``round(k * 10 / 64)`` tokens are contextual (the README's 54 + 10 split) and the
  rest dominant; with no [CLS], all k slots go to patches;
* kept tokens stay at their original indices (sorted), instead of [dominant, contextual] order.

Count known before the encoders run. ``visionzip_compress`` also returns the contextual
tokens' merged embeddings; ``select`` returns its indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_tokenzip.methods import register
from vllm_tokenzip.methods._common import (
    attention_received,
    group_mean,
    split_evenly,
    top_k_sorted,
)
from vllm_tokenzip.methods.base import Method, Need, VideoInputs, kept_count_rounded

CONTEXTUAL_SHARE = 10 / 64


def visionzip_frame(
    tokens: torch.Tensor, attention: torch.Tensor, num_keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on one frame.

    tokens: [N, D]; attention: [N] attention received; 0 <= num_keep <= N.
    Returns (indices LongTensor [num_keep] sorted, embeds [num_keep, D]).
    """
    num_contextual = round(num_keep * CONTEXTUAL_SHARE)
    dominant = top_k_sorted(attention, num_keep - num_contextual)
    if num_contextual == 0:
        return dominant, tokens[dominant]
    rest = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    rest[dominant] = False
    rest = rest.nonzero().squeeze(-1)
    step = max(1, rest.numel() // num_contextual)
    is_target = torch.zeros_like(rest, dtype=torch.bool)
    is_target[torch.arange(0, rest.numel(), step, device=rest.device)[:num_contextual]] = True
    targets, others = rest[is_target], rest[~is_target]
    unit = F.normalize(tokens.float(), dim=-1)
    owner = (unit[others] @ unit[targets].T).argmax(-1)
    contextual = tokens[targets] + group_mean(tokens[others], owner, num_contextual)
    indices = torch.cat([dominant, targets])
    order = indices.argsort()
    return indices[order], torch.cat([tokens[dominant], contextual])[order]


def visionzip_compress(
    video: torch.Tensor, attention: torch.Tensor, num_keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip per frame with ``num_keep`` split evenly over frames (earlier frames +1).

    video: [T, N, D]; attention: [T, N]. Returns (indices LongTensor [num_keep] sorted into the
    flattened T * N, embeds [num_keep, D]).
    """
    num_frames, per_frame = video.shape[:2]
    parts = [
        visionzip_frame(video[t], attention[t], k)
        for t, k in enumerate(split_evenly(num_keep, num_frames))
    ]
    indices = torch.cat([t * per_frame + ids for t, (ids, _) in enumerate(parts)])
    return indices, torch.cat([embeds for _, embeds in parts])


def select(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """Engine form: indices of :func:`visionzip_compress`; sorted LongTensor [num_keep]."""
    return visionzip_compress(inputs.embeds, attention_received(inputs), num_keep)[0]


METHOD = register(
    Method(
        name="visionzip",
        needs=frozenset({Need.EMBEDDINGS, Need.ENCODER_ATTENTION}),
        count_known_in_advance=True,
        kept_count=kept_count_rounded,
        select=select,
        summary="per frame: top encoder-attention tokens + merged contextual tokens (VisionZip)",
    )
)
