"""Pruning time, KV entries evicted and per-method latencies: exact amounts, in-process and
through real servers (multiprocess mode set up by the launchers)."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY
from starlette.testclient import TestClient
from tokenzip_server import launcher
from tokenzip_server.middleware import TokenZipMiddleware

from tests.server.test_middleware import CHAT, FakeApp, chat_body
from tests.server.test_serving import CLIP, post, scrape, video_messages
from tests.server.test_serving_omni import ask
from tests.server.test_stats import multiprocess_registry
from vllm_tokenzip import methods, metrics
from vllm_tokenzip.launch import Server
from vllm_tokenzip.models import mm_pruning
from vllm_tokenzip.stats import ItemCounts

MULTIPROC_CODE = (
    "from types import SimpleNamespace; from vllm_tokenzip import metrics; "
    "config = SimpleNamespace(served_model_name=['m']); metrics.set_worker_model(config); "
    "metrics.observe_pruning('divprune', 0.01); "
    "metrics.count_evicted(config, 7)"
)


# A ratio no other test sends: vLLM's encoder and processor caches would otherwise serve a
# repeated (video, settings) pair without running the encoder, so nothing would be pruned.
FRESH_RATIO = "0.4321"


def config(name: str) -> SimpleNamespace:
    return SimpleNamespace(served_model_name=[name])


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def vl_fields(method: str | None, keep: int) -> dict[str, torch.Tensor]:
    method_id = mm_pruning.NO_METHOD if method is None else methods.available().index(method)
    return {mm_pruning.METHOD_ID: torch.tensor(method_id), mm_pruning.RATIO: torch.tensor(0.5),
            mm_pruning.NUM_KEEP: torch.tensor(keep)}  # fmt: skip


def test_each_pruned_item_is_observed_once_by_record_pruning():
    """keep_indices selects (timing is the adapter's: record_pruning, once per item)."""
    metrics.set_worker_model(config("w"))
    count = ("tokenzip_pruning_seconds_count", {"model_name": "w", "method": "divprune"})
    before = sample(count[0], **count[1])
    embeds = torch.randn(2 * 4 * 4, 8)
    for _ in range(3):
        started = time.perf_counter()
        keep = mm_pruning.keep_indices(embeds, (2, 8, 8), 2, vl_fields("divprune", 10), None)
        mm_pruning.record_pruning(embeds[keep], "divprune", started)
    mm_pruning.keep_indices(embeds, (2, 8, 8), 2, vl_fields(None, 32), lambda: torch.arange(32))
    assert sample(count[0], **count[1]) == before + 3
    assert sample("tokenzip_pruning_seconds_sum", **count[1]) > 0


def test_count_evicted_and_zero_series_after_record():
    metrics.record("fresh", ItemCounts())
    assert (
        REGISTRY.get_sample_value("tokenzip_kv_evicted_tokens_total", {"model_name": "fresh"}) == 0
    )
    metrics.count_evicted(config("fresh"), 136)
    metrics.count_evicted(config("fresh"), 32)
    assert sample("tokenzip_kv_evicted_tokens_total", model_name="fresh") == 168


def latency_counts(model: str, method: str) -> tuple[float, float]:
    labels = {"model_name": model, "method": method}
    return (sample("tokenzip_time_to_first_token_seconds_count", **labels),
            sample("tokenzip_e2e_request_latency_seconds_count", **labels))  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("stats", "method"), [(FakeApp().stats, "divprune"), (None, "none")])
def test_middleware_times_each_chat_request_once(stream, stats, method):
    model = f"lat-{stream}-{method}"
    before = latency_counts(model, method)
    app = TestClient(TokenZipMiddleware(FakeApp(stats), validator=None))
    reply = app.post(CHAT, json=chat_body(model=model, stream=stream))
    assert reply.status_code == 200, reply.text
    assert latency_counts(model, method) == (before[0] + 1, before[1] + 1)
    labels = {"model_name": model, "method": method}
    ttft = sample("tokenzip_time_to_first_token_seconds_sum", **labels)
    assert 0 < ttft <= sample("tokenzip_e2e_request_latency_seconds_sum", **labels)


