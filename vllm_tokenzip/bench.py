"""``tokenzip bench``: audio-video load against running servers, baseline vs TokenZip ratios.

Variants, each measured at every ``--concurrency``:

- ``baseline``: the ``--url`` server with pruning off (ratios 0 in the request);
- ``METHOD RATIO`` for each ``--ratios`` value above 0: the same server, pruned per request;
- ``--evs-url`` (optional): a second server started with vLLM's own ``--video-pruning-rate``
  (EVS, Qwen2.5-VL / Qwen3-VL), sent the same requests without TokenZip settings.

Every request streams one chat completion with the video (and its sound with
``--audio-in-video``, for Omni models), a unique text prefix and a unique media ``uuid``, so
that neither the prefix cache nor vLLM's processor and encoder caches (keyed by the media's
hash or uuid) hide the work; ``ignore_eos`` makes each produce ``--max-tokens`` tokens. Per
point: requests/s, output tokens/s, TTFT and end-to-end latency p50/p99, mean prompt tokens,
mean pruning time (``usage.tokenzip.pruning_ms``, servers with the TokenZip scheduler; NaN
elsewhere). Written to ``--out``: ``bench.json``, ``throughput.png``, ``ttft.png``.

Bounds: ``--requests`` per point (at most 1000), ``--time-limit`` per point (no request starts
after it), ``--timeout`` per request. Servers must be on the loopback interface.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

MAX_REQUESTS = 1000
OFF = {"ratio": 0.0, "audio_ratio": 0.0, "video_ratio": 0.0}


@dataclass(frozen=True)
class Variant:
    """One configuration under test: a server and the per-request TokenZip settings."""

    label: str
    url: str
    tokenzip: dict | None


@dataclass(frozen=True)
class Sample:
    """One request's outcome (times in seconds)."""

    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    pruning_ms: float | None = None  # None: the server does not report it
    error: str = ""


