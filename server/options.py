"""Per-request TokenZip options from ``X-TokenZip-*`` headers and the JSON body.

Sources (each optional; a field may appear in several):

- headers ``X-TokenZip-Method``, ``X-TokenZip-Ratio``, ``X-TokenZip-Audio-Ratio``,
  ``X-TokenZip-Video-Ratio``, ``X-TokenZip-KV-Budget``;
- body ``"tokenzip": {"method", "ratio", "audio_ratio", "video_ratio", "kv_budget"}``
  (OpenAI SDK: ``extra_body={"tokenzip": {...}}``);
- body ``mm_processor_kwargs.tokenzip`` (the plugin's native field, same keys minus
  ``kv_budget``) and ``vllm_xargs.tokenzip_kv_budget``.

Precedence: there is none to learn. Fields are merged one by one; a field given by several
sources must have the same value in all of them (compared after parsing, so ``0.5`` and
``"0.50"`` agree), else the request is refused with HTTP 400 naming both sources. Fields the
request leaves out fall back to the server defaults (``$TOKENZIP_DEFAULTS``, set by
``tokenzip serve --method/--ratio``), then to "no pruning".

Ratio mapping (done per item by the model adapter, which knows the item's token counts):
``audio_ratio`` / ``video_ratio`` set one modality each and win over ``ratio`` for that
modality. ``ratio`` alone means: for OmniZip, the whole audio+video region of an item keeps
``N - round(ratio * N)`` tokens (audio pruned at half the ratio, video takes the rest); for
video-only methods, the video is pruned at ``ratio`` and audio is kept whole, so the achieved
ratio of a request with audio is below the requested one (the response reports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vllm_tokenzip import methods
from vllm_tokenzip.settings import FIELDS, KWARGS_KEY, SettingsError, parse_ratio, resolve

KV_BUDGET = "kv_budget"
XARGS_KV_BUDGET = "tokenzip_kv_budget"
BODY_FIELDS = (*FIELDS, KV_BUDGET)
HEADER_NAMES = {
    "method": "X-TokenZip-Method",
    "ratio": "X-TokenZip-Ratio",
    "audio_ratio": "X-TokenZip-Audio-Ratio",
    "video_ratio": "X-TokenZip-Video-Ratio",
    KV_BUDGET: "X-TokenZip-KV-Budget",
}


class OptionsError(ValueError):
    """A refused option; ``param`` names where it came from (header or body path)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Options:
    """Validated options: ``tokenzip`` goes to ``mm_processor_kwargs``, the budget to xargs."""

    tokenzip: dict[str, object]
    kv_budget: int | None = None

    @property
    def empty(self) -> bool:
        return not self.tokenzip and self.kv_budget is None


def parse_kv_budget(value: object) -> int:
    """``value`` as a positive integer (tokens of KV cache), else SettingsError."""
    message = f"kv_budget must be a positive integer (KV entries), got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SettingsError(message)
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(message) from None
    if not math.isfinite(number) or number != int(number) or number < 1:
        raise SettingsError(message)
    return int(number)


def parse_method(value: object) -> str:
    """``value`` as a registered method name, else SettingsError listing them."""
    names = methods.available()
    if not isinstance(value, str) or value.strip() not in names:
        raise SettingsError(f"method must be one of {names}, got {value!r}")
    return value.strip()


def parse_field(field: str, value: object) -> object:
    """One field's value, parsed and validated."""
    if field == "method":
        return parse_method(value)
    if field == KV_BUDGET:
        return parse_kv_budget(value)
    return parse_ratio(field, value)


def _object(value: object, where: str, allowed: tuple[str, ...]) -> Mapping[str, object]:
    """``value`` as a dict with only ``allowed`` keys, else OptionsError at ``where``."""
    if not isinstance(value, Mapping):
        raise OptionsError(f"{where} must be an object with keys {list(allowed)}", where)
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise OptionsError(f"unknown {where} field(s) {unknown}; allowed: {list(allowed)}", where)
    return value


