"""Expected prompt sizes, computed without vLLM: PyAV decodes the media and the checkpoint's own
Hugging Face processor counts the tokens.

vLLM samples a video's frames uniformly at 2 fps, at most 32 (its default for these models):
n = max(1, min(32, total_frames, floor(duration_s * 2))), indices linspace(0, total - 1, n).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import av
import numpy as np

MAX_FRAMES = 32
SAMPLING_FPS = 2


def sampled_frames(path: Path) -> np.ndarray:
    """[n, H, W, 3] uint8 frames, sampled as vLLM samples them."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        duration = float(stream.duration * stream.time_base)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    count = max(1, min(MAX_FRAMES, len(frames), math.floor(duration * SAMPLING_FPS)))
    picks = np.linspace(0, len(frames) - 1, count, dtype=int)
    return np.stack([frames[i] for i in picks])


def audio_16k_mono(path: Path) -> np.ndarray:
    """[samples] float32 waveform of the first audio stream, resampled to 16 kHz mono."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
    chunks = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32)


@lru_cache(maxsize=4)
def _processor(model_dir: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def expected_prompt_tokens(
    model_dir: Path,
    *,
    text: str,
    video: Path | None = None,
    audio: Path | None = None,
    use_audio_in_video: bool = False,
) -> int:
    """Prompt length the HF processor gives for one user turn: [video][audio] text."""
    processor = _processor(str(model_dir))
    content: list[dict] = []
    kwargs: dict = {}
    if video is not None:
        content.append({"type": "video"})
        kwargs.update(videos=[sampled_frames(video)], do_sample_frames=False)
    if audio is not None:
        content.append({"type": "audio"})
    content.append({"type": "text", "text": text})
    if audio is not None or use_audio_in_video:
        kwargs["audio"] = [audio_16k_mono(audio if audio is not None else video)]
    if use_audio_in_video:
        kwargs["use_audio_in_video"] = True
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return int(processor(text=[prompt], return_tensors="pt", **kwargs)["input_ids"].shape[1])
