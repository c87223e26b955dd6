"""Pure ASGI middleware: ``X-TokenZip-*`` request options in, prompt statistics out.

Enabled with ``vllm serve ... --middleware tokenzip_server.middleware.TokenZipMiddleware``
(``tokenzip serve`` adds it). For ``POST /v1/chat/completions`` it

1. reads the JSON body and the ``X-TokenZip-*`` headers, validates them
   (:func:`tokenzip_server.options.parse_options`, including the served model's adapter check)
   and answers HTTP 400 with an OpenAI error object on any bad value, before vLLM sees it;
2. rewrites the body: the settings into ``mm_processor_kwargs["tokenzip"]``, the KV budget into
   ``vllm_xargs["tokenzip_kv_budget"]``;
3. sets :data:`vllm_tokenzip.stats.CURRENT` to a fresh dict that the render wrapper fills
   before the response starts, and adds to the response, streaming or not, the headers
   ``X-TokenZip-Ratio-Achieved``, ``-Tokens-Original``, ``-Tokens-Kept`` (audio+video),
   ``-Method`` and ``Access-Control-Expose-Headers`` listing them; the same figures go into
   the body as ``usage.tokenzip`` (for SSE: every chunk that carries a usage object, i.e. the
   last one with ``stream_options.include_usage``);
4. adds the engine figures of the finished request, which the TokenZip schedulers return
   (:mod:`vllm_tokenzip.scheduler`: ``pruning_ms``; with KV eviction ``kv_budget``,
   ``kv_policy``, ``kv_evicted``, ``kv_peak_blocks``), to ``usage.tokenzip``, and on
   non-streaming responses as ``X-TokenZip-Pruning-Ms``, ``-KV-Evicted``, ``-KV-Peak-Blocks``
   headers (a streamed response's headers leave before they are known); they are taken out of
   ``kv_transfer_params``, where vLLM would also return them;
5. times each request answered 200 from its arrival here to its first body chunk and to the
   end of its response: ``tokenzip_time_to_first_token_seconds`` and
   ``tokenzip_e2e_request_latency_seconds`` (labels model_name, method; method ``none`` when
   nothing was pruned, :func:`vllm_tokenzip.metrics.observe_latency`).
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Mapping

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenzip_server.options import OptionsError, Validator, apply, parse_options

from vllm_tokenzip import metrics
from vllm_tokenzip.kv.request import FIGURES_KEY
from vllm_tokenzip.stats import CURRENT, ItemCounts

COMPACT = (",", ":")  # vLLM's own JSON separators
CHAT_PATHS = frozenset({"/v1/chat/completions"})
RESPONSE_HEADERS = (
    "X-TokenZip-Ratio-Achieved",
    "X-TokenZip-Tokens-Original",
    "X-TokenZip-Tokens-Kept",
    "X-TokenZip-Method",
)
# Engine figures (vllm_tokenzip.scheduler: pruning time, KV eviction) are known when the
# request finishes: headers on non-streaming responses only; usage.tokenzip (JSON body, last
# SSE chunk with usage) carries them too.
ENGINE_HEADERS = {
    "pruning_ms": "X-TokenZip-Pruning-Ms",
    "kv_evicted": "X-TokenZip-KV-Evicted",
    "kv_peak_blocks": "X-TokenZip-KV-Peak-Blocks",
}
# vLLM architecture -> "module:function" that raises SettingsError for settings its adapter
# cannot run (called with the request's mm_processor_kwargs).
ADAPTER_CHECKS = {
    "Qwen2_5_VLForConditionalGeneration": "vllm_tokenzip.models.mm_pruning:video_settings",
    "Qwen2_5OmniModel": "vllm_tokenzip.models.qwen2_5_omni:request_settings",
    "Qwen2_5OmniForConditionalGeneration": "vllm_tokenzip.models.qwen2_5_omni:request_settings",
}


def adapter_check(architectures: list[str]) -> Validator | None:
    """The settings check of the served model's adapter, None for other models."""
    for architecture in architectures:
        if architecture in ADAPTER_CHECKS:
            module, _, name = ADAPTER_CHECKS[architecture].partition(":")
            return getattr(importlib.import_module(module), name)
    return None


def vllm_config(scope: Scope) -> object | None:
    """The served model's config (vLLM keeps it in app.state), None outside vLLM."""
    return getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)


def served_check(scope: Scope) -> Validator | None:
    """The adapter check of the model the app serves."""
    config = vllm_config(scope)
    return adapter_check(config.model_config.architectures or []) if config else None


def served_name(scope: Scope, body: object) -> str:
    """The served model name (vLLM's label); outside vLLM, the request's ``model`` field."""
    config = vllm_config(scope)
    if config is not None:
        return metrics.model_name(config.model_config)
    model = body.get("model") if isinstance(body, dict) else None
    return str(model) if model else metrics.UNKNOWN_MODEL


def stats_headers(stats: ItemCounts) -> dict[str, str]:
    """Response header values of one request's statistics."""
    return dict(
        zip(
            RESPONSE_HEADERS,
            (f"{stats.ratio_achieved:.6f}", str(stats.original), str(stats.kept),
             stats.method or "none"),
            strict=True,
        )
    )  # fmt: skip


def error_body(err: OptionsError) -> bytes:
    """An OpenAI-shaped error object for a refused option."""
    error = {"message": str(err), "type": "BadRequestError", "param": err.param, "code": 400}
    return json.dumps({"error": error}).encode()


async def read_body(receive: Receive) -> bytes:
    """The whole request body."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive callable that yields ``body`` once, then defers to ``receive`` (disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def with_body_length(scope: Scope, length: int) -> Scope:
    """``scope`` with its content-length header set to ``length``."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


