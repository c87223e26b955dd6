"""The serving surface against real vLLM on CPU: the tiny Qwen2.5-VL with the middleware.

Expected figures are closed forms: a video of T frames with H'W' tokens each has T * H'W'
tokens originally and ``method.kept_count(T, H'W', ratio)`` kept.
"""

from __future__ import annotations

import base64
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.engine.test_prune_vl import video_grid
from tests.server.test_middleware import BODY_CASES, HEADER_CASES
from vllm_tokenzip import media, methods
from vllm_tokenzip.launch import Server

pytestmark = pytest.mark.engine
CLIP = "moving_16k"


def video_messages(video: Path | str) -> list[dict]:
    url = video if isinstance(video, str) else video.as_uri()
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "What happens?"}]}]  # fmt: skip


def post(server: Server, headers: dict | None = None, **body) -> requests.Response:
    body = {"model": server.model, "max_tokens": 1, "temperature": 0.0,
            "messages": [{"role": "user", "content": "hi"}], **body}  # fmt: skip
    return requests.post(
        f"{server.base_url}/v1/chat/completions", json=body, headers=headers, timeout=300
    )


def expected(model_dir: Path, video: Path, method: str, ratio: float) -> tuple[int, int]:
    """(original, kept) video tokens of ``video`` pruned by ``method`` at ``ratio``."""
    t, per_frame = video_grid(model_dir, video)
    return t * per_frame, methods.get(method).kept_count(t, per_frame, ratio)


def figures(headers) -> tuple[str, int, int, float]:
    return (
        headers["X-TokenZip-Method"],
        int(headers["X-TokenZip-Tokens-Original"]),
        int(headers["X-TokenZip-Tokens-Kept"]),
        float(headers["X-TokenZip-Ratio-Achieved"]),
    )


