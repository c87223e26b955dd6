"""The Docker images: hadolint on both Dockerfiles, and the entry point run with a fake ``vllm``.

No Docker engine is needed: the entry point script is what the images run, so it is tested
here with a ``vllm`` stub on PATH that prints the arguments it receives.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from tokenzip_server.launcher import MIDDLEWARE

from tests.deploy.tools import ROOT, tool
from vllm_tokenzip.scheduler import ASYNC_SCHEDULER, SYNC_SCHEDULER

DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
FAKE_VLLM = f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n"
SCHEDULER_FLAGS = ["--scheduler-cls", ASYNC_SCHEDULER]
PLUGIN_FLAGS = ["--middleware", MIDDLEWARE, "--trust-request-mm-kwargs", *SCHEDULER_FLAGS]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name: str) -> None:
    """hadolint reports nothing (warnings included) on the Dockerfile."""
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "style", str(ROOT / name)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_shape(name: str) -> None:
    """FROM vLLM's official image at a supported version; ENTRYPOINT is the script, exec form."""
    text = (ROOT / name).read_text()
    version = re.search(r"^ARG VLLM_VERSION=(\S+)$", text, re.M).group(1)
    cpu = name.endswith(".cpu")
    base = (
        "vllm/vllm-openai-cpu:v${VLLM_VERSION}-x86_64"
        if cpu
        else "vllm/vllm-openai:v${VLLM_VERSION}"
    )
    assert f"FROM {base}\n" in text
    assert supported(version), f"{name}: vLLM {version} outside the plugin's range"
    assert 'ENTRYPOINT ["tokenzip-entrypoint"]' in text
    assert "COPY docker/entrypoint.sh /usr/local/bin/tokenzip-entrypoint" in text


def supported(version: str) -> bool:
    """Whether ``version`` is inside the ``gpu`` extra's ``vllm[audio]>=A,<B`` range."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = next(s for s in extras["optional-dependencies"]["gpu"] if s.startswith("vllm"))
    low, high = re.search(r">=([\d.]+),<([\d.]+)", spec).groups()

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(part) for part in v.split("."))

    return key(low) <= key(version) < key(high)


def run_entrypoint(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """The arguments ``docker/entrypoint.sh ARGS`` passes to ``vllm`` (a stub on PATH)."""
    stub = tmp_path / "vllm"
    stub.write_text(FAKE_VLLM)
    stub.chmod(0o755)
    run_env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **(env or {})}
    result = subprocess.run([str(ENTRYPOINT), *args], capture_output=True, text=True,
                            env=run_env, check=True)  # fmt: skip
    return json.loads(result.stdout)


def test_entrypoint_passes_args_like_vllm_image(tmp_path: Path) -> None:
    """``docker run IMAGE --model M --port 8000`` runs ``vllm serve --model M --port 8000 ...``."""
    argv = run_entrypoint(tmp_path, "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--port", "8000")
    assert argv == ["serve", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--port", "8000",
                    *PLUGIN_FLAGS]  # fmt: skip


def test_entrypoint_keeps_args_with_spaces(tmp_path: Path) -> None:
    """JSON arguments with spaces and quotes reach vLLM as one argument each."""
    limit = '{"video": 1, "audio": 1}'
    argv = run_entrypoint(tmp_path, "m", "--limit-mm-per-prompt", limit)
    assert argv[:4] == ["serve", "m", "--limit-mm-per-prompt", limit]


def test_entrypoint_does_not_repeat_given_flags(tmp_path: Path) -> None:
    """Flags the caller already gave are not added again."""
    argv = run_entrypoint(tmp_path, "m", *PLUGIN_FLAGS)
    assert argv == ["serve", "m", *PLUGIN_FLAGS]


def test_entrypoint_without_middleware(tmp_path: Path) -> None:
    """TOKENZIP_MIDDLEWARE=0 serves without the middleware (body fields only)."""
    argv = run_entrypoint(tmp_path, "m", env={"TOKENZIP_MIDDLEWARE": "0"})
    assert argv == ["serve", "m", "--trust-request-mm-kwargs", *SCHEDULER_FLAGS]


@pytest.mark.parametrize(
    ("args", "env", "added"),
    [
        ((), {"TOKENZIP_SCHEDULING": "sync"}, ["--scheduler-cls", SYNC_SCHEDULER]),
        (("--no-async-scheduling",), {}, ["--scheduler-cls", SYNC_SCHEDULER]),
        (("--scheduler-cls=my.Scheduler",), {}, []),
        (("--scheduler-cls", "my.Scheduler"), {"TOKENZIP_SCHEDULING": "sync"}, []),
    ],
)
def test_entrypoint_scheduler_matches_the_scheduling_mode(tmp_path: Path, args, env, added):
    """The CPU image (TOKENZIP_SCHEDULING=sync) and --no-async-scheduling get the synchronous
    scheduler; a scheduler the caller names is kept."""
    argv = run_entrypoint(tmp_path, "m", *args, env=env)
    assert argv == ["serve", "m", *args, "--middleware", MIDDLEWARE,
                    "--trust-request-mm-kwargs", *added]  # fmt: skip


def test_cpu_image_schedules_synchronously() -> None:
    text = (ROOT / "Dockerfile.cpu").read_text()
    assert re.search(r"^ENV .*TOKENZIP_SCHEDULING=sync", text, re.M)


def test_entrypoint_help_reaches_vllm(tmp_path: Path) -> None:
    """No arguments or ``--help`` go to vllm serve unchanged (plus the flags)."""
    assert run_entrypoint(tmp_path, "--help")[:2] == ["serve", "--help"]


def test_entrypoint_sets_a_prometheus_multiproc_dir(tmp_path: Path) -> None:
    """Worker and engine-core metrics need PROMETHEUS_MULTIPROC_DIR; a caller's value is kept."""
    stub = tmp_path / "vllm"
    stub.write_text(
        f"#!{sys.executable}\nimport os\nprint(os.environ['PROMETHEUS_MULTIPROC_DIR'])\n"
    )
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}

    def multiproc_dir(run_env: dict[str, str]) -> str:
        done = subprocess.run([str(ENTRYPOINT), "m"], capture_output=True, text=True,
                              env=run_env, check=True)  # fmt: skip
        return done.stdout.strip()

    made = multiproc_dir(env)
    assert Path(made).is_dir() and Path(made).parent == tmp_path
    assert multiproc_dir({**env, "PROMETHEUS_MULTIPROC_DIR": "/x"}) == "/x"