def add_usage(event: dict, stats: ItemCounts, engine: Mapping[str, object]) -> dict:
    """``event`` with ``usage.tokenzip`` (prompt statistics and the engine figures ``engine``)
    added when it carries a usage object."""
    if isinstance(event.get("usage"), dict):
        event["usage"]["tokenzip"] = {**stats.as_usage(), **engine}
    return event


def without_engine_figures(payload: dict) -> dict:
    """``payload`` without the scheduler's ``kv_transfer_params["tokenzip"]`` (its figures are
    in ``usage.tokenzip``); ``kv_transfer_params`` becomes null when nothing else is left."""
    params = payload.get("kv_transfer_params")
    if isinstance(params, dict) and FIGURES_KEY in params:
        rest = {k: v for k, v in params.items() if k != FIGURES_KEY}
        payload["kv_transfer_params"] = rest or None
    return payload


def rewrite_sse(chunk: bytes, stats: ItemCounts, engine: Mapping[str, object]) -> bytes:
    """An SSE body chunk with ``usage.tokenzip`` added to each data event carrying usage."""
    if b'"usage":{' not in chunk.replace(b" ", b""):
        return chunk
    lines = []
    for line in chunk.decode().split("\n"):
        if line.startswith("data: ") and line[6:].strip().startswith("{"):
            event = add_usage(json.loads(line[6:]), stats, engine)
            line = "data: " + json.dumps(event, separators=COMPACT)
        lines.append(line)
    return "\n".join(lines).encode()


class _LatencyClock:
    """The ``send`` of one request: observes its latencies once its response is complete."""

    def __init__(self, send: Send, sink: Mapping[str, object], model: str, started: float):
        self.send = send
        self.sink = sink
        self.model = model
        self.started = started
        self.first: float | None = None  # when the first body chunk went out
        self.status: int | None = None

    async def __call__(self, message: Message) -> None:
        await self.send(message)
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self._body_sent(message)

    def _body_sent(self, message: Message) -> None:
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        if self.status == 200 and not message.get("more_body", False):
            stats: ItemCounts | None = self.sink.get("stats")  # type: ignore[assignment]
            method = stats.method if stats is not None else None
            metrics.observe_latency(
                self.model, method, self.first - self.started, now - self.started
            )


class _ResponseEditor:
    """The ``send`` of one request: adds the headers and the usage extension."""

    def __init__(self, send: Send, sink: Mapping[str, object]) -> None:
        self.send = send
        self.sink = sink
        self.held: Message | None = None  # the start of a JSON response, sent with its body
        self.chunks: list[bytes] = []
        self.sse = False

    @property
    def stats(self) -> ItemCounts | None:
        return self.sink.get("stats")  # type: ignore[return-value]

    @property
    def engine(self) -> Mapping[str, object]:
        """Engine figures of the finished request (see ``vllm_tokenzip.stats``), or {}."""
        return self.sink.get("engine") or {}  # type: ignore[return-value]

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            await self._start(message)
        elif message["type"] == "http.response.body" and self.held is not None:
            await self._json_body(message)
        elif message["type"] == "http.response.body" and self.sse and self.stats:
            body = rewrite_sse(message.get("body", b""), self.stats, self.engine)
            await self.send({**message, "body": body})
        else:
            await self.send(message)

    async def _start(self, message: Message) -> None:
        headers = MutableHeaders(raw=message["headers"])
        exposed = [h for h in headers.get("access-control-expose-headers", "").split(",") if h]
        headers["Access-Control-Expose-Headers"] = ", ".join(
            [*exposed, *RESPONSE_HEADERS, *ENGINE_HEADERS.values()]
        )
        if self.stats is None:
            await self.send(message)
            return
        for name, value in stats_headers(self.stats).items():
            headers[name] = value
        content_type = headers.get("content-type", "")
        self.sse = content_type.startswith("text/event-stream")
        if content_type.startswith("application/json") and message["status"] == 200:
            self.held = message
        else:
            await self.send(message)

    async def _json_body(self, message: Message) -> None:
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        payload = add_usage(json.loads(b"".join(self.chunks)), self.stats, self.engine)
        payload = without_engine_figures(payload)
        body = json.dumps(payload, separators=COMPACT).encode()
        headers = MutableHeaders(raw=self.held["headers"])
        headers["content-length"] = str(len(body))
        for field, value in self.engine.items():
            if field in ENGINE_HEADERS:
                headers[ENGINE_HEADERS[field]] = str(value)
        await self.send(self.held)
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


class TokenZipMiddleware:
    """Validates ``X-TokenZip-*`` options of chat requests and reports prompt statistics."""

    def __init__(self, app: ASGIApp, validator: Validator | None = None) -> None:
        self.app = app
        self.validator = validator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in CHAT_PATHS:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        raw = await read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict):
            try:
                options = parse_options(self._headers(scope), body, self._validator(scope))
            except OptionsError as err:
                await self._refuse(send, err)
                return
            if not options.empty:
                raw = json.dumps(apply(body, options), separators=COMPACT).encode()
                scope = with_body_length(scope, len(raw))
        sink: dict[str, object] = {}
        clock = _LatencyClock(send, sink, served_name(scope, body), started)
        token = CURRENT.set(sink)
        try:
            await self.app(scope, replay(raw, receive), _ResponseEditor(clock, sink))
        finally:
            CURRENT.reset(token)

    def _validator(self, scope: Scope) -> Validator | None:
        return self.validator if self.validator is not None else served_check(scope)

    @staticmethod
    def _headers(scope: Scope) -> dict[str, str]:
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

    @staticmethod
    async def _refuse(send: Send, err: OptionsError) -> None:
        body = error_body(err)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
