"""The vLLM 0.32-0.33 internals that ``vllm_tokenzip.kv`` overrides or reads still exist with
the signatures it relies on (fails fast on a vLLM upgrade, before any engine starts)."""

from __future__ import annotations

import inspect

from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_tokenzip.kv.scheduler import EvictingScheduler
from vllm_tokenzip.kv.worker import EvictingCPUModelRunner


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_overridden_methods_keep_their_signatures():
    assert params(GPUModelRunner._prepare_inputs) == [
        "self", "scheduler_output", "num_scheduled_tokens",
    ]  # fmt: skip
    assert params(GPUModelRunner.execute_model)[:3] == [
        "self", "scheduler_output", "intermediate_tensors",
    ]  # fmt: skip
    assert params(Scheduler._free_blocks) == ["self", "request"]
    assert params(Scheduler._preempt_request)[:2] == ["self", "request"]
    assert params(KVCacheManager.allocate_slots)[:3] == ["self", "request", "num_new_tokens"]


def test_runner_state_the_overrides_use():
    source = inspect.getsource(GPUModelRunner._prepare_inputs)
    for name in ("self.seq_lens[", "self.optimistic_seq_lens_cpu", "self.positions[",
                 "self.req_indices", "compute_slot_mapping("):  # fmt: skip
        assert name in source, name
    assert "preempted_req_ids" in SchedulerOutput.__dataclass_fields__
    assert "__slots__" not in vars(SchedulerOutput), "the plan rides as an extra attribute"


def test_subclasses_are_the_v1_classes():
    assert issubclass(EvictingCPUModelRunner, CPUModelRunner)
    assert issubclass(EvictingScheduler, Scheduler)
