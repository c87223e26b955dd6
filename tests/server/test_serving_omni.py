"""Omni audio-in-video response figures: the audio is counted once, in the video item."""

from __future__ import annotations

import pytest
import requests

RATIO = 0.55


def ask(server, clip, headers: dict[str, str]) -> requests.Response:
    content = [{"type": "video_url", "video_url": {"url": clip.as_uri()}},
               {"type": "text", "text": "What happens here?"}]  # fmt: skip
    body = {"model": server.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 1, "mm_processor_kwargs": {"use_audio_in_video": True}}  # fmt: skip
    reply = requests.post(f"{server.base_url}/v1/chat/completions", json=body, headers=headers,
                          timeout=300)  # fmt: skip
    assert reply.status_code == 200, reply.text
    return reply


@pytest.mark.parametrize("clip", ["bigbuckbunny", "moving_16k"])
def test_omnizip_figures_match_the_prompt(omni_server, clips, clip):
    plain = ask(omni_server, clips[clip], {})
    pruned = ask(omni_server, clips[clip],
                 {"X-TokenZip-Method": "omnizip", "X-TokenZip-Ratio": str(RATIO)})  # fmt: skip
    original = int(pruned.headers["X-TokenZip-Tokens-Original"])
    kept = int(pruned.headers["X-TokenZip-Tokens-Kept"])
    saved = plain.json()["usage"]["prompt_tokens"] - pruned.json()["usage"]["prompt_tokens"]
    assert original - kept == saved
    assert kept == original - round(RATIO * original)
    assert float(pruned.headers["X-TokenZip-Ratio-Achieved"]) == pytest.approx(
        1 - kept / original, abs=1e-6
    )
    assert pruned.json()["usage"]["tokenzip"]["tokens_original"] == original
    assert int(plain.headers["X-TokenZip-Tokens-Original"]) == original
    assert int(plain.headers["X-TokenZip-Tokens-Kept"]) == original
