"""Which requests evict, with what budget and policy.

A request opts in with ``vllm_xargs`` (``SamplingParams.extra_args``):
``{"tokenzip_kv_budget": N, "tokenzip_kv_policy": "streamingllm" | "snapkv" | "h2o"}``.
Server defaults come from the environment of ``vllm serve``: ``TOKENZIP_KV_BUDGET`` (unset or
0: no eviction) and ``TOKENZIP_KV_POLICY`` (default ``streamingllm``). A request's own
``tokenzip_kv_budget`` of 0 turns eviction off for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from vllm_tokenzip.kv.policies import make_policy

BUDGET_KEY = "tokenzip_kv_budget"
POLICY_KEY = "tokenzip_kv_policy"
FIGURES_KEY = "tokenzip"  # a finished request's engine figures, in kv_transfer_params
DEFAULT_POLICY = "streamingllm"


@dataclass(frozen=True)
class EvictionRequest:
    """A request's eviction settings: keep ``budget`` entries per layer and kv-head."""

    budget: int
    policy: str


def eviction_settings(extra_args: dict[str, Any] | None) -> EvictionRequest | None:
    """The settings for a request's ``extra_args``, or ``None`` when it does not evict.

    Raises ValueError for a malformed budget or policy, or a budget below the policy's
    protected entries.
    """
    extra_args = extra_args or {}
    raw_budget = extra_args.get(BUDGET_KEY, os.environ.get("TOKENZIP_KV_BUDGET") or 0)
    policy = str(extra_args.get(POLICY_KEY, os.environ.get("TOKENZIP_KV_POLICY", DEFAULT_POLICY)))
    try:
        budget = int(raw_budget)
    except (TypeError, ValueError):
        raise ValueError(f"{BUDGET_KEY} must be an integer, got {raw_budget!r}") from None
    if budget < 0:
        raise ValueError(f"{BUDGET_KEY} must be >= 0, got {budget}")
    if budget == 0:
        return None
    minimum = make_policy(policy).min_budget()
    if budget < max(minimum, 1):
        raise ValueError(f"{BUDGET_KEY}={budget} is below {policy}'s protected {minimum} entries")
    return EvictionRequest(budget=budget, policy=policy)
