"""ASGI-level tests of the TokenZip middleware with a fake downstream app (no engine)."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient
from tokenzip_server.middleware import (
    ENGINE_HEADERS,
    RESPONSE_HEADERS,
    TokenZipMiddleware,
    adapter_check,
    rewrite_sse,
)
from tokenzip_server.options import OptionsError, apply, parse_options

from vllm_tokenzip.models.mm_pruning import video_settings
from vllm_tokenzip.stats import CURRENT, ItemCounts

STATS = ItemCounts("divprune", audio_original=0, audio_kept=0, video_original=400, video_kept=100)
CHAT = "/v1/chat/completions"


class FakeApp:
    """Stands in for vLLM: records the body, "renders" (fills the stats), answers JSON or SSE."""

    def __init__(self, stats: ItemCounts | None = STATS) -> None:
        self.stats = stats
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        message = await receive()
        body = json.loads(message["body"] or b"{}")
        self.bodies.append(body)
        sink = CURRENT.get()
        if sink is not None and self.stats is not None:
            sink["stats"] = self.stats
        usage = {"prompt_tokens": 120, "completion_tokens": 2, "total_tokens": 122}
        if isinstance(body, dict) and body.get("stream"):
            await self._sse(send, usage)
        else:
            payload = json.dumps({"id": "x", "usage": usage}).encode()
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(payload)).encode())]  # fmt: skip
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": payload[:5], "more_body": True})
            await send({"type": "http.response.body", "body": payload[5:]})

    @staticmethod
    async def _sse(send, usage: dict) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        events = [{"choices": [{"delta": {"content": "a"}}], "usage": None},
                  {"choices": [], "usage": usage}]  # fmt: skip
        for event in events:
            chunk = f"data: {json.dumps(event)}\n\n".encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def client(app: FakeApp, validator=None) -> TestClient:
    return TestClient(TokenZipMiddleware(app, validator=validator))


def chat_body(**extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_headers_written_into_mm_processor_kwargs_and_xargs():
    app = FakeApp()
    headers = {"X-TokenZip-Method": "divprune", "X-TokenZip-Ratio": "0.5",
               "X-TokenZip-Video-Ratio": "0.25", "X-TokenZip-KV-Budget": "2048"}  # fmt: skip
    reply = client(app).post(CHAT, json=chat_body(mm_processor_kwargs={"x": 1}), headers=headers)
    assert reply.status_code == 200, reply.text
    body = app.bodies[0]
    assert body["mm_processor_kwargs"] == {
        "x": 1,
        "tokenzip": {"method": "divprune", "ratio": 0.5, "video_ratio": 0.25},
    }
    assert body["vllm_xargs"] == {"tokenzip_kv_budget": 2048}


def test_body_field_equivalent_to_headers_and_removed():
    app = FakeApp()
    tokenzip = {"method": "evs", "ratio": 0.4, "kv_budget": 64}
    reply = client(app).post(CHAT, json=chat_body(tokenzip=tokenzip))
    assert reply.status_code == 200, reply.text
    assert "tokenzip" not in app.bodies[0]
    assert app.bodies[0]["mm_processor_kwargs"] == {"tokenzip": {"method": "evs", "ratio": 0.4}}
    assert app.bodies[0]["vllm_xargs"] == {"tokenzip_kv_budget": 64}


def test_agreeing_sources_accepted():
    app = FakeApp()
    body = chat_body(tokenzip={"ratio": 0.5}, mm_processor_kwargs={"tokenzip": {"ratio": "0.50"}})
    headers = {"X-TokenZip-Ratio": "0.5", "X-TokenZip-Method": "random"}
    assert client(app).post(CHAT, json=body, headers=headers).status_code == 200
    assert app.bodies[0]["mm_processor_kwargs"]["tokenzip"] == {"method": "random", "ratio": 0.5}


def test_request_without_options_untouched():
    app = FakeApp()
    body = chat_body(mm_processor_kwargs={"use_audio_in_video": True})
    assert client(app).post(CHAT, json=body).status_code == 200
    assert app.bodies[0] == body


HEADER_CASES = [
    ({"X-TokenZip-Ratio": "abc", "X-TokenZip-Method": "evs"}, "X-TokenZip-Ratio", "0 <= ratio < 1"),
    ({"X-TokenZip-Ratio": "nan", "X-TokenZip-Method": "evs"}, "X-TokenZip-Ratio", "0 <= ratio"),
    ({"X-TokenZip-Ratio": "-0.1", "X-TokenZip-Method": "evs"}, "X-TokenZip-Ratio", "0 <= ratio"),
    ({"X-TokenZip-Ratio": "1", "X-TokenZip-Method": "evs"}, "X-TokenZip-Ratio", "ratio < 1"),
    ({"X-TokenZip-Ratio": "", "X-TokenZip-Method": "evs"}, "X-TokenZip-Ratio", "ratio"),
    ({"X-TokenZip-Audio-Ratio": "inf", "X-TokenZip-Method": "evs"}, "X-TokenZip-Audio-Ratio",
     "audio_ratio < 1"),
    ({"X-TokenZip-Video-Ratio": "2", "X-TokenZip-Method": "evs"}, "X-TokenZip-Video-Ratio",
     "video_ratio < 1"),
    ({"X-TokenZip-Method": "zip"}, "X-TokenZip-Method", "method must be one of ['divprune'"),
    ({"X-TokenZip-Ratio": "0.5"}, "method", "a ratio needs a method"),
    ({"X-TokenZip-KV-Budget": "0"}, "X-TokenZip-KV-Budget", "positive integer"),
    ({"X-TokenZip-KV-Budget": "1.5"}, "X-TokenZip-KV-Budget", "positive integer"),
    ({"X-TokenZip-KV-Budget": "many"}, "X-TokenZip-KV-Budget", "positive integer"),
]  # fmt: skip
BODY_CASES = [
    ({"tokenzip": "fast"}, "tokenzip", "must be an object"),
    ({"tokenzip": {"rate": 0.5}}, "tokenzip", "unknown tokenzip field(s) ['rate']"),
    ({"tokenzip": {"ratio": True, "method": "evs"}}, "tokenzip.ratio", "must be a number"),
    ({"tokenzip": {"ratio": [0.5], "method": "evs"}}, "tokenzip.ratio", "must be a number"),
    ({"tokenzip": {"method": 3}}, "tokenzip.method", "method must be one of"),
    ({"tokenzip": {"kv_budget": -4}}, "tokenzip.kv_budget", "positive integer"),
    ({"mm_processor_kwargs": {"tokenzip": {"kv_budget": 4}}}, "mm_processor_kwargs.tokenzip",
     "allowed: ['method', 'ratio', 'audio_ratio', 'video_ratio']"),
    ({"vllm_xargs": {"tokenzip_kv_budget": "x"}}, "vllm_xargs.tokenzip_kv_budget", "integer"),
]  # fmt: skip


@pytest.mark.parametrize(("headers", "param", "text"), HEADER_CASES)
def test_invalid_header_refused(headers, param, text):
    app = FakeApp()
    reply = client(app).post(CHAT, json=chat_body(), headers=headers)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, 400, "BadRequestError")
    assert text in error["message"]
    assert not app.bodies


@pytest.mark.parametrize(("extra", "param", "text"), BODY_CASES)
def test_invalid_body_refused(extra, param, text):
    app = FakeApp()
    reply = client(app).post(CHAT, json=chat_body(**extra))
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param
    assert text in reply.json()["error"]["message"]
    assert not app.bodies


def test_conflicting_header_and_body_refused():
    headers = {"X-TokenZip-Ratio": "0.5", "X-TokenZip-Method": "evs"}
    reply = client(FakeApp()).post(CHAT, json=chat_body(tokenzip={"ratio": 0.3}), headers=headers)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "conflicting values for ratio" in message
    assert "header X-TokenZip-Ratio=0.5" in message and "body tokenzip.ratio=0.3" in message


def test_method_the_adapter_cannot_run_refused():
    reply = client(FakeApp(), validator=video_settings).post(
        CHAT, json=chat_body(), headers={"X-TokenZip-Method": "omnizip", "X-TokenZip-Ratio": "0.5"}
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "method"
    assert "method must be one of" in reply.json()["error"]["message"]


def test_server_default_method_lets_ratio_alone_through(monkeypatch):
    monkeypatch.setenv("TOKENZIP_DEFAULTS", '{"method": "divprune"}')
    options = parse_options({"x-tokenzip-ratio": "0.5"}, chat_body())
    assert options.tokenzip == {"ratio": 0.5}


def test_adapter_check_table():
    assert adapter_check(["Qwen2_5_VLForConditionalGeneration"]) is video_settings
    assert adapter_check(["LlamaForCausalLM"]) is None


def test_apply_keeps_other_fields():
    body = chat_body(tokenzip={"ratio": 0.2}, vllm_xargs={"a": 1})
    with pytest.raises(OptionsError):
        parse_options({}, body)  # ratio without method
    out = apply(body, parse_options({"x-tokenzip-method": "evs"}, body))
    assert out["vllm_xargs"] == {"a": 1}
    assert out["mm_processor_kwargs"] == {"tokenzip": {"method": "evs", "ratio": 0.2}}


def test_non_streaming_headers_and_usage():
    reply = client(FakeApp()).post(CHAT, json=chat_body())
    assert reply.status_code == 200
    assert reply.headers["X-TokenZip-Ratio-Achieved"] == "0.750000"
    assert reply.headers["X-TokenZip-Tokens-Original"] == "400"
    assert reply.headers["X-TokenZip-Tokens-Kept"] == "100"
    assert reply.headers["X-TokenZip-Method"] == "divprune"
    assert reply.headers["content-length"] == str(len(reply.content))
    usage = reply.json()["usage"]
    assert usage["prompt_tokens"] == 120
    assert usage["tokenzip"] == {
        "method": "divprune", "ratio_achieved": 0.75, "tokens_original": 400, "tokens_kept": 100,
        "audio_original": 0, "audio_kept": 0, "video_original": 400, "video_kept": 100,
    }  # fmt: skip
    exposed = [h.strip() for h in reply.headers["access-control-expose-headers"].split(",")]
    assert exposed == [*RESPONSE_HEADERS, *ENGINE_HEADERS.values()]


def test_streaming_headers_and_final_usage_chunk():
    with client(FakeApp()).stream("POST", CHAT, json=chat_body(stream=True)) as reply:
        assert reply.headers["X-TokenZip-Tokens-Kept"] == "100"
        assert reply.headers["X-TokenZip-Method"] == "divprune"
        text = reply.read().decode()
    events = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    assert events[0]["usage"] is None
    assert events[-1]["usage"]["tokenzip"]["tokens_original"] == 400
    assert text.endswith("data: [DONE]\n\n")


def test_no_stats_no_figures():
    reply = client(FakeApp(stats=None)).post(CHAT, json=chat_body())
    assert "X-TokenZip-Method" not in reply.headers
    assert "tokenzip" not in reply.json()["usage"]
    assert "X-TokenZip-Method" in reply.headers["access-control-expose-headers"]


def test_other_paths_and_invalid_json_pass_through():
    app = FakeApp()
    test_client = client(app)
    reply = test_client.post("/v1/embeddings", json={"tokenzip": "bad"})
    assert reply.status_code == 200
    assert "X-TokenZip-Method" not in reply.headers
    assert app.bodies == [{"tokenzip": "bad"}]
    reply = test_client.post(CHAT, content=b"[1, 2]", headers={"X-TokenZip-Ratio": "7"})
    assert reply.status_code == 200  # not an object: vLLM's own validation answers


def test_rewrite_sse_leaves_other_chunks_alone():
    chunk = b'data: {"usage": null}\n\n'
    assert rewrite_sse(chunk, STATS, {}) == chunk
