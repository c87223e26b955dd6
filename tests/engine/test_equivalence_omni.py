"""A pruned Qwen2.5-Omni request in vLLM computes what Hugging Face computes over the same tokens.

For each case the session's float32 ``omni_server`` returns the prompt's log-probs (vLLM's
``prompt_logprobs``) and two greedy tokens with theirs; :mod:`tests.hf_reference_omni` runs the
checkpoint's thinker in transformers over the same kept tokens, embeddings and original TMRoPE
positions, re-running the selection itself (the registry method on the video embeddings, or
OmniZip on the HF-built region with the saliency of the HF audio tower's last layer).
Matching log-probs (max abs difference <= 1e-4) show the survivors (and consolidated anchors),
their positions, the text positions after the region and the decode steps' rope delta are right.

Cases: video alone (divprune 0.5, and ratio 0 = stock vLLM), audio alone (OmniZip 0.4) and
audio in video (OmniZip audio 0.3 / video 0.6) on Big Buck Bunny and a 16 kHz synthetic clip.
The synthetic clip's case is an expected failure: its ISTC video selection hangs on near-ties
smaller than float32 vLLM-vs-HF noise (with video_ratio 0 the same region matches to ~1e-6).
The checkpoint must give vLLM and HF one TMRoPE time scale (test_checkpoint_time_scales_agree).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch

from tests.engine.logprobs import assert_matches_reference, reply_logprobs
from tests.hf_reference_omni import AUDIO, AUDIO_IN_VIDEO, VIDEO, reference, selection_flips
from vllm_tokenzip.launch import Server

QUESTION = "What happens here?"
TOLERANCE = 1e-4  # float32 vLLM vs HF differ by ~1e-6; a one-position error moves them more
GENERATED = 2
AV_SETTINGS = {"method": "omnizip", "audio_ratio": 0.3, "video_ratio": 0.6}
CASES = [
    ("bigbuckbunny", VIDEO, {"method": "divprune", "video_ratio": 0.5}),
    ("bigbuckbunny", VIDEO, {"method": "divprune", "video_ratio": 0.0}),
    ("speech_16k", AUDIO, {"method": "omnizip", "audio_ratio": 0.4}),
    ("bigbuckbunny", AUDIO_IN_VIDEO, AV_SETTINGS),
    pytest.param(
        "moving_16k",
        AUDIO_IN_VIDEO,
        AV_SETTINGS,
        marks=pytest.mark.xfail(
            strict=True,
            reason=(
                "OmniZip's video selection on the synthetic test pattern hangs on near-ties below "
                "float32 vLLM-vs-HF noise (test_synthetic_clip_selection_is_tie_sensitive)"
            ),
        ),
    ),
]


def case_id(value: object) -> str:
    """Readable test id part: settings as method-key=value, other values as they are."""
    if isinstance(value, dict):
        return "-".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def request_body(server: Server, path: Path, mode: str, settings: dict) -> dict:
    """Chat request: one media part and the question, greedy, with prompt and decode log-probs."""
    kind = "audio_url" if mode == AUDIO else "video_url"
    content = [{"type": kind, kind: {"url": path.as_uri()}}, {"type": "text", "text": QUESTION}]
    mm_kwargs: dict = {"tokenzip": settings}
    if mode == AUDIO_IN_VIDEO:
        mm_kwargs["use_audio_in_video"] = True
    return {"model": server.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": GENERATED, "temperature": 0.0, "logprobs": True, "prompt_logprobs": 0,
            "return_token_ids": True, "mm_processor_kwargs": mm_kwargs}  # fmt: skip


def vllm_logprobs(
    server: Server, path: Path, mode: str, settings: dict
) -> tuple[list[int], torch.Tensor, list[int], torch.Tensor]:
    """(prompt ids, prompt log-probs [L - 1], generated ids, their log-probs) from vLLM."""
    body = request_body(server, path, mode, settings)
    reply = requests.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply_logprobs(reply.json())


@pytest.mark.parametrize(("name", "mode", "settings"), CASES, ids=case_id)
def test_prompt_logprobs_match_transformers(omni_server, omni_tiny, clips, name, mode, settings):
    path = clips[name]
    got = vllm_logprobs(omni_server, path, mode, settings)
    ref, ref_generated_lp = reference(omni_tiny, path, mode, QUESTION, settings, got[2])
    assert_matches_reference(f"{name} {mode} {settings}", got, ref, ref_generated_lp, TOLERANCE)


def test_tolerance_detects_a_one_position_error(omni_tiny, clips):
    """The checkpoint is position-sensitive enough for the tolerance to catch an off-by-one
    after an audio-in-video region (the audio_bos/eos numbering question)."""
    path = clips["moving_16k"]
    right, _ = reference(omni_tiny, path, AUDIO_IN_VIDEO, QUESTION, AV_SETTINGS)
    wrong, _ = reference(omni_tiny, path, AUDIO_IN_VIDEO, QUESTION, AV_SETTINGS, text_shift=1)
    assert (right.prompt_logprobs - wrong.prompt_logprobs).abs().max().item() > TOLERANCE


def test_checkpoint_time_scales_agree(omni_tiny):
    """vLLM's TMRoPE time scale (``vision_config.tokens_per_second``, 25 when absent) is HF's
    (``position_id_per_seconds``); otherwise the two lay out audio-in-video chunks and number
    video frames differently, and the cases above cannot agree."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(omni_tiny).thinker_config
    vllm_scale = getattr(config.vision_config, "tokens_per_second", 25)
    assert vllm_scale == config.position_id_per_seconds, (
        f"vision_config.tokens_per_second={vllm_scale} (vLLM) but "
        f"position_id_per_seconds={config.position_id_per_seconds} (HF, original Qwen)"
    )


@pytest.mark.parametrize(("name", "unstable"), [("bigbuckbunny", False), ("moving_16k", True)])
def test_synthetic_clip_selection_is_tie_sensitive(omni_tiny, clips, name, unstable):
    """Why the synthetic audio-in-video case cannot match: there, 1e-6 relative noise on the
    embeddings already changes which video tokens OmniZip keeps (ISTC near-ties on the flat
    test pattern); on Big Buck Bunny the selection is stable."""
    flips = [selection_flips(omni_tiny, clips[name], AUDIO_IN_VIDEO, QUESTION, AV_SETTINGS, seed)
             for seed in range(2)]  # fmt: skip
    assert (min(flips) > 0) == unstable, flips
