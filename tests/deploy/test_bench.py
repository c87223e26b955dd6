"""``tokenzip bench`` on the tiny VL server: a small run (concurrency 1 and 2, 2 requests each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_tokenzip import bench, cli
from vllm_tokenzip.launch import Server

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.engine
def test_bench_small_run(deploy_server: Server, clips, tmp_path: Path) -> None:
    """JSON and plots are written; pruning shows as fewer prompt tokens; nothing fails."""
    code = cli.main(["bench", "--url", deploy_server.base_url, "--ratios", "0.5",
                     "--concurrency", "1,2", "--requests", "2", "--max-tokens", "4",
                     "--video", str(clips["moving_16k"]), "--no-progress",
                     "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    points = json.loads((tmp_path / "bench.json").read_text())["points"]
    assert [(p["variant"], p["concurrency"]) for p in points] == [
        ("baseline", 1), ("baseline", 2), ("divprune 0.5", 1), ("divprune 0.5", 2)]  # fmt: skip
    assert all(p["completed"] == 2 and p["failed"] == 0 for p in points)
    assert all(0 < p["ttft_p50"] <= p["ttft_p99"] <= p["latency_p99"] for p in points)
    assert all(p["output_tokens_per_s"] > 0 for p in points)
    baseline, pruned = points[0]["prompt_tokens_mean"], points[2]["prompt_tokens_mean"]
    assert pruned < baseline
    # Unique media uuids: every pruned request runs the encoder and prunes (no cache hits).
    assert all(p["pruning_ms_mean"] == 0 for p in points[:2])
    assert all(p["pruning_ms_min"] > 0 for p in points[2:])
    for name in ("throughput.png", "ttft.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://[::2]:80"])
def test_bench_refuses_non_loopback(url: str) -> None:
    with pytest.raises(SystemExit, match="only loopback"):
        bench.check_loopback(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/", "http://localhost:1", "http://[::1]:2"])
def test_bench_accepts_loopback(url: str) -> None:
    assert bench.check_loopback(url) == url.rstrip("/")


def test_bench_request_bounds() -> None:
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--url", "http://127.0.0.1:1", "--requests", "1001"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--url", "http://127.0.0.1:1", "--concurrency", "0"])
