"""Start and stop a ``vllm serve`` process with the flags the plugin's CPU setup needs.

Used by the demo, the tests' session fixtures and the benchmarks, so every one of them serves
the same way. The plugin itself is loaded by vLLM through its entry point.

Each server gets its own fresh ``PROMETHEUS_MULTIPROC_DIR`` (removed when it stops), so that
the worker's and engine core's ``tokenzip_`` metrics reach ``/metrics``
(see :mod:`vllm_tokenzip.metrics`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vllm_tokenzip.media import media_dir

DEFAULT_LIMIT_MM = {"video": 1, "audio": 1, "image": 1}
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def cpu_serve_args(max_model_len: int = 16384) -> list[str]:
    """``vllm serve`` flags for CPU serving of the locally built models.

    --enforce-eager: start-up in ~25 s instead of ~60 s (the compile cache does not reload).
    --trust-request-mm-kwargs: per-request ``mm_processor_kwargs`` (``use_audio_in_video``).
    --allowed-local-media-path: ``file://`` URLs of the cached test media.
    """
    return [
        "--enforce-eager",
        "--trust-request-mm-kwargs",
        "--allowed-local-media-path", str(media_dir()),
        "--limit-mm-per-prompt", json.dumps(DEFAULT_LIMIT_MM),
        "--max-model-len", str(max_model_len),
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running ``vllm serve`` process and where to reach it."""

    model: str
    port: int
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    metrics_dir: Path | None = None  # this server's Prometheus multiprocess directory

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (SIGINT, then SIGKILL) and remove its metrics directory."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    model: Path | str,
    extra_args: list[str] | None = None,
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    startup_timeout: float = 600.0,
) -> Server:
    """Start ``vllm serve MODEL`` on a free port and wait until ``/health`` answers.

    The server runs in Prometheus multiprocess mode in a fresh directory (``env`` may name
    another). Raises RuntimeError with the log's tail if the server exits or does not come up.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model),
           "--port", str(port), *cpu_serve_args(), *(extra_args or [])]  # fmt: skip
    metrics_dir = Path(tempfile.mkdtemp(prefix="tokenzip-prometheus-"))
    # PYTHONUNBUFFERED: every process writes its log lines at once (the log is a file).
    run_env = {"VLLM_CPU_KVCACHE_SPACE": "2", **os.environ, "PYTHONUNBUFFERED": "1",
               METRICS_DIR_ENV: str(metrics_dir), **(env or {})}  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env,
                                   start_new_session=True)  # fmt: skip
    server = Server(model=str(model), port=port, log_path=log_path, process=process,
                    metrics_dir=metrics_dir)  # fmt: skip
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{server.base_url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"vllm serve not healthy after {startup_timeout:.0f} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
