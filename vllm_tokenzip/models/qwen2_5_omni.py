"""Qwen2.5-Omni thinker: everything the plugin changes about this model family.

- Audio resampling with PyAV: vLLM's default resampler is torchaudio, which is a CUDA build on
  PyPI and cannot load beside CPU torch (requests with 48 kHz audio, or a video whose audio
  track is 48 kHz, failed with HTTP 500). PyAV is a vLLM audio dependency on every platform
  and gives the same 16 kHz input to the Whisper feature extractor, so it is used everywhere.
- Per-request pruning before prefill, on vLLM's multimodal-pruning path (the runner patch in
  :mod:`.mm_pruning` enables it for this adapter). Requests without ``tokenzip`` settings, or
  with all ratios 0, are processed exactly as stock. For a request with settings, every audio
  and video item is "pruned" (ratio 0 of one modality keeps all of it):

  * video with ``use_audio_in_video``: the video item owns the whole interleaved region (the
    Qwen3-VL EVS pattern). The processor emits ``<|audio_bos|>`` + K ``<|VIDEO|>`` +
    ``<|audio_eos|>`` with K = kept audio + kept video (:func:`region_counts`) and attaches the
    paired audio features to the video item; the derived audio item has nothing to embed and
    is never encoded. The model runs both towers, scores the audio with the last audio layer's
    Q/K (captured by a forward pre-hook during the real forward, :func:`audio_saliency` with
    global attention), runs :func:`omnizip_engine` on the region in vLLM's 2-second chunk
    layout and returns the survivors in their original interleaved order. Video-only methods
    prune the video part and keep all audio.
  * video without audio: any registered video method, or OmniZip's video form
    (:func:`mm_pruning.keep_indices`). Methods needing the vision tower's attention (fastvid,
    holitom, visionzip) get it from the real tower forward (:mod:`.vit_attention`, captured
    only when one of the batch's videos needs it).
  * audio alone: OmniZip's audio stage (:func:`omnizip_audio_stage`); other methods keep all.

  With OmniZip, an overall ``ratio`` (no per-modality ratio) is split per item by
  :func:`vllm_tokenzip.settings.omnizip_split`, so the item keeps exactly
  ``N - round(ratio * N)`` of its N audio + video tokens.

  Each survivor carries its original TMRoPE position (relative to the region start) and its
  row in the region as :data:`POSITION_CHANNELS` extra channels, base-128 digits so that they
  are exact in bf16. :meth:`get_mrope_input_positions` gives text tokens their positions in
  the unpruned layout and marks pruned regions (negative values, ``-(region start + 1)``);
  :meth:`recompute_mrope_positions` fills the marks from the channels. The decode delta is
  ``unpruned max + 1 - pruned length``. Positions of a pruned request follow HF's
  ``get_rope_index`` (the layout OmniZip was evaluated on): media token i of a region at
  region start + its TMRoPE offset, ``<|audio_bos|>`` / ``<|audio_eos|>`` sharing the position
  of ``<|vision_bos|>`` / ``<|vision_eos|>``. Stock vLLM (used without settings) numbers a
  ``use_audio_in_video`` region from ``<|audio_bos|>`` instead, one token early, so its
  positions after such a region are 2 higher than HF's.

  A produced count differing from the promised one raises :class:`PruneCountMismatch`.

Prompt statistics: the processor adds per-item fields :data:`VIDEO_STATS` and
:data:`AUDIO_STATS` (float64 rows ``[method id, audio original, audio kept, video original,
video kept]``, method id indexes ``methods.available()``, -1 for stock) to the processed
``mm_kwargs``; :func:`prompt_stats` turns one request's items into a dict. The worker logs
every pruned item with its counts and pruning time (``tokenzip: pruned ...``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerDummyInputsBuilder,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2_5OmniThinkerMultiModalProcessor,
    Qwen2_5OmniThinkerProcessingInfo,
)
from vllm.model_executor.models.qwen2_audio import _get_feat_extract_output_lengths
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.audio import AudioResampler
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement, PromptUpdate, PromptUpdateDetails

from vllm_tokenzip import methods
from vllm_tokenzip.methods.base import Need
from vllm_tokenzip.methods.omnizip import (
    audio_saliency,
    omnizip_audio_stage,
    omnizip_engine,
    omnizip_kept_counts,
)
from vllm_tokenzip.models import mm_pruning, vit_attention
from vllm_tokenzip.models.mm_pruning import (
    METHOD_ID,
    NO_METHOD,
    NUM_KEEP,
    RATIO,
    PruneCountMismatch,
    decode_positions,
    encode_positions,
)
from vllm_tokenzip.settings import PruneSettings, SettingsError, omnizip_split, resolve

mm_pruning.install_runner_patch()
logger = logging.getLogger("vllm.tokenzip")

AUDIO_RESAMPLE_METHOD = "pyav"
OMNIZIP = "omnizip"
# Video items: mm_pruning's METHOD_ID / RATIO (video ratio) / NUM_KEEP (region total) and:
AV_AUDIO_RATIO = "tokenzip_av_audio_ratio"  # [V] audio ratio of the paired audio
AV_FEATURES = "tokenzip_av_features"  # [n_mels, sum frames] paired audio features
AV_LENGTHS = "tokenzip_av_feature_lengths"  # [V] mel frames of the paired audio
VIDEO_STATS = "tokenzip_video_stats"  # [V, 5], see the module docstring
# Audio items:
AUDIO_METHOD_ID = "tokenzip_audio_method_id"
AUDIO_RATIO = "tokenzip_audio_ratio"
AUDIO_NUM_KEEP = "tokenzip_audio_num_keep"
AUDIO_STATS = "tokenzip_audio_stats"
VIDEO_FIELDS = (METHOD_ID, RATIO, NUM_KEEP, AV_AUDIO_RATIO, AV_FEATURES, AV_LENGTHS, VIDEO_STATS)
AUDIO_FIELDS = (AUDIO_METHOD_ID, AUDIO_RATIO, AUDIO_NUM_KEEP, AUDIO_STATS)
STATS_KEYS = ("method", "audio_original", "audio_kept", "video_original", "video_kept")


# ---------------------------------------------------------------- settings and counts


def request_settings(kwargs: Mapping[str, object]) -> PruneSettings:
    """The request's settings; SettingsError for methods needing inputs the adapter lacks."""
    settings = resolve(kwargs, methods.available())
    if settings.method is not None:
        missing = methods.get(settings.method).needs - {
            Need.EMBEDDINGS,
            Need.ENCODER_ATTENTION,
            Need.AUDIO_SALIENCY,
            Need.LAYOUT,
        }
        if missing:
            raise SettingsError(
                f"method {settings.method!r} needs {sorted(missing)}, which the Qwen2.5-Omni "
                "adapter does not capture"
            )
    return settings


