"""Prompt statistics of each chat request, known before its response starts.

The patch (vLLM 0.32-0.33): ``OnlineRenderer.render_chat(request, *, skip_mm_cache=False)``
returns ``(conversation, engine_inputs)`` or an ``ErrorResponse``; it is awaited by the chat
handler before the JSON or SSE response is created. :func:`install` wraps it (once, in the
processes that import the renderer: the API servers) so that after rendering it

1. counts each request's audio and video tokens, original and kept (:func:`request_stats`),
2. records them in the Prometheus collectors (:mod:`vllm_tokenzip.metrics`),
3. stores them in the dict that :data:`CURRENT` holds, if the middleware set one.

The middleware sets :data:`CURRENT` before calling the app; the handler (and any task it
spawns, which copies the context) sees the same mutable dict. The processor itself runs in a
thread pool without the context, which is why the counts travel as per-item fields.

Per-item fields read, for any adapter (the shared channel):

- ``tokenzip_video_stats`` / ``tokenzip_audio_stats``: a row ``[method id, audio original,
  audio kept, video original, video kept]`` (method id indexes ``methods.available()``,
  -1 when nothing was pruned);
- else, for video items, ``tokenzip_method_id`` + ``tokenzip_num_keep`` with
  ``video_grid_thw`` (original = T * H * W / merge_size**2), as the Qwen2.5-VL adapter ships;
- else (stock items) the placeholder length counts as both original and kept.

:func:`item_counts` is the helper any adapter's items can be read with.

vLLM's processor cache replaces items it already sent with ``None``; their counts are
remembered here by multimodal hash (which includes ``mm_processor_kwargs``).

A second wrapper, of ``AsyncLLM.generate`` (same versions; also only where the API server
imports it), copies the engine figures of a finished request (pruning time; KV eviction
figures), which the TokenZip schedulers (:mod:`vllm_tokenzip.scheduler`) return in
``RequestOutput.kv_transfer_params["tokenzip"]``, into the same dict as ``"engine"``: the
middleware then adds them to the end of the response (vLLM itself sends
``kv_transfer_params`` in non-streaming bodies only).
"""

from __future__ import annotations

import functools
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from types import ModuleType

from vllm_tokenzip import methods, metrics
from vllm_tokenzip.import_hooks import patch_module
from vllm_tokenzip.kv.request import FIGURES_KEY
from vllm_tokenzip.models.mm_pruning import METHOD_ID, NO_METHOD, NUM_KEEP

PATCHED_MODULE = "vllm.renderers.online_renderer"
ENGINE_MODULE = "vllm.v1.engine.async_llm"
PATCH_MARKER = "_tokenzip_stats"
STATS_FIELDS = {"video": "tokenzip_video_stats", "audio": "tokenzip_audio_stats"}
MEDIA = ("audio", "video")
CACHE_SIZE = 4096

CURRENT: ContextVar[dict[str, object] | None] = ContextVar("tokenzip_stats", default=None)


@dataclass(frozen=True)
class ItemCounts:
    """Audio and video tokens of one item (or a request), before and after pruning."""

    method: str | None = None
    audio_original: int = 0
    audio_kept: int = 0
    video_original: int = 0
    video_kept: int = 0

    def __add__(self, other: ItemCounts) -> ItemCounts:
        sums = [a + b for a, b in zip(self._counts(), other._counts(), strict=True)]
        return ItemCounts(other.method or self.method, *sums)

    def _counts(self) -> tuple[int, int, int, int]:
        return self.audio_original, self.audio_kept, self.video_original, self.video_kept

    @property
    def original(self) -> int:
        return self.audio_original + self.video_original

    @property
    def kept(self) -> int:
        return self.audio_kept + self.video_kept

    @property
    def ratio_achieved(self) -> float:
        """Fraction of the audio+video tokens pruned (0 without any)."""
        return 1.0 - self.kept / self.original if self.original else 0.0

    def as_usage(self) -> dict[str, object]:
        """The ``usage.tokenzip`` object of the response body."""
        return {
            "method": self.method or "none",
            "ratio_achieved": round(self.ratio_achieved, 6),
            "tokens_original": self.original,
            "tokens_kept": self.kept,
            **{k: v for k, v in asdict(self).items() if k != "method"},
        }


_by_hash: OrderedDict[str, ItemCounts] = OrderedDict()  # counts of items vLLM sent before


def _method_name(method_id: int) -> str | None:
    return None if method_id == NO_METHOD else methods.available()[method_id]