def collect(headers: Mapping[str, str], body: Mapping[str, object]) -> dict[str, list]:
    """{field: [(source, raw value), ...]} from every source, in header-then-body order."""
    found: dict[str, list[tuple[str, object]]] = {field: [] for field in BODY_FIELDS}
    for field, name in HEADER_NAMES.items():
        if name.lower() in headers:
            found[field].append((f"header {name}", headers[name.lower()]))
    if KWARGS_KEY in body:
        for field, value in _object(body[KWARGS_KEY], KWARGS_KEY, BODY_FIELDS).items():
            found[field].append((f"body {KWARGS_KEY}.{field}", value))
    mm_kwargs = body.get("mm_processor_kwargs") or {}
    if isinstance(mm_kwargs, Mapping) and mm_kwargs.get(KWARGS_KEY) is not None:
        where = f"mm_processor_kwargs.{KWARGS_KEY}"
        for field, value in _object(mm_kwargs[KWARGS_KEY], where, FIELDS).items():
            found[field].append((f"body {where}.{field}", value))
    xargs = body.get("vllm_xargs") or {}
    if isinstance(xargs, Mapping) and XARGS_KV_BUDGET in xargs:
        found[KV_BUDGET].append((f"body vllm_xargs.{XARGS_KV_BUDGET}", xargs[XARGS_KV_BUDGET]))
    return found


def merge(found: Mapping[str, list[tuple[str, object]]]) -> dict[str, object]:
    """One parsed value per field; OptionsError on a bad value or on disagreeing sources."""
    merged: dict[str, object] = {}
    for field, given in found.items():
        parsed = []
        for source, raw in given:
            if raw is None:
                continue
            try:
                parsed.append((source, parse_field(field, raw)))
            except SettingsError as err:
                raise OptionsError(f"{source}: {err}", _param(source)) from None
        if len({value for _, value in parsed}) > 1:
            listing = ", ".join(f"{source}={value!r}" for source, value in parsed)
            raise OptionsError(
                f"conflicting values for {field}: {listing}; give it once or the same everywhere",
                _param(parsed[0][0]),
            )
        if parsed:
            merged[field] = parsed[0][1]
    return merged


def _param(source: str) -> str:
    """The OpenAI error ``param`` of a source label ('header X-..', 'body a.b')."""
    return source.split(" ", 1)[1]


Validator = Callable[[Mapping[str, object]], object]


def parse_options(
    headers: Mapping[str, str], body: Mapping[str, object], validator: Validator | None = None
) -> Options:
    """Validated options of one request (OptionsError names the field and allowed values).

    headers: lower-cased names; body: the parsed JSON request; validator: the served model's
    adapter check of ``mm_processor_kwargs`` (raises SettingsError for methods it cannot run).
    """
    merged = merge(collect(headers, body))
    kv_budget = merged.pop(KV_BUDGET, None)
    mm_kwargs = {KWARGS_KEY: merged}
    try:
        settings = resolve(mm_kwargs, methods.available())
        if validator is not None:
            validator(mm_kwargs)
    except SettingsError as err:
        raise OptionsError(str(err), _field_param(str(err), "method")) from None
    if settings.method is None and any(settings.modality_ratios()):
        raise OptionsError(
            f"a ratio needs a method (no server default is set); method must be one of "
            f"{methods.available()}",
            "method",
        )
    return Options(tokenzip=merged, kv_budget=kv_budget)  # type: ignore[arg-type]


def _field_param(message: str, default: str) -> str:
    """The first settings field a message names, else ``default``."""
    return next((field for field in BODY_FIELDS if message.startswith(field)), default)


def apply(body: dict[str, object], options: Options) -> dict[str, object]:
    """``body`` with the options written where vLLM and the plugin read them.

    Drops the top-level ``tokenzip`` field (vLLM would log it as ignored).
    """
    out = {k: v for k, v in body.items() if k != KWARGS_KEY}
    if options.tokenzip:
        out["mm_processor_kwargs"] = {**(body.get("mm_processor_kwargs") or {}),
                                      KWARGS_KEY: options.tokenzip}  # fmt: skip
    if options.kv_budget is not None:
        out["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), XARGS_KV_BUDGET: options.kv_budget}
    return out
