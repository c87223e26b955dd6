"""Qwen2.5-VL: per-request video pruning on vLLM's multimodal-pruning path.

- Processor: reads the request's ``tokenzip`` settings (never passed to the HF processor),
  emits exactly ``method.kept_count(T, H'*W', video_ratio)`` video placeholders and ships
  (method id, ratio, promised count) to the model as per-video fields. Requests without
  settings keep stock behaviour, including stock EVS under ``--video-pruning-rate``.
- Model: always returns image and video embeddings with each survivor's M-RoPE position
  appended as ``POSITION_CHANNELS`` base-128 digits (exact in bfloat16; stock's 4 raw channels
  are not past 256): (t, h, w) relative to the item, with t = int64(t * tokens_per_second *
  second_per_grid_ts) as stock (no truncated second_per_grid_ts), and the item's unpruned
  max + 1 where stock has llm_grid_w, so the text after it continues where unpruned stock's
  does. :meth:`recompute_mrope_positions` decodes the digits and calls vLLM's
  ``evs.recompute_mrope_positions`` (the runner patch in :mod:`.mm_pruning` enables that path
  on every runner). A produced count differing from the promised one fails the request.
- Methods needing the ViT's attention (fastvid, holitom, visionzip) get it from the real tower
  forward of the batch (:mod:`.vit_attention`, captured only when one of its videos needs it).
  Methods needing audio (omnizip) are refused with a SettingsError (HTTP 400).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.video_prune import evs
from vllm.multimodal.video_prune.evs import compute_retained_tokens_count, compute_retention_mask

from vllm_tokenzip import methods
from vllm_tokenzip.models import mm_pruning, vit_attention

mm_pruning.install_runner_patch()


class TokenZipQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**mm_pruning.strip_settings(kwargs))


class TokenZipQwen2_5_VLProcessor(Qwen2_5_VLMultiModalProcessor):
    """Emits the kept number of video placeholders and ships the settings to the model."""

    def _call_hf_processor(self, hf_data, hf_kwargs):
        return super()._call_hf_processor(hf_data, mm_pruning.strip_settings(hf_kwargs))

    def _stock_count(self, num_frames: int, tokens_per_frame: int) -> int:
        """Stock count: everything, or EVS's count under ``--video-pruning-rate``."""
        rate = self.info.ctx.get_mm_config().video_pruning_rate
        if rate:
            return compute_retained_tokens_count(tokens_per_frame, num_frames, rate)
        return num_frames * tokens_per_frame

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(
            mm_inputs, hf_processor_mm_kwargs, processed_data
        )
        if "video_grid_thw" in processed_data:
            settings = mm_pruning.video_settings(hf_processor_mm_kwargs)
            merge_size = self.info.get_hf_config().vision_config.spatial_merge_size
            processed_data.update(
                mm_pruning.video_fields(
                    settings, processed_data["video_grid_thw"], merge_size, self._stock_count
                )
            )
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return dict(
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            **mm_pruning.field_configs("video"),
        )

    def _get_prompt_updates(
        self, mm_items, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs
    ) -> Sequence[PromptUpdate]:
        """Stock updates, with each video replaced by its promised number of placeholders."""
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)

        def kept_placeholders(item_idx: int, video_token: list[int]) -> list[int]:
            return video_token * int(out_mm_kwargs["video"][item_idx][mm_pruning.NUM_KEEP].data)

        return [
            PromptReplacement(
                modality="video",
                target=update.target,
                replacement=partial(kept_placeholders, video_token=update.target),
            )
            if update.modality == "video"
            else update
            for update in updates
        ]