def item_ratios(settings: PruneSettings, num_audio: int, num_video: int) -> tuple[float, float]:
    """(audio_ratio, video_ratio) of one item with num_audio / num_video tokens.

    Per-modality settings win; an overall ``ratio`` alone is split exactly for OmniZip
    (:func:`omnizip_split`: the item keeps ``N - round(ratio * N)`` tokens), and applies to
    each modality for other methods.
    """
    explicit = settings.audio_ratio is not None or settings.video_ratio is not None
    if settings.method == OMNIZIP and settings.ratio and not explicit:
        return omnizip_split(settings.ratio, num_audio, num_video)
    return settings.modality_ratios()


def region_counts(
    method_name: str,
    ratios: tuple[float, float],
    num_audio: int,
    num_frames: int,
    tokens_per_frame: int,
) -> tuple[int, int]:
    """(kept audio, kept video) of one item: the counts the model must produce.

    ratios: (audio_ratio, video_ratio); num_audio: audio tokens (0 for a video without audio);
    num_frames * tokens_per_frame: video tokens (0 for audio alone). OmniZip prunes both;
    other methods only video.
    """
    audio_ratio, video_ratio = ratios
    num_video = num_frames * tokens_per_frame
    if method_name == OMNIZIP:
        return omnizip_kept_counts(num_video, num_audio, audio_ratio, video_ratio)
    method = methods.get(method_name)
    kept_video = method.kept_count(num_frames, tokens_per_frame, video_ratio) if num_video else 0
    return num_audio, kept_video


