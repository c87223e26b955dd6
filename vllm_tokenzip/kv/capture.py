"""What the scoring policies observe during the forward pass (vLLM 0.32-0.33, V1 CPU).

:class:`CapturingCPUAttentionBackend` is vLLM's CPU attention with one addition: after the
kernel has written the step's keys and values, :data:`OBSERVER` sees the step's queries and
the request's cached keys, for the requests the runner marked as observed. On CUDA the same
observer would wrap the FlashAttention impl (registered with ``register_backend`` over
``FLASH_ATTN`` or as ``CUSTOM``); only the cache view and its
:class:`~vllm_tokenzip.kv.compaction.BlockLayout` differ.

The observer keeps, per (request, layer):

* SnapKV: the last ``window`` queries ``[H_q, W, D]`` (prompt and decode queries alike);
* H2O: the attention mass every cached entry received so far ``[H_kv, P]``.

Both are kept in physical order, so compaction re-indexes them with the kept indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_tokenzip.kv.compaction import BlockLayout, cpu_layer_layout, cpu_regions, gather_entries
from vllm_tokenzip.kv.policies import EvictionPolicy, Observation, attention_mass


@dataclass
class _RequestObservation:
    policy: EvictionPolicy
    queries: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [H_q, W, D]
    accumulated: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [H_kv, P]


class Observer:
    """Per-worker record of the queries and attention mass the policies need."""

    def __init__(self) -> None:
        self._requests: dict[str, _RequestObservation] = {}
        self.rows: list[str | None] = []  # batch row -> observed request id

    def track(self, request_id: str, policy: EvictionPolicy) -> None:
        if policy.needs_queries or policy.needs_accumulated:
            self._requests.setdefault(request_id, _RequestObservation(policy))

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def set_batch(self, request_ids: list[str]) -> None:
        self.rows = [rid if rid in self._requests else None for rid in request_ids]

    def observation(self, request_id: str, layer: str, keys: torch.Tensor) -> Observation:
        """The policy input for a request's layer; keys ``[H_kv, P, D]``."""
        record = self._requests.get(request_id)
        if record is None:
            return Observation(keys=keys)
        return Observation(
            keys=keys,
            queries=record.queries.get(layer),
            accumulated=record.accumulated.get(layer),
        )

    def compact(self, request_id: str, layer: str, keep: torch.Tensor) -> None:
        """Re-index a layer's accumulated mass to the kept entries ``keep`` ``[H_kv, B]``."""
        record = self._requests.get(request_id)
        if record is not None and layer in record.accumulated:
            record.accumulated[layer] = record.accumulated[layer].gather(1, keep)

    def observe(
        self,
        layer: str,
        query: torch.Tensor,
        cache: tuple[torch.Tensor, BlockLayout],
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        scale: float,
    ) -> None:
        """Record one layer's step.

        query: ``[T, H_q, D]``; cache: the layer's ``[N, H_kv, 2, bs*D]`` regions and layout.
        """
        for row, request_id in enumerate(self.rows):
            if request_id is None:
                continue
            record = self._requests[request_id]
            start, end = int(query_start_loc[row]), int(query_start_loc[row + 1])
            queries = query[start:end].transpose(0, 1).float()
            self._observe_request(
                record, layer, queries, cache, block_table[row], seq_lens[row], scale
            )

    @staticmethod
    def _observe_request(
        record: _RequestObservation,
        layer: str,
        queries: torch.Tensor,
        cache: tuple[torch.Tensor, BlockLayout],
        block_row: torch.Tensor,
        seq_len: torch.Tensor,
        scale: float,
    ) -> None:
        policy = record.policy
        if policy.needs_queries:
            previous = record.queries.get(layer)
            joined = queries if previous is None else torch.cat([previous, queries], dim=1)
            record.queries[layer] = joined[:, -policy.window :].clone()
        if policy.needs_accumulated:
            length = int(seq_len)
            keys = gather_entries(*cache, block_row.tolist(), length)[:, 0]
            mass = attention_mass(queries, keys, scale)
            previous = record.accumulated.get(layer)
            if previous is not None:
                mass[:, : previous.shape[1]] += previous
            record.accumulated[layer] = mass


OBSERVER = Observer()


class CapturingCPUAttentionImpl(CPUAttentionBackendImpl):
    """CPU attention that reports each decoder step to :data:`OBSERVER`."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw):
        result = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, *args, **kw
        )
        observed = self.attn_type == AttentionType.DECODER and any(OBSERVER.rows)
        if observed and attn_metadata is not None and kv_cache.numel():
            OBSERVER.observe(
                layer.layer_name,
                query,
                (cpu_regions(kv_cache), cpu_layer_layout(layer, kv_cache)),
                attn_metadata.query_start_loc,
                attn_metadata.seq_lens,
                attn_metadata.block_table,
                self.scale,
            )
        return result


class CapturingCPUAttentionBackend(CPUAttentionBackend):
    """``register_backend(AttentionBackendEnum.CPU_ATTN, <this class>)`` target."""

    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return CapturingCPUAttentionImpl
