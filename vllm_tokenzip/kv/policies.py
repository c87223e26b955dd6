"""KV-cache eviction policies as small pure-torch scoring classes (NVIDIA kvpress style).

Each policy only defines :meth:`EvictionPolicy.score`; the shared selection in the base class
protects the attention sinks (the first ``sinks`` entries) and the recent window (the last
``window`` entries), then keeps the ``budget`` highest-scoring entries per kv-head. Every
kv-head of a layer keeps the same count, which is what physical compaction of a paged cache
needs (one sequence length per request and layer). Ties are broken towards the older entry,
so a selection is deterministic.

Index space: ``P`` entries of one request in one layer, in physical (cache) order, which is
also semantic order: compaction keeps the kept entries sorted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Observation:
    """What the scorers may look at, for one request in one layer.

    keys: ``[H_kv, P, D]`` cached keys (after RoPE).
    queries: ``[H_q, W, D]`` the last ``W`` queries (after RoPE), the last one at entry
        ``P - 1``; ``None`` when the policy needs none.
    accumulated: ``[H_kv, P]`` attention mass each entry received so far; ``None`` when the
        policy needs none.
    """

    keys: torch.Tensor
    queries: torch.Tensor | None = None
    accumulated: torch.Tensor | None = None


def attention_mass(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probability each key receives from ``queries``, summed over the queries and
    averaged over the query heads of each kv-head group (GQA).

    queries: ``[H_q, Q, D]``, query ``i`` sitting at entry ``P - Q + i`` (causal).
    keys: ``[H_kv, P, D]``. Returns ``[H_kv, P]`` in float32.
    """
    num_q_heads, num_queries, _ = queries.shape
    num_kv_heads, num_keys, _ = keys.shape
    group = num_q_heads // num_kv_heads
    expanded = keys.float().repeat_interleave(group, dim=0)
    logits = torch.einsum("hqd,hkd->hqk", queries.float(), expanded) * scale
    query_pos = torch.arange(num_keys - num_queries, num_keys).unsqueeze(1)
    logits.masked_fill_(torch.arange(num_keys).unsqueeze(0) > query_pos, float("-inf"))
    mass = logits.softmax(dim=-1).sum(dim=1)
    return mass.view(num_kv_heads, group, num_keys).mean(dim=1)


class EvictionPolicy:
    """Base class: protected sinks and recent window, top-``budget`` selection per kv-head.

    Subclasses set :attr:`name`, what they observe, and implement :meth:`score`.
    """

    name: str = ""
    needs_queries: bool = False
    needs_accumulated: bool = False

    def __init__(self, sinks: int = 0, window: int = 0) -> None:
        if sinks < 0 or window < 0:
            raise ValueError("sinks and window must be >= 0")
        self.sinks = sinks
        self.window = window

    def min_budget(self) -> int:
        """The smallest budget that keeps every protected entry."""
        return self.sinks + self.window

    def score(self, obs: Observation, scale: float) -> torch.Tensor:
        """``[H_kv, P]`` importance of every entry (higher is kept first)."""
        raise NotImplementedError

    def select(self, obs: Observation, budget: int, scale: float) -> torch.Tensor:
        """``[H_kv, min(budget, P)]`` kept entry indices per kv-head, ascending."""
        if budget < self.min_budget():
            raise ValueError(f"{self.name}: budget {budget} < sinks + window")
        num_kv_heads, num_keys, _ = obs.keys.shape
        if budget >= num_keys:
            return torch.arange(num_keys).expand(num_kv_heads, num_keys).clone()
        scores = self.score(obs, scale).float().clone()
        protected = torch.zeros(num_keys, dtype=torch.bool)
        protected[: self.sinks] = True
        if self.window:
            protected[-self.window :] = True
        scores[:, protected] = float("inf")
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        return order[:, :budget].sort(dim=-1).values


class StreamingLLM(EvictionPolicy):
    """Attention sinks plus the most recent entries (Xiao et al., 2023): the score is the
    entry's position, so the newest entries win after the protected sinks."""

    name = "streamingllm"

    def __init__(self, sinks: int = 4) -> None:
        super().__init__(sinks=sinks, window=0)

    def score(self, obs: Observation, scale: float) -> torch.Tensor:
        num_kv_heads, num_keys, _ = obs.keys.shape
        return torch.arange(num_keys, dtype=torch.float32).expand(num_kv_heads, num_keys)


class SnapKV(EvictionPolicy):
    """Attention from the last ``window`` queries (the observation window), summed, GQA-averaged
    and smoothed by 1-D average pooling (Li et al., 2024); the window itself is kept."""

    name = "snapkv"
    needs_queries = True

    def __init__(self, window: int = 8, kernel_size: int = 5, sinks: int = 0) -> None:
        if kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd")
        super().__init__(sinks=sinks, window=window)
        self.kernel_size = kernel_size

    def score(self, obs: Observation, scale: float) -> torch.Tensor:
        if obs.queries is None:
            raise ValueError("SnapKV needs the observation-window queries")
        mass = attention_mass(obs.queries, obs.keys, scale)
        pad = self.kernel_size // 2
        return F.avg_pool1d(mass.unsqueeze(1), self.kernel_size, stride=1, padding=pad).squeeze(1)


class H2O(EvictionPolicy):
    """Heavy hitters: attention accumulated over every query so far, plus a recent window
    (Zhang et al., 2023)."""

    name = "h2o"
    needs_accumulated = True

    def __init__(self, window: int = 8, sinks: int = 0) -> None:
        super().__init__(sinks=sinks, window=window)

    def score(self, obs: Observation, scale: float) -> torch.Tensor:
        if obs.accumulated is None:
            raise ValueError("H2O needs the accumulated attention")
        return obs.accumulated


POLICIES: dict[str, type[EvictionPolicy]] = {cls.name: cls for cls in (StreamingLLM, SnapKV, H2O)}


def make_policy(name: str) -> EvictionPolicy:
    """A policy with its default parameters, by name (``streamingllm``, ``snapkv``, ``h2o``)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown KV eviction policy {name!r}; known: {sorted(POLICIES)}"
        ) from None
