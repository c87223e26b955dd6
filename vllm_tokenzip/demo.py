"""The README's main job: serve a locally built Qwen2.5-Omni model with the plugin and send it
the real bigbuckbunny clip with its sound, through the official OpenAI SDK."""

from __future__ import annotations

import time

from vllm_tokenzip import media
from vllm_tokenzip.launch import start_server
from vllm_tokenzip.model_builder import build_model, cache_dir


def run_demo(size: str = "tiny", question: str = "What happens in this clip?") -> int:
    from openai import OpenAI

    started = time.monotonic()
    model = build_model("omni", size)
    clip = media.bigbuckbunny()
    print(f"model: {model}\nclip:  {clip}")
    log = cache_dir() / "logs" / "demo-server.log"
    print(f"starting vllm serve (log: {log}) ...", flush=True)
    with start_server(model, log_path=log) as server:
        print(f"server up in {time.monotonic() - started:.1f} s at {server.base_url}", flush=True)
        content = [
            {"type": "video_url", "video_url": {"url": clip.as_uri()}},
            {"type": "text", "text": question},
        ]
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="EMPTY")
        reply = client.chat.completions.create(
            model=str(model),
            messages=[{"role": "user", "content": content}],
            max_tokens=32,
            temperature=0.0,
            extra_body={
                "mm_processor_kwargs": {"use_audio_in_video": True},
                "skip_special_tokens": False,
            },
        )
    usage = reply.usage
    print(f"answer (random weights, so not meaningful): {reply.choices[0].message.content!r}")
    print(f"usage: prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}")
    return 0
