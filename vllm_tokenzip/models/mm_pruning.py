"""Engine glue for per-request pruning on vLLM's multimodal-pruning path (vLLM 0.32-0.33).

vLLM's path (see shared/design/VLLM_NOTES.md section 2): the processor emits the pruned number
of placeholders, ``embed_multimodal`` returns the survivors with their M-RoPE positions
appended as extra channels, and the model runner calls ``model.recompute_mrope_positions`` to
strip the channels and rewrite the request's positions. The runners enable that last step only
when the server-level ``--video-pruning-rate`` is set, and ``CPUModelRunner.load_model`` (which
overrides the GPU runner's) never enables it. The CPU runner inherits the GPU runner's
``_gather_mm_embeddings`` and its recompute branch, so setting the flag is the whole fix.

This module holds what the model adapters share:

- :func:`install_runner_patch`: makes every runner enable the path for models that set
  ``ALWAYS_PRUNES_ATTR`` (our adapters), whatever the server flags. Called when an adapter
  module is imported (the worker imports it before ``load_model``) and safe to call from the
  plugin's ``register()``; idempotent; patches each runner module when it is imported (no
  import cost in processes that never load a runner). The worker logs ``PATCH_LOG_MARKER`` (with the
  runner's name) each time it enables the path: that line is how tests check it.
- per-request pruning time (V1 runners): :func:`record_pruning` marks each pruned item's
  output with its seconds (attribute :data:`PRUNING_ATTR`); the runner patch collects them by
  encoder cache key when the runner caches the output and sends them with the step's
  ``ModelRunnerOutput`` (same attribute), for :mod:`vllm_tokenzip.scheduler`.
- :func:`video_settings`: the request's settings, refusing methods the adapters cannot feed.
- per-item fields the processors ship to the model (:data:`FIELD_NAMES`, :func:`video_fields`,
  :func:`field_configs`) and :func:`strip_settings` for the HF processor call.
- :func:`keep_indices`: the survivors of one video for the requested method, checked against
  the count the processor promised; :func:`needs_encoder_attention` says when a batch needs
  the vision tower's attention (:mod:`.vit_attention`).
- :func:`media_positions`, :func:`encode_positions`, :func:`decode_positions`: the M-RoPE
  position channels appended to the survivors, as base-128 digits so that they stay exact in
  bfloat16 embeddings (which hold integers exactly only up to 256).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from types import ModuleType

import numpy as np
import torch

from vllm_tokenzip import methods, metrics
from vllm_tokenzip.import_hooks import patch_module
from vllm_tokenzip.methods.base import Need, VideoInputs
from vllm_tokenzip.settings import KWARGS_KEY, PruneSettings, SettingsError, resolve

logger = logging.getLogger("vllm.tokenzip")

ALWAYS_PRUNES_ATTR = "tokenzip_always_prunes"
PATCH_LOG_MARKER = "tokenzip: multimodal-pruning runner path enabled"
NO_METHOD = -1  # method id of items without tokenzip settings (stock behaviour)
METHOD_ID, RATIO, NUM_KEEP = "tokenzip_method_id", "tokenzip_ratio", "tokenzip_num_keep"
FIELD_NAMES = (METHOD_ID, RATIO, NUM_KEEP)
DIGIT_BASE = 128  # position channels: 3 base-128 digits per value, exact in bf16
DIGITS = 3
POSITION_CHANNELS = 4 * DIGITS  # 4 values per token, DIGITS channels each
# On a pruned item's output tensor: its pruning seconds; on a step's ModelRunnerOutput:
# {encoder cache key: seconds} of the items pruned in the step.
PRUNING_ATTR = "tokenzip_pruning_seconds"
PENDING_ATTR = "_tokenzip_pruned_items"  # runner: the same dict, until the step's output
# What the video adapters feed a method: embeddings and the vision tower's attention
# (models.vit_attention, computed only for videos whose method needs it).
VIDEO_NEEDS = frozenset({Need.EMBEDDINGS, Need.ENCODER_ATTENTION})


class PruneCountMismatch(RuntimeError):
    """The model produced a different number of embeddings than the processor promised."""


# ---------------------------------------------------------------- runner patch (worker side)


def _enable_if_adapter(runner: object) -> None:
    """Turn on the runner's recompute path when its model is one of our adapters."""
    if getattr(runner.get_model(), ALWAYS_PRUNES_ATTR, False):
        runner.is_multimodal_pruning_enabled = True
        metrics.set_worker_model(runner.model_config)
        logger.info("%s on %s", PATCH_LOG_MARKER, type(runner).__name__)
        _warn_without_engine_figures(runner.vllm_config.scheduler_config)