def audio_tokens(feature_lengths: torch.Tensor) -> list[int]:
    """LLM audio tokens of each audio from its mel frame counts [n]."""
    return _get_feat_extract_output_lengths(feature_lengths)[1].tolist()


def prompt_stats(mm_kwargs: Mapping[str, Sequence[Mapping[str, object]]]) -> dict[str, object]:
    """Per-request statistics from processed items (``{modality: [item fields]}``).

    Returns {"method", "audio_original", "audio_kept", "video_original", "video_kept"}
    summed over the request's items; method is None when nothing was pruned. Audio items
    that belong to a pruned video are counted with the video.
    """
    rows = [
        item[key].data
        for modality, key in (("video", VIDEO_STATS), ("audio", AUDIO_STATS))
        for item in mm_kwargs.get(modality, [])
        if item is not None and key in item
    ]
    totals = dict.fromkeys(STATS_KEYS[1:], 0)
    method = None
    for row in rows:
        if int(row[0]) != NO_METHOD:
            method = methods.available()[int(row[0])]
        for key, value in zip(STATS_KEYS[1:], row[1:].tolist(), strict=True):
            totals[key] += int(value)
    return {"method": method, **totals}


# ---------------------------------------------------------------- processor


class TokenZipQwen2_5OmniProcessingInfo(Qwen2_5OmniThinkerProcessingInfo):
    def get_data_parser(self):
        parser = super().get_data_parser()
        parser.audio_resampler = AudioResampler(
            target_sr=parser.audio_resampler.target_sr, method=AUDIO_RESAMPLE_METHOD
        )
        return parser

    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**mm_pruning.strip_settings(kwargs))


