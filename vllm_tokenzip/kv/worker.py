"""Worker side of decode-time KV eviction (``--worker-cls``; vLLM 0.32-0.33, V1 CPU runner).

:class:`EvictingCPUWorker` is vLLM's ``CPUWorker`` with :class:`EvictingCPUModelRunner`, a
subclass of the V1 ``CPUModelRunner`` (pin ``VLLM_USE_V2_MODEL_RUNNER=0``; the V2 runner is
refused). It overrides two runner methods and changes nothing else:

* ``execute_model``: before the step, apply the scheduler's compaction plans
  (:class:`~vllm_tokenzip.kv.scheduler.CompactionPlan`): per layer and kv-head, the policy picks
  ``budget`` entries, they move to the request's first blocks, and the request's block list is
  cut to match the scheduler's (which has already freed the rest).
* ``_prepare_inputs``: positions (RoPE, M-RoPE) stay semantic; ``seq_lens`` and the slot
  mapping become physical (semantic position minus the request's offset).

On CUDA the same two overrides apply to a ``GPUModelRunner`` subclass (same method names in
0.32-0.33), with the attention observer wrapping the FlashAttention impl and the cache view
from :mod:`vllm_tokenzip.kv.compaction` for its layout. The attention wrapper is registered
here, in the worker process, before the model is built, so servers without ``--worker-cls``
are untouched.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_tokenzip.kv.capture import OBSERVER
from vllm_tokenzip.kv.compaction import (
    cdiv,
    compact_entries,
    cpu_layer_layout,
    cpu_regions,
    gather_entries,
)
from vllm_tokenzip.kv.policies import EvictionPolicy, make_policy
from vllm_tokenzip.kv.request import eviction_settings
from vllm_tokenzip.kv.scheduler import PLAN_ATTR, CompactionPlan

CAPTURE_BACKEND = "vllm_tokenzip.kv.capture.CapturingCPUAttentionBackend"


class EvictingCPUModelRunner(CPUModelRunner):
    """V1 CPU runner with physical sequence lengths and in-place KV compaction."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._offsets: dict[str, int] = {}  # request id -> semantic minus physical length
        self._policies: dict[str, EvictionPolicy] = {}

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        self._forget(scheduler_output.finished_req_ids)
        for req_id in scheduler_output.preempted_req_ids or ():
            self._restart(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            self._track(new.req_id, new.sampling_params)
        for req_id, plan in getattr(scheduler_output, PLAN_ATTR, {}).items():
            self._compact(req_id, plan)
        try:
            return super().execute_model(scheduler_output, intermediate_tensors)
        finally:
            OBSERVER.set_batch([])  # set by _prepare_inputs for this step's forward only

    def _track(self, req_id: str, sampling_params) -> None:
        try:
            settings = eviction_settings(sampling_params.extra_args) if sampling_params else None
        except ValueError:
            settings = None  # the scheduler logged it and never plans a compaction
        if settings is None:
            return
        policy = make_policy(settings.policy)
        self._policies[req_id] = policy
        OBSERVER.track(req_id, policy)

    def _forget(self, req_ids) -> None:
        for req_id in req_ids:
            self._offsets.pop(req_id, None)
            self._policies.pop(req_id, None)
            OBSERVER.forget(req_id)

    def _restart(self, req_id: str) -> None:
        """A preempted request is recomputed from scratch: uncompacted, observed anew."""
        self._offsets.pop(req_id, None)
        OBSERVER.forget(req_id)
        if req_id in self._policies:
            OBSERVER.track(req_id, self._policies[req_id])

    def _compact(self, req_id: str, plan: CompactionPlan) -> None:
        """Keep ``plan.budget`` entries per layer and kv-head; cut the block list to match."""
        state = self.requests[req_id]
        block_ids = state.block_ids[0]
        policy = self._policies[req_id]  # tracked when the request arrived, same settings
        assert policy.name == plan.policy, (policy.name, plan.policy)
        group = self.kv_cache_config.kv_cache_groups[0]
        context = self.compilation_config.static_forward_context
        for layer_name in group.layer_names:
            layer = context[layer_name]
            regions, layout = cpu_regions(layer.kv_cache), cpu_layer_layout(layer, layer.kv_cache)
            entries = gather_entries(regions, layout, block_ids, plan.length)
            observation = OBSERVER.observation(req_id, layer_name, entries[:, 0])
            keep = policy.select(observation, plan.budget, layer.impl.scale)
            compact_entries(regions, layout, block_ids, entries, keep)
            OBSERVER.compact(req_id, layer_name, keep)
        del block_ids[cdiv(plan.budget, layout.block_size) :]
        row = self.input_batch.req_id_to_index.get(req_id)
        if row is not None:
            self.input_batch.block_table.add_row(state.block_ids, row)
        self._offsets[req_id] = plan.offset

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        OBSERVER.set_batch(req_ids)
        offsets = np.array([self._offsets.get(rid, 0) for rid in req_ids], dtype=np.int64)
        if offsets.any():
            self._to_physical(torch.from_numpy(offsets), num_reqs, scheduler_output)
        return result

    def _to_physical(self, offsets: torch.Tensor, num_reqs: int, scheduler_output) -> None:
        """Subtract each request's offset from ``seq_lens`` and the slot positions.

        offsets: ``[num_reqs]`` int64.
        """
        num_tokens = scheduler_output.total_num_scheduled_tokens
        self.seq_lens[:num_reqs] -= offsets.to(self.seq_lens.dtype)
        self.optimistic_seq_lens_cpu[:num_reqs] -= offsets.to(self.optimistic_seq_lens_cpu.dtype)
        req_indices = self.req_indices.gpu[:num_tokens].long()
        physical = self.positions[:num_tokens] - offsets[req_indices]
        self.input_batch.block_table.compute_slot_mapping(
            num_reqs, self.query_start_loc.gpu[: num_reqs + 1], physical
        )


class EvictingCPUWorker(CPUWorker):
    """``--worker-cls vllm_tokenzip.kv.worker.EvictingCPUWorker``."""

    def init_device(self) -> None:
        if self.use_v2_model_runner:
            raise RuntimeError("tokenzip KV eviction needs VLLM_USE_V2_MODEL_RUNNER=0")
        register_backend(AttentionBackendEnum.CPU_ATTN, CAPTURE_BACKEND)
        super().init_device()
        self.model_runner = EvictingCPUModelRunner(self.vllm_config, torch.device("cpu"))
