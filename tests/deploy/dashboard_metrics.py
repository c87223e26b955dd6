"""Every metric the dashboards query, in one place: align names with the serving layer here.

Names are the series names as /metrics shows them (``_total``, ``_bucket``, ``_sum``,
``_count`` included). tests/deploy checks that the dashboards (scripts/make_dashboards.py)
name exactly these, that ``VLLM`` and ``TOKENZIP`` are on a live server's /metrics, and that
``PENDING`` ones are not (yet): when the serving layer exports one, that test fails and says
to move it to ``TOKENZIP`` (or to rename it in the dashboards and here).
"""

from __future__ import annotations

import re

VLLM = frozenset({
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
})  # fmt: skip

# vllm_tokenzip.metrics (labels model_name, and modality or method). Pruning time (worker) and
# KV entries evicted (engine core) reach /metrics through Prometheus multiprocess mode.
TOKENZIP = frozenset({
    "tokenzip_tokens_original_total",
    "tokenzip_tokens_kept_total",
    "tokenzip_requests_total",
    "tokenzip_ratio_achieved_bucket",
    "tokenzip_ratio_achieved_sum",
    "tokenzip_ratio_achieved_count",
    "tokenzip_pruning_seconds_bucket",
    "tokenzip_kv_evicted_tokens_total",
    "tokenzip_time_to_first_token_seconds_bucket",
    "tokenzip_e2e_request_latency_seconds_bucket",
})  # fmt: skip

# Named by the dashboards, not exported yet: name -> what the serving layer has to add.
PENDING: dict[str, str] = {}

ALL = VLLM | TOKENZIP | set(PENDING)
_NAME = re.compile(r"\b(?:vllm:|tokenzip_)[A-Za-z0-9_:]*")


def names_in(expr: str) -> set[str]:
    """The vllm:/tokenzip_ metric names a PromQL expression reads."""
    return set(_NAME.findall(expr))
