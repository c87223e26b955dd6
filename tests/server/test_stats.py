"""Prompt statistics, metrics, the render_chat patch and the ``tokenzip serve`` launcher."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from tokenzip_server import launcher

from vllm_tokenzip import cli, methods, metrics, stats
from vllm_tokenzip.models.mm_pruning import METHOD_ID, NO_METHOD, NUM_KEEP, RATIO
from vllm_tokenzip.stats import ItemCounts, input_counts, item_counts, request_stats


def elem(value) -> SimpleNamespace:
    """A stand-in for vLLM's MultiModalFieldElem."""
    return SimpleNamespace(data=torch.as_tensor(value))


def vl_item(method: str | None, keep: int, grid=(4, 8, 12)) -> dict:
    method_id = methods.available().index(method) if method else NO_METHOD
    return {"video_grid_thw": elem(list(grid)), METHOD_ID: elem(method_id),
            RATIO: elem(0.5), NUM_KEEP: elem(keep)}  # fmt: skip


def test_item_counts_from_vl_fields():
    counts = item_counts("video", vl_item("divprune", 30), merge=2)
    assert counts == ItemCounts("divprune", video_original=4 * 8 * 12 // 4, video_kept=30)
    assert counts.ratio_achieved == pytest.approx(1 - 30 / 96)


def test_item_counts_from_stats_rows():
    omnizip = methods.available().index("omnizip")
    row = {"tokenzip_video_stats": elem([omnizip, 50, 40, 200, 80])}
    assert item_counts("video", row, merge=2) == ItemCounts("omnizip", 50, 40, 200, 80)
    assert item_counts("audio", {"input_features": elem([1])}, merge=2) is None


def placeholder(length: int) -> SimpleNamespace:
    return SimpleNamespace(length=length)


def test_cached_items_use_remembered_counts_and_stock_items_their_placeholder():
    first = {"mm_kwargs": {"video": [vl_item("evs", 10)]}, "mm_hashes": {"video": ["h1"]},
             "mm_placeholders": {"video": [placeholder(10)]}}  # fmt: skip
    again = {**first, "mm_kwargs": {"video": [None]}}
    stock = {"mm_kwargs": {"audio": [None]}, "mm_hashes": {"audio": ["h2"]},
             "mm_placeholders": {"audio": [placeholder(25)]}}  # fmt: skip
    assert input_counts(first, 2) == input_counts(again, 2) == ItemCounts("evs", 0, 0, 96, 10)
    total = request_stats([again, stock], 2)
    assert (total.method, total.original, total.kept) == ("evs", 121, 35)
    assert total.as_usage()["audio_kept"] == 25


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_record_exact_amounts():
    counts = ItemCounts("divprune", 10, 10, 100, 40)
    before = sample("tokenzip_tokens_kept_total", model_name="t", modality="video")
    before_requests = sample("tokenzip_requests_total", model_name="t", method="divprune")
    metrics.record("t", counts)
    metrics.record("t", ItemCounts())  # no audio or video: not counted
    assert sample("tokenzip_tokens_kept_total", model_name="t", modality="video") == before + 40
    assert sample("tokenzip_requests_total", model_name="t", method="divprune") == (
        before_requests + 1
    )
    assert sample("tokenzip_ratio_achieved_sum", model_name="t") >= 50 / 110


def test_install_patches_render_chat_once():
    stats.install()
    stats.install()
    from vllm.renderers.online_renderer import OnlineRenderer

    assert stats.is_installed()
    wrapped = OnlineRenderer.render_chat
    stats.install()
    assert OnlineRenderer.render_chat is wrapped
    assert not getattr(wrapped.__wrapped__, stats.PATCH_MARKER, False)


def test_plugin_register_installs_patch_in_fresh_process():
    code = (
        "from vllm_tokenzip.plugin import register; register(); "
        "import vllm.renderers.online_renderer; "
        "from vllm_tokenzip.stats import is_installed; print(is_installed())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("True")


def serve_args(*argv: str) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser()
    launcher.configure_parser(parser)
    return parser.parse_known_args(list(argv))


def test_serve_command_with_preset_and_overrides():
    args, rest = serve_args("/m", "--preset", "cpu-dev", "--ratio", "0.4", "--max-model-len", "9")
    argv, env = launcher.build_command(args, rest, on_cpu=True)
    assert argv[2:5] == ["vllm.entrypoints.cli.main", "serve", "/m"]
    assert argv.count("--enforce-eager") == 1  # the preset already has it
    assert argv[argv.index("--middleware") + 1] == launcher.MIDDLEWARE
    assert "--trust-request-mm-kwargs" in argv
    assert argv[-2:] == ["--max-model-len", "9"]
    assert json.loads(env["TOKENZIP_DEFAULTS"]) == {"method": "divprune", "ratio": 0.4}


def test_serve_command_plain_gpu():
    args, rest = serve_args("/m")
    argv, env = launcher.build_command(args, rest, on_cpu=False)
    assert "--enforce-eager" not in argv and env == {}
    assert set(launcher.presets()) >= {"cpu-dev", "gpu-7b"}


def test_serve_refuses_bad_defaults_and_presets():
    with pytest.raises(ValueError, match="ratio"):
        launcher.build_command(serve_args("/m", "--method", "evs", "--ratio", "1.5")[0], [], True)
    with pytest.raises(SystemExit, match="no preset"):
        launcher.build_command(serve_args("/m", "--preset", "tpu")[0], [], True)


def test_cli_serve_dry_run_and_help(capsys):
    assert cli.main(["serve", "/m", "--dry-run", "--port", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["argv"][-2:] == ["--port", "1"]
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--middleware", "--trust-request-mm-kwargs", "--enforce-eager", "--preset"):
        assert flag in text


def multiprocess_registry(code: str, metrics_dir: Path, processes: int = 2) -> CollectorRegistry:
    """Run ``code`` in ``processes`` interpreters in Prometheus multiprocess mode (directory
    ``metrics_dir``); the registry that merges what they recorded."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    for _ in range(processes):
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    return registry


def test_metrics_in_multiprocess_mode(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR (--api-server-count > 1) two processes' counts add up."""
    code = (
        "from vllm_tokenzip import metrics; from vllm_tokenzip.stats import ItemCounts; "
        "metrics.record('m', ItemCounts('evs', 0, 0, 100, 25))"
    )
    registry = multiprocess_registry(code, tmp_path)
    labels = {"model_name": "m", "modality": "video"}
    assert registry.get_sample_value("tokenzip_tokens_kept_total", labels) == 50
    assert registry.get_sample_value("tokenzip_ratio_achieved_count", {"model_name": "m"}) == 2


def test_kv_policy_adds_the_eviction_scheduler_and_worker():
    args, rest = serve_args("/m", "--kv-policy", "snapkv", "--kv-budget", "512")
    argv, env = launcher.build_command(args, rest, on_cpu=True)
    assert argv[argv.index("--scheduler-cls") + 1] == "vllm_tokenzip.kv.scheduler.EvictingScheduler"
    assert argv[argv.index("--worker-cls") + 1] == "vllm_tokenzip.kv.worker.EvictingCPUWorker"
    assert env["TOKENZIP_KV_POLICY"] == "snapkv" and env["TOKENZIP_KV_BUDGET"] == "512"
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert argv.count("--scheduler-cls") == 1


@pytest.mark.parametrize(
    ("extra", "on_cpu", "expected"),
    [
        ((), True, "vllm_tokenzip.scheduler.TokenZipScheduler"),
        ((), False, "vllm_tokenzip.scheduler.TokenZipAsyncScheduler"),
        (("--no-async-scheduling",), False, "vllm_tokenzip.scheduler.TokenZipScheduler"),
        (("--scheduler-cls", "my.Scheduler"), False, "my.Scheduler"),
        (("--scheduler-cls=my.Scheduler",), True, None),
    ],
)
def test_serve_adds_the_scheduler_matching_the_scheduling_mode(extra, on_cpu, expected):
    argv, _ = launcher.build_command(*serve_args("/m", *extra), on_cpu=on_cpu)
    if expected is None:
        assert "--scheduler-cls" not in argv and argv[-1] == "--scheduler-cls=my.Scheduler"
    else:
        assert argv.count("--scheduler-cls") == 1
        assert argv[argv.index("--scheduler-cls") + 1] == expected


@pytest.mark.parametrize(
    "argv", [("--kv-budget", "64"), ("--kv-policy", "h2o", "--kv-budget", "0")]
)
def test_bad_kv_options_are_refused(argv):
    with pytest.raises(SystemExit, match="kv-budget"):
        launcher.build_command(serve_args("/m", *argv)[0], [], True)
