"""Per-request pruning time: worker -> scheduler -> API server -> response.

In-process: each hop (the item's mark, the runner's step output, the scheduler's attribution,
the scheduling-mode check). Through the session's servers: the time a response reports equals
what the worker observed in ``tokenzip_pruning_seconds`` for it, also under concurrency.
"""

from __future__ import annotations

import inspect
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests
import torch
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

from tests.server.test_metrics_more import delta
from tests.server.test_serving import CLIP, post, scrape, video_messages
from tests.server.test_serving_omni import ask
from vllm_tokenzip import scheduler
from vllm_tokenzip.models import mm_pruning

PRUNING_HEADER = "X-TokenZip-Pruning-Ms"


# ---------------------------------------------------------------- in-process


def test_record_pruning_marks_the_item_with_its_seconds():
    item = torch.zeros(3, 4)
    started = mm_pruning.time.perf_counter()
    assert mm_pruning.record_pruning(item, "divprune", started) is item
    seconds = getattr(item, mm_pruning.PRUNING_ATTR)
    assert 0 < seconds < mm_pruning.time.perf_counter() - started + 1e-9


def test_step_output_carries_item_seconds():
    output = ModelRunnerOutput(req_ids=[], req_id_to_index={})
    assert mm_pruning.attach_pruning_seconds(output, {"h1": 0.5})
    assert getattr(output, mm_pruning.PRUNING_ATTR) == {"h1": 0.5}

    class Deferred(AsyncModelRunnerOutput):
        def get_output(self) -> ModelRunnerOutput:
            return ModelRunnerOutput(req_ids=[], req_id_to_index={})

    deferred = Deferred()
    assert mm_pruning.attach_pruning_seconds(deferred, {"h2": 0.25})
    assert getattr(deferred.get_output(), mm_pruning.PRUNING_ATTR) == {"h2": 0.25}
    assert not mm_pruning.attach_pruning_seconds(object(), {"h3": 1.0})  # e.g. a PP rank's


def test_runner_collects_marked_outputs_and_sends_them_with_the_step():
    """The wrapped runner methods, on a stand-in runner class."""

    class Runner:
        def __init__(self) -> None:
            self.cached: dict[str, torch.Tensor] = {}

        def _cache_encoder_output(self, mm_hash, output, metadata, free):
            self.cached[mm_hash] = output

        def sample_tokens(self, grammar_output):
            return ModelRunnerOutput(req_ids=[], req_id_to_index={})

    mm_pruning._wrap_cache_encoder_output(Runner)
    mm_pruning._wrap_sample_tokens(Runner)
    runner = Runner()
    pruned = mm_pruning.record_pruning(torch.zeros(2, 2), "evs", 0.0)
    runner._cache_encoder_output("pruned", pruned, None, [])
    runner._cache_encoder_output("stock", torch.zeros(2, 2), None, [])
    first, second = runner.sample_tokens(None), runner.sample_tokens(None)
    sent = getattr(first, mm_pruning.PRUNING_ATTR)
    assert list(sent) == ["pruned"] and sent["pruned"] == getattr(pruned, mm_pruning.PRUNING_ATTR)
    assert not hasattr(second, mm_pruning.PRUNING_ATTR)  # sent once
    assert set(runner.cached) == {"pruned", "stock"}


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_vllm_internals_the_path_relies_on():
    """vLLM 0.32-0.33: the runner caches each encoder output by key and returns the step's
    output from sample_tokens (the CPU runner inherits both); the patch wraps both."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    mm_pruning.install_runner_patch()
    assert params(GPUModelRunner._cache_encoder_output)[:3] == ["self", "mm_hash", "output"]
    assert "self._cache_encoder_output(" in inspect.getsource(GPUModelRunner._execute_mm_encoder)
    for name in ("_cache_encoder_output", "sample_tokens"):
        assert name not in vars(CPUModelRunner), name
        assert getattr(GPUModelRunner, name)._tokenzip_patched, name
    assert params(Scheduler.update_from_output) == [
        "self", "scheduler_output", "model_runner_output",
    ]  # fmt: skip
    assert params(Scheduler._connector_finished) == ["self", "request"]
    assert "__slots__" not in vars(ModelRunnerOutput), "the seconds ride as an extra attribute"


def feature(identifier: str) -> SimpleNamespace:
    return SimpleNamespace(identifier=identifier)


def test_item_time_goes_to_the_requests_that_encoded_the_item():
    requests_ = {
        "a": SimpleNamespace(mm_features=[feature("v1"), feature("a1")]),
        "b": SimpleNamespace(mm_features=[feature("v2")]),
        "c": SimpleNamespace(mm_features=[feature("v3")]),
    }
    scheduled = {"a": [0, 1], "b": [0], "c": [0]}
    seconds = {"v1": 0.25, "a1": 0.5, "v2": 0.125}  # v3 not pruned
    spent = scheduler.pruning_seconds_by_request(scheduled, requests_, seconds)
    assert spent == {"a": 0.75, "b": 0.125}


@pytest.mark.parametrize(
    ("cls", "async_scheduling", "wanted"),
    [
        (scheduler.TokenZipScheduler, True, scheduler.ASYNC_SCHEDULER),
        (scheduler.TokenZipAsyncScheduler, False, scheduler.SYNC_SCHEDULER),
    ],
)
def test_scheduler_refuses_the_other_scheduling_mode(cls, async_scheduling, wanted):
    config = SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling))
    with pytest.raises(ValueError, match=f"--scheduler-cls {wanted}"):
        cls(config)


def test_worker_warns_when_no_tokenzip_scheduler_runs(caplog):
    def config(cls: type, async_scheduling: bool) -> SimpleNamespace:
        return SimpleNamespace(get_scheduler_cls=lambda: cls, async_scheduling=async_scheduling)

    with caplog.at_level(logging.WARNING, logger="vllm.tokenzip"):
        mm_pruning._warn_without_engine_figures(config(scheduler.TokenZipScheduler, False))
        assert not caplog.records
        mm_pruning._warn_without_engine_figures(config(Scheduler, True))
    assert scheduler.ASYNC_SCHEDULER in caplog.text and "pruning time" in caplog.text


# ---------------------------------------------------------------- real servers


def pruning_ms(reply: requests.Response) -> float:
    """The response's pruning time; header and usage.tokenzip must agree."""
    body = reply.json()
    reported = body["usage"]["tokenzip"]["pruning_ms"]
    assert float(reply.headers[PRUNING_HEADER]) == reported
    assert body.get("kv_transfer_params") is None  # the figures are not returned twice
    return reported