def data_url(payload: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def engine_cases(video: Path) -> list[tuple[dict, dict, str]]:
    """(headers, body fields, expected message part) refused by the server or by vLLM."""
    omnizip = {"X-TokenZip-Method": "omnizip", "X-TokenZip-Ratio": "0.5"}
    cases = [(headers, {}, text) for headers, _, text in HEADER_CASES]
    cases += [({}, extra, text) for extra, _, text in BODY_CASES]
    cases += [
        (omnizip, {}, "which this model adapter does not capture"),
        ({"X-TokenZip-Method": "omnizip"}, {}, "method must be one of"),
        ({"X-TokenZip-Method": "holitom", "X-TokenZip-Video-Ratio": "1.3"}, {}, "video_ratio"),
        ({}, {"tokenzip": {"method": "evs", "video_ratio": "0.9.1"}}, "0 <= video_ratio < 1"),
        ({}, {"tokenzip": {"method": "omnizip", "video_ratio": 0.2}}, "does not capture"),
        ({"X-TokenZip-Method": "evs"}, {"tokenzip": {"method": "random"}}, "conflicting"),
        ({"X-TokenZip-KV-Budget": "8"}, {"tokenzip": {"kv_budget": 9}}, "conflicting"),
        ({}, {"messages": video_messages(data_url(b"no video" * 64))}, "Could not open"),
        ({}, {"messages": video_messages(data_url(video.read_bytes()[:4096]))}, ""),
        ({}, {"messages": video_messages("data:video/mp4;base64,!!!")}, "base64"),
        ({}, {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, "audio"),
    ]  # fmt: skip
    return cases


def test_invalid_inputs_are_400_and_server_keeps_serving(vl_serving, clips):
    cases = engine_cases(clips[CLIP])
    assert len(cases) >= 30
    valid = {"X-TokenZip-Method": "divprune", "X-TokenZip-Ratio": "0.5"}
    for headers, body, text in cases:
        reply = post(vl_serving, headers, **body)
        assert reply.status_code == 400, (headers, body, reply.text)
        assert reply.json()["error"]["code"] == 400
        assert text in reply.json()["error"]["message"], reply.text
        ok = post(vl_serving, valid)
        assert ok.status_code == 200, ok.text
        assert figures(ok.headers) == ("none", 0, 0, 0.0)


@pytest.mark.parametrize("server_name", ["vl_serving", "omni_server"])
def test_one_frame_video_is_400_and_server_keeps_serving(request, server_name, clips):
    """vLLM 0.32's Qwen2-VL frame sampling divides by zero on a one-frame clip (HTTP 500);
    the plugin's video backend refuses it with a 400 naming the minimum."""
    server = request.getfixturevalue(server_name)
    reply = post(server, messages=video_messages(media.synthetic_clip(seconds=1.0, fps=1)))
    assert reply.status_code == 400, reply.text
    assert "has 1 frame(s)" in reply.json()["error"]["message"]
    assert post(server, messages=video_messages(clips[CLIP])).status_code == 200


def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


def test_sdk_non_streaming_with_headers(vl_serving, vl_tiny, clips):
    video = clips[CLIP]
    original, kept = expected(vl_tiny, video, "divprune", 0.5)
    plain = post(vl_serving, messages=video_messages(video)).json()["usage"]["prompt_tokens"]
    headers = {"X-TokenZip-Method": "divprune", "X-TokenZip-Ratio": "0.5"}
    for _ in range(2):  # the second time vLLM's processor cache leaves the item out
        raw = sdk(vl_serving).chat.completions.with_raw_response.create(
            model=vl_serving.model, messages=video_messages(video), max_tokens=2,
            extra_headers=headers,
        )  # fmt: skip
        assert figures(raw.headers) == ("divprune", original, kept, round(1 - kept / original, 6))
        usage = raw.parse().usage
        assert usage.prompt_tokens == plain - original + kept
        assert usage.model_dump()["tokenzip"]["video_kept"] == kept
    assert "X-TokenZip-Tokens-Kept" in raw.headers["access-control-expose-headers"]


def test_sdk_streaming_with_body(vl_serving, vl_tiny, clips):
    video = clips[CLIP]
    original, kept = expected(vl_tiny, video, "evs", 0.3)
    raw = sdk(vl_serving).chat.completions.with_raw_response.create(
        model=vl_serving.model, messages=video_messages(video), max_tokens=3, stream=True,
        stream_options={"include_usage": True},
        extra_body={"tokenzip": {"method": "evs", "ratio": 0.3, "kv_budget": 4096}},
    )  # fmt: skip
    assert figures(raw.headers)[:3] == ("evs", original, kept)
    chunks = list(raw.parse())
    assert [c.usage is not None for c in chunks].count(True) == 1
    extension = chunks[-1].usage.model_dump()["tokenzip"]
    assert (extension["tokens_original"], extension["tokens_kept"]) == (original, kept)
    assert extension["method"] == "evs"


def scrape(server: Server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the tokenzip_ metrics."""
    text = requests.get(f"{server.base_url}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("tokenzip_")
        for sample in family.samples
    }


def test_metrics_move_by_exact_amounts(vl_serving, vl_tiny, clips):
    video = clips[CLIP]
    original, kept = expected(vl_tiny, video, "uniform_spatial", 0.6)
    model = ("model_name", vl_serving.model)
    before = scrape(vl_serving)
    reply = post(vl_serving, {"X-TokenZip-Method": "uniform_spatial", "X-TokenZip-Ratio": "0.6"},
                 messages=video_messages(video))  # fmt: skip
    assert reply.status_code == 200, reply.text
    post(vl_serving)  # text only: counted nowhere
    after = scrape(vl_serving)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted([model, *labels.items()])))
        return after[key] - before.get(key, 0.0)

    assert delta("tokenzip_tokens_original_total", modality="video") == original
    assert delta("tokenzip_tokens_kept_total", modality="video") == kept
    assert delta("tokenzip_tokens_original_total", modality="audio") == 0
    assert delta("tokenzip_requests_total", method="uniform_spatial") == 1
    assert delta("tokenzip_ratio_achieved_count") == 1
    assert delta("tokenzip_ratio_achieved_sum") == pytest.approx(1 - kept / original)
    assert not any(name.startswith("vllm:") for name, _ in after)


def test_concurrent_requests_get_their_own_headers(vl_serving, vl_tiny, clips):
    video = clips[CLIP]
    rng = random.Random(0)
    names = ["divprune", "evs", "uniform_temporal", "random"]
    settings = [(rng.choice(names), round(rng.uniform(0.05, 0.95), 3)) for _ in range(32)]

    def send(setting: tuple[str, float]) -> tuple:
        method, ratio = setting
        headers = {"X-TokenZip-Method": method, "X-TokenZip-Ratio": str(ratio)}
        reply = post(vl_serving, headers, messages=video_messages(video))
        assert reply.status_code == 200, reply.text
        return figures(reply.headers)[:3], reply.json()["usage"]["tokenzip"]["tokens_kept"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, settings))
    for (method, ratio), (header_figures, body_kept) in zip(settings, results, strict=True):
        original, kept = expected(vl_tiny, video, method, ratio)
        assert header_figures == (method, original, kept), (method, ratio)
        assert body_kept == kept