def test_refused_requests_are_not_timed():
    before = latency_counts("refused", "none")
    app = TestClient(TokenZipMiddleware(FakeApp(), validator=None))
    reply = app.post(CHAT, json=chat_body(model="refused"), headers={"X-TokenZip-Ratio": "2"})
    assert reply.status_code == 400
    assert latency_counts("refused", "none") == before


def test_worker_and_engine_metrics_add_up_in_multiprocess_mode(tmp_path):
    registry = multiprocess_registry(MULTIPROC_CODE, tmp_path)
    labels = {"model_name": "m", "method": "divprune"}
    assert registry.get_sample_value("tokenzip_pruning_seconds_count", labels) == 2
    assert registry.get_sample_value("tokenzip_kv_evicted_tokens_total", {"model_name": "m"}) == 14


def exec_env(monkeypatch, *argv: str) -> dict[str, str]:
    """The environment ``tokenzip serve`` would exec vLLM with."""
    captured = {}
    monkeypatch.setattr(os, "execve", lambda path, args, env: captured.update(env))
    parser = argparse.ArgumentParser()
    launcher.configure_parser(parser)
    launcher.serve(*parser.parse_known_args(list(argv)))
    return captured


def test_tokenzip_serve_sets_a_fresh_metrics_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "on_cpu", lambda: True)
    monkeypatch.delenv(launcher.METRICS_DIR_ENV, raising=False)
    first = exec_env(monkeypatch, "/m")[launcher.METRICS_DIR_ENV]
    second = exec_env(monkeypatch, "/m")[launcher.METRICS_DIR_ENV]
    assert first != second
    for path in (first, second):
        assert Path(path).is_dir() and not any(Path(path).iterdir())
        Path(path).rmdir()
    monkeypatch.setenv(launcher.METRICS_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(launcher, "fresh_metrics_dir", lambda: pytest.fail("created a dir"))
    assert exec_env(monkeypatch, "/m")[launcher.METRICS_DIR_ENV] == str(tmp_path)


def test_server_stop_removes_its_metrics_dir(tmp_path):
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    server = Server("m", 1, tmp_path / "log", process, metrics_dir=metrics_dir)
    server.stop()
    assert process.returncode is not None and not metrics_dir.exists()


# ---------------------------------------------------------------- real servers


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.mark.engine
def test_vl_server_pruning_and_latency_metrics(vl_serving, clips):
    model = vl_serving.model
    before = scrape(vl_serving)
    reply = post(vl_serving, {"X-TokenZip-Method": "divprune", "X-TokenZip-Ratio": FRESH_RATIO},
                 messages=video_messages(clips[CLIP]))  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert post(vl_serving).status_code == 200  # text only: method none
    after = scrape(vl_serving)
    pruned = {"model_name": model, "method": "divprune"}
    assert delta(before, after, "tokenzip_pruning_seconds_count", **pruned) == 1
    assert delta(before, after, "tokenzip_pruning_seconds_sum", **pruned) > 0
    for name in ("tokenzip_time_to_first_token_seconds_count",
                 "tokenzip_e2e_request_latency_seconds_count"):  # fmt: skip
        assert delta(before, after, name, **pruned) == 1
        assert delta(before, after, name, model_name=model, method="none") == 1


@pytest.mark.engine
@pytest.mark.parametrize("method", ["omnizip", "divprune"])
def test_omni_server_observes_each_pruned_item_once(omni_server, clips, method):
    labels = {"model_name": omni_server.model, "method": method}
    before = scrape(omni_server)
    ask(omni_server, clips[CLIP], {"X-TokenZip-Method": method, "X-TokenZip-Ratio": FRESH_RATIO})
    after = scrape(omni_server)
    assert delta(before, after, "tokenzip_pruning_seconds_count", **labels) == 1
    assert delta(before, after, "tokenzip_e2e_request_latency_seconds_count", **labels) == 1
