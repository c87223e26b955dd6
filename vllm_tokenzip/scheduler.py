"""Schedulers that return each request's engine-side figures (``--scheduler-cls``; vLLM
0.32-0.33, V1).

The worker times each pruned audio or video item and sends ``{encoder cache key: seconds}``
with the step's ``ModelRunnerOutput`` (attribute :data:`PRUNING_ATTR`; see
:mod:`vllm_tokenzip.models.mm_pruning`). :class:`EngineFigures` adds an item's time to every
request that scheduled that item's encoder input in the step, and when the request finishes
(or is aborted) returns its figures in ``kv_transfer_params["tokenzip"]``:
``{"pruning_ms": float}``, the worker time spent pruning this request's items (0 when its
items came from vLLM's encoder cache or were not pruned). :mod:`vllm_tokenzip.stats` hands
them to the middleware, which adds them to the end of the response.

Pick the class that matches vLLM's scheduling mode: :class:`TokenZipScheduler` when
scheduling is synchronous (always on CPU; ``--no-async-scheduling``),
:class:`TokenZipAsyncScheduler` when it is asynchronous (vLLM's default on GPU). A mismatch is
refused at start-up. ``tokenzip serve`` and the Docker entry point pick it.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request

from vllm_tokenzip.kv.request import FIGURES_KEY
from vllm_tokenzip.models.mm_pruning import PRUNING_ATTR

SYNC_SCHEDULER = "vllm_tokenzip.scheduler.TokenZipScheduler"
ASYNC_SCHEDULER = "vllm_tokenzip.scheduler.TokenZipAsyncScheduler"


def pruning_seconds_by_request(
    scheduled_encoder_inputs: dict[str, list[int]],
    requests: dict[str, Request],
    item_seconds: dict[str, float],
) -> dict[str, float]:
    """Seconds each request of a step spent pruning.

    scheduled_encoder_inputs: request id -> indices of its mm features encoded in the step;
    item_seconds: encoder cache key (``mm_feature.identifier``) -> pruning seconds of the item.
    """
    spent: dict[str, float] = {}
    for req_id, inputs in scheduled_encoder_inputs.items():
        features = requests[req_id].mm_features
        seconds = sum(item_seconds.get(features[i].identifier, 0.0) for i in inputs)
        if seconds:
            spent[req_id] = seconds
    return spent


class EngineFigures:
    """Mixin over a V1 scheduler: accumulates pruning time and reports it on finish."""

    def __init__(self, vllm_config, *args: Any, **kwargs: Any) -> None:
        is_async = isinstance(self, AsyncScheduler)
        if bool(vllm_config.scheduler_config.async_scheduling) != is_async:
            wanted = ASYNC_SCHEDULER if not is_async else SYNC_SCHEDULER
            mode = "on" if vllm_config.scheduler_config.async_scheduling else "off"
            raise ValueError(
                f"{type(self).__name__} does not match vLLM's async scheduling ({mode}): "
                f"use --scheduler-cls {wanted}"
            )
        super().__init__(vllm_config, *args, **kwargs)
        self._pruning_seconds: dict[str, float] = {}

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ):
        item_seconds = getattr(model_runner_output, PRUNING_ATTR, None)
        if item_seconds:
            spent = pruning_seconds_by_request(
                scheduler_output.scheduled_encoder_inputs, self.requests, item_seconds
            )
            for req_id, seconds in spent.items():
                self._pruning_seconds[req_id] = self._pruning_seconds.get(req_id, 0.0) + seconds
        return super().update_from_output(scheduler_output, model_runner_output)

    def engine_figures(self, request: Request) -> dict[str, Any]:
        """The figures of a finishing request (subclasses add theirs)."""
        seconds = self._pruning_seconds.get(request.request_id, 0.0)
        return {"pruning_ms": round(1000 * seconds, 3)}

    def _connector_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        """Adds :meth:`engine_figures` under ``"tokenzip"`` to the request's
        ``kv_transfer_params`` (vLLM calls this once per finished or aborted request)."""
        delay, params = super()._connector_finished(request)
        figures = self.engine_figures(request)
        self._pruning_seconds.pop(request.request_id, None)
        return delay, {**(params or {}), FIGURES_KEY: figures}


class TokenZipScheduler(EngineFigures, Scheduler):
    """vLLM's synchronous V1 scheduler, reporting each request's pruning time."""


class TokenZipAsyncScheduler(EngineFigures, AsyncScheduler):
    """vLLM's asynchronous V1 scheduler, reporting each request's pruning time."""