def pruning_sum_ms(before: dict, after: dict, model: str, method: str) -> float:
    labels = {"model_name": model, "method": method}
    return 1000 * delta(before, after, "tokenzip_pruning_seconds_sum", **labels)


@pytest.mark.engine
def test_vl_response_reports_the_worker_pruning_time(vl_serving, clips):
    before = scrape(vl_serving)
    headers = {"X-TokenZip-Method": "divprune", "X-TokenZip-Ratio": "0.4417"}
    reply = post(vl_serving, headers, messages=video_messages(clips[CLIP]))
    assert reply.status_code == 200, reply.text
    after = scrape(vl_serving)
    reported = pruning_ms(reply)
    assert reported > 0
    assert reported == pytest.approx(pruning_sum_ms(before, after, vl_serving.model, "divprune"),
                                     abs=1e-3)  # fmt: skip
    assert pruning_ms(post(vl_serving, messages=video_messages(clips[CLIP]))) == 0  # not pruned
    assert pruning_ms(post(vl_serving)) == 0  # text only


@pytest.mark.engine
def test_vl_streamed_response_reports_pruning_time_in_its_last_usage(vl_serving, clips):
    body = {"model": vl_serving.model, "messages": video_messages(clips[CLIP]), "max_tokens": 2,
            "stream": True, "stream_options": {"include_usage": True},
            "tokenzip": {"method": "evs", "ratio": 0.4418}}  # fmt: skip
    with requests.post(f"{vl_serving.base_url}/v1/chat/completions", json=body, stream=True,
                       timeout=300) as reply:  # fmt: skip
        assert reply.status_code == 200
        assert PRUNING_HEADER not in reply.headers  # known only once the request finishes
        events = [json.loads(line[6:]) for line in reply.iter_lines(decode_unicode=True)
                  if line.startswith("data: {")]  # fmt: skip
    usages = [event["usage"] for event in events if event.get("usage")]
    assert len(usages) == 1 and usages[0]["tokenzip"]["pruning_ms"] > 0


@pytest.mark.engine
def test_vl_concurrent_requests_each_get_their_own_pruning_time(vl_serving, clips):
    settings = [("divprune", "0.4421"), ("evs", "0.4422"), (None, None), ("dycoke", "0.4423"),
                ("uniform_spatial", "0.4424"), (None, None)]  # fmt: skip

    def send(setting: tuple[str | None, str | None]) -> float:
        method, ratio = setting
        headers = {"X-TokenZip-Method": method, "X-TokenZip-Ratio": ratio} if method else {}
        reply = post(vl_serving, headers, messages=video_messages(clips[CLIP]))
        assert reply.status_code == 200, reply.text
        return pruning_ms(reply)

    before = scrape(vl_serving)
    with ThreadPoolExecutor(len(settings)) as pool:
        reported = list(pool.map(send, settings))
    after = scrape(vl_serving)
    for (method, _), ms in zip(settings, reported, strict=True):
        if method is None:
            assert ms == 0
        else:
            observed = pruning_sum_ms(before, after, vl_serving.model, method)
            assert ms > 0 and ms == pytest.approx(observed, abs=1e-3), method


@pytest.mark.engine
def test_omni_audio_in_video_reports_the_worker_pruning_time(omni_server, clips):
    before = scrape(omni_server)
    reply = ask(omni_server, clips["bigbuckbunny"],
                {"X-TokenZip-Method": "omnizip", "X-TokenZip-Ratio": "0.4419"})  # fmt: skip
    after = scrape(omni_server)
    reported = pruning_ms(reply)
    assert reported > 0
    assert reported == pytest.approx(pruning_sum_ms(before, after, omni_server.model, "omnizip"),
                                     abs=1e-3)  # fmt: skip
