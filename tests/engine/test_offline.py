"""Offline ``vllm.LLM`` prunes per call as the server does, and chunked prefill (a prompt split
over several scheduler steps) gives the same tokens and log-probs as one-step prefill."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SETTINGS = [None, {"method": "divprune", "ratio": 0.5}, {"method": "evs", "ratio": 0.75}]


def run_offline(model, video, max_batched_tokens: int) -> list[dict]:
    cmd = [sys.executable, "-m", "tests.engine.offline_run", str(model), str(video),
           str(max_batched_tokens), json.dumps(SETTINGS)]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def one_step_and_chunked(vl_tiny, clips):
    video = clips["moving_16k"]
    return run_offline(vl_tiny, video, 8192), run_offline(vl_tiny, video, 256)


def test_offline_prunes_per_call(one_step_and_chunked):
    one_step, _ = one_step_and_chunked
    prompts = [r["prompt_tokens"] for r in one_step]
    assert prompts[0] > prompts[1] > prompts[2]


def test_chunked_prefill_matches_one_step_prefill(one_step_and_chunked):
    one_step, chunked = one_step_and_chunked
    for single, split in zip(one_step, chunked, strict=True):
        assert split["prompt_tokens"] == single["prompt_tokens"]
        assert split["token_ids"] == single["token_ids"]
        assert split["logprobs"] == pytest.approx(single["logprobs"], abs=1e-4)


def vision_start_index(model_dir) -> int:
    """Index of <|vision_start|> in offline_run's prompt (video first, then the question)."""
    from tests.media_expect import _processor

    processor = _processor(str(model_dir))
    content = [{"type": "video"}, {"type": "text", "text": "What happens here?"}]
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = processor.tokenizer(prompt)["input_ids"]
    return ids.index(processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))


def test_prefill_chunk_ending_at_the_vision_start(one_step_and_chunked, vl_tiny, clips):
    """A chunk boundary right after <|vision_start|> (vLLM 0.32's recompute raised IndexError
    there and killed the engine, also for requests without settings)."""
    one_step, _ = one_step_and_chunked
    boundary = run_offline(vl_tiny, clips["moving_16k"], vision_start_index(vl_tiny) + 1)
    for single, split in zip(one_step, boundary, strict=True):
        assert split["token_ids"] == single["token_ids"]
        assert split["logprobs"] == pytest.approx(single["logprobs"], abs=1e-4)


def test_offline_matches_the_server(one_step_and_chunked, vl_server, clips):
    import requests

    one_step, _ = one_step_and_chunked
    for tokenzip, offline in zip(SETTINGS, one_step, strict=True):
        content = [{"type": "video_url", "video_url": {"url": clips["moving_16k"].as_uri()}},
                   {"type": "text", "text": "What happens here?"}]  # fmt: skip
        body = {"model": vl_server.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": 4, "temperature": 0.0}  # fmt: skip
        if tokenzip:
            body["mm_processor_kwargs"] = {"tokenzip": tokenzip}
        reply = requests.post(f"{vl_server.base_url}/v1/chat/completions", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["prompt_tokens"] == offline["prompt_tokens"]
