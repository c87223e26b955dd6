"""Write the two Grafana dashboards of deploy/ (TokenZip and latency) as JSON.

    .venv/bin/python scripts/make_dashboards.py [OUT_DIR]   (default deploy/grafana/dashboards)

Panels are written here once, as (title, unit, [(PromQL, legend)]), and expanded into Grafana's
dashboard JSON (schema 39, Grafana >= 10): a ``DS_PROMETHEUS`` datasource variable (so the files
work both provisioned and imported) and a ``model_name`` variable. The metric names the queries
use are listed, with where they come from, in tests/deploy/dashboard_metrics.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SEL = '{model_name=~"$model_name"}'
RATE = "$__rate_interval"
QUANTILES = ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"))


def quantiles(metric: str, by: str = "", qs=QUANTILES) -> list[tuple[str, str]]:
    """histogram_quantile queries of ``metric`` (a histogram's base name) at ``qs``."""
    group = f"le, {by}" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{SEL}[{RATE}])))",
             f"{legend}{name}") for q, name in qs]  # fmt: skip


def rate(metric: str, by: str = "model_name") -> str:
    """Per-second rate of a counter, summed by ``by``."""
    return f"sum by ({by}) (rate({metric}{SEL}[{RATE}]))"


TOKENZIP_PANELS = [
    ("Achieved ratio (mean fraction of audio+video tokens pruned)", "percentunit", [
        (f"{rate('tokenzip_ratio_achieved_sum')} / {rate('tokenzip_ratio_achieved_count')}",
         "{{model_name}}")]),
    ("Achieved ratio per request (p50, p90)", "percentunit",
     quantiles("tokenzip_ratio_achieved", qs=QUANTILES[:2])),
    ("Tokens saved per second, by modality", "short", [
        (f"{rate('tokenzip_tokens_original_total', 'modality')}"
         f" - {rate('tokenzip_tokens_kept_total', 'modality')}", "{{modality}}")]),
    ("Tokens per second before and after pruning", "short", [
        (rate("tokenzip_tokens_original_total", "modality"), "original {{modality}}"),
        (rate("tokenzip_tokens_kept_total", "modality"), "kept {{modality}}")]),
    ("Requests per second, by method", "reqps", [
        (rate("tokenzip_requests_total", "method"), "{{method}}")]),
    ("Pruning time (p50, p99)", "s",
     quantiles("tokenzip_pruning_seconds", qs=(QUANTILES[0], QUANTILES[2]))),
    ("KV-cache entries evicted per second", "short", [
        (rate("tokenzip_kv_evicted_tokens_total"), "{{model_name}}")]),
    ("KV-cache usage", "percentunit", [
        (f"max by (model_name) (vllm:kv_cache_usage_perc{SEL})", "{{model_name}}")]),
]  # fmt: skip

LATENCY_PANELS = [
    ("Time to first token", "s", quantiles("vllm:time_to_first_token_seconds")),
    ("Inter-token latency", "s", quantiles("vllm:inter_token_latency_seconds")),
    ("End-to-end request latency", "s", [
        *quantiles("vllm:e2e_request_latency_seconds"),
        (f"{rate('vllm:e2e_request_latency_seconds_sum')}"
         f" / {rate('vllm:e2e_request_latency_seconds_count')}", "mean")]),
    ("Token throughput", "short", [
        (rate("vllm:prompt_tokens_total"), "prompt tokens/s"),
        (rate("vllm:generation_tokens_total"), "generation tokens/s")]),
    ("Finished requests per second", "reqps", [
        (rate("vllm:request_success_total", "finished_reason"), "{{finished_reason}}")]),
    ("Scheduler state", "short", [
        (f"sum(vllm:num_requests_running{SEL})", "running"),
        (f"sum(vllm:num_requests_waiting{SEL})", "waiting")]),
    ("Requests per second, by TokenZip method", "reqps", [
        (rate("tokenzip_requests_total", "method"), "{{method}}")]),
    ("Time to first token by method (p50, p99)", "s",
     quantiles("tokenzip_time_to_first_token_seconds", "method", (QUANTILES[0], QUANTILES[2]))),
    ("End-to-end latency by method (p50, p90, p99)", "s",
     quantiles("tokenzip_e2e_request_latency_seconds", "method")),
]  # fmt: skip


def panel(index: int, title: str, unit: str, queries: list[tuple[str, str]]) -> dict:
    """A time-series panel, two per row."""
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        },
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                "refId": chr(ord("A") + i),
            }
            for i, (expr, legend) in enumerate(queries)
        ],
    }


def variables() -> list[dict]:
    """The datasource and model_name template variables."""
    model = {
        "name": "model_name",
        "label": "model",
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": "label_values(vllm:num_requests_running, model_name)", "refId": "M"},
        "definition": "label_values(vllm:num_requests_running, model_name)",
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
    }
    source = {"name": "DS_PROMETHEUS", "label": "datasource", "type": "datasource",
              "query": "prometheus", "current": {}, "hide": 0}  # fmt: skip
    return [source, model]


def dashboard(uid: str, title: str, panels: list[tuple]) -> dict:
    """A dashboard JSON of ``panels``."""
    return {
        "uid": uid,
        "title": title,
        "tags": ["vllm", "tokenzip"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "templating": {"list": variables()},
        "panels": [panel(i, *spec) for i, spec in enumerate(panels)],
    }


DASHBOARDS = {
    "tokenzip.json": dashboard("tokenzip", "TokenZip: pruning", TOKENZIP_PANELS),
    "latency.json": dashboard(
        "tokenzip-latency", "TokenZip: latency and throughput", LATENCY_PANELS
    ),
}


def write(out_dir: Path) -> list[Path]:
    """Write the dashboards into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, board in DASHBOARDS.items():
        path = out_dir / name
        path.write_text(json.dumps(board, indent=2) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(written)
