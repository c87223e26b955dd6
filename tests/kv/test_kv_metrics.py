"""``tokenzip_kv_evicted_tokens_total`` on a real server equals what the scheduler evicted."""

from __future__ import annotations

import re

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.kv.test_engine import complete
from vllm_tokenzip.launch import Server

pytestmark = pytest.mark.engine
EVICTED = re.compile(r"budget \d+, (\d+) tokens evicted")


def evicted_metric(server: Server) -> float:
    """The server's tokenzip_kv_evicted_tokens_total for its model (0 when absent)."""
    text = requests.get(f"{server.base_url}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tokenzip_kv_evicted_tokens_total"
        and sample.labels.get("model_name") == server.model
    )


def evicted_logged(server: Server) -> list[int]:
    """Entries evicted per finished request, as the scheduler logs them."""
    return [int(n) for n in EVICTED.findall(server.log_text())]


def test_evicted_counter_matches_the_scheduler(kv_server):
    before, logged = evicted_metric(kv_server), len(evicted_logged(kv_server))
    complete(kv_server, {"tokenzip_kv_budget": 64})
    complete(kv_server, None)  # no budget: nothing evicted
    new = evicted_logged(kv_server)[logged:]
    assert len(new) == 1 and new[0] > 0
    assert evicted_metric(kv_server) - before == new[0]
