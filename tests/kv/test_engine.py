"""Decode-time KV eviction inside real vLLM (CPU, tiny Qwen2.5-VL, float32) against the
Hugging Face reference of :mod:`vllm_tokenzip.kv.reference`."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.kv.conftest import BLOCK_SIZE, NUM_BLOCKS
from vllm_tokenzip.kv import reference
from vllm_tokenzip.kv.compaction import cdiv
from vllm_tokenzip.kv.policies import make_policy
from vllm_tokenzip.launch import Server

pytestmark = pytest.mark.engine

PROMPT = list(range(100, 300))  # 200 tokens: the first decode step already compacts
MAX_TOKENS = 120
TOLERANCE = 1e-3
LONG_TOKENS = 16000  # ~50 s of decoding on a quiet machine: still running at the hang-up


def complete(server: Server, xargs: dict | None, prompt: list[int] = PROMPT) -> dict:
    """Greedy completion: {"tokens": [...], "logprobs": [...]}."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "logprobs": 1, "ignore_eos": True,
            "return_tokens_as_token_ids": True}  # fmt: skip
    if xargs:
        body["vllm_xargs"] = xargs
    reply = requests.post(f"{server.base_url}/v1/completions", json=body, timeout=600)
    assert reply.status_code == 200, reply.text
    logprobs = reply.json()["choices"][0]["logprobs"]
    tokens = [int(token.split(":")[1]) for token in logprobs["tokens"]]
    return {"tokens": tokens, "logprobs": logprobs["token_logprobs"]}


def kv_usage(server: Server, timeout: float = 30.0) -> float:
    """vLLM's ``vllm:kv_cache_usage_perc``. In Prometheus multiprocess mode (how the test
    servers run) the gauge has no sample until vLLM first records it: wait for one."""
    deadline = time.monotonic() + timeout
    while True:
        text = requests.get(f"{server.base_url}/metrics", timeout=30).text
        found = re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)", text, re.M)
        if found:
            return float(found.group(1))
        assert time.monotonic() < deadline, "vllm:kv_cache_usage_perc has no sample"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def hf_model(vl_tiny: Path):
    return reference.load(vl_tiny)


def assert_matches_reference(hf_model, got: dict, policy: str | None, budget: int) -> int:
    """Engine log-probs equal the reference's for the engine's tokens; returns compactions."""
    ref = reference.generate(
        hf_model, PROMPT, len(got["tokens"]), make_policy(policy) if policy else None,
        budget, BLOCK_SIZE, forced=got["tokens"],
    )  # fmt: skip
    worst = max(abs(a - b) for a, b in zip(ref.logprobs, got["logprobs"], strict=True))
    assert worst <= TOLERANCE, f"{policy}/{budget}: max |log-prob diff| {worst:.2e}"
    return ref.compactions


def test_worker_and_scheduler_in_use_prefix_caching_off(kv_server):
    complete(kv_server, {"tokenzip_kv_budget": 64})
    log = kv_server.log_text()
    assert "tokenzip KV eviction: prefix caching disabled" in log
    assert "first compaction 200 -> 64 entries (streamingllm)" in log


def test_budget_above_length_changes_nothing(kv_server):
    plain = complete(kv_server, None)
    roomy = complete(kv_server, {"tokenzip_kv_budget": len(PROMPT) + MAX_TOKENS})
    assert roomy["tokens"] == plain["tokens"]
    assert (
        max(abs(a - b) for a, b in zip(roomy["logprobs"], plain["logprobs"], strict=True)) <= 1e-5
    )


@pytest.mark.parametrize("policy", ["streamingllm", "snapkv", "h2o"])
def test_policy_matches_hf_reference(kv_server, hf_model, policy):
    plain = complete(kv_server, None)
    got = complete(kv_server, {"tokenzip_kv_budget": 64, "tokenzip_kv_policy": policy})
    assert got["tokens"] != plain["tokens"], "eviction had no effect"
    assert assert_matches_reference(hf_model, got, policy, 64) >= 4


def test_mixed_batch_matches_reference(kv_server, hf_model):
    mix = [(None, 0), ("streamingllm", 64), ("h2o", 96), ("snapkv", 80)]
    xargs = [{"tokenzip_kv_budget": b, "tokenzip_kv_policy": p} if p else None for p, b in mix]
    with ThreadPoolExecutor(len(mix)) as pool:
        results = list(pool.map(lambda x: complete(kv_server, x), xargs))
    for (policy, budget), got in zip(mix, results, strict=True):
        assert_matches_reference(hf_model, got, policy, budget)


