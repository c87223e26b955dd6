"""The dashboards against a real Prometheus scraping a real vLLM server with TokenZip.

Traffic: two batches of video requests (pruning off, DivPrune, random), a scrape apart, so that
every counter and histogram has increased inside the rate window. Then every dashboard query
is evaluated through Prometheus' HTTP API. The deploy server runs without KV eviction: its
``tokenzip_kv_evicted_tokens_total`` series is 0 (created with the first rendered request).
Queries over metrics the serving layer does not export yet (dashboard_metrics.PENDING, empty
today) are expected to come back empty: they are xfail(strict) with the missing metric in the
reason, so the day the metric appears they fail and ask to move it from PENDING to TOKENZIP.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy import dashboard_metrics as dm
from tests.deploy.dashboards import Query, queries
from vllm_tokenzip.launch import Server

pytestmark = pytest.mark.engine
BATCH_RATIOS = (("0.5", "0.75"), ("0.6", "0.85"))  # DivPrune, random


def settings(batch: int) -> list[dict]:
    """The batch's requests: pruning off, DivPrune, random. The ratios differ per batch: vLLM's
    caches are keyed by them, and a cached item is not pruned again (no pruning time)."""
    divprune, random = BATCH_RATIOS[batch]
    return [{}, {"X-TokenZip-Method": "divprune", "X-TokenZip-Ratio": divprune},
            {"X-TokenZip-Method": "random", "X-TokenZip-Ratio": random}]  # fmt: skip


def chat(server: Server, video_uri: str, headers: dict) -> None:
    """One video chat request of 4 tokens (so inter-token latency is observed)."""
    content = [{"type": "video_url", "video_url": {"url": video_uri}},
               {"type": "text", "text": "What happens?"}]  # fmt: skip
    body = {"model": server.model, "max_tokens": 4, "ignore_eos": True,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    reply = requests.post(f"{server.base_url}/v1/chat/completions", json=body, headers=headers,
                          timeout=120)  # fmt: skip
    assert reply.status_code == 200, reply.text


def instant(prometheus: str, promql: str) -> dict:
    """The ``data`` of an instant query; AssertionError with Prometheus' error otherwise."""
    reply = requests.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10)
    payload = reply.json()
    assert payload["status"] == "success", f"{promql}: {payload.get('error')}"
    return payload["data"]


def wait_for_requests(prometheus: str, count: int, timeout: float = 30.0) -> None:
    """Wait until Prometheus has scraped ``count`` finished requests, then one scrape more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = instant(prometheus, "sum(vllm:request_success_total)")["result"]
        if result and float(result[0]["value"][1]) >= count:
            time.sleep(1.5)
            return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus did not see {count} finished requests in {timeout} s")


@pytest.fixture(scope="module")
def traffic(deploy_server: Server, prometheus: str, clips) -> str:
    """Send two batches a scrape apart; returns the Prometheus URL."""
    uri = clips["moving_16k"].as_uri()
    wait_for_requests(prometheus, 0)
    sent = 0
    for batch in range(len(BATCH_RATIOS)):
        batch_headers = settings(batch)
        with ThreadPoolExecutor(len(batch_headers)) as pool:
            list(pool.map(lambda h: chat(deploy_server, uri, h), batch_headers))
        sent += len(batch_headers)
        wait_for_requests(prometheus, sent)
    return prometheus


def exported(server: Server) -> set[str]:
    """Sample names on the server's /metrics."""
    text = requests.get(f"{server.base_url}/metrics", timeout=10).text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_metrics_exported(deploy_server: Server, traffic: str) -> None:
    """Every vllm:/tokenzip_ metric the dashboards need today is on /metrics."""
    missing = (dm.VLLM | dm.TOKENZIP) - exported(deploy_server)
    assert not missing, f"dashboards read metrics the server does not export: {sorted(missing)}"


def test_pending_metrics_still_absent(deploy_server: Server, traffic: str) -> None:
    """PENDING lists only what is really missing (move a name to TOKENZIP once exported)."""
    present = set(dm.PENDING) & exported(deploy_server)
    assert not present, f"now exported, move from PENDING to TOKENZIP: {sorted(present)}"


def test_model_name_variable(traffic: str) -> None:
    """The dashboards' model_name variable (label_values) has the served model."""
    reply = requests.get(f"{traffic}/api/v1/label/model_name/values",
                         params={"match[]": "vllm:num_requests_running"}, timeout=10)  # fmt: skip
    assert reply.json()["data"], reply.text


def query_params() -> list:
    """Every dashboard query; those over PENDING metrics xfail(strict) naming what is missing."""
    params = []
    for query in queries():
        pending = sorted(dm.names_in(query.expr) & set(dm.PENDING))
        reason = "; ".join(f"needs {name}: {dm.PENDING[name]}" for name in pending)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if pending else []
        params.append(pytest.param(query, marks=marks, id=f"{query.panel}: {query.expr[:60]}"))
    return params


@pytest.mark.parametrize("query", query_params())
def test_dashboard_query_has_data(traffic: str, query: Query) -> None:
    """The query parses and returns at least one finite value after the traffic."""
    data = instant(traffic, query.promql())
    values = [float(series["value"][1]) for series in data["result"]]
    assert any(math.isfinite(v) for v in values), f"{query}: no finite value in {values}"
