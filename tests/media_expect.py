"""Expected prompt sizes, computed without vLLM: PyAV decodes the media and the checkpoint's own
Hugging Face processor counts the tokens.

vLLM loads Qwen2-VL / Qwen2.5-VL videos with its ``qwen2_vl`` loader (a port of transformers'
``Qwen2VLVideoProcessor.sample_frames`` in fps mode), re-implemented here. With ``total`` the
container's frame count and ``fps`` its frame rate:
n = total / fps * 2, clamped to [4, min(768, total) rounded down to even] and to ``total``,
then rounded down to even (the temporal patch size); indices are
int(torch.arange(0, total, total / n)) in float32, the last clamped to total - 1.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
import torch

MIN_FRAMES, MAX_FRAMES = 4, 768
SAMPLING_FPS = 2
TEMPORAL_PATCH = 2


def frame_indices(total: int, fps: float) -> list[int]:
    """Indices of the frames vLLM's ``qwen2_vl`` loader keeps from ``total`` frames at ``fps``."""
    cap = math.floor(min(MAX_FRAMES, total) / TEMPORAL_PATCH) * TEMPORAL_PATCH
    count = min(max(total / fps * SAMPLING_FPS, MIN_FRAMES), cap, total)
    count = math.floor(count / TEMPORAL_PATCH) * TEMPORAL_PATCH
    picks = torch.arange(0, total, total / count).int().clamp(max=total - 1)
    return picks.tolist()


def sampled_frames(path: Path) -> np.ndarray:
    """[n, H, W, 3] uint8 frames, sampled as vLLM samples them."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total, fps = stream.frames, float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[i] for i in frame_indices(total or len(frames), fps)])


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
