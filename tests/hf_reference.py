"""Hugging Face transformers reference for pruned Qwen2.5-VL requests, computed without vLLM.

The same checkpoint runs in float32: vLLM's own video loader decodes and samples the frames (the
loader vLLM picks for the checkpoint's video processor, so frames, pixels and the metadata behind
``second_per_grid_ts`` are the server's), the HF processor builds the full prompt, the HF
vision tower embeds the video, the registry method picks the survivors from those embeddings,
and the language model runs over the kept tokens only, each at its column of the FULL sequence's
3-D position ids. Decode steps continue at the last prompt position + 1.

The full positions are ``get_rope_index``'s, except the text after the video: the original
Qwen2.5-VL code (and vLLM's ``get_mrope_input_positions``) continues it at the video's largest
position + 1, while transformers 5.x continues at the video's start + max(H', W'), which
ignores the temporal positions (they differ whenever t * tokens_per_second * second_per_grid
outgrows the spatial grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from vllm_tokenzip import methods
from vllm_tokenzip.methods.base import VideoInputs


@dataclass(frozen=True)
class Reference:
    """The reference's view of one request.

    prompt_ids: [L] kept prompt token ids.
    prompt_logprobs: [L - 1] log-prob of each prompt token after the first, given its prefix.
    """

    prompt_ids: list[int]
    prompt_logprobs: torch.Tensor


@lru_cache(maxsize=2)
def load(model_dir: Path):
    """(model, processor) of the checkpoint, float32, eval mode."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(model_dir)


def load_video(model_dir: Path, video: Path) -> tuple[np.ndarray, dict]:
    """([n, H, W, 3] uint8 frames, HF metadata) exactly as the server's media loader gives them."""
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO
    from vllm.multimodal.video import get_video_loader_backend_for_processor
    from vllm.transformers_utils.processor import get_video_processor_cls_name_from_config

    backend = get_video_loader_backend_for_processor(
        get_video_processor_cls_name_from_config(str(model_dir))
    )
    loader = VideoMediaIO(
        ImageMediaIO(image_mode="RGB"), **({"video_backend": backend} if backend else {})
    )
    return loader.load_bytes(video.read_bytes()).media


def processor_inputs(model_dir: Path, video: Path, question: str) -> dict[str, torch.Tensor]:
    """Full (unpruned) processor outputs for one user turn: [video] question."""
    from transformers.video_utils import VideoMetadata

    _, processor = load(model_dir)
    frames, metadata = load_video(model_dir, video)
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fields = {k: v for k, v in metadata.items() if k in VideoMetadata.__dataclass_fields__}
    return processor(
        text=[prompt], videos=[frames], video_metadata=[VideoMetadata(**fields)],
        do_sample_frames=False, return_tensors="pt",
    )  # fmt: skip


def kept_video_indices(
    embeds: torch.Tensor, grid_thw: list[int], merge: int, method: str, ratio: float
) -> torch.Tensor:
    """Sorted survivors of one video's [T * H'W', D] embeddings; all of them at ratio 0."""
    t, h, w = grid_thw
    grid_hw = (h // merge, w // merge)
    per_frame = grid_hw[0] * grid_hw[1]
    if ratio == 0:
        return torch.arange(embeds.shape[0])
    chosen = methods.get(method)
    frames = VideoInputs(embeds=embeds.reshape(t, per_frame, -1), grid_hw=grid_hw)
    return chosen.select(frames, chosen.kept_count(t, per_frame, ratio))


@dataclass(frozen=True)
class Encoded:
    """The unpruned request: ids [L], video embeddings [T * H'W', D], positions [3, L]."""

    ids: torch.Tensor
    grid_thw: list[int]
    embeds: torch.Tensor
    positions: torch.Tensor


@lru_cache(maxsize=4)
@torch.no_grad()
def encode(model_dir: Path, video: Path, question: str) -> Encoded:
    """Prompt ids, HF vision-tower embeddings and full-sequence ``get_rope_index`` positions."""
    model, _ = load(model_dir)
    inputs = processor_inputs(model_dir, video, question)
    grid = inputs["video_grid_thw"]
    embeds = model.model.get_video_features(
        inputs["pixel_values_videos"], grid, return_dict=True
    ).pooler_output[0]
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=grid,
        second_per_grid_ts=inputs["second_per_grid_ts"],
    )  # fmt: skip
    ids = inputs["input_ids"][0]
    video_cols = (ids == model.config.video_token_id).nonzero().squeeze(1)
    return Encoded(ids, grid[0].tolist(), embeds, text_after_media(positions[:, 0], video_cols))


def text_after_media(positions: torch.Tensor, media_cols: torch.Tensor) -> torch.Tensor:
    """positions [3, L] with the text after the media columns [M] (one contiguous run)
    re-laid at the media's largest position + 1 onwards, on all three axes (original Qwen)."""
    after = int(media_cols[-1]) + 1
    out = positions.clone()
    start = positions[:, media_cols].max() + 1
    out[:, after:] = torch.arange(start, start + positions.shape[1] - after).expand(3, -1)
    return out


@torch.no_grad()
def reference(
    model_dir: Path,
    video: Path,
    question: str,
    method: str,
    ratio: float,
    generated: list[int] = (),
    text_shift: int = 0,
) -> tuple[Reference, torch.Tensor]:
    """The reference for one request, and the log-probs [G] of its ``generated`` tokens.

    Generated token g_i sits at position (last prompt position + 1 + i) on all three axes,
    which is where Qwen2.5-VL's rope delta puts decode steps. ``text_shift`` moves every
    position after the video by that much (a deliberate error, to check the test's power).
    """
    model, _ = load(model_dir)
    full = encode(model_dir, video, question)
    merge = model.config.vision_config.spatial_merge_size
    keep = kept_video_indices(full.embeds, full.grid_thw, merge, method, ratio)
    video_cols = (full.ids == model.config.video_token_id).nonzero().squeeze(1)
    kept_cols = torch.ones_like(full.ids, dtype=torch.bool)
    kept_cols[video_cols] = False
    kept_cols[video_cols[keep]] = True
    shifted = full.positions.clone()
    shifted[:, video_cols[-1] + 1 :] += text_shift
    prompt_ids, positions = full.ids[kept_cols], shifted[:, kept_cols]
    all_ids = torch.cat([prompt_ids, torch.tensor(list(generated), dtype=torch.long)])
    step = torch.arange(1, len(generated) + 1).expand(3, -1) + positions[:, -1:]
    tokens = model.get_input_embeddings()(all_ids)
    tokens[(prompt_ids == model.config.video_token_id).nonzero().squeeze(1)] = full.embeds[keep]
    logits = model(
        inputs_embeds=tokens[None], position_ids=torch.cat([positions, step], dim=1)[:, None]
    ).logits[0]
    logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)
    target = logprobs.gather(1, all_ids[1:, None]).squeeze(1)
    count = len(prompt_ids)
    ref = Reference(prompt_ids.tolist(), target[: count - 1])
    return ref, target[count - 1 :]