class TokenZipQwen2_5OmniProcessor(Qwen2_5OmniThinkerMultiModalProcessor):
    """Emits the kept number of placeholders and ships settings and counts to the model."""

    def _call_hf_processor(self, hf_data, hf_kwargs):
        return super()._call_hf_processor(hf_data, mm_pruning.strip_settings(hf_kwargs))

    def _postprocess_hf_mm_data(self, hf_data, hf_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(hf_data, hf_kwargs, processed_data)
        settings = request_settings(hf_kwargs)
        method_id = methods.available().index(settings.method) if settings.enabled else NO_METHOD
        lengths = processed_data.get("audio_feature_lengths", torch.zeros(0, dtype=torch.long))
        num_audio = audio_tokens(lengths.flatten()) if len(lengths) else []
        with_audio = bool(hf_kwargs.get("use_audio_in_video")) and settings.enabled
        if "video_grid_thw" in processed_data:
            processed_data.update(
                self._video_fields(
                    settings, method_id, processed_data, num_audio if with_audio else []
                )
            )
        if len(lengths):
            audio = self._audio_fields(settings, method_id, num_audio)
            if with_audio:  # the video items own (and count) their audio
                audio[AUDIO_STATS][:, 1:] = 0
            processed_data.update(audio)
        return processed_data

    def _video_fields(
        self,
        settings: PruneSettings,
        method_id: int,
        processed: Mapping[str, torch.Tensor],
        paired_audio: list[int],
    ) -> dict[str, torch.Tensor]:
        """Per-video fields; paired_audio: audio tokens of each video's track (audio in video).

        Video i pairs with audio item i (vLLM's order for ``use_audio_in_video``).
        """
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        grids = processed["video_grid_thw"].tolist()
        stats, keep, ratios = [], [], []
        for i, (t, h, w) in enumerate(grids):
            per_frame = (h // merge) * (w // merge)
            num_audio = paired_audio[i] if paired_audio else 0
            ratios.append(item_ratios(settings, num_audio, t * per_frame))
            kept = (
                region_counts(settings.method, ratios[-1], num_audio, t, per_frame)
                if settings.enabled
                else (0, t * per_frame)
            )
            keep.append(sum(kept))
            stats.append([method_id, num_audio, kept[0], t * per_frame, kept[1]])
        count = len(grids)
        ratios = torch.tensor(ratios, dtype=torch.float64).reshape(count, 2)
        fields = {
            METHOD_ID: torch.full((count,), method_id, dtype=torch.long),
            RATIO: ratios[:, 1],
            NUM_KEEP: torch.tensor(keep, dtype=torch.long),
            VIDEO_STATS: torch.tensor(stats, dtype=torch.float64),
        }
        if paired_audio:
            frames = processed["audio_feature_lengths"].flatten()[:count]
            fields[AV_AUDIO_RATIO] = ratios[:, 0]
            fields[AV_LENGTHS] = frames.clone()
            fields[AV_FEATURES] = processed["input_audio_features"][:, : int(frames.sum())]
        return fields

    @staticmethod
    def _audio_fields(
        settings: PruneSettings, method_id: int, num_audio: list[int]
    ) -> dict[str, torch.Tensor]:
        """Per-audio fields: settings, promised count and statistics."""
        ratios = [item_ratios(settings, n, 0) for n in num_audio]
        kept = [
            region_counts(settings.method, r, n, 0, 0)[0] if settings.enabled else n
            for n, r in zip(num_audio, ratios, strict=True)
        ]
        count = len(num_audio)
        return {
            AUDIO_METHOD_ID: torch.full((count,), method_id, dtype=torch.long),
            AUDIO_RATIO: torch.tensor([r[0] for r in ratios], dtype=torch.float64),
            AUDIO_NUM_KEEP: torch.tensor(kept, dtype=torch.long),
            AUDIO_STATS: torch.tensor(
                [[method_id, n, k, 0, 0] for n, k in zip(num_audio, kept, strict=True)],
                dtype=torch.float64,
            ).reshape(count, 5),
        }

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for name in (*VIDEO_FIELDS, *AUDIO_FIELDS):
            if name not in hf_inputs:
                continue
            modality = "video" if name in VIDEO_FIELDS else "audio"
            if name == AV_FEATURES:
                config[name] = MultiModalFieldConfig.flat_from_sizes(
                    "video", hf_inputs[AV_LENGTHS], dim=1
                )
            else:
                config[name] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return config

    def _get_prompt_updates(
        self, mm_items, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs
    ) -> Sequence[PromptUpdate]:
        """Stock updates; pruned items get their promised number of placeholders."""
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.info.get_hf_config()
        keys = {"video": (METHOD_ID, NUM_KEEP), "audio": (AUDIO_METHOD_ID, AUDIO_NUM_KEEP)}

        def replacement(item_idx: int, modality: str, stock: Callable, token: int):
            item = out_mm_kwargs[modality][item_idx]
            method_key, keep_key = keys[modality]
            if int(item[method_key].data) == NO_METHOD:
                return stock(item_idx)
            run = [token] * int(item[keep_key].data)
            if AV_LENGTHS not in item:
                return run
            seq = [config.audio_start_token_id, *run, config.audio_end_token_id]
            return PromptUpdateDetails.select_token_id(seq, embed_token_id=token)

        return [
            PromptReplacement(
                modality=update.modality,
                target=update.target,
                replacement=partial(
                    replacement,
                    modality=update.modality,
                    stock=update.replacement,
                    token=update.target[0],
                ),
            )
            if update.modality in keys
            else update
            for update in updates
        ]


# ---------------------------------------------------------------- model helpers


def media_run(mm_position) -> tuple[int, int]:
    """[start, end) prompt indices of a placeholder's embedded tokens (one contiguous run)."""
    if mm_position.is_embed is None:
        return mm_position.offset, mm_position.offset + mm_position.length
    embedded = mm_position.is_embed.nonzero().squeeze(1)
    return mm_position.offset + int(embedded[0]), mm_position.offset + int(embedded[-1]) + 1


@contextmanager
def capture_attention_input(attention: torch.nn.Module):
    """Collects the hidden states ([T, D]) entering ``attention`` during the block."""
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        captured.append((kwargs.get("hidden_states") if not args else args[0]).detach())

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def last_layer_qk(attention: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q, K [H, T, d] of the audio encoder's last attention from its input hidden [T, D]."""
    heads = attention.num_heads
    q = attention.q_proj(hidden).reshape(len(hidden), heads, -1).transpose(0, 1)
    k = attention.k_proj(hidden).reshape(len(hidden), heads, -1).transpose(0, 1)
    return q, k


# ---------------------------------------------------------------- model


@MULTIMODAL_REGISTRY.register_processor(
    TokenZipQwen2_5OmniProcessor,
    info=TokenZipQwen2_5OmniProcessingInfo,
    dummy_inputs=Qwen2_5OmniThinkerDummyInputsBuilder,
)
class TokenZipQwen2_5OmniThinker(Qwen2_5OmniThinkerForConditionalGeneration):
    """The stock thinker, pruning audio/video per request on the multimodal-pruning path."""

    tokenzip_always_prunes = True  # mm_pruning.ALWAYS_PRUNES_ATTR: runner recomputes positions

    # ---- layouts

    def _tokens_per_second(self) -> int:
        return getattr(self.config.vision_config, "tokens_per_second", 25)

    def region_layout(
        self, grid_thw: Sequence[int] | None, second_per_grid: float, audio_frames: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpruned media tokens of one item: (ids [L], relative TMRoPE positions [3, L]).

        grid_thw: video patch grid or None (audio alone); audio_frames: mel frames of the audio
        (alone or in the video) or None. Audio in video uses vLLM's 2-second chunk layout.
        """
        config = self.config
        merge = config.vision_config.spatial_merge_size
        if grid_thw is None:
            count = self._compute_audio_token_count(audio_frames)
            rel = np.broadcast_to(np.arange(count), (3, count))
            return torch.full((count,), config.audio_token_index), torch.from_numpy(rel.copy())
        t, h, w = (int(x) for x in grid_thw)
        t_factor = second_per_grid * self._tokens_per_second()
        if audio_frames is None:
            rel = np.indices((t, h // merge, w // merge)).reshape(3, -1)
            rel[0] = (rel[0] * t_factor).astype(np.int64)
            return torch.full((rel.shape[1],), config.video_token_index), torch.from_numpy(rel)
        audio_len = self._compute_audio_token_count(audio_frames)
        seq = TokenZipQwen2_5OmniProcessor.omni_get_updates_use_audio_in_video(
            config, audio_len, [t, h, w], second_per_grid
        )[1:-1]
        data = {"grid_t": t, "grid_h": h // merge, "grid_w": w // merge}
        data |= {"t_factor": t_factor, "audio_feature_length": audio_frames}
        rel, _ = self._compute_interleaved_positions(0, data)
        return torch.tensor(seq), torch.from_numpy(np.ascontiguousarray(rel))

    # ---- embeddings

    def embed_multimodal(self, **kwargs: object):
        """Stock embeddings, except pruned items: [K, D + POSITION_CHANNELS] survivors."""
        video = {name: kwargs.pop(name) for name in VIDEO_FIELDS if name in kwargs}
        audio = {name: kwargs.pop(name) for name in AUDIO_FIELDS if name in kwargs}
        if video and bool((video[METHOD_ID] != NO_METHOD).any()):
            return self._embed_videos(kwargs, video)
        if audio and bool((audio[AUDIO_METHOD_ID] != NO_METHOD).any()):
            return self._embed_audios(kwargs, audio)
        return super().embed_multimodal(**kwargs)

    def _audio_with_saliency(
        self, features: torch.Tensor, frames: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
        """Audio tower on features [n_mels, sum frames] of n audios with frames [n].

        Returns (embeddings [N_a_i, D] per audio, saliency [N_a_i] per audio); the saliency
        uses the last layer's Q/K from this forward, attended globally within each audio.
        """
        attention = self.audio_tower.layers[-1].self_attn
        audio_input = {"input_features": features, "audio_feature_lengths": frames}
        with capture_attention_input(attention) as captured:
            embeds = self._process_audio_input(audio_input)
        encoder_lengths = _get_feat_extract_output_lengths(frames.cpu())[0].tolist()
        saliency = []
        with torch.no_grad():
            for hidden in captured[0].split(encoder_lengths):
                saliency.append(audio_saliency(*last_layer_qk(attention, hidden)))
        return embeds, saliency

    def _embed_videos(self, kwargs: dict, fields: dict) -> tuple[torch.Tensor, ...]:
        """Videos of one batch; stock items unchanged, pruned items as survivors + channels."""
        video_input = self._parse_and_validate_video_input(**kwargs)
        grids = video_input["video_grid_thw"].tolist()
        video_embeds, attention = self._videos_with_attention(video_input, grids, fields)
        seconds = kwargs.get("second_per_grid_ts")
        audio = None
        if AV_LENGTHS in fields:
            features = fields[AV_FEATURES]
            features = torch.cat(list(features), 1) if isinstance(features, list) else features
            audio = self._audio_with_saliency(features, fields[AV_LENGTHS])
        out = []
        for i, (emb, grid) in enumerate(zip(video_embeds, grids, strict=True)):
            if int(fields[METHOD_ID][i]) == NO_METHOD:
                out.append(emb)
                continue
            item = {name: value[i] for name, value in fields.items() if name != AV_FEATURES}
            spg = float(seconds[i]) if seconds is not None else 1.0
            item_audio = None if audio is None else (audio[0][i], audio[1][i])
            out.append(self._prune_video(emb, grid, spg, item, item_audio, attention[i]))
        return tuple(out)

    def _videos_with_attention(
        self, video_input, grids: list[list[int]], fields: dict
    ) -> tuple[tuple[torch.Tensor, ...], Sequence[torch.Tensor | None]]:
        """Stock video embeddings [N_v, D] per video, and each video's tower attention [T, N]
        when a method of the batch needs it (None per video otherwise)."""
        if video_input["type"] == "video_embeds" or not mm_pruning.needs_encoder_attention(
            fields[METHOD_ID]
        ):
            return self._process_video_input(video_input), [None] * len(grids)
        with vit_attention.capture_last_attention(self.visual) as captured:
            embeds = self._process_video_input(video_input)
        return embeds, vit_attention.video_attention(self.visual, captured, grids)

    def _prune_video(
        self,
        video: torch.Tensor,
        grid: list[int],
        second_per_grid: float,
        item: Mapping[str, torch.Tensor],
        audio: tuple[torch.Tensor, torch.Tensor] | None,
        attention: torch.Tensor | None,
    ) -> torch.Tensor:
        """One pruned video (with its audio): [K, D + POSITION_CHANNELS] survivors.

        video: [N_v, D]; audio: (embeddings [N_a, D], saliency [N_a]) or None;
        attention: [T, N] vision-tower attention received, or None when not captured.
        """
        started = time.perf_counter()
        method = methods.available()[int(item[METHOD_ID])]
        frames = None if audio is None else int(item[AV_LENGTHS])
        ids, rel = self.region_layout(grid, second_per_grid, frames)
        is_video = ids == self.config.video_token_index
        embeds = video.new_empty(len(ids), video.shape[-1])
        embeds[is_video] = video
        if audio is not None:
            embeds[~is_video] = audio[0].to(embeds.dtype)
        if audio is not None and method == OMNIZIP:
            embeds, keep = self._omnizip_region(ids, embeds, audio[1], grid, item)
        else:
            keep = torch.ones(len(ids), dtype=torch.bool)
            video_item = {**item, NUM_KEEP: item[NUM_KEEP] - int((~is_video).sum())}
            kept_video = mm_pruning.keep_indices(
                video, tuple(grid), self.visual.spatial_merge_size, video_item,
                lambda: torch.arange(len(video)), attention,
            )  # fmt: skip
            video_keep = torch.zeros(len(video), dtype=torch.bool)
            video_keep[kept_video.cpu()] = True
            keep[is_video] = video_keep
        return self._survivors(embeds, rel, keep, int(item[NUM_KEEP]), method, ids, started)

    def _omnizip_region(
        self,
        ids: torch.Tensor,
        embeds: torch.Tensor,
        saliency: torch.Tensor,
        grid: list[int],
        item: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """OmniZip engine form on one region: (embeds [L, D] with anchors, keep [L] bool)."""
        out, keep = omnizip_engine(
            ids[None].to(embeds.device),
            embeds[None],
            saliency,
            torch.tensor([grid]),
            audio_token_id=self.config.audio_token_index,
            video_token_id=self.config.video_token_index,
            rho_audio=float(item[AV_AUDIO_RATIO]),
            rho_video=float(item[RATIO]),
        )
        return out[0], keep[0].cpu()

    def _embed_audios(self, kwargs: dict, fields: dict) -> tuple[torch.Tensor, ...]:
        """Standalone audios of one batch; pruned items as survivors + channels."""
        audio_input = self._parse_and_validate_audio_input(**kwargs)
        embeds, saliency = self._audio_with_saliency(
            audio_input["input_features"], audio_input["audio_feature_lengths"]
        )
        out = []
        frames = audio_input["audio_feature_lengths"].tolist()
        for i, (emb, score) in enumerate(zip(embeds, saliency, strict=True)):
            method_id = int(fields[AUDIO_METHOD_ID][i])
            if method_id == NO_METHOD:
                out.append(emb)
                continue
            started = time.perf_counter()
            method = methods.available()[method_id]
            ids, rel = self.region_layout(None, 1.0, frames[i])
            keep = torch.ones(len(emb), dtype=torch.bool)
            if method == OMNIZIP:
                ratio = float(fields[AUDIO_RATIO][i])
                emb, keep = omnizip_audio_stage(emb, score, ratio, min_kept=1)
            promised = int(fields[AUDIO_NUM_KEEP][i])
            out.append(self._survivors(emb, rel, keep.cpu(), promised, method, ids, started))
        return tuple(out)

    def _survivors(
        self,
        embeds: torch.Tensor,
        rel: torch.Tensor,
        keep: torch.Tensor,
        promised: int,
        method: str,
        ids: torch.Tensor,
        started: float,
    ) -> torch.Tensor:
        """embeds [L, D], rel [3, L], keep [L] -> [K, D + POSITION_CHANNELS]; checks K."""
        kept = int(keep.sum())
        if kept != promised:
            raise PruneCountMismatch(
                f"tokenzip: method {method!r} kept {kept} of {len(keep)} tokens but the "
                f"processor promised {promised}"
            )
        rows = torch.arange(kept)
        channels = encode_positions(torch.cat([rel[:, keep].T, rows[:, None]], dim=1))
        survivors = embeds[keep.to(embeds.device)]
        item = torch.cat([survivors, channels.to(survivors)], dim=1)
        mm_pruning.record_pruning(item, method, started)
        is_video = ids == self.config.video_token_index
        logger.info(
            "tokenzip: pruned %s audio %d->%d video %d->%d in %.1f ms",
            method,
            int((~is_video).sum()),
            int((keep & ~is_video).sum()),
            int(is_video.sum()),
            int((keep & is_video).sum()),
            1000 * getattr(item, mm_pruning.PRUNING_ATTR),
        )
        return item

    # ---- positions

    def _is_pruned(self, feature) -> bool:
        """Whether an mm feature was processed with tokenzip settings."""
        key = {"video": METHOD_ID, "audio": AUDIO_METHOD_ID}.get(feature.modality)
        data = feature.data
        return key is not None and key in data and int(data[key].data) != NO_METHOD

    def _feature_layout(self, feature) -> torch.Tensor:
        """Relative positions [3, n] of one feature's unpruned media tokens."""
        data = feature.data
        if feature.modality == "audio":
            return self.region_layout(None, 1.0, int(data["audio_feature_lengths"].data))[1]
        if feature.modality == "image":
            t, h, w = data["image_grid_thw"].data.tolist()
            merge = self.config.vision_config.spatial_merge_size
            return torch.from_numpy(np.indices((t, h // merge, w // merge)).reshape(3, -1))
        spg = data.get("second_per_grid_ts")
        spg = 1.0 if spg is None else float(spg.data)
        frames = int(data[AV_LENGTHS].data) if AV_LENGTHS in data else None
        return self.region_layout(data["video_grid_thw"].data.tolist(), spg, frames)[1]

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features):
        """Stock positions unless the request is pruned; then text as unpruned, regions marked.

        Returns (positions [3, N], delta = unpruned max + 1 - N). A pruned region's tokens
        hold ``-(region start + 1)`` until :meth:`recompute_mrope_positions` fills them.
        """
        if not any(self._is_pruned(f) for f in mm_features):
            return super().get_mrope_input_positions(input_tokens, mm_features)
        positions = torch.empty(3, len(input_tokens), dtype=torch.long)
        cursor, next_pos = 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            place = feature.mm_position
            if place.is_embed is not None and not bool(place.is_embed.any()):
                continue  # audio owned by its video
            if feature.modality != "image" and not self._is_pruned(feature):
                raise RuntimeError("tokenzip: a pruned request has an unpruned audio/video item")
            start, end = media_run(place)
            # <|audio_bos|> / <|audio_eos|> of audio in video share the neighbouring
            # <|vision_bos|> / <|vision_eos|> position, as in HF's get_rope_index.
            shared = start - place.offset
            positions[:, cursor : start - shared] = torch.arange(
                next_pos, next_pos + start - shared - cursor
            )
            next_pos += start - shared - cursor
            positions[:, start - shared : start] = next_pos - 1
            rel = self._feature_layout(feature)
            if feature.modality == "image":
                positions[:, start:end] = rel + next_pos
            else:
                positions[:, start:end] = -(next_pos + 1)
            next_pos += int(rel.max()) + 1
            cursor = place.offset + place.length
            positions[:, end:cursor] = next_pos
        tail = len(input_tokens) - cursor
        positions[:, cursor:] = torch.arange(next_pos, next_pos + tail)
        return positions, next_pos + tail - len(input_tokens)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """Fill the marked positions of pruned regions from the embeddings' channels.

        multimodal_embeddings: this step's slices, [k, D] (stock, unchanged) or
        [k, D + POSITION_CHANNELS] (pruned, stripped); mrope_positions: [3, N].
        Returns (embeddings [k, D], positions [3, N], delta).
        """
        hidden = self.config.text_config.hidden_size
        positions = mrope_positions.clone()
        cursor, out = num_computed_tokens, []
        for embeds in multimodal_embeddings:
            if embeds.shape[-1] == hidden:
                out.append(embeds)
                continue
            decoded = decode_positions(embeds[:, hidden:]).to(positions.device)
            first_row = int(decoded[0, 3])
            if first_row:
                start = num_computed_tokens - first_row
            else:
                marked = (positions[0, cursor:] < 0).nonzero()
                if not len(marked):
                    raise RuntimeError("tokenzip: pruned embeddings without a marked region")
                start = cursor + int(marked[0])
            tokens = start + decoded[:, 3]
            if tokens[-1] >= positions.shape[1] or bool((positions[0, tokens] >= 0).any()):
                raise RuntimeError("tokenzip: pruned embeddings do not match their region")
            base = -positions[0, tokens[:1]] - 1
            positions[:, tokens] = decoded[:, :3].T + base
            cursor = int(tokens[-1]) + 1
            out.append(embeds[:, :hidden])
        delta = int(positions.max()) + 1 - positions.shape[1]
        return out, positions, delta