@dataclass(frozen=True)
class Point:
    """The summary of one variant at one concurrency."""

    variant: str
    concurrency: int
    completed: int
    failed: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    prompt_tokens_mean: float
    pruning_ms_mean: float
    pruning_ms_min: float  # 0 for a pruned variant: some request did not prune (a cache hit)
    ttft_p50: float
    ttft_p99: float
    latency_p50: float
    latency_p99: float
    errors: list[str]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` and make :func:`run` its command."""
    parser.add_argument("--url", required=True, help="TokenZip server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--evs-url", help="second server started with --video-pruning-rate")
    parser.add_argument("--evs-label", default="vLLM EVS", help="legend of the --evs-url server")
    parser.add_argument("--method", default="divprune", help="TokenZip method of the ratios")
    parser.add_argument("--ratios", type=_floats, default=[0.5, 0.75], help="e.g. 0.5,0.75")
    parser.add_argument("--concurrency", type=_ints, default=[1, 4, 8, 16], help="e.g. 1,4,8,16")
    parser.add_argument("--requests", type=_bounded, default=16, help="requests per point")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--video", help="video path or URL (default: bigbuckbunny, cached)")
    parser.add_argument("--audio-in-video", action="store_true",
                        help="send the video's sound too (Omni: use_audio_in_video)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per point")
    parser.add_argument("--out", type=Path, default=Path("bench_out/serving"), help="directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part]


def _ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"positive integers expected, got {text!r}")
    return values


def _bounded(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_REQUESTS:
        raise argparse.ArgumentTypeError(f"between 1 and {MAX_REQUESTS}, got {value}")
    return value


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash; SystemExit unless its host is a loopback address."""
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"tokenzip bench: only loopback servers, got {url!r}")
    return url.rstrip("/")


def variants(args: argparse.Namespace) -> list[Variant]:
    """The variants ``args`` asks for, baseline first."""
    url = check_loopback(args.url)
    found = [Variant("baseline", url, OFF)]
    for ratio in args.ratios:
        if ratio > 0:
            found.append(Variant(f"{args.method} {ratio:g}", url, {"method": args.method,
                                                                    "ratio": ratio}))  # fmt: skip
    if args.evs_url:
        found.append(Variant(args.evs_label, check_loopback(args.evs_url), None))
    return found


def video_url(video: str | None) -> str:
    """A URL the server can fetch: the cached bigbuckbunny by default, paths as file:// URIs."""
    if video and "://" in video:
        return video
    if video:
        return Path(video).resolve().as_uri()
    from vllm_tokenzip.media import bigbuckbunny

    return bigbuckbunny().as_uri()


def request_body(model: str, video: str, variant: Variant, index: int, args) -> dict:
    """The chat request ``index`` of ``variant`` (unique text and media uuid: no cache
    shortcuts)."""
    mm_kwargs = {}
    if variant.tokenzip is not None:
        mm_kwargs["tokenzip"] = variant.tokenzip
    if args.audio_in_video:
        mm_kwargs["use_audio_in_video"] = True
    content = [
        {"type": "text", "text": f"Request {index} of {variant.label}: what happens?"},
        {"type": "video_url", "video_url": {"url": video},
         "uuid": f"tokenzip-bench-{variant.label}-{index}-{time.time_ns()}"},
    ]  # fmt: skip
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if mm_kwargs:
        body["mm_processor_kwargs"] = mm_kwargs
    return body


def served_model(client, url: str) -> str:
    """The first model the server at ``url`` serves."""
    reply = client.get(f"{url}/v1/models", timeout=30)
    reply.raise_for_status()
    return reply.json()["data"][0]["id"]


def send(client, url: str, body: dict, timeout: float) -> Sample:
    """Stream one chat completion; TTFT is the first chunk carrying generated text."""
    started = time.monotonic()
    ttft = None
    usage: dict = {}
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                           timeout=timeout) as reply:  # fmt: skip
            if reply.status_code != 200:
                return Sample(ok=False, error=f"HTTP {reply.status_code}: {reply.read()[:200]!r}")
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if ttft is None and any(c.get("delta", {}).get("content")
                                        for c in chunk.get("choices", [])):  # fmt: skip
                    ttft = time.monotonic() - started
    except (httpx.HTTPError, json.JSONDecodeError) as err:  # a data point, not a crash
        return Sample(ok=False, error=f"{type(err).__name__}: {err}")
    latency = time.monotonic() - started
    return Sample(ok=True, ttft=latency if ttft is None else ttft, latency=latency,
                  prompt_tokens=usage.get("prompt_tokens", 0),
                  output_tokens=usage.get("completion_tokens", 0),
                  pruning_ms=(usage.get("tokenzip") or {}).get("pruning_ms"))  # fmt: skip


def run_point(client, variant: Variant, model: str, concurrency: int, args, tick) -> Point:
    """``args.requests`` requests of ``variant`` from ``concurrency`` threads, summarized."""
    video = video_url(args.video)
    samples: list[Sample] = []
    lock = threading.Lock()
    issued = [0]
    deadline = time.monotonic() + args.time_limit

    def worker() -> None:
        while True:
            with lock:
                if issued[0] >= args.requests or time.monotonic() > deadline:
                    return
                index = issued[0]
                issued[0] += 1
            body = request_body(model, video, variant, index, args)
            sample = send(client, variant.url, body, args.timeout)
            with lock:
                samples.append(sample)
            tick()

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(variant.label, concurrency, samples, time.monotonic() - started)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation); NaN when empty."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def summarize(label: str, concurrency: int, samples: list[Sample], wall: float) -> Point:
    """The :class:`Point` of ``samples`` collected in ``wall`` seconds."""
    ok = [s for s in samples if s.ok]
    ttfts = [s.ttft for s in ok]
    latencies = [s.latency for s in ok]
    pruning = [s.pruning_ms for s in ok if s.pruning_ms is not None]
    return Point(
        variant=label,
        concurrency=concurrency,
        completed=len(ok),
        failed=len(samples) - len(ok),
        wall_s=wall,
        requests_per_s=len(ok) / wall if wall else 0.0,
        output_tokens_per_s=sum(s.output_tokens for s in ok) / wall if wall else 0.0,
        prompt_tokens_mean=statistics.fmean(s.prompt_tokens for s in ok) if ok else 0.0,
        pruning_ms_mean=statistics.fmean(pruning) if pruning else float("nan"),
        pruning_ms_min=min(pruning, default=float("nan")),
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        latency_p50=percentile(latencies, 50),
        latency_p99=percentile(latencies, 99),
        errors=sorted({s.error for s in samples if not s.ok})[:5],
    )


def plot(points: list[Point], out: Path) -> list[Path]:
    """throughput.png (requests/s, output tokens/s) and ttft.png (p50, p99) vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(p.variant for p in points))
    figures = {
        "throughput.png": [("requests_per_s", "requests/s", "-"),
                           ("output_tokens_per_s", "output tokens/s", "-")],
        "ttft.png": [("ttft_p50", "TTFT p50 (s)", "-"), ("ttft_p99", "TTFT p99 (s)", "--")],
    }  # fmt: skip
    paths = []
    for name, series in figures.items():
        fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), squeeze=False)
        for ax, (field, title, style) in zip(axes[0], series, strict=True):
            for label in labels:
                mine = [p for p in points if p.variant == label]
                ax.plot([p.concurrency for p in mine], [getattr(p, field) for p in mine],
                        style, marker="o", label=label)  # fmt: skip
            ax.set(xlabel="concurrency", title=title, xscale="log", xticks=sorted(
                {p.concurrency for p in points}))  # fmt: skip
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths


def run(args: argparse.Namespace) -> int:
    """Run every variant at every concurrency; write JSON and plots; 1 if a request failed."""
    from tqdm import tqdm

    chosen = variants(args)
    total = len(chosen) * len(args.concurrency) * args.requests
    points = []
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    with httpx.Client(limits=limits, trust_env=False) as client, \
            tqdm(total=total, unit="req", disable=args.no_progress) as bar:  # fmt: skip
        models = {url: served_model(client, url) for url in {v.url for v in chosen}}
        for variant in chosen:
            for concurrency in args.concurrency:
                bar.set_description(f"{variant.label} @ {concurrency}")
                points.append(run_point(client, variant, models[variant.url], concurrency,
                                        args, lambda: bar.update(1)))  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
              if k != "func"}  # fmt: skip
    rows = [{k: None if v != v else v for k, v in asdict(p).items()} for p in points]  # NaN
    result = {"config": config, "models": models, "points": rows}
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    written = [args.out / "bench.json", *plot(points, args.out)]
    print("\n".join(str(path) for path in written))
    return int(any(p.failed for p in points))
