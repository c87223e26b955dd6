"""Prometheus collectors of the plugin, prefix ``tokenzip_``, label ``model_name``.

Each process creates them on first use in prometheus_client's default registry. Never prefix
with ``vllm:``: vLLM unregisters those collectors.

In the API server, when a chat request's prompt is rendered (requests with audio or video):

- ``tokenzip_tokens_original_total{model_name, modality}`` / ``tokenzip_tokens_kept_total``
- ``tokenzip_requests_total{model_name, method}`` (method ``none`` when nothing was pruned)
- ``tokenzip_ratio_achieved{model_name}``: histogram of the fraction of audio+video pruned.

In the API server, by the middleware (chat completions answered 200, any content):

- ``tokenzip_time_to_first_token_seconds{model_name, method}``: request in to first body chunk;
- ``tokenzip_e2e_request_latency_seconds{model_name, method}``: request in to end of response.

In the worker, once per pruned audio/video item: ``tokenzip_pruning_seconds{model_name,
method}``, the method's selection (``mm_pruning.keep_indices``: Qwen2.5-VL videos, Omni videos
pruned by a video method) or the whole item (Omni: OmniZip on a video with its audio, audios
alone); the label is the served name that the runner patch records
(:func:`set_worker_model`). In the engine core, when the KV-eviction
scheduler plans a compaction: ``tokenzip_kv_evicted_tokens_total{model_name}`` (entries
dropped). The API server also creates this counter's series at 0 on its first rendered
request, so that servers without eviction show 0 rather than no data.

How worker and engine-core values reach vLLM's ``/metrics``: Prometheus multiprocess mode.
With ``PROMETHEUS_MULTIPROC_DIR`` set before vLLM starts, every process inherits it,
prometheus_client (which picks its value class at import) writes each process's values to
files there, and vLLM's ``/metrics`` merges them with ``MultiProcessCollector``. ``tokenzip
serve`` and :func:`vllm_tokenzip.launch.start_server` set a fresh directory; vLLM sets one
itself with ``--api-server-count > 1``. Plain ``vllm serve`` without the variable (single API
server) serves the default registry of the API server process only: the rendered-prompt and
latency metrics are there, ``tokenzip_pruning_seconds`` and the KV counter's increments are
not (they stay in the worker's and engine core's own registries). There are no gauges here;
one would need a ``multiprocess_mode``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from vllm_tokenzip.stats import ItemCounts

RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
PRUNING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                   160.0, 320.0, 640.0)  # fmt: skip
NO_METHOD = "none"
UNKNOWN_MODEL = "unknown"

_worker_model = UNKNOWN_MODEL  # the served name of the model this worker process runs


@dataclass(frozen=True)
class Collectors:
    tokens_original: Counter
    tokens_kept: Counter
    requests: Counter
    ratio_achieved: Histogram
    pruning_seconds: Histogram
    kv_evicted: Counter
    time_to_first_token: Histogram
    e2e_latency: Histogram


@functools.cache
def collectors() -> Collectors:
    """The collectors, registered once per process."""
    return Collectors(
        tokens_original=Counter(
            "tokenzip_tokens_original",
            "Audio/video prompt tokens before TokenZip pruning.",
            ["model_name", "modality"],
        ),
        tokens_kept=Counter(
            "tokenzip_tokens_kept",
            "Audio/video prompt tokens kept by TokenZip pruning.",
            ["model_name", "modality"],
        ),
        requests=Counter(
            "tokenzip_requests",
            "Requests with audio or video, by TokenZip method ('none': not pruned).",
            ["model_name", "method"],
        ),
        ratio_achieved=Histogram(
            "tokenzip_ratio_achieved",
            "Fraction of a request's audio+video prompt tokens pruned.",
            ["model_name"],
            buckets=RATIO_BUCKETS,
        ),
        pruning_seconds=Histogram(
            "tokenzip_pruning_seconds",
            "Time to prune one audio/video item in the worker.",
            ["model_name", "method"],
            buckets=PRUNING_BUCKETS,
        ),
        kv_evicted=Counter(
            "tokenzip_kv_evicted_tokens",
            "KV-cache entries evicted during decode.",
            ["model_name"],
        ),
        time_to_first_token=Histogram(
            "tokenzip_time_to_first_token_seconds",
            "Chat request in to first response body chunk, by TokenZip method.",
            ["model_name", "method"],
            buckets=LATENCY_BUCKETS,
        ),
        e2e_latency=Histogram(
            "tokenzip_e2e_request_latency_seconds",
            "Chat request in to end of response, by TokenZip method.",
            ["model_name", "method"],
            buckets=LATENCY_BUCKETS,
        ),
    )


def model_name(model_config: object) -> str:
    """The served model name, as vLLM labels its own metrics."""
    name = model_config.served_model_name
    return name[0] if isinstance(name, list | tuple) else str(name)


def record(model_name: str, stats: ItemCounts) -> None:
    """Count one rendered request (nothing for requests without audio or video)."""
    c = collectors()
    c.kv_evicted.labels(model_name)  # the series exists (at 0) without eviction too
    if not stats.original:
        return
    for modality, original, kept in (
        ("audio", stats.audio_original, stats.audio_kept),
        ("video", stats.video_original, stats.video_kept),
    ):
        c.tokens_original.labels(model_name, modality).inc(original)
        c.tokens_kept.labels(model_name, modality).inc(kept)
    c.requests.labels(model_name, stats.method or NO_METHOD).inc()
    c.ratio_achieved.labels(model_name).observe(stats.ratio_achieved)


def set_worker_model(model_config: object) -> None:
    """Remember the served name of the model this (worker) process runs, for pruning times."""
    global _worker_model
    _worker_model = model_name(model_config)


def observe_pruning(method: str, seconds: float) -> None:
    """One item pruned with ``method`` in ``seconds``."""
    collectors().pruning_seconds.labels(_worker_model, method).observe(seconds)


def count_evicted(model_config: object, entries: int) -> None:
    """``entries`` KV-cache entries evicted from one request of the model."""
    collectors().kv_evicted.labels(model_name(model_config)).inc(entries)


def observe_latency(model_name: str, method: str | None, ttft: float, e2e: float) -> None:
    """Time to first token and end-to-end latency (seconds) of one chat request."""
    c = collectors()
    c.time_to_first_token.labels(model_name, method or NO_METHOD).observe(ttft)
    c.e2e_latency.labels(model_name, method or NO_METHOD).observe(e2e)