def _warn_without_engine_figures(scheduler_config: object) -> None:
    """Log that responses carry no pruning time unless a TokenZip scheduler runs."""
    from vllm_tokenzip.scheduler import ASYNC_SCHEDULER, SYNC_SCHEDULER, EngineFigures

    if not issubclass(scheduler_config.get_scheduler_cls(), EngineFigures):
        wanted = ASYNC_SCHEDULER if scheduler_config.async_scheduling else SYNC_SCHEDULER
        logger.warning(
            "tokenzip: responses will not report pruning time; serve with --scheduler-cls %s",
            wanted,
        )


def _wrap_method(cls: type, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``cls.<name>`` (defined on ``cls``) by ``wrap(original)``, once per class."""
    original = cls.__dict__[name]
    if getattr(original, "_tokenzip_patched", False):
        return
    wrapped = functools.wraps(original)(wrap(original))
    wrapped._tokenzip_patched = True
    setattr(cls, name, wrapped)


def _wrap_load_model(cls: type) -> None:
    """Make ``cls.load_model`` call :func:`_enable_if_adapter` after the original."""

    def wrap(original: Callable) -> Callable:
        def load_model(self, *args, **kwargs):
            original(self, *args, **kwargs)
            _enable_if_adapter(self)

        return load_model

    _wrap_method(cls, "load_model", wrap)


def _wrap_cache_encoder_output(cls: type) -> None:
    """Make ``cls._cache_encoder_output`` note the pruning seconds of each output it caches."""

    def wrap(original: Callable) -> Callable:
        def _cache_encoder_output(self, mm_hash, output, *args, **kwargs):
            seconds = getattr(output, PRUNING_ATTR, None)
            if seconds is not None:
                self.__dict__.setdefault(PENDING_ATTR, {})[mm_hash] = seconds
            return original(self, mm_hash, output, *args, **kwargs)

        return _cache_encoder_output

    _wrap_method(cls, "_cache_encoder_output", wrap)


def _wrap_sample_tokens(cls: type) -> None:
    """Make ``cls.sample_tokens`` attach the pending pruning seconds to its ModelRunnerOutput."""

    def wrap(original: Callable) -> Callable:
        def sample_tokens(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            pending = self.__dict__.get(PENDING_ATTR)
            if pending and attach_pruning_seconds(result, pending):
                self.__dict__[PENDING_ATTR] = {}
            return result

        return sample_tokens

    _wrap_method(cls, "sample_tokens", wrap)


def attach_pruning_seconds(result: object, item_seconds: dict[str, float]) -> bool:
    """Attach ``item_seconds`` to a runner's step result; False if it is not an output.

    result: a ``ModelRunnerOutput``, an ``AsyncModelRunnerOutput`` (whose ``get_output`` is
    wrapped, on this instance) or ``IntermediateTensors`` (not a final output: False).
    """
    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

    if isinstance(result, ModelRunnerOutput):
        setattr(result, PRUNING_ATTR, item_seconds)
        return True
    if isinstance(result, AsyncModelRunnerOutput):
        get_output = result.get_output

        def get_output_with_seconds():
            output = get_output()
            setattr(output, PRUNING_ATTR, item_seconds)
            return output

        result.get_output = get_output_with_seconds
        return True
    return False


def _patch_v1_gpu(module: ModuleType) -> None:
    """V1 GPU runner (the CPU runner inherits all three methods)."""
    _wrap_load_model(module.GPUModelRunner)
    _wrap_cache_encoder_output(module.GPUModelRunner)
    _wrap_sample_tokens(module.GPUModelRunner)


def _patch_v1_cpu(module: ModuleType) -> None:
    _wrap_load_model(module.CPUModelRunner)


def _patch_v2(module: ModuleType) -> None:
    """Model Runner V2: create the ``MultiModalPruner`` for our adapters too."""
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    original = module.maybe_create_mm_pruner
    if getattr(original, "_tokenzip_patched", False):
        return

    def maybe_create_mm_pruner(model_config, model, rope_state, encoder_cache):
        pruner = original(model_config, model, rope_state, encoder_cache)
        if (
            pruner is None
            and rope_state is not None
            and encoder_cache is not None
            and getattr(model, ALWAYS_PRUNES_ATTR, False)
        ):
            pruner = MultiModalPruner(
                model, rope_state, encoder_cache, model_config.get_inputs_embeds_size()
            )
            logger.info("%s on ModelRunnerV2 (no per-request pruning time)", PATCH_LOG_MARKER)
            metrics.set_worker_model(model_config)
        return pruner

    maybe_create_mm_pruner._tokenzip_patched = True
    module.maybe_create_mm_pruner = maybe_create_mm_pruner


# vLLM module -> patch; the module names and patched functions are those of vLLM 0.32-0.33.
_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "vllm.v1.worker.gpu_model_runner": _patch_v1_gpu,
    "vllm.v1.worker.cpu_model_runner": _patch_v1_cpu,
    "vllm.v1.worker.gpu.model_states.default": _patch_v2,
}


def install_runner_patch() -> None:
    """Patch vLLM's model runners (0.32-0.33) so our adapters always get the recompute path.

    Idempotent. Modules already imported are patched now, the others when first imported.
    """
    for name, patch in _PATCHES.items():
        patch_module(name, patch)


# ---------------------------------------------------------------- processor side


def strip_settings(kwargs: Mapping[str, object]) -> dict[str, object]:
    """``kwargs`` without the ``tokenzip`` key, for the HF processor."""
    return {k: v for k, v in kwargs.items() if k != KWARGS_KEY}


def video_settings(kwargs: Mapping[str, object]) -> PruneSettings:
    """The request's settings; SettingsError if the method cannot prune video.

    The adapters feed embeddings and the vision tower's attention (:data:`VIDEO_NEEDS`);
    methods needing anything else (omnizip: audio) are refused.
    """
    settings = resolve(kwargs, methods.available())
    if settings.method is None:
        return settings
    method = methods.get(settings.method)
    missing = sorted(str(need) for need in method.needs - VIDEO_NEEDS)
    if "video" not in method.modalities or missing:
        video_only = [
            name for name in methods.available()
            if methods.get(name).needs <= VIDEO_NEEDS
        ]  # fmt: skip
        raise SettingsError(
            f"method {settings.method!r} needs {missing}, "
            f"which this model adapter does not capture; method must be one of {video_only}"
        )
    return settings


def video_fields(
    settings: PruneSettings,
    grid_thw: torch.Tensor,
    merge_size: int,
    default_keep: Callable[[int, int], int],
) -> dict[str, torch.Tensor]:
    """Per-video fields shipped to the model, one row per video.

    grid_thw: [V, 3] (T, H, W) patch grid of each video; merge_size: spatial merge factor.
    default_keep(T, tokens_per_frame) -> int: the stock count, for requests without settings.
    Returns {METHOD_ID: long [V], RATIO: float64 [V], NUM_KEEP: long [V]}.
    """
    _, video_ratio = settings.modality_ratios()
    active = settings.enabled and video_ratio > 0
    method = methods.get(settings.method) if active else None
    method_id = methods.available().index(settings.method) if active else NO_METHOD
    keep = []
    for t, h, w in grid_thw.tolist():
        per_frame = (h // merge_size) * (w // merge_size)
        keep.append(
            method.kept_count(t, per_frame, video_ratio) if method else default_keep(t, per_frame)
        )
    count = len(keep)
    return {
        METHOD_ID: torch.full((count,), method_id, dtype=torch.long),
        RATIO: torch.full((count,), video_ratio if active else 0.0, dtype=torch.float64),
        NUM_KEEP: torch.tensor(keep, dtype=torch.long),
    }


def field_configs(modality: str) -> dict[str, object]:
    """``_get_mm_fields_config`` entries for :data:`FIELD_NAMES` (batched, kept on CPU)."""
    from vllm.multimodal.inputs import MultiModalFieldConfig

    return {name: MultiModalFieldConfig.batched(modality, keep_on_cpu=True) for name in FIELD_NAMES}


# ---------------------------------------------------------------- model side


def needs_encoder_attention(method_ids: torch.Tensor) -> bool:
    """Whether a method of the batch's videos (METHOD_ID field, [V]) needs the tower's attention."""
    names = methods.available()
    return any(
        Need.ENCODER_ATTENTION in methods.get(names[i]).needs
        for i in method_ids.tolist()
        if i != NO_METHOD
    )


def keep_indices(
    embeds: torch.Tensor,
    grid_thw: tuple[int, int, int],
    merge_size: int,
    fields: Mapping[str, torch.Tensor],
    stock_keep: Callable[[], torch.Tensor],
    encoder_attention: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted indices of the surviving tokens of one video, exactly as many as promised.

    embeds: [T * H' * W', D] post-merger embeddings (frame-major, raster order).
    grid_thw: (T, H, W) patch grid; H' = H / merge_size, W' = W / merge_size.
    fields: this video's METHOD_ID / RATIO / NUM_KEEP scalars.
    stock_keep() -> LongTensor: stock behaviour for videos without tokenzip settings.
    encoder_attention: [T, H' * W'] vision-tower attention received, or None when not captured.
    Returns LongTensor [NUM_KEEP]; raises PruneCountMismatch if the count differs.
    """
    method_id, promised = int(fields[METHOD_ID]), int(fields[NUM_KEEP])
    t, h, w = grid_thw
    grid_hw = (h // merge_size, w // merge_size)
    if method_id == NO_METHOD:
        name, kept = "stock", stock_keep()
    else:
        name = methods.available()[method_id]
        frames = VideoInputs(
            embeds=embeds.reshape(t, grid_hw[0] * grid_hw[1], -1),
            grid_hw=grid_hw,
            encoder_attention=encoder_attention,
        )
        kept = methods.get(name).select(frames, promised)
    if kept.numel() != promised:
        raise PruneCountMismatch(
            f"tokenzip: method {name!r} kept {kept.numel()} video tokens but the processor "
            f"promised {promised} (grid {grid_thw}, ratio {float(fields[RATIO])})"
        )
    return kept.to(embeds.device)


def record_pruning(item: torch.Tensor, method: str, started: float) -> torch.Tensor:
    """Time one pruned item: observe ``tokenzip_pruning_seconds`` and mark its output.

    item: the item's survivors as returned to the runner ([K, D + POSITION_CHANNELS]);
    started: ``time.perf_counter()`` when its pruning began. Returns ``item``, carrying the
    seconds as attribute :data:`PRUNING_ATTR` (read by the runner patch).
    """
    seconds = time.perf_counter() - started
    metrics.observe_pruning(method, seconds)
    setattr(item, PRUNING_ATTR, seconds)
    return item


def media_positions(
    grid_thw: tuple[int, int, int], merge_size: int, t_factor: float
) -> torch.Tensor:
    """Unpruned M-RoPE layout of one image or video, as stock vLLM's get_mrope_input_positions.

    grid_thw: (T, H, W) patch grid; tokens are (T, H', W') raster order with H' = H / merge_size.
    t_factor: tokens_per_second * second_per_grid_ts for videos (float, not truncated), 1 for
    images; the temporal index is int64(t * t_factor), computed in float64 like stock.
    Returns LongTensor [T * H' * W', 4]: (t, h, w, next) relative to the item's start, where
    ``next`` = max over all the item's (t, h, w) + 1 is where the following text starts (vLLM's
    ``recompute_mrope_positions`` places it at base + channel 3).
    """
    t, h, w = grid_thw
    grid = np.indices((t, h // merge_size, w // merge_size)).reshape(3, -1)
    grid[0] = (grid[0] * t_factor).astype(np.int64)
    following = np.full((1, grid.shape[1]), grid.max(initial=-1) + 1)
    return torch.from_numpy(np.concatenate([grid, following]).T.copy())


def encode_positions(values: torch.Tensor) -> torch.Tensor:
    """values: [K, 4] non-negative long -> [K, 4 * DIGITS] float base-128 digits (low first)."""
    if values.numel() and int(values.max()) >= DIGIT_BASE**DIGITS:
        raise ValueError(f"position {int(values.max())} too large for the position channels")
    digits = [(values // DIGIT_BASE**d) % DIGIT_BASE for d in range(DIGITS)]
    return torch.stack(digits, dim=-1).reshape(len(values), -1).float()


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """channels: [K, 4 * DIGITS] from :func:`encode_positions` -> [K, 4] long."""
    digits = channels.float().round().long().reshape(len(channels), 4, DIGITS)
    scale = DIGIT_BASE ** torch.arange(DIGITS, device=channels.device)
    return (digits * scale).sum(-1)
