"""Test media: the real clip with picture and 48 kHz sound, and synthetic speech clips."""

from __future__ import annotations

import itertools

import av
import numpy as np

from tests.media_expect import audio_16k_mono
from vllm_tokenzip import media


def streams(path):
    with av.open(str(path)) as container:
        return [(s.type, getattr(s, "rate", None), getattr(s, "channels", None))
                for s in container.streams]  # fmt: skip


def rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))


def test_bigbuckbunny_has_picture_and_48k_surround_sound(clips):
    kinds = streams(clips["bigbuckbunny"])
    assert ("audio", 48000, 6) in kinds
    assert any(kind == "video" for kind, _, _ in kinds)


def test_synthetic_clip_rates_and_channels(clips):
    assert ("audio", 16000, 1) in streams(clips["moving_16k"])
    assert ("audio", 48000, 6) in streams(clips["static_48k_51"])


def test_speech_in_one_segment_silence_elsewhere(clips):
    wave = audio_16k_mono(clips["speech_16k"])
    assert abs(len(wave) - 6 * 16000) < 1600
    assert rms(wave[: int(0.9 * 16000)]) < 1e-3  # silence before speech starts at 1 s
    assert rms(wave[int(1.2 * 16000) : int(3.0 * 16000)]) > 1e-2


def test_static_and_moving_scenes_differ_in_motion(clips):
    def frame_change(path):
        with av.open(str(path)) as container:
            decoded = itertools.islice(container.decode(video=0), 10)
            frames = [f.to_ndarray(format="gray").astype(np.float32) for f in decoded]
        return float(np.mean([np.abs(a - b).mean() for a, b in itertools.pairwise(frames)]))

    assert frame_change(clips["static_48k_51"]) < 0.5 < frame_change(clips["moving_16k"])


def test_media_is_cached(clips):
    assert media.bigbuckbunny() == clips["bigbuckbunny"]
    mtime = clips["moving_16k"].stat().st_mtime_ns
    assert media.synthetic_clip(moving=True, sample_rate=16000).stat().st_mtime_ns == mtime
