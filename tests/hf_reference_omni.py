"""Hugging Face transformers reference for pruned Qwen2.5-Omni thinker requests, without vLLM.

The thinker (``Qwen2_5OmniThinkerForConditionalGeneration``, the checkpoint's ``thinker.*``
weights, float32) runs over the kept tokens only, each at its column of the FULL sequence's 3-D
(TMRoPE) positions. Media come from vLLM's own loaders (:func:`tests.hf_reference.load_video`
for frames; vLLM's ``AudioMediaIO`` + PyAV resampling to 16 kHz mono for audio, the path the
adapter installs), the HF processor builds the full prompt (for ``use_audio_in_video`` its
interleaving is vLLM's 2-second chunk layout: per 2 s, the chunk's video tokens then up to
50 audio tokens), the HF towers embed the media and the selection is recomputed here:

* video alone: the registry method on the video embeddings (:mod:`tests.hf_reference`);
* audio alone and audio in video: :func:`omnizip_engine` on the media region, with the audio
  saliency from the HF audio tower's last layer Q/K (captured by a forward pre-hook) under
  global attention (:func:`audio_saliency`). Consolidated anchors replace their embeddings.

Positions are HF's ``get_rope_index``. For this model transformers 5.19 keeps the original
Qwen2.5-Omni rule (checked against the Qwen release code): the text after a region continues at
the last appended chunk's max + 1, and in a ``use_audio_in_video`` region ``<|audio_bos|>`` /
``<|audio_eos|>`` share the ``<|vision_bos|>`` / ``<|vision_eos|>`` positions, media at region
start + their TMRoPE offsets. Decode step i sits at the last prompt position + 1 + i.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from tests.hf_reference import Reference, kept_video_indices, load_video
from vllm_tokenzip.methods.omnizip import audio_saliency, omnizip_engine

VIDEO, AUDIO, AUDIO_IN_VIDEO = "video", "audio", "av"


@lru_cache(maxsize=1)
def load(model_dir: Path):
    """(thinker, processor): the checkpoint's thinker in float32, eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    config = AutoConfig.from_pretrained(model_dir).thinker_config
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).to(torch.float32)
    prefix = "thinker."
    weights = {
        key[len(prefix) :]: value.float()
        for file in sorted(model_dir.glob("*.safetensors"))
        for key, value in load_file(file).items()
        if key.startswith(prefix)
    }
    model.load_state_dict(weights, strict=True)
    return model.eval(), AutoProcessor.from_pretrained(model_dir)


def load_audio(path: Path) -> np.ndarray:
    """[samples] float32 16 kHz mono waveform of the file's audio, as the server gets it."""
    from vllm.multimodal.audio import AudioResampler, AudioSpec, normalize_audio
    from vllm.multimodal.media.audio import AudioMediaIO

    audio, rate = AudioMediaIO().load_bytes(path.read_bytes())
    audio = AudioResampler(target_sr=16000, method="pyav").resample(audio, orig_sr=rate)
    return np.asarray(normalize_audio(audio, AudioSpec(target_channels=1)), dtype=np.float32)


def processor_inputs(model_dir: Path, path: Path, mode: str, question: str) -> dict:
    """Full (unpruned) processor outputs for one user turn: [video or audio] question."""
    from transformers.video_utils import VideoMetadata

    _, processor = load(model_dir)
    kwargs: dict = {}
    if mode == AUDIO:
        content = [{"type": "audio"}]
        kwargs["audio"] = [load_audio(path)]
    else:
        content = [{"type": "video"}]
        frames, metadata = load_video(model_dir, path)
        fields = {k: v for k, v in metadata.items() if k in VideoMetadata.__dataclass_fields__}
        kwargs |= {"videos": [frames], "video_metadata": [VideoMetadata(**fields)],
                   "do_sample_frames": False}  # fmt: skip
    if mode == AUDIO_IN_VIDEO:
        config = load(model_dir)[0].config  # the processor's own defaults are 25 and 2
        kwargs |= {"audio": [load_audio(path)], "use_audio_in_video": True,
                   "position_id_per_seconds": config.position_id_per_seconds,
                   "seconds_per_chunk": float(config.seconds_per_chunk)}  # fmt: skip
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[prompt], return_tensors="pt", **kwargs)


