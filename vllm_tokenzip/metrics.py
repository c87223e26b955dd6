"""Prometheus collectors of the serving layer, prefix ``tokenzip_``, label ``model_name``.

Created on first use in the API server process, in prometheus_client's default registry, which
vLLM's ``/metrics`` serves in single-API-server mode. With ``--api-server-count > 1`` vLLM sets
``PROMETHEUS_MULTIPROC_DIR`` before it starts the API servers, so prometheus_client (imported
there after the variable is set) writes these counters and histograms to the shared directory
and vLLM's ``MultiProcessCollector`` merges them: nothing to do here (no gauges, which would need
a ``multiprocess_mode``). Never prefix with ``vllm:``: vLLM unregisters those collectors.

Counted when a chat request's prompt is rendered, for requests with audio or video:

- ``tokenzip_tokens_original_total{model_name, modality}`` / ``tokenzip_tokens_kept_total``
- ``tokenzip_requests_total{model_name, method}`` (method ``none`` when nothing was pruned)
- ``tokenzip_ratio_achieved{model_name}``: histogram of the fraction of audio+video pruned.

Not here yet: pruning time (measured in the worker, which has no channel to this process) and
KV entries evicted (no KV eviction exists yet).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from vllm_tokenzip.stats import ItemCounts

RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


@dataclass(frozen=True)
class Collectors:
    tokens_original: Counter
    tokens_kept: Counter
    requests: Counter
    ratio_achieved: Histogram


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
    )


def record(model_name: str, stats: ItemCounts) -> None:
    """Count one rendered request (nothing for requests without audio or video)."""
    if not stats.original:
        return
    c = collectors()
    for modality, original, kept in (
        ("audio", stats.audio_original, stats.audio_kept),
        ("video", stats.video_original, stats.video_kept),
    ):
        c.tokens_original.labels(model_name, modality).inc(original)
        c.tokens_kept.labels(model_name, modality).inc(kept)
    c.requests.labels(model_name, stats.method or "none").inc()
    c.ratio_achieved.labels(model_name).observe(stats.ratio_achieved)
