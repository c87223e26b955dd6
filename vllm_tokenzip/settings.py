"""Per-request compression settings: parsing, validation and server defaults.

A request carries its settings in ``mm_processor_kwargs["tokenzip"]`` (the serving layer writes
them there from ``X-TokenZip-*`` headers or the body), e.g.::

    {"tokenzip": {"method": "omnizip", "audio_ratio": 0.3, "video_ratio": 0.6}}
    {"tokenzip": {"method": "divprune", "ratio": 0.5}}

Ratios are fractions of tokens to PRUNE, ``0 <= r < 1``. ``ratio`` is the overall fraction of
the request's audio + video tokens; ``audio_ratio`` / ``video_ratio`` set one modality each and
win over ``ratio`` for that modality. Because ``mm_processor_kwargs`` is part of vLLM's
multimodal hash, requests with different settings never share cache entries.

Server defaults come from the JSON in ``$TOKENZIP_DEFAULTS`` (same keys); with nothing set,
nothing is pruned.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

KWARGS_KEY = "tokenzip"
DEFAULTS_ENV = "TOKENZIP_DEFAULTS"
FIELDS = ("method", "ratio", "audio_ratio", "video_ratio")


class SettingsError(ValueError):
    """A bad setting; the message names the field and the allowed values."""


@dataclass(frozen=True)
class PruneSettings:
    """Resolved settings of one request. ``method`` None means no pruning."""

    method: str | None = None
    ratio: float | None = None
    audio_ratio: float | None = None
    video_ratio: float | None = None

    @property
    def enabled(self) -> bool:
        return self.method is not None and any(
            r for r in (self.ratio, self.audio_ratio, self.video_ratio)
        )

    def modality_ratios(self) -> tuple[float, float]:
        """(audio_ratio, video_ratio): explicit per-modality values, else the overall ratio."""
        overall = self.ratio or 0.0
        audio = overall if self.audio_ratio is None else self.audio_ratio
        video = overall if self.video_ratio is None else self.video_ratio
        return audio, video


def parse_ratio(field: str, value: object) -> float:
    """``value`` as a float in [0, 1), else SettingsError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SettingsError(f"{field} must be a number with 0 <= {field} < 1, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(
            f"{field} must be a number with 0 <= {field} < 1, got {value!r}"
        ) from None
    if math.isnan(number) or not 0.0 <= number < 1.0:
        raise SettingsError(f"{field} must satisfy 0 <= {field} < 1, got {value!r}")
    return number


def parse_settings(raw: Mapping[str, object], available_methods: list[str]) -> PruneSettings:
    """Validate one ``tokenzip`` dict; unknown keys and bad values raise SettingsError."""
    if not isinstance(raw, Mapping):
        raise SettingsError(f"{KWARGS_KEY} must be an object with keys {FIELDS}, got {raw!r}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise SettingsError(f"unknown {KWARGS_KEY} field(s) {unknown}; allowed: {list(FIELDS)}")
    method = raw.get("method")
    if method is not None and method not in available_methods:
        raise SettingsError(f"method must be one of {available_methods}, got {method!r}")
    ratios = {k: parse_ratio(k, raw[k]) for k in FIELDS[1:] if raw.get(k) is not None}
    return PruneSettings(method=method, **ratios)  # type: ignore[arg-type]


def server_defaults(available_methods: list[str]) -> PruneSettings:
    """Settings from ``$TOKENZIP_DEFAULTS`` (JSON), or no pruning."""
    text = os.environ.get(DEFAULTS_ENV, "").strip()
    if not text:
        return PruneSettings()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise SettingsError(f"${DEFAULTS_ENV} is not valid JSON: {err}") from None
    return parse_settings(raw, available_methods)


def resolve(mm_kwargs: Mapping[str, object], available_methods: list[str]) -> PruneSettings:
    """The request's settings over the server defaults (request fields win one by one)."""
    defaults = server_defaults(available_methods)
    raw = mm_kwargs.get(KWARGS_KEY)
    if raw is None:
        return defaults
    request = parse_settings(raw, available_methods)  # type: ignore[arg-type]
    merged = {
        name: getattr(request, name) if getattr(request, name) is not None
        else getattr(defaults, name)
        for name in FIELDS
    }  # fmt: skip
    return PruneSettings(**merged)


OMNIZIP_AUDIO_SHARE = 0.5  # audio pruned at half the overall ratio (paper defaults 0.3 / 0.6)


def omnizip_split(
    ratio: float, num_audio: int, num_video: int, *, contextual_ratio: float = 0.05
) -> tuple[float, float]:
    """(audio_ratio, video_ratio) for OmniZip that keep exactly ``N - round(ratio * N)`` tokens.

    N = num_audio + num_video, the item's audio and video tokens (known in the processor).
    With video, audio is pruned at ``OMNIZIP_AUDIO_SHARE * ratio`` and the video ratio is
    chosen so that the video keeps the rest; when that rest would be under one video token,
    the video keeps one and the audio gives up the difference. Audio alone (or video alone)
    takes the whole budget. Exact unless the budget is below the fewest tokens OmniZip can
    keep (the audio's ``contextual_ratio`` anchors plus one video token; audio alone: its
    anchors, at least one); then that minimum is kept. The kept counts follow
    ``omnizip_kept_counts``.
    """
    from vllm_tokenzip.methods.omnizip import audio_split_counts

    parse_ratio("ratio", ratio)
    total = num_audio + num_video
    target = total - round(ratio * total)
    if not num_video:
        return _audio_ratio_keeping(target, num_audio, contextual_ratio), 0.0
    audio_ratio = ratio * OMNIZIP_AUDIO_SHARE if num_audio else 0.0
    kept_audio = sum(audio_split_counts(num_audio, audio_ratio, contextual_ratio, 1))
    if num_audio and target - kept_audio < 1:  # the video at its floor: audio gives up the rest
        audio_ratio = _audio_ratio_keeping(target - 1, num_audio, contextual_ratio)
        kept_audio = sum(audio_split_counts(num_audio, audio_ratio, contextual_ratio, 1))
    kept_video = min(max(target - kept_audio, 1), num_video)
    return audio_ratio, (num_video - kept_video) / num_video


def _audio_ratio_keeping(kept: int, num_audio: int, contextual_ratio: float) -> float:
    """The OmniZip audio ratio keeping ``kept`` of ``num_audio`` tokens (dominant + anchors),
    or the nearest count in [anchors, num_audio]."""
    if not num_audio:
        return 0.0
    anchors = min(round(contextual_ratio * num_audio), num_audio)
    dominant = min(max(kept - anchors, 0), num_audio)
    return 1 - max(dominant, 0.25) / num_audio  # a quarter token rounds to none; ratio < 1
