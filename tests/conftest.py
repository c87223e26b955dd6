"""Session fixtures: locally built models, cached media, and one vLLM server per model.

Everything is built under the tokenzip cache ($TOKENZIP_CACHE, default ~/.cache/vllm_tokenzip);
server logs go to pytest's temporary directory. Servers run in float32 (vLLM would pick bfloat16
on CPU) so their log-probs can be compared with a Hugging Face reference forward.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenzip_server.launcher import MIDDLEWARE, scheduler_flags

from vllm_tokenzip import media
from vllm_tokenzip.launch import Server, start_server
from vllm_tokenzip.model_builder import build_model

SERVER_ARGS = ["--dtype", "float32"]
# What `tokenzip serve` adds on CPU: the middleware and the scheduler reporting pruning time.
SERVING_ARGS = ["--middleware", MIDDLEWARE, *scheduler_flags([], on_cpu=True)]
# Each vLLM worker reserves this much KV cache in RAM; tiny models need a few MB per sequence,
# and several test servers (and offline engines) share the machine's 24 GiB.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # whole GiB: vLLM parses an int


@pytest.fixture(scope="session")
def omni_tiny() -> Path:
    return build_model("omni", "tiny")


@pytest.fixture(scope="session")
def vl_tiny() -> Path:
    return build_model("vl", "tiny")


@pytest.fixture(scope="session")
def clips() -> dict[str, Path]:
    """The test media by name."""
    return {
        "bigbuckbunny": media.bigbuckbunny(),
        "moving_16k": media.synthetic_clip(moving=True, sample_rate=16000),
        "static_48k_51": media.synthetic_clip(moving=False, sample_rate=48000, channels=6),
        "speech_16k": media.speech_wav(sample_rate=16000),
        "speech_48k": media.speech_wav(sample_rate=48000),
    }


@pytest.fixture(scope="session")
def omni_server(omni_tiny: Path, clips, tmp_path_factory) -> Iterator[Server]:
    """The tiny Qwen2.5-Omni thinker, served like ``vl_server``."""
    log = tmp_path_factory.mktemp("logs") / "omni-server.log"
    args = [*SERVER_ARGS, *SERVING_ARGS]
    with start_server(omni_tiny, args, log_path=log, env={"TOKENZIP_DEFAULTS": ""}) as server:
        yield server


@pytest.fixture(scope="session")
def vl_server(vl_tiny: Path, clips, tmp_path_factory) -> Iterator[Server]:
    """The tiny Qwen2.5-VL with the TokenZip middleware (as `tokenzip serve` runs it) and no
    server-default settings: requests without X-TokenZip headers behave as plain vLLM."""
    log = tmp_path_factory.mktemp("logs") / "vl-server.log"
    args = [*SERVER_ARGS, *SERVING_ARGS]
    with start_server(vl_tiny, args, log_path=log, env={"TOKENZIP_DEFAULTS": ""}) as server:
        yield server
