"""Prefill time and TTFT of pruned video requests served by vLLM on CPU, per method and retention.

One run measures, on the locally built Qwen2.5-VL (``--size tiny|mid``):

- the plugin's video methods, per request (``mm_processor_kwargs.tokenzip``), on one server;
- stock vLLM EVS (``--video-pruning-rate``), one server per rate since the rate is server-wide
  (the adapter applies it to requests without tokenzip settings);
- with ``--omni``, OmniZip on Qwen2.5-Omni audio-video requests (``use_audio_in_video``); its
  ``ratio`` prunes the audio + video tokens together, so there % kept is of both.

100 % kept is the request without settings, measured once per server kind and shared by its
methods. Each point is the median of ``--repeats`` sequential requests after one warm-up.
TTFT is client-side (streaming, first chunk carrying content); prefill time is the delta of
vLLM's ``vllm:request_prefill_time_seconds`` histogram sum / count around the request; prompt
tokens come from the streamed usage. Prefix caching and the processor cache are off and each
request's video carries a fresh ``uuid`` (vLLM's encoder cache, keyed by the media's hash or
uuid, would otherwise serve repeats), so every request encodes its video and prefills from
scratch. Threads: the servers inherit
``VLLM_CPU_OMP_THREADS_BIND`` (``--omp-bind`` sets it; vLLM's ``auto`` binds the worker to all
cores but one, so 1 of 2); the binding vLLM logged is copied into the JSON.

    python benchmarks/bench_prefill.py --size tiny --methods divprune --repeats 1 --out /tmp/b.json
    python benchmarks/bench_prefill.py --size mid --omni --out bench_out/prefill_mid.json

Writes the JSON to stdout and ``--out``, and a PNG plot next to ``--out`` (needs the ``bench``
extra: matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from vllm_tokenzip import media, methods
from vllm_tokenzip.launch import Server, start_server
from vllm_tokenzip.methods.base import Need
from vllm_tokenzip.model_builder import build_model

KEPT_PERCENTS = (100, 55, 45, 35, 20)
STOCK_EVS = "vllm_evs"
OMNIZIP = "omnizip"
QUESTION = "Describe the video."
PREFILL_METRIC = "vllm:request_prefill_time_seconds"
SERVER_ARGS = [
    "--no-enable-prefix-caching",
    "--mm-processor-cache-gb", "0",
    "--max-model-len", "32768",
]  # fmt: skip
METRICS_WAIT_S = 10.0


def video_methods() -> list[str]:
    """The methods the Qwen2.5-VL adapter serves: video methods that need only embeddings."""
    return [
        name
        for name in methods.available()
        if "video" in methods.get(name).modalities and methods.get(name).needs == {Need.EMBEDDINGS}
    ]


def prune_ratio(kept_percent: int) -> float:
    """Fraction to prune for a retention in percent."""
    return round(1 - kept_percent / 100, 6)


def prefill_counters(server: Server) -> tuple[float, int]:
    """(sum of seconds, count) of the prefill-time histogram, over all label sets."""
    text = requests.get(f"{server.base_url}/metrics", timeout=30).text
    total, count = 0.0, 0
    for line in text.splitlines():
        if line.startswith(f"{PREFILL_METRIC}_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{PREFILL_METRIC}_count"):
            count += int(float(line.rsplit(" ", 1)[1]))
    return total, count


def chat_body(server: Server, video: Path, mm_kwargs: dict) -> dict:
    """Streaming one-token chat request over one video, with usage in the last chunk."""
    content = [{"type": "video_url", "video_url": {"url": video.as_uri()}},
               {"type": "text", "text": QUESTION}]  # fmt: skip
    body = {"model": server.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 1, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if mm_kwargs:
        body["mm_processor_kwargs"] = mm_kwargs
    return body


def with_fresh_media_uuid(body: dict) -> dict:
    """A copy of ``body`` whose video part carries a new uuid (no encoder-cache reuse)."""
    message = body["messages"][0]
    content = [{**part, "uuid": f"bench-{uuid.uuid4()}"} if part["type"] == "video_url" else part
               for part in message["content"]]  # fmt: skip
    return {**body, "messages": [{**message, "content": content}]}


def stream_chat(server: Server, body: dict) -> tuple[float, int]:
    """(TTFT in s: first chunk with content or a finish reason, prompt tokens)."""
    start = time.perf_counter()
    ttft, prompt_tokens = None, None
    with requests.post(
        f"{server.base_url}/v1/chat/completions", json=body, stream=True, timeout=3600
    ) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.text}")
        for line in reply.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: ") :])
            choice = (chunk.get("choices") or [{}])[0]
            if ttft is None and (
                choice.get("delta", {}).get("content") or choice.get("finish_reason")
            ):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    if ttft is None or prompt_tokens is None:
        raise RuntimeError("stream ended without content or usage")
    return ttft, prompt_tokens


def measured_request(server: Server, body: dict) -> dict[str, float]:
    """One request: TTFT, prefill seconds (metrics delta) and prompt tokens."""
    before_sum, before_count = prefill_counters(server)
    ttft, prompt_tokens = stream_chat(server, with_fresh_media_uuid(body))
    deadline = time.monotonic() + METRICS_WAIT_S
    while True:
        after_sum, after_count = prefill_counters(server)
        if after_count > before_count or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if after_count != before_count + 1:
        raise RuntimeError(f"prefill histogram count moved by {after_count - before_count}, not 1")
    return {"ttft_s": ttft, "prefill_s": after_sum - before_sum, "prompt_tokens": prompt_tokens}


def measure(server: Server, body: dict, repeats: int) -> dict[str, object]:
    """Medians over ``repeats`` requests after one warm-up; all samples kept."""
    measured_request(server, body)
    samples = [measured_request(server, body) for _ in range(repeats)]
    return {
        "ttft_s": statistics.median(s["ttft_s"] for s in samples),
        "prefill_s": statistics.median(s["prefill_s"] for s in samples),
        "prompt_tokens": samples[0]["prompt_tokens"],
        "samples": samples,
    }


def omp_binding(server: Server) -> list[str]:
    """The OpenMP binding lines vLLM logged at start-up."""
    lines = server.log_text().splitlines()
    starts = [i for i, line in enumerate(lines) if "OpenMP thread binding info" in line]
    if not starts:
        return []
    return [re.sub(r"^.*\] ", "", line).strip() for line in lines[starts[0] + 1 : starts[0] + 5]]


@contextmanager
def serving(model: Path, extra_args: list[str], log_dir: Path, name: str) -> Iterator[Server]:
    """A server for ``model``, with the benchmark's flags; logs under ``log_dir/name.log``."""
    print(f"[bench] starting {name}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with start_server(model, [*SERVER_ARGS, *extra_args], log_path=log_dir / f"{name}.log") as srv:
        print(f"[bench] {name} up in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        yield srv


def log_point(label: str, kept: int, point: dict) -> None:
    print(f"[bench] {label:>16} {kept:3d}%: {point['prompt_tokens']:6d} tokens, prefill "
          f"{point['prefill_s']:.3f} s, TTFT {point['ttft_s']:.3f} s",
          file=sys.stderr, flush=True)  # fmt: skip


def bench_plugin(
    model: Path, video: Path, names: list[str], kept: list[int], args, log_dir: Path
) -> tuple[dict, dict, list[str]]:
    """(no-pruning point, {method: {kept %: point}}, OMP binding) on one VL plugin server."""
    with serving(model, args.server_args, log_dir, "vl-plugin") as server:
        baseline = measure(server, chat_body(server, video, {}), args.repeats)
        log_point("no pruning", 100, baseline)
        results = {}
        for name in names:
            results[name] = {100: baseline}
            for percent in (p for p in kept if p != 100):
                tokenzip = {"method": name, "ratio": prune_ratio(percent)}
                body = chat_body(server, video, {"tokenzip": tokenzip})
                results[name][percent] = measure(server, body, args.repeats)
                log_point(name, percent, results[name][percent])
        return baseline, results, omp_binding(server)


def bench_stock_evs(
    model: Path, video: Path, kept: list[int], baseline: dict, args, log_dir: Path
) -> dict:
    """{kept %: point} for stock vLLM EVS, one server per ``--video-pruning-rate``."""
    results = {100: baseline}
    for percent in (p for p in kept if p != 100):
        rate = str(prune_ratio(percent))
        extra = [*args.server_args, "--video-pruning-rate", rate]
        with serving(model, extra, log_dir, f"vl-evs-{rate}") as server:
            results[percent] = measure(server, chat_body(server, video, {}), args.repeats)
            log_point(STOCK_EVS, percent, results[percent])
    return results


def bench_omnizip(
    model: Path, video: Path, kept: list[int], args, log_dir: Path
) -> tuple[dict, list[str]]:
    """({kept %: point}, OMP binding) for OmniZip on Omni audio-video requests.

    Requests send ``use_audio_in_video``; 100 % kept is the request without settings.
    """
    results = {}
    with serving(model, args.server_args, log_dir, "omni-plugin") as server:
        for percent in kept:
            mm_kwargs: dict = {"use_audio_in_video": True}
            if percent != 100:
                mm_kwargs["tokenzip"] = {"method": OMNIZIP, "ratio": prune_ratio(percent)}
            results[percent] = measure(server, chat_body(server, video, mm_kwargs), args.repeats)
            log_point(f"omni {OMNIZIP}", percent, results[percent])
        return results, omp_binding(server)


def add_speedups(curves: dict[str, dict[int, dict]]) -> None:
    """Add prefill and TTFT speed-ups vs the curve's 100 % point to every point."""
    for curve in curves.values():
        full = curve[100]
        for point in curve.values():
            point["prefill_speedup"] = full["prefill_s"] / point["prefill_s"]
            point["ttft_speedup"] = full["ttft_s"] / point["ttft_s"]


PANELS = (
    ("prefill_s", "prefill time (s)"),
    ("ttft_s", "TTFT (s)"),
    ("prefill_speedup", "prefill speed-up vs 100 % kept"),
)


def plot(curves: dict[str, dict[int, dict]], title: str, path: Path) -> None:
    """Prefill time, TTFT and prefill speed-up vs % kept, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4.5))
    for name, curve in curves.items():
        percents = sorted(curve, key=int)  # int keys, or str ones from a reloaded JSON
        style = "--" if name == STOCK_EVS or name.startswith("omni") else "-"
        for ax, (key, _) in zip(axes, PANELS, strict=True):
            ax.plot(
                [int(p) for p in percents],
                [curve[p][key] for p in percents],
                style,
                marker="o",
                label=name,
            )
    for ax, (_, label) in zip(axes, PANELS, strict=True):
        ax.set_xlabel("% of video tokens kept")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "mid"), default="mid")
    parser.add_argument(
        "--methods",
        default=",".join(video_methods()),
        help="comma-separated plugin methods (default: all the VL adapter serves)",
    )
    parser.add_argument(
        "--kept",
        default=",".join(map(str, KEPT_PERCENTS)),
        help="comma-separated %% of video tokens kept (100 is always measured)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-stock-evs",
        dest="stock_evs",
        action="store_false",
        help="skip the stock --video-pruning-rate servers",
    )
    parser.add_argument(
        "--omni", action="store_true", help="also OmniZip on Qwen2.5-Omni audio-video requests"
    )
    parser.add_argument("--clip-seconds", type=float, default=16.0)
    parser.add_argument("--clip-size", default="640x360", help="WxH of the synthetic clip")
    parser.add_argument(
        "--omp-bind",
        default=None,
        help="VLLM_CPU_OMP_THREADS_BIND for the servers (default: inherited)",
    )
    parser.add_argument(
        "--server-args",
        default="",
        help="extra `vllm serve` flags, space-separated (e.g. '--dtype float32')",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_out/prefill.json"))  # fmt: skip
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.kept = sorted({100, *(int(p) for p in args.kept.split(","))}, reverse=True)
    args.server_args = args.server_args.split()
    unknown = sorted(set(args.methods) - set(video_methods()))
    if unknown:
        parser.error(f"methods {unknown} not served by the VL adapter; one of {video_methods()}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.omp_bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.omp_bind
    video = media.synthetic_clip(seconds=args.clip_seconds, size=args.clip_size, moving=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench_prefill_"))
    started = time.perf_counter()
    curves, omni, binding = {}, {}, []
    if args.methods or args.stock_evs:
        vl_model = build_model("vl", args.size)
        baseline, curves, binding = bench_plugin(
            vl_model, video, args.methods, args.kept, args, log_dir
        )
        if args.stock_evs:
            curves[STOCK_EVS] = bench_stock_evs(vl_model, video, args.kept, baseline, args, log_dir)
    if args.omni:
        omni_model = build_model("omni", args.size)
        omni[OMNIZIP], omni_binding = bench_omnizip(omni_model, video, args.kept, args, log_dir)
        binding = binding or omni_binding
        add_speedups(omni)
    add_speedups(curves)
    report = {
        "size": args.size,
        "clip": {"path": str(video), "seconds": args.clip_seconds, "size": args.clip_size},
        "repeats": args.repeats,
        "server_args": [*SERVER_ARGS, *args.server_args],
        "threads": {
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            "cpu_count": os.cpu_count(),
            "vllm_binding_log": binding,
        },
        "platform": platform.platform(),
        "vl": curves,
        "omni": omni,
        "logs": str(log_dir),
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    png = args.out.with_suffix(".png")
    title = f"Qwen2.5 {args.size} on CPU: {args.clip_seconds:g} s {args.clip_size} clip"
    plot({**curves, **{f"omni {k}": v for k, v in omni.items()}}, title, png)
    print(json.dumps(report, indent=1))
    print(f"[bench] wrote {args.out} and {png} in {report['wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
