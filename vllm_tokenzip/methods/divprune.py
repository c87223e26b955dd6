"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset of the visual tokens.

Greedy max-min diversity on cosine distance ``1 - cos(x_i, x_j)`` over all T * N tokens of a
video as one list. The first pick is the token whose nearest neighbour is farthest; every
later pick is the token farthest from the already chosen set.

The distance matrix is computed once, as in the official code (float32 whatever the input
dtype; N * N floats). Differences from the official loop, same picks otherwise:

* the distance to the chosen set is a running minimum updated with the newest pick's row
  (O(N) per step, O(N * k) in all) instead of re-reducing the [k, N] rows of all chosen
  tokens every step (O(N * k^2) time and a [k, N] copy per step);
* chosen tokens are excluded explicitly, so the indices are always unique (the official loop
  relies on the self-distance being about 0 and can re-pick an index once the remaining tokens
  duplicate chosen ones).

Engine form: ``ratio`` is the fraction pruned, the kept count ``round((1 - ratio) * N)`` (at
least 1) is the official ``round(r * N)`` with ``r = 1 - ratio``; known before the encoders run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_tokenzip.methods import register
from vllm_tokenzip.methods.base import Method, Need, VideoInputs, check_ratio


def cosine_distances(tokens: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of every pair of rows in float32: [N, D] -> [N, N]."""
    unit = F.normalize(tokens.float(), dim=-1)
    return 1.0 - unit @ unit.T


def divprune_order(tokens: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices in the order DivPrune picks them.

    tokens: [N, D]. Returns LongTensor [min(num_keep, N)], unique. The first pick has the
    largest nearest-neighbour distance (second-smallest of its column, the smallest being
    its self-distance); each next pick has the largest distance to the chosen set.
    """
    n = tokens.shape[0]
    num_keep = min(num_keep, n)
    if num_keep <= 0:
        return torch.empty(0, dtype=torch.long)
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    dist = cosine_distances(tokens)
    picks = [int(dist.topk(2, dim=0, largest=False).values[1].argmax())]
    to_chosen = torch.full((n,), float("inf"))
    for _ in range(num_keep - 1):
        torch.minimum(to_chosen, dist[picks[-1]], out=to_chosen)
        to_chosen[picks[-1]] = -float("inf")
        picks.append(int(to_chosen.argmax()))
    return torch.tensor(picks, dtype=torch.long)


def divprune_select(tokens: torch.Tensor, num_keep: int) -> torch.Tensor:
    """DivPrune's kept tokens in original order: [N, D] -> sorted LongTensor [min(num_keep, N)]."""
    return divprune_order(tokens, num_keep).sort().values


def kept_count(num_frames: int, tokens_per_frame: int, ratio: float) -> int:
    """``round((1 - ratio) * T * N)``, at least 1 (the official ``round(r * N)``)."""
    check_ratio(ratio)
    return max(1, round((1.0 - ratio) * num_frames * tokens_per_frame))


def select(inputs: VideoInputs, num_keep: int) -> torch.Tensor:
    """Engine form: DivPrune over all frames' tokens as one list.

    inputs.embeds: [T, N, D]. Returns sorted LongTensor [num_keep] into the flattened T * N.
    """
    return divprune_select(inputs.embeds.flatten(0, 1), num_keep)


register(
    Method(
        name="divprune",
        needs=frozenset({Need.EMBEDDINGS}),
        count_known_in_advance=True,
        kept_count=kept_count,
        select=select,
        summary="greedy max-min cosine diversity over all video tokens (DivPrune)",
    )
)
