"""A tiny Qwen2.5-VL server with the TokenZip middleware, and a real Prometheus scraping it."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import ROOT, tool
from vllm_tokenzip.launch import Server, free_port

SCRAPE_INTERVAL = "1s"


@pytest.fixture(scope="session")
def deploy_server(vl_server: Server) -> Server:
    """The session's tiny VL server: it runs with the middleware, as the images do."""
    return vl_server


def prometheus_config(target: str) -> dict:
    """deploy/prometheus/prometheus.yaml pointed at ``target``, scraping every second."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yaml").read_text())
    config["global"]["scrape_interval"] = SCRAPE_INTERVAL
    config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    return config


@pytest.fixture(scope="session")
def prometheus(deploy_server: Server, tmp_path_factory) -> Iterator[str]:
    """A Prometheus server (Debian package) scraping ``deploy_server``; yields its base URL."""
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yaml"
    config.write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{deploy_server.port}")))
    port = free_port()
    log = (work / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/-/ready", process, work / "prometheus.log")
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Wait until ``url`` answers 200; RuntimeError with the log if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"prometheus not ready after {timeout} s:\n{log.read_text()[-3000:]}")
