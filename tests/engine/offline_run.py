"""Offline ``vllm.LLM`` run used by test_offline.py (a script: vLLM spawns workers, so it runs
in its own interpreter). Prints one JSON line: per request, prompt length, tokens, log-probs.

    python -m tests.engine.offline_run MODEL VIDEO MAX_BATCHED_TOKENS SETTINGS_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from vllm import LLM, SamplingParams

    model, video, max_batched, settings = sys.argv[1:5]
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=8192,
        max_num_batched_tokens=int(max_batched),
        max_num_seqs=4,  # one request at a time; lets max_num_batched_tokens go below 256
        limit_mm_per_prompt={"video": 1},
        allowed_local_media_path=str(Path(video).parent),
    )
    content = [{"type": "video_url", "video_url": {"url": Path(video).as_uri()}},
               {"type": "text", "text": "What happens here?"}]  # fmt: skip
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=0)
    results = []
    for tokenzip in json.loads(settings):
        kwargs = {"tokenzip": tokenzip} if tokenzip else None
        (out,) = llm.chat([{"role": "user", "content": content}], params, use_tqdm=False,
                          mm_processor_kwargs=kwargs)  # fmt: skip
        completion = out.outputs[0]
        results.append({
            "prompt_tokens": len(out.prompt_token_ids),
            "token_ids": list(completion.token_ids),
            "logprobs": [next(iter(step.values())).logprob for step in completion.logprobs],
        })  # fmt: skip
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
