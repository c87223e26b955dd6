"""One vLLM server with decode-time KV eviction enabled (real engine, CPU, tiny Qwen2.5-VL).

Eviction is per request (``vllm_xargs``), so the same server also answers requests without it.
Prefix caching is left at vLLM's default so the test sees the scheduler turn it off.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenzip_server.launcher import MIDDLEWARE

from tests.conftest import SERVER_ARGS
from vllm_tokenzip.launch import Server, start_server

BLOCK_SIZE = 32
NUM_BLOCKS = 512
KV_SERVER_ARGS = [
    *SERVER_ARGS,
    "--scheduler-cls", "vllm_tokenzip.kv.scheduler.EvictingScheduler",
    "--worker-cls", "vllm_tokenzip.kv.worker.EvictingCPUWorker",
    "--block-size", str(BLOCK_SIZE),
    "--num-gpu-blocks-override", str(NUM_BLOCKS),
    "--max-model-len", str(BLOCK_SIZE * (NUM_BLOCKS - 1)),  # one request may fill the cache
    "--middleware", MIDDLEWARE,
]  # fmt: skip


@pytest.fixture(scope="session")
def kv_server(vl_tiny: Path, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "kv-server.log"
    env = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    with start_server(vl_tiny, KV_SERVER_ARGS, log_path=log, env=env) as server:
        yield server
