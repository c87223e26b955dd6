"""Decode-time KV eviction in a real vLLM server: decode speed, KV blocks held, concurrency.

One server (``--scheduler-cls``/``--worker-cls`` of ``vllm_tokenzip.kv``) with a fixed KV
space of ``--kv-blocks`` blocks serves every case; budgets are per request (``vllm_xargs``).

* Single request per budget (and without eviction): a random ``--prompt-len`` token prompt,
  ``--gen`` greedy tokens (EOS ignored). Decode tokens/s is ``(gen - 1) / (t(gen) - t(1))``
  from two non-streamed requests, so prefill cancels out (stream timestamps measure the
  client, not the engine). Peak KV blocks during decode: the scheduler's own count after the
  first compaction (evicting requests; the prefill itself holds ``cdiv(prompt, bs)``), and
  ``cdiv(prompt + gen, bs)`` without eviction (vLLM allocates exactly that).
* Concurrency: ``--concurrent`` such requests at once, with and without eviction (the
  smallest budget): most requests running at the same time, peak KV usage and preemptions,
  sampled from /metrics every 50 ms.

Writes JSON (and a PNG when matplotlib is installed).

    python benchmarks/bench_kv.py --size mid --out bench_out/kv.json          # 4k prompt, 512 new
    python benchmarks/bench_kv.py --size tiny --prompt-len 512 --gen 64 --budgets 64 128 \\
        --kv-blocks 96 --concurrent 6 --out bench_out/kv_tiny.json         # quick validation
"""

from __future__ import annotations

import argparse
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from vllm_tokenzip.kv.compaction import cdiv
from vllm_tokenzip.launch import Server, start_server
from vllm_tokenzip.model_builder import build_model

BLOCK_SIZE = 32
METRIC = r"^{name}(?:\{{[^}}]*\}})? (\S+)"


def server_args(kv_blocks: int, max_model_len: int) -> list[str]:
    return [
        "--dtype", "float32",
        "--scheduler-cls", "vllm_tokenzip.kv.scheduler.EvictingScheduler",
        "--worker-cls", "vllm_tokenzip.kv.worker.EvictingCPUWorker",
        "--block-size", str(BLOCK_SIZE),
        "--num-gpu-blocks-override", str(kv_blocks),
        "--max-model-len", str(max_model_len),
    ]  # fmt: skip


def metric(server: Server, name: str) -> float:
    text = requests.get(f"{server.base_url}/metrics", timeout=30).text
    found = re.search(METRIC.format(name=re.escape(name)), text, re.M)
    return float(found.group(1)) if found else 0.0


class Sampler:
    """Samples /metrics gauges in a background thread; keeps each one's maximum."""

    def __init__(self, server: Server, names: tuple[str, ...], period: float = 0.05) -> None:
        self.server, self.names, self.period = server, names, period
        self.peaks = dict.fromkeys(names, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in self.names:
                self.peaks[name] = max(self.peaks[name], metric(self.server, name))
            time.sleep(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def timed_request(server: Server, prompt: list[int], gen: int, budget: int | None) -> float:
    """Seconds for one greedy completion of exactly ``gen`` tokens."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": gen, "temperature": 0.0,
            "ignore_eos": True}  # fmt: skip
    if budget:
        body["vllm_xargs"] = {"tokenzip_kv_budget": budget}
    began = time.perf_counter()
    reply = requests.post(f"{server.base_url}/v1/completions", json=body, timeout=3600)
    reply.raise_for_status()
    assert reply.json()["usage"]["completion_tokens"] == gen
    return time.perf_counter() - began


def logged_peaks(server: Server, start: int) -> list[int]:
    """Peak blocks after the first compaction, per evicting request logged since ``start``."""
    text = server.log_text()[start:]
    return [int(peak) for peak in re.findall(r"peak (\d+) blocks after the first", text)]


def single_runs(server: Server, args, prompt: list[int]) -> list[dict]:
    rows = []
    for budget in [None, *args.budgets]:
        start = len(server.log_text())
        first = timed_request(server, prompt, 1, budget)
        full = timed_request(server, prompt, args.gen, budget)
        time.sleep(1.0)  # let the finish line reach the log
        decode_peaks = logged_peaks(server, start)
        full_blocks = cdiv(args.prompt_len + args.gen, BLOCK_SIZE)
        rows.append({
            "budget": budget,
            "decode_tok_s": (args.gen - 1) / (full - first),
            "request_s": full,
            "peak_decode_blocks": max(decode_peaks) if budget and decode_peaks else full_blocks,
            "decode_bound_blocks": cdiv(budget, BLOCK_SIZE) + 1 if budget else full_blocks,
            "prefill_blocks": cdiv(args.prompt_len, BLOCK_SIZE),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def concurrency_runs(server: Server, args, prompts: list[list[int]]) -> list[dict]:
    rows = []
    names = ("vllm:num_requests_running", "vllm:kv_cache_usage_perc")
    for budget in (None, min(args.budgets)):
        preempted = metric(server, "vllm:num_preemptions_total")
        began = time.perf_counter()
        with Sampler(server, names) as sampler, ThreadPoolExecutor(len(prompts)) as pool:
            runs = [pool.submit(timed_request, server, p, args.gen, budget) for p in prompts]
            for run in runs:
                run.result()
        rows.append({
            "budget": budget,
            "requests": len(prompts),
            "max_running": int(sampler.peaks["vllm:num_requests_running"]),
            "peak_kv_usage": sampler.peaks["vllm:kv_cache_usage_perc"],
            "preemptions": int(metric(server, "vllm:num_preemptions_total") - preempted),
            "wall_s": time.perf_counter() - began,
            "generated_tok_s": len(prompts) * args.gen / (time.perf_counter() - began),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = report["single"]
    labels = [str(r["budget"] or "none") for r in rows]
    fig, (speed, blocks) = plt.subplots(1, 2, figsize=(9, 3.5))
    speed.bar(labels, [r["decode_tok_s"] for r in rows])
    speed.set(title="decode tokens/s", xlabel="KV budget")
    blocks.bar(labels, [r["peak_decode_blocks"] for r in rows])
    blocks.set(title="peak KV blocks during decode", xlabel="KV budget")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid", choices=["tiny", "mid"])
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--gen", type=int, default=512)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--kv-blocks", type=int, default=1024, help="fixed KV space, blocks")
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_out/kv.json"))
    args = parser.parse_args()

    rng = random.Random(args.seed)
    prompts = [[rng.randrange(100, 400) for _ in range(args.prompt_len)]
               for _ in range(args.concurrent)]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = build_model("vl", args.size)
    extra = server_args(args.kv_blocks, args.prompt_len + args.gen + 16)
    log = args.out.with_suffix(".server.log")
    with start_server(model, extra, log_path=log, env={"VLLM_USE_V2_MODEL_RUNNER": "0"}) as srv:
        timed_request(srv, prompts[0][:64], 4, None)  # warm-up
        report = {
            "model": f"vl-{args.size}",
            "prompt_len": args.prompt_len,
            "gen": args.gen,
            "block_size": BLOCK_SIZE,
            "kv_blocks": args.kv_blocks,
            "single": single_runs(srv, args, prompts[0]),
            "concurrent": concurrency_runs(srv, args, prompts),
        }
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