def stream_then_abort(server: Server, xargs: dict | None, chunks: int) -> list[float]:
    """Start a long streamed request, sample the KV usage after the 2nd token (prefill done, so
    an evicting request has compacted), halfway and at the end, then hang up after ``chunks``."""
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": LONG_TOKENS,
            "temperature": 0.0, "ignore_eos": True, "stream": True}  # fmt: skip
    if xargs:
        body["vllm_xargs"] = xargs
    samples = []
    with requests.post(f"{server.base_url}/v1/completions", json=body, stream=True,
                       timeout=600) as reply:  # fmt: skip
        lines = (line for line in reply.iter_lines() if line.startswith(b"data: {"))
        for index in range(chunks):
            next(lines)
            if index in (2, chunks // 2, chunks - 1):
                samples.append(kv_usage(server))
    return samples


def wait_for_empty_cache(server: Server, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while (usage := kv_usage(server)) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    return usage


def wait_for_log(server: Server, text: str, count: int, timeout: float = 30.0) -> str:
    """The server log once it holds ``count`` copies of ``text`` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while (log := server.log_text()).count(text) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return log


def test_blocks_bounded_usage_drops_and_abort_frees_everything(kv_server):
    budget, chunks = 64, 30
    bound = cdiv(budget, BLOCK_SIZE) + 1
    usable = NUM_BLOCKS - 1  # the null block is never handed out
    complete(kv_server, None)  # vLLM records the usage gauge from its first request on
    assert wait_for_empty_cache(kv_server) == 0.0
    aborts_before = kv_server.log_text().count("FINISHED_ABORTED, budget")
    evicting = stream_then_abort(kv_server, {"tokenzip_kv_budget": budget}, chunks)
    assert wait_for_empty_cache(kv_server) == 0.0, "aborted evicting request kept blocks"
    plain = stream_then_abort(kv_server, None, chunks)
    assert wait_for_empty_cache(kv_server) == 0.0, "aborted request kept blocks"
    log = wait_for_log(kv_server, "FINISHED_ABORTED, budget", aborts_before + 1)
    assert log.count("FINISHED_ABORTED, budget") == aborts_before + 1, "not aborted mid-decode"
    held = max(round(usage * usable) for usage in evicting)
    held_plain = max(round(usage * usable) for usage in plain)
    assert held <= bound, f"evicting request held {held} blocks mid-decode (bound {bound})"
    assert held_plain >= cdiv(len(PROMPT) + chunks, BLOCK_SIZE), held_plain
    peaks = re.findall(r"budget (\d+), \d+ tokens evicted, peak (\d+) blocks", log)
    assert peaks, "no evicting request reported its peak"
    for logged_budget, peak in peaks:
        assert int(peak) <= cdiv(int(logged_budget), BLOCK_SIZE) + 1
    print(f"blocks held mid-decode: <= {held} with budget {budget}, up to {held_plain} without")


def test_kv_budget_header_reaches_the_scheduler(kv_server):
    """X-TokenZip-KV-Budget (through the middleware) turns eviction on for that request only."""
    messages = [{"role": "user", "content": "word " * 150}]
    body = {"model": kv_server.model, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "messages": messages}  # fmt: skip
    pattern = re.compile(r"first compaction \d+ -> 48 entries")
    before = len(pattern.findall(kv_server.log_text()))
    url = f"{kv_server.base_url}/v1/chat/completions"
    plain = requests.post(url, json=body, timeout=600)
    assert plain.status_code == 200, plain.text
    budgeted = requests.post(url, json=body, headers={"X-TokenZip-KV-Budget": "48"}, timeout=600)
    assert budgeted.status_code == 200, budgeted.text
    assert len(pattern.findall(kv_server.log_text())) == before + 1
    figures = budgeted.json()["usage"]["tokenzip"]
    evicted = int(budgeted.headers["X-TokenZip-KV-Evicted"])
    assert figures["kv_budget"] == 48 and figures["kv_evicted"] == evicted > 0
    assert figures["kv_peak_blocks"] == int(budgeted.headers["X-TokenZip-KV-Peak-Blocks"]) <= 3
    assert "X-TokenZip-KV-Evicted" not in plain.headers
    streamed = requests.post(url, headers={"X-TokenZip-KV-Budget": "48"}, timeout=600, json={
        **body, "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    assert events[-1]["usage"]["tokenzip"]["kv_evicted"] == evicted
    refused = requests.post(url, json=body, headers={"X-TokenZip-KV-Budget": "0"}, timeout=60)
    assert refused.status_code == 400 and "X-TokenZip-KV-Budget" in refused.text
