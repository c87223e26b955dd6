"""Time every registered compression method on CPU and print the results as JSON.

Video methods run their engine form ``select(inputs, kept_count(T, N, ratio))`` on random,
temporally redundant embeddings; OmniZip is also timed on an interleaved audio-video prompt
(audio saliency from encoder Q/K, then the engine and reference forms when present).

    python benchmarks/bench_methods.py --sizes small --repeats 3 --threads 1
    python benchmarks/bench_methods.py --sizes realistic --dtype bfloat16 --out bench_out/cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_tokenzip import methods
from vllm_tokenzip.methods import omnizip
from vllm_tokenzip.methods.base import Method, VideoInputs

AUDIO_TOKEN_ID = 151646  # Qwen2.5-Omni <|AUDIO|>
VIDEO_TOKEN_ID = 151656  # Qwen2.5-Omni <|VIDEO|>
TEXT_TOKEN_ID = 1000
AUDIO_PER_CHUNK = 50  # LLM audio tokens per 2-s chunk of the use_audio_in_video layout
ENCODER_TOKENS_PER_SECOND = 50  # audio-encoder tokens (before the stride-2 pooling to 25 / s)
STEPS_PER_CHUNK = 2  # temporal grid steps (1 s each) per 2-s chunk

SIZES = {
    # video: frames x grid (tokens per frame = h * w) x hidden; omni: grid steps (1 s each),
    # audio-encoder heads x tokens x head dim (LLM audio tokens = tokens // 2).
    "small": {
        "video": {"frames": 8, "grid_hw": (4, 4), "dim": 64, "ratio": 0.65},
        "omni": {"steps": 8, "grid_hw": (4, 4), "dim": 64, "heads": 4, "head_dim": 16},
    },
    "realistic": {
        "video": {"frames": 64, "grid_hw": (12, 12), "dim": 3584, "ratio": 0.65},
        "omni": {"steps": 60, "grid_hw": (12, 12), "dim": 3584, "heads": 20, "head_dim": 64},
    },
}
OMNI_RATIOS = {"rho_audio": 0.3, "rho_video": 0.6}  # OmniZip paper defaults
SCENES = 8
FRAME_NOISE = 0.3
QUERY_TOKENS = 32


def timed(run: Callable[[], object], repeats: int) -> dict[str, object]:
    """Median and all wall times in ms of ``repeats`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": round(statistics.median(times), 3),
        "runs_ms": [round(t, 3) for t in times],
    }


def scene_tokens(frames: int, tokens: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """Frames around a few scene vectors (consecutive frames redundant): [frames, tokens, dim]."""
    base = torch.randn(SCENES, tokens, dim, generator=gen)
    scene = torch.arange(frames) * SCENES // frames
    return base[scene] + FRAME_NOISE * torch.randn(frames, tokens, dim, generator=gen)


def video_inputs(size: dict, dtype: torch.dtype, seed: int) -> VideoInputs:
    """Embeddings [T, N, D], softmax-of-random-logits encoder attention [T, N], query [Q, D]."""
    gen = torch.Generator().manual_seed(seed)
    height, width = size["grid_hw"]
    tokens = height * width
    embeds = scene_tokens(size["frames"], tokens, size["dim"], gen)
    attention = torch.randn(size["frames"], tokens, generator=gen).softmax(dim=-1)
    query = torch.randn(QUERY_TOKENS, size["dim"], generator=gen)
    return VideoInputs(
        embeds=embeds.to(dtype),
        grid_hw=size["grid_hw"],
        encoder_attention=attention.to(dtype),
        query=query.to(dtype),
        seed=seed,
    )


def time_video_method(
    method: Method, inputs: VideoInputs, ratio: float, repeats: int
) -> dict[str, object]:
    """One timing row for ``method.select`` at ``kept_count(T, N, ratio)``."""
    frames, tokens, _ = inputs.embeds.shape
    num_keep = method.kept_count(frames, tokens, ratio)
    return {**timed(lambda: method.select(inputs, num_keep), repeats), "kept": num_keep}


def omni_layout(steps: int, tokens_per_step: int, num_audio: int) -> torch.Tensor:
    """input_ids [1, L] of the 2-s use_audio_in_video layout: per chunk its video then audio."""
    ids = [TEXT_TOKEN_ID] * 5
    audio_left = num_audio
    for first in range(0, steps, STEPS_PER_CHUNK):
        ids += [VIDEO_TOKEN_ID] * (min(STEPS_PER_CHUNK, steps - first) * tokens_per_step)
        chunk_audio = min(AUDIO_PER_CHUNK, audio_left)
        ids += [AUDIO_TOKEN_ID] * chunk_audio
        audio_left -= chunk_audio
    ids += [AUDIO_TOKEN_ID] * audio_left + [TEXT_TOKEN_ID] * 6
    return torch.tensor([ids])


def time_omnizip(size: dict, dtype: torch.dtype, seed: int, repeats: int) -> dict[str, object]:
    """Audio saliency on encoder Q/K [H, T_enc, d], then OmniZip's engine and reference forms."""
    gen = torch.Generator().manual_seed(seed)
    encoder_tokens = size["steps"] * ENCODER_TOKENS_PER_SECOND  # steps are 1 s each
    q, k = (
        torch.randn(size["heads"], encoder_tokens, size["head_dim"], generator=gen).to(dtype)
        for _ in range(2)
    )
    rows = {"audio_saliency": timed(lambda: omnizip.audio_saliency(q, k), repeats)}
    saliency = omnizip.audio_saliency(q, k)
    height, width = size["grid_hw"]
    input_ids = omni_layout(size["steps"], height * width, saliency.numel())
    embeds = torch.randn(1, input_ids.shape[1], size["dim"], generator=gen).to(dtype)
    grid_thw = torch.tensor([[size["steps"], 2 * height, 2 * width]])
    for form in (omnizip.omnizip_engine, omnizip.omnizip_reference):

        def call(run: Callable = form) -> object:
            return run(
                input_ids,
                embeds,
                saliency,
                grid_thw,
                audio_token_id=AUDIO_TOKEN_ID,
                video_token_id=VIDEO_TOKEN_ID,
                **OMNI_RATIOS,
            )

        rows[form.__name__] = timed(call, repeats)
    shapes = {
        "qk": [size["heads"], encoder_tokens, size["head_dim"]],
        "audio_tokens": saliency.numel(),
        "video_tokens": int((input_ids == VIDEO_TOKEN_ID).sum()),
        "sequence": list(embeds.shape),
        **OMNI_RATIOS,
    }
    return {"shapes": shapes, "forms": rows}


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo, else platform.processor()."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "both"], default="both", help="input dtype"
    )
    parser.add_argument("--sizes", choices=sorted(SIZES), default="realistic")
    parser.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    registry = {name: methods.get(name) for name in methods.available()}
    wanted = [name for name in args.methods.split(",") if name] or sorted(registry)
    unknown = sorted(set(wanted) - set(registry))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; available: {sorted(registry)}")
    size = SIZES[args.sizes]
    results: dict[str, dict[str, object]] = {}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        inputs = video_inputs(size["video"], dtype, args.seed)
        for name in wanted:
            try:
                row = time_video_method(
                    registry[name], inputs, size["video"]["ratio"], args.repeats
                )
            except Exception as error:
                row = {"error": f"{type(error).__name__}: {error}"}
            results.setdefault(name, {})[dtype_name] = row
        if "omnizip" in wanted:
            try:
                row = time_omnizip(size["omni"], dtype, args.seed, args.repeats)
            except Exception as error:
                row = {"error": f"{type(error).__name__}: {error}"}
            results.setdefault("omnizip_audio_video", {})[dtype_name] = row
    video = size["video"]
    report = {
        "sizes": args.sizes,
        "video_shape": [video["frames"], video["grid_hw"][0] * video["grid_hw"][1], video["dim"]],
        "video_ratio_pruned": video["ratio"],
        "repeats": args.repeats,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "results": results,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
