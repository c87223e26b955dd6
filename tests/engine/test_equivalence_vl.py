"""A pruned request in vLLM computes what Hugging Face computes over the same kept tokens.

For each case the session's float32 ``vl_server`` returns the prompt's log-probs (vLLM's
``prompt_logprobs``) and two greedy tokens with theirs; :mod:`tests.hf_reference` runs the same
checkpoint in transformers over the same kept tokens, embeddings and original 3-D positions.
Matching log-probs (max abs difference <= 1e-4) show the survivors' embeddings and positions,
the text positions after the video, and the decode steps' rope delta are right.

Besides Big Buck Bunny, two synthetic clips expose position bugs: "timing" (10.75 s at 4 fps:
second_per_grid 1.075, so frame positions are int(k * 2.15)) and "portrait" (20 frames of
8 x 4 tokens: the text after the video continues after its temporal positions, not its width).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch

from tests.engine.logprobs import assert_matches_reference, reply_logprobs
from tests.hf_reference import reference
from vllm_tokenzip import media
from vllm_tokenzip.launch import Server

QUESTION = "What happens here?"
TOLERANCE = 1e-4  # float32 vLLM vs HF differ by ~1e-6; each position bug gave >= 1.5e-3
GENERATED = 2


def vllm_logprobs(
    server: Server, video: Path, tokenzip: dict
) -> tuple[list[int], torch.Tensor, list[int], torch.Tensor]:
    """(prompt ids, prompt log-probs [L - 1], generated ids, their log-probs) from vLLM."""
    content = [{"type": "video_url", "video_url": {"url": video.as_uri()}},
               {"type": "text", "text": QUESTION}]  # fmt: skip
    body = {"model": server.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": GENERATED, "temperature": 0.0, "logprobs": True, "prompt_logprobs": 0,
            "return_token_ids": True, "mm_processor_kwargs": {"tokenzip": tokenzip}}  # fmt: skip
    reply = requests.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply_logprobs(reply.json())


def clip(name: str, clips: dict[str, Path]) -> Path:
    """A test clip by name: the session's, or one of the position-bug clips."""
    if name == "timing":
        return media.synthetic_clip(seconds=10.75, fps=4, size="224x112")
    if name == "portrait":
        return media.synthetic_clip(seconds=20, fps=4, size="112x224")
    return clips[name]


@pytest.mark.parametrize(
    ("name", "method", "ratio"),
    [
        ("bigbuckbunny", "divprune", 0.0),
        ("bigbuckbunny", "divprune", 0.5),
        ("bigbuckbunny", "evs", 0.6),
        ("bigbuckbunny", "uniform_spatial", 0.5),
        ("timing", "divprune", 0.0),
        ("timing", "evs", 0.5),
        ("portrait", "divprune", 0.0),
        ("portrait", "uniform_spatial", 0.5),
    ],
)
def test_prompt_logprobs_match_transformers(vl_server, vl_tiny, clips, name, method, ratio):
    video = clip(name, clips)
    got = vllm_logprobs(vl_server, video, {"method": method, "ratio": ratio})
    ref, ref_generated_lp = reference(vl_tiny, video, QUESTION, method, ratio, got[2])
    assert_matches_reference(f"{name} {method} {ratio}", got, ref, ref_generated_lp, TOLERANCE)


def test_tolerance_detects_a_one_position_error(vl_tiny, clips):
    """The checkpoint is position-sensitive enough for the tolerance to catch an off-by-one.

    With random weights attention is nearly uniform, so position errors move log-probs only
    a little; if this fails, the equivalence cases above no longer prove positions right.
    """
    video = clips["bigbuckbunny"]
    right, _ = reference(vl_tiny, video, QUESTION, "divprune", 0.5)
    wrong, _ = reference(vl_tiny, video, QUESTION, "divprune", 0.5, text_shift=1)
    assert (right.prompt_logprobs - wrong.prompt_logprobs).abs().max().item() > TOLERANCE
