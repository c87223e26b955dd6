"""The serving-surface engine tests use the session's Qwen2.5-VL server (it runs the middleware)."""

from __future__ import annotations

import pytest

from vllm_tokenzip.launch import Server


@pytest.fixture(scope="session")
def vl_serving(vl_server: Server) -> Server:
    return vl_server