def item_counts(modality: str, item: Mapping[str, object], merge: int) -> ItemCounts | None:
    """Counts from one processed item's tokenzip fields (``{name: MultiModalFieldElem}``).

    merge: the vision spatial merge size. None when the item carries no tokenzip fields (a
    stock item, or one the processor cache left out); see the module doc for the fields.
    """
    stats_field = STATS_FIELDS.get(modality)
    if stats_field in item and item[stats_field].data is not None:
        row = [int(v) for v in item[stats_field].data.tolist()]
        return ItemCounts(_method_name(row[0]), *row[1:5])
    if modality == "video" and all(
        name in item and item[name].data is not None
        for name in (NUM_KEEP, METHOD_ID, "video_grid_thw")
    ):
        t, h, w = item["video_grid_thw"].data.tolist()
        kept = int(item[NUM_KEEP].data)
        method = _method_name(int(item[METHOD_ID].data))
        return ItemCounts(method, video_original=t * h * w // merge**2, video_kept=kept)
    return None


def stock_counts(modality: str, placeholder: int) -> ItemCounts:
    """Counts of an item without tokenzip fields: its whole placeholder, kept."""
    if modality == "audio":
        return ItemCounts(audio_original=placeholder, audio_kept=placeholder)
    return ItemCounts(video_original=placeholder, video_kept=placeholder)


def input_counts(engine_input: Mapping[str, object], merge: int) -> ItemCounts:
    """Summed counts of one engine input's audio and video items."""
    total = ItemCounts()
    items = engine_input.get("mm_kwargs") or {}
    hashes = engine_input.get("mm_hashes") or {}
    placeholders = engine_input.get("mm_placeholders") or {}
    for modality in MEDIA:
        for i, placeholder in enumerate(placeholders.get(modality, [])):
            item = items[modality][i] if modality in items else None
            key = hashes[modality][i] if modality in hashes else None
            counts = item_counts(modality, item, merge) if item is not None else None
            if counts is not None:
                _remember(key, counts)
            else:
                counts = _by_hash.get(key) or stock_counts(modality, placeholder.length)
            total += counts
    return total


def _remember(key: str | None, counts: ItemCounts) -> None:
    """Keep ``counts`` for later requests whose item vLLM's processor cache leaves out."""
    if key is None:
        return
    _by_hash[key] = counts
    _by_hash.move_to_end(key)
    while len(_by_hash) > CACHE_SIZE:
        _by_hash.popitem(last=False)


def request_stats(engine_inputs: Sequence[Mapping[str, object]], merge: int) -> ItemCounts:
    """Counts of a whole request (all of its engine inputs)."""
    total = ItemCounts()
    for engine_input in engine_inputs:
        total += input_counts(engine_input, merge)
    return total


def merge_size(hf_config: object) -> int:
    """The vision tower's spatial merge size (1 without a vision config)."""
    for config in (hf_config, getattr(hf_config, "thinker_config", None)):
        vision = getattr(config, "vision_config", None)
        if vision is not None:
            return int(getattr(vision, "spatial_merge_size", 1))
    return 1


def _wrap_render_chat(cls: type) -> None:
    """Wrap ``cls.render_chat`` to count, record and publish each request's stats."""
    original = cls.render_chat
    if getattr(original, PATCH_MARKER, False):
        return

    @functools.wraps(original)
    async def render_chat(self, request, *args, **kwargs):
        result = await original(self, request, *args, **kwargs)
        if isinstance(result, tuple):
            merge = merge_size(self.model_config.hf_config)
            stats = request_stats(result[1], merge)
            metrics.record(metrics.model_name(self.model_config), stats)
            sink = CURRENT.get()
            if sink is not None:
                sink["stats"] = stats
        return result

    setattr(render_chat, PATCH_MARKER, True)
    cls.render_chat = render_chat


def _patch(module: ModuleType) -> None:
    _wrap_render_chat(module.OnlineRenderer)


def _wrap_generate(cls: type) -> None:
    """Wrap ``cls.generate`` to publish a finished request's engine figures."""
    original = cls.generate
    if getattr(original, PATCH_MARKER, False):
        return

    @functools.wraps(original)
    async def generate(self, *args, **kwargs):
        async for output in original(self, *args, **kwargs):
            if output.finished:
                publish_engine_figures(output.kv_transfer_params)
            yield output

    setattr(generate, PATCH_MARKER, True)
    cls.generate = generate


def publish_engine_figures(kv_transfer_params: object) -> None:
    """Store ``kv_transfer_params["tokenzip"]`` in the middleware's dict, if both exist."""
    sink = CURRENT.get()
    figures = kv_transfer_params.get(FIGURES_KEY) if isinstance(kv_transfer_params, dict) else None
    if sink is not None and isinstance(figures, dict):
        sink["engine"] = dict(figures)


def _patch_engine(module: ModuleType) -> None:
    _wrap_generate(module.AsyncLLM)


def install() -> None:
    """Patch ``OnlineRenderer.render_chat`` where it is (or will be) imported. Idempotent.

    Only processes that import the renderer (the API servers) are patched; engine cores and
    workers never import it, so they pay nothing.
    """
    patch_module(PATCHED_MODULE, _patch)
    patch_module(ENGINE_MODULE, _patch_engine)


def is_installed() -> bool:
    """Whether the renderer in this process carries the wrapper."""
    module = sys.modules.get(PATCHED_MODULE)
    return module is not None and getattr(module.OnlineRenderer.render_chat, PATCH_MARKER, False)
