"""The README's main job: serve a locally built Qwen2.5-Omni model with the plugin and send it
the real bigbuckbunny clip with its sound through the official OpenAI SDK, asking for OmniZip
compression with an ``X-TokenZip-Ratio`` header, and show what was achieved."""

from __future__ import annotations

import time

from tokenzip_server.launcher import MIDDLEWARE, on_cpu, scheduler_flags

from vllm_tokenzip import media
from vllm_tokenzip.launch import start_server
from vllm_tokenzip.model_builder import build_model, cache_dir

ACHIEVED_HEADERS = (
    "X-TokenZip-Method",
    "X-TokenZip-Tokens-Original",
    "X-TokenZip-Tokens-Kept",
    "X-TokenZip-Ratio-Achieved",
    "X-TokenZip-Pruning-Ms",
)


def run_demo(size: str = "tiny", question: str = "What happens in this clip?",
             method: str = "omnizip", ratio: float = 0.55) -> int:  # fmt: skip
    from openai import OpenAI

    started = time.monotonic()
    model = build_model("omni", size)
    clip = media.bigbuckbunny()
    print(f"model: {model}\nclip:  {clip}")
    log = cache_dir() / "logs" / "demo-server.log"
    print(f"starting vllm serve with the TokenZip middleware (log: {log}) ...", flush=True)
    serving = ["--middleware", MIDDLEWARE, *scheduler_flags([], on_cpu())]
    with start_server(model, serving, log_path=log) as server:
        print(f"server up in {time.monotonic() - started:.1f} s at {server.base_url}", flush=True)
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="EMPTY")
        content = [
            {"type": "video_url", "video_url": {"url": clip.as_uri()}},
            {"type": "text", "text": question},
        ]
        raw = client.chat.completions.with_raw_response.create(
            model=str(model),
            messages=[{"role": "user", "content": content}],
            max_tokens=32,
            temperature=0.0,
            extra_headers={"X-TokenZip-Method": method, "X-TokenZip-Ratio": str(ratio)},
            extra_body={
                "mm_processor_kwargs": {"use_audio_in_video": True},
                "skip_special_tokens": False,
            },
        )
    reply = raw.parse()
    usage = reply.usage
    print(f"answer (random weights, so not meaningful): {reply.choices[0].message.content!r}")
    print(f"usage: prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}")
    print(f"asked: {method} pruning {ratio:.0%} of the audio+video tokens")
    for name in ACHIEVED_HEADERS:
        print(f"{name}: {raw.headers.get(name)}")
    return 0
