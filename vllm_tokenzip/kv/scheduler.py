"""Scheduler side of decode-time KV eviction (``--scheduler-cls``; vLLM 0.32-0.33, V1).

Accounting is in *physical* entries: a request that was compacted to ``B`` entries holds
``semantic length - offset`` entries, and the KV cache manager sees exactly that (through
:class:`_PhysicalView`), so it allocates blocks for the entries that exist, not for the
tokens generated so far.

A compaction is planned here, at schedule time, for every running request in decode whose
cache reached ``budget + block_size`` entries (amortised: one compaction every
``block_size`` tokens, never more than ``cdiv(budget, block_size) + 1`` blocks held). The
plan frees the request's blocks past ``cdiv(budget, block_size)`` at once and travels to the
worker on ``SchedulerOutput.tokenzip_kv``; the worker moves the kept entries into the first
blocks *before* the step's forward pass, so a freed block that is handed to another request
in the same step is read before anyone writes it. Finished, aborted and preempted requests
free all their blocks through vLLM's own path (the manager's block list is kept truthful).

Prefix caching is turned off (with a log line): compacted blocks must never be shared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.request import Request, RequestStatus

from vllm_tokenzip import metrics
from vllm_tokenzip.kv.compaction import cdiv
from vllm_tokenzip.kv.request import EvictionRequest, eviction_settings
from vllm_tokenzip.scheduler import TokenZipScheduler

logger = logging.getLogger("vllm.tokenzip.kv")
PLAN_ATTR = "tokenzip_kv"


@dataclass(frozen=True)
class CompactionPlan:
    """Compact one request from ``length`` to ``budget`` entries; afterwards its semantic
    length exceeds its physical length by ``offset``."""

    length: int
    budget: int
    offset: int
    policy: str


@dataclass
class _Tracked:
    settings: EvictionRequest
    offset: int = 0
    peak_blocks: int = 0  # most blocks held since the first compaction


class _PhysicalView:
    """A request as the KV cache manager should see it: lengths in physical entries."""

    def __init__(self, request: Request, offset: int) -> None:
        self._request = request
        self.num_computed_tokens = request.num_computed_tokens - offset
        self.num_tokens = request.num_tokens - offset
        self.num_prompt_tokens = min(request.num_prompt_tokens, self.num_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


class EvictingScheduler(TokenZipScheduler):
    """V1 scheduler that plans KV compactions and accounts in physical entries (and reports
    pruning time, as :class:`~vllm_tokenzip.scheduler.TokenZipScheduler`)."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        if vllm_config.scheduler_config.async_scheduling or vllm_config.speculative_config:
            raise ValueError("tokenzip KV eviction needs synchronous scheduling, no spec decode")
        if vllm_config.cache_config.enable_prefix_caching:
            logger.info(
                "tokenzip KV eviction: prefix caching disabled (compacted blocks are private)"
            )
            vllm_config.cache_config.enable_prefix_caching = False
        super().__init__(vllm_config, *args, **kwargs)
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError("tokenzip KV eviction supports one full-attention KV cache group")
        self._manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        self._tracked: dict[str, _Tracked] = {}
        allocate = self.kv_cache_manager.allocate_slots

        def allocate_physical(request: Request, *a: Any, **kw: Any):
            tracked = self._tracked.get(request.request_id)
            if tracked is not None and tracked.offset:
                request = _PhysicalView(request, tracked.offset)
            return allocate(request, *a, **kw)

        self.kv_cache_manager.allocate_slots = allocate_physical

    def add_request(self, request: Request) -> None:
        known = request.request_id in self.requests
        super().add_request(request)
        if known or request.sampling_params is None:
            return
        try:
            settings = eviction_settings(request.sampling_params.extra_args)
        except ValueError as err:
            logger.warning("tokenzip KV eviction off for request %s: %s", request.request_id, err)
            return
        if settings is not None:
            self._tracked[request.request_id] = _Tracked(settings)

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        plans = self._plan_compactions()
        output = super().schedule(*args, **kwargs)
        for req_id in output.preempted_req_ids or ():
            plans.pop(req_id, None)
        setattr(output, PLAN_ATTR, plans)
        self._record_peaks()
        return output

    def held_blocks(self, request_id: str) -> int:
        """Blocks the KV cache manager assigns to a request now."""
        return len(self._manager.req_to_blocks.get(request_id, ()))

    def _plan_compactions(self) -> dict[str, CompactionPlan]:
        plans = {}
        block_size = self._manager.block_size
        for request in self.running:
            tracked = self._tracked.get(request.request_id)
            if tracked is None or request.status != RequestStatus.RUNNING:
                continue
            if request.num_computed_tokens < request.num_prompt_tokens:
                continue  # still in prefill
            budget = tracked.settings.budget
            length = request.num_computed_tokens - tracked.offset
            if length < budget + block_size:
                continue
            tracked.offset += length - budget
            metrics.count_evicted(self.vllm_config.model_config, length - budget)
            self._free_tail(request.request_id, cdiv(budget, block_size))
            plans[request.request_id] = CompactionPlan(
                length, budget, tracked.offset, tracked.settings.policy
            )
            if tracked.peak_blocks == 0:
                logger.info(
                    "tokenzip KV eviction: request %s first compaction %d -> %d entries (%s)",
                    request.request_id, length, budget, tracked.settings.policy,
                )  # fmt: skip
        return plans

    def _free_tail(self, request_id: str, keep_blocks: int) -> None:
        blocks = self._manager.req_to_blocks[request_id]
        tail = blocks[keep_blocks:]
        del blocks[keep_blocks:]
        self._manager.block_pool.free_blocks(reversed(tail))

    def _record_peaks(self) -> None:
        for request_id, tracked in self._tracked.items():
            if tracked.offset:
                tracked.peak_blocks = max(tracked.peak_blocks, self.held_blocks(request_id))

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super()._preempt_request(request, *args, **kwargs)
        tracked = self._tracked.get(request.request_id)
        if tracked is not None:  # recomputed from scratch on resume: uncompacted again
            tracked.offset = 0

    def engine_figures(self, request: Request) -> dict[str, Any]:
        """The pruning time, plus the request's eviction figures when it evicts."""
        figures = super().engine_figures(request)
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            return figures
        return {
            **figures,
            "kv_budget": tracked.settings.budget,
            "kv_policy": tracked.settings.policy,
            "kv_evicted": tracked.offset,
            "kv_peak_blocks": tracked.peak_blocks,
        }

    def _free_blocks(self, request: Request) -> None:
        tracked = self._tracked.pop(request.request_id, None)
        if tracked is not None and tracked.offset:
            logger.info(
                "tokenzip KV eviction: request %s %s, budget %d, %d tokens evicted, "
                "peak %d blocks after the first compaction",
                request.request_id, request.status.name, tracked.settings.budget, tracked.offset,
                tracked.peak_blocks,
            )  # fmt: skip
        super()._free_blocks(request)