@contextmanager
def captured_input(module: torch.nn.Module):
    """Collects the first positional (or ``hidden_states``) input of ``module`` per call."""
    captured: list[torch.Tensor] = []

    def hook(_, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def audio_with_saliency(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """HF audio tower on one audio: (embeddings [N_a, D], saliency [N_a]).

    The saliency is :func:`audio_saliency` on the last encoder layer's Q/K of the whole audio,
    computed from that layer's input hidden states in this forward.
    """
    attention = model.audio_tower.layers[-1].self_attn
    with captured_input(attention) as hidden:
        embeds = model.get_audio_features(
            inputs["input_features"], inputs["feature_attention_mask"], return_dict=True
        ).last_hidden_state
    states = hidden[0]
    heads = attention.num_heads
    q, k = (
        proj(states).reshape(len(states), heads, -1).transpose(0, 1)
        for proj in (attention.q_proj, attention.k_proj)
    )
    return embeds, audio_saliency(q, k)


@dataclass(frozen=True)
class Encoded:
    """The unpruned request.

    ids: [L]; embeds: [L, D] input embeddings with the media embeddings in place; positions:
    [3, L] from ``get_rope_index``; grid_thw: the video grid or None; saliency: [N_a] audio
    saliency or None (no audio).
    """

    ids: torch.Tensor
    embeds: torch.Tensor
    positions: torch.Tensor
    grid_thw: list[int] | None
    saliency: torch.Tensor | None


@lru_cache(maxsize=8)
@torch.no_grad()
def encode(model_dir: Path, path: Path, mode: str, question: str) -> Encoded:
    """Prompt ids, input embeddings (HF towers), audio saliency and full 3-D positions."""
    model, _ = load(model_dir)
    config = model.config
    inputs = processor_inputs(model_dir, path, mode, question)
    ids = inputs["input_ids"][0]
    embeds = model.get_input_embeddings()(ids)
    grid, saliency, seconds, audio_lengths = None, None, None, None
    if mode != AUDIO:
        grid = inputs["video_grid_thw"]
        video = model.get_video_features(inputs["pixel_values_videos"], grid, return_dict=True)
        embeds[ids == config.video_token_id] = video.pooler_output[0]
        seconds = torch.as_tensor(inputs["video_second_per_grid"], dtype=torch.float32)
    if mode != VIDEO:
        audio, saliency = audio_with_saliency(model, inputs)
        embeds[ids == config.audio_token_id] = audio
        audio_lengths = inputs["feature_attention_mask"].sum(-1)
    positions, _ = model.get_rope_index(
        inputs["input_ids"], video_grid_thw=grid, attention_mask=inputs["attention_mask"],
        use_audio_in_video=mode == AUDIO_IN_VIDEO, audio_seqlens=audio_lengths,
        second_per_grids=seconds,
    )  # fmt: skip
    grid_thw = None if grid is None else grid[0].tolist()
    return Encoded(ids, embeds, positions[:, 0], grid_thw, saliency)


def media_region(ids: torch.Tensor, token_ids: tuple[int, ...]) -> tuple[int, int]:
    """[start, end) of the single contiguous run of media tokens (any of token_ids) in ids."""
    cols = torch.isin(ids, torch.tensor(token_ids)).nonzero().squeeze(1)
    start, end = int(cols[0]), int(cols[-1]) + 1
    if end - start != len(cols):
        raise ValueError("media tokens are not one contiguous run")
    return start, end


def select(
    model_dir: Path, full: Encoded, mode: str, settings: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [L] bool, embeds [L, D] with consolidated anchors) of one request's settings."""
    model, _ = load(model_dir)
    config = model.config
    media = (config.video_token_id, config.audio_token_id)
    start, end = media_region(full.ids, media)
    keep = torch.ones_like(full.ids, dtype=torch.bool)
    embeds = full.embeds.clone()
    region_ids = full.ids[start:end]
    if settings["method"] == "omnizip":
        out, region_keep = omnizip_engine(
            region_ids[None], embeds[None, start:end], full.saliency,
            None if full.grid_thw is None else torch.tensor([full.grid_thw]),
            audio_token_id=config.audio_token_id, video_token_id=config.video_token_id,
            rho_audio=settings.get("audio_ratio", 0.0),
            rho_video=settings.get("video_ratio", 0.0),
        )  # fmt: skip
        embeds[start:end], keep[start:end] = out[0], region_keep[0]
        return keep, embeds
    if mode != VIDEO:
        raise ValueError(f"only omnizip prunes audio, got {settings['method']!r}")
    merge = config.vision_config.spatial_merge_size
    chosen = kept_video_indices(
        embeds[start:end], full.grid_thw, merge, settings["method"], settings["video_ratio"]
    )
    region_keep = torch.zeros(end - start, dtype=torch.bool)
    region_keep[chosen] = True
    keep[start:end] = region_keep
    return keep, embeds


@torch.no_grad()
def reference(
    model_dir: Path,
    path: Path,
    mode: str,
    question: str,
    settings: dict,
    generated: list[int] = (),
    text_shift: int = 0,
) -> tuple[Reference, torch.Tensor]:
    """The reference for one request, and the log-probs [G] of its ``generated`` tokens.

    mode: "video", "audio" or "av" (use_audio_in_video); settings: the request's ``tokenzip``
    dict (method, video_ratio / audio_ratio). ``text_shift`` moves every position after the
    media region by that much (a deliberate error, to check the test's power). Kept tokens of an
    audio-in-video region are all ``<|VIDEO|>`` ids, as in vLLM's prompt (the adapter's video
    item owns the region); their embeddings are the survivors', so only the scored ids change.
    """
    model, _ = load(model_dir)
    full = encode(model_dir, path, mode, question)
    keep, embeds = select(model_dir, full, mode, settings)
    media = (model.config.video_token_id, model.config.audio_token_id)
    start, end = media_region(full.ids, media)
    positions = full.positions.clone()
    positions[:, end:] += text_shift
    ids = full.ids.clone()
    if mode == AUDIO_IN_VIDEO:  # vLLM's placeholders: the video item owns the whole region
        ids[start:end] = model.config.video_token_id
    prompt_ids, positions = ids[keep], positions[:, keep]
    extra = torch.tensor(list(generated), dtype=torch.long)
    step = torch.arange(1, len(extra) + 1).expand(3, -1) + positions[:, -1:]
    tokens = torch.cat([embeds[keep], model.get_input_embeddings()(extra)])
    logits = model(
        inputs_embeds=tokens[None], position_ids=torch.cat([positions, step], dim=1)[:, None]
    ).logits[0]
    all_ids = torch.cat([prompt_ids, extra])
    logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)
    target = logprobs.gather(1, all_ids[1:, None]).squeeze(1)
    count = len(prompt_ids)
    return Reference(prompt_ids.tolist(), target[: count - 1]), target[count - 1 :]


def selection_flips(
    model_dir: Path, path: Path, mode: str, question: str, settings: dict, seed: int = 0
) -> int:
    """Keep decisions that change when the media embeddings get 1e-6 relative noise (the size
    of float32 vLLM-vs-HF differences); > 0 means the selection hangs on near-ties."""
    full = encode(model_dir, path, mode, question)
    noise = torch.randn(full.embeds.shape, generator=torch.Generator().manual_seed(seed))
    noisy = Encoded(
        full.ids, full.embeds * (1 + 1e-6 * noise), full.positions, full.grid_thw, full.saliency
    )
    keep, _ = select(model_dir, full, mode, settings)
    return int((select(model_dir, noisy, mode, settings)[0] != keep).sum())