@MULTIMODAL_REGISTRY.register_processor(
    TokenZipQwen2_5_VLProcessor,
    info=TokenZipQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TokenZipQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Stock Qwen2.5-VL whose videos are pruned per request on the multimodal-pruning path."""

    tokenzip_always_prunes = True  # mm_pruning.ALWAYS_PRUNES_ATTR: runner recomputes positions

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # Stock appends position channels (images and videos) only under this flag.
        self.is_multimodal_pruning_enabled = True
        self._video_fields: dict[str, torch.Tensor] = {}
        self._video_attention: tuple[torch.Tensor, ...] = ()

    def embed_multimodal(self, **kwargs: object):
        """Stock embedding; the per-video tokenzip fields are read by the video postprocess."""
        self._video_fields = {
            name: kwargs.pop(name) for name in mm_pruning.FIELD_NAMES if name in kwargs
        }
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._video_fields, self._video_attention = {}, ()

    def _process_video_input(self, video_input) -> tuple[torch.Tensor, ...]:
        """Stock; also keeps each video's tower attention [T, N] when a method needs it."""
        method_ids = self._video_fields.get(mm_pruning.METHOD_ID)
        if (
            video_input["type"] == "video_embeds"
            or method_ids is None
            or not mm_pruning.needs_encoder_attention(method_ids)
        ):
            return super()._process_video_input(video_input)
        if self.use_data_parallel:
            raise RuntimeError("tokenzip: encoder attention needs the unsharded vision tower")
        with vit_attention.capture_last_attention(self.visual) as captured:
            embeds = super()._process_video_input(video_input)
        grids = video_input["video_grid_thw"].tolist()
        self._video_attention = vit_attention.video_attention(self.visual, captured, grids)
        return embeds

    def _postprocess_image_embeds_evs(
        self, image_embeds_split: tuple[torch.Tensor, ...], image_input: Mapping[str, Any]
    ) -> tuple[torch.Tensor, ...]:
        """Append each image's ([H'*W', D]) encoded positions: [H'*W', D + POSITION_CHANNELS]."""
        merge_size = self.visual.spatial_merge_size
        grids = image_input["image_grid_thw"].tolist()
        return tuple(
            with_positions(emb, mm_pruning.media_positions(tuple(grid), merge_size, 1.0))
            for emb, grid in zip(image_embeds_split, grids, strict=True)
        )

    def _postprocess_video_embeds_evs(
        self, video_embeds_split: tuple[torch.Tensor, ...], video_input: Mapping[str, Any]
    ) -> tuple[torch.Tensor, ...]:
        """Prune each video ([T*H'*W', D]) to its promised count; append encoded positions.

        Returns one [num_keep, D + POSITION_CHANNELS] tensor per video.
        """
        merge_size = self.visual.spatial_merge_size
        tokens_per_second = self.config.vision_config.tokens_per_second
        second_per_grid_ts = video_input.get("second_per_grid_ts")
        if second_per_grid_ts is None:
            raise ValueError("second_per_grid_ts is required to place pruned video tokens")
        out = []
        grids = video_input["video_grid_thw"].tolist()
        for i, (emb, grid) in enumerate(zip(video_embeds_split, grids, strict=True)):
            fields = {name: values[i] for name, values in self._video_fields.items()}
            started = time.perf_counter()
            keep = mm_pruning.keep_indices(
                emb,
                tuple(grid),
                merge_size,
                fields,
                partial(self._stock_keep, emb, grid),
                self._video_attention[i] if self._video_attention else None,
            )
            t_factor = tokens_per_second * float(second_per_grid_ts[i])
            positions = mm_pruning.media_positions(tuple(grid), merge_size, t_factor)
            survivors = with_positions(emb[keep], positions[keep.cpu()])
            method_id = int(fields[mm_pruning.METHOD_ID])
            if method_id != mm_pruning.NO_METHOD:
                mm_pruning.record_pruning(survivors, methods.available()[method_id], started)
            out.append(survivors)
        return tuple(out)

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """Decode the survivors' position digits and rewrite the request's positions.

        multimodal_embeddings: this step's [k, D + POSITION_CHANNELS] slices; mrope_positions:
        [3, N] for the whole prompt. Returns (embeddings [k, D], positions [3, N], delta), as
        vLLM's ``evs.recompute_mrope_positions`` computes them from the decoded (t, h, w, next).

        A prefill chunk that ends right after a vision-start token makes vLLM 0.32's function
        take that start as a finished media's and look for a next one (IndexError, fatal to the
        engine; stock ``--video-pruning-rate`` shares it). The start token is text, so counting
        it as not yet computed (:func:`computed_before_media`) changes nothing else.
        """
        embeds = multimodal_embeddings
        device = embeds[0].device if embeds else mrope_positions.device
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
        start_id = self.config.vision_start_token_id
        num_computed_tokens = computed_before_media(ids, num_computed_tokens, start_id)
        width = mm_pruning.POSITION_CHANNELS
        decoded = [mm_pruning.decode_positions(mm[:, -width:]).T for mm in embeds]
        positions, delta = evs.recompute_mrope_positions(
            ids,
            decoded,
            mrope_positions,
            num_computed_tokens,
            start_id,
            self.config.image_token_id,
            self.config.video_token_id,
        )
        return [mm[:, :-width] for mm in embeds], positions, int(delta)

    def _stock_keep(self, emb: torch.Tensor, grid: list[int]) -> torch.Tensor:
        """Stock survivors: EVS's under ``--video-pruning-rate``, else all. LongTensor [K]."""
        if not self.video_pruning_rate:
            return torch.arange(emb.shape[0], device=emb.device)
        mask = compute_retention_mask(
            emb, grid, spatial_merge_size=self.visual.spatial_merge_size, q=self.video_pruning_rate
        )
        return mask.nonzero().squeeze(1)


def computed_before_media(ids: torch.Tensor, num_computed: int, vision_start_id: int) -> int:
    """``num_computed``, less one when the last computed prompt token (of ids [N]) is a vision
    start; in decode (``num_computed`` >= N) unchanged."""
    if 0 < num_computed < len(ids) and int(ids[num_computed - 1]) == vision_start_id:
        return num_computed - 1
    return num_computed


def with_positions(embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """embeds [K, D], positions [K, 4] long -> [K, D + POSITION_CHANNELS] in embeds' dtype."""
    return torch.cat([embeds, mm_pruning.encode_positions(positions).to(embeds)], dim=1)
