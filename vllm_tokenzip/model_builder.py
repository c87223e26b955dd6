"""Build seeded random-weight Qwen2.5-Omni (thinker) and Qwen2.5-VL checkpoints locally.

No weights can be downloaded here, so tests and benchmarks serve checkpoints of the real
architectures with random (seeded) weights, a byte-level BPE tokenizer trained with
``tokenizers`` that carries Qwen's real special tokens in their original order, a chat
template, and the real processor configs (Whisper feature extractor, Qwen2-VL image and
video processors). vLLM serves them like the published checkpoints.

Checkpoints are built into ``cache_dir() / "models" / "<family>-<size>-<hash>"`` where the
hash covers the full build spec, so a changed spec never reuses a stale build. Builds are
seeded and deterministic.

Head sizes: vLLM's CPU attention kernel rejects some head sizes (24 fails, 32 and 64 work),
so every preset uses a text head_dim of 32 or 64.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUILDER_VERSION = 3  # bump whenever the files a build writes change
FAMILIES = ("omni", "vl")

# Qwen2.5-Omni's added tokens, in the order (and so relative ids) of the published tokenizer.
OMNI_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
    "<|audio_eos|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>",
    "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
# The named tokens Qwen2_5OmniProcessor reads from its tokenizer.
OMNI_NAMED_TOKENS = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
# Qwen2.5-VL's added tokens, likewise.
VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip

# Qwen2's pre-tokenizer split pattern.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Per-size specs. "text" is the language model, "vision" the ViT, "audio" the Whisper-style
# encoder (Omni only). Every size uses the real patching: 14 px patches, 2x2 merge, 2 frames
# per temporal patch.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2),
        "vision": dict(hidden_size=64, intermediate_size=128, depth=2, num_heads=2,
                       fullatt_block_indexes=[1]),
        "audio": dict(d_model=64, encoder_ffn_dim=128, encoder_layers=2,
                      encoder_attention_heads=2),
    },
    "mid": {
        "text": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=4),
        "vision": dict(hidden_size=256, intermediate_size=512, depth=4, num_heads=4,
                       fullatt_block_indexes=[1, 3]),
        "audio": dict(d_model=256, encoder_ffn_dim=512, encoder_layers=4,
                      encoder_attention_heads=4),
    },
}  # fmt: skip

TOKENIZER_VOCAB = 1024
# TMRoPE / M-RoPE temporal position units per second of video, as in the published configs.
# vLLM reads the Omni thinker's from vision_config.tokens_per_second, HF from
# position_id_per_seconds: both must be 25 for Qwen2.5-Omni.
OMNI_POSITIONS_PER_SECOND = 25
VL_POSITIONS_PER_SECOND = 2
# Real processor settings of the published checkpoints, except the per-frame pixel cap of
# videos, lowered to OmniZip's paper setting (128 * 28 * 28) so CPU requests stay small.
IMAGE_MIN_PIXELS = 3136
IMAGE_MAX_PIXELS = 12845056
VIDEO_MAX_PIXELS = 128 * 28 * 28
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url') %}{{ IMAGE_PLACEHOLDER }}"
    "{% elif part['type'] in ('video', 'video_url') %}{{ VIDEO_PLACEHOLDER }}"
    "{% elif part['type'] in ('audio', 'audio_url', 'input_audio') %}{{ AUDIO_PLACEHOLDER }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    """Root of everything built locally: ``$TOKENZIP_CACHE`` or ``~/.cache/vllm_tokenzip``."""
    root = os.environ.get("TOKENZIP_CACHE") or Path.home() / ".cache" / "vllm_tokenzip"
    return Path(root)


def build_spec(
    family: str, size: str = "tiny", overrides: dict[str, Any] | None = None, seed: int = 0
) -> dict[str, Any]:
    """The full spec of one build: preset ``size`` with dotted ``overrides`` applied.

    overrides: e.g. ``{"text.num_hidden_layers": 4, "vision.depth": 1}``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    spec = copy.deepcopy(SIZES[size])
    if family == "vl":
        del spec["audio"]
    for key, value in (overrides or {}).items():
        part, _, field = key.partition(".")
        if part not in spec or not field:
            raise ValueError(f"override {key!r} must be <{'|'.join(spec)}>.<field>")
        spec[part][field] = value
    heads = spec["text"]["num_attention_heads"]
    head_dim = spec["text"]["hidden_size"] // heads
    if head_dim not in (32, 64, 128):
        raise ValueError(
            f"text head_dim {head_dim} is not supported by vLLM's CPU kernel; "
            "choose hidden_size / num_attention_heads in (32, 64, 128)"
        )
    return {"family": family, "size": size, "seed": seed, "builder": BUILDER_VERSION, **spec}


def model_dir(spec: dict[str, Any]) -> Path:
    """Where the build of ``spec`` lives: keyed by a hash of the spec."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{spec['family']}-{spec['size']}-{digest}"


def build_model(
    family: str,
    size: str = "tiny",
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Build (or reuse) a checkpoint and return its directory."""
    spec = build_spec(family, size, overrides, seed)
    target = model_dir(spec)
    if (target / "model.safetensors").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        _write_checkpoint(spec, staging)
        (staging / "tokenzip_build.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_checkpoint(spec: dict[str, Any], out: Path) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # default sub-configs warn about ids we then set

    special = OMNI_SPECIAL_TOKENS if spec["family"] == "omni" else VL_SPECIAL_TOKENS
    tokenizer = _train_tokenizer(special)
    token_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in special}
    vocab_size = _round_up(len(tokenizer), 64)
    torch.manual_seed(spec["seed"])
    if spec["family"] == "omni":
        config, model = _omni_model(spec, token_ids, vocab_size)
        processor = _omni_processor(tokenizer)
    else:
        config, model = _vl_model(spec, token_ids, vocab_size)
        processor = _vl_processor(tokenizer)
    _save_weights(model, out, prefix="thinker." if spec["family"] == "omni" else "")
    config.save_pretrained(out)
    processor.save_pretrained(out)
    _write_generation_config(out, token_ids)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _training_corpus() -> list[str]:
    """Deterministic English-like text: enough for a small BPE vocabulary."""
    words = (
        "the a video audio sound picture frame scene token model answer question what is in "
        "this clip describe rabbit bunny forest tree bird sky grass run jump look at moving "
        "static speech silence music loud quiet first second minute hello world yes no one two "
        "three four five six seven eight nine ten and or but with without of on to from by "
    ).split()
    lines = []
    for i in range(4000):
        n = 4 + i % 9
        lines.append(" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(n)) + ".")
    lines += [str(n) for n in range(1000)]
    return lines


def _train_tokenizer(special_tokens: tuple[str, ...]):
    """A Qwen2-style byte-level BPE with ``special_tokens`` appended in order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    tok.add_special_tokens(list(special_tokens))
    named = OMNI_NAMED_TOKENS if "<|AUDIO|>" in special_tokens else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        model_specific_special_tokens=named,
    )
    fast.chat_template = _chat_template(special_tokens)
    return fast


def _chat_template(special_tokens: tuple[str, ...]) -> str:
    if "<|AUDIO|>" in special_tokens:
        image, video = (
            "<|vision_bos|><|IMAGE|><|vision_eos|>",
            "<|vision_bos|><|VIDEO|><|vision_eos|>",
        )
        audio = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    else:
        image = "<|vision_start|><|image_pad|><|vision_end|>"
        video = "<|vision_start|><|video_pad|><|vision_end|>"
        audio = ""
    return (
        CHAT_TEMPLATE.replace("{{ IMAGE_PLACEHOLDER }}", image)
        .replace("{{ VIDEO_PLACEHOLDER }}", video)
        .replace("{{ AUDIO_PLACEHOLDER }}", audio)
    )


def _text_config(spec: dict[str, Any], vocab_size: int, token_ids: dict[str, int]) -> dict:
    return dict(
        vocab_size=vocab_size,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": _mrope_section(spec)},
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        tie_word_embeddings=False,
        **spec["text"],
    )  # fmt: skip


def _mrope_section(spec: dict[str, Any]) -> list[int]:
    """Split head_dim / 2 rotary pairs over (t, h, w) in Qwen's 1 : 1.5 : 1.5 proportion."""
    half = spec["text"]["hidden_size"] // spec["text"]["num_attention_heads"] // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _vision_config(spec: dict[str, Any], out_hidden: int, tokens_per_second: int) -> dict:
    """tokens_per_second: temporal M-RoPE units per second (Qwen2.5-VL 2, Qwen2.5-Omni 25)."""
    return dict(
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        in_channels=3, out_hidden_size=out_hidden, hidden_act="silu",
        tokens_per_second=tokens_per_second, **spec["vision"],
    )  # fmt: skip


def _omni_model(spec: dict[str, Any], ids: dict[str, int], vocab_size: int):
    from transformers import Qwen2_5OmniConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    hidden = spec["text"]["hidden_size"]
    thinker = dict(
        text_config=_text_config(spec, vocab_size, ids),
        vision_config=_vision_config(spec, hidden, OMNI_POSITIONS_PER_SECOND),
        audio_config=dict(num_mel_bins=128, max_source_positions=1500, n_window=100,
                          output_dim=hidden, **spec["audio"]),
        audio_token_index=ids["<|AUDIO|>"],
        image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"],
        user_token_id=ids["<|im_start|>"],
        position_id_per_seconds=OMNI_POSITIONS_PER_SECOND,
        seconds_per_chunk=2,
    )  # fmt: skip
    # The talker is never built or served (vLLM drops talker.* weights) but the full
    # Qwen2_5OmniConfig must name one; keep it small and consistent with the thinker ids.
    talker = dict(
        vocab_size=vocab_size, embedding_size=hidden, tts_text_start_token_id=vocab_size - 3,
        tts_text_end_token_id=vocab_size - 2, tts_text_pad_token_id=vocab_size - 1,
        tts_codec_start_token_id=vocab_size - 7, tts_codec_end_token_id=vocab_size - 6,
        tts_codec_pad_token_id=vocab_size - 5, tts_codec_mask_token_id=vocab_size - 4,
        hidden_size=64, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"], vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"], audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"],
    )  # fmt: skip
    config = Qwen2_5OmniConfig(
        thinker_config=thinker, talker_config=talker, enable_audio_output=False
    )
    config.architectures = ["Qwen2_5OmniModel"]
    model = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config)
    return config, model


def _vl_model(spec: dict[str, Any], ids: dict[str, int], vocab_size: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = _text_config(spec, vocab_size, ids)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=_vision_config(spec, spec["text"]["hidden_size"], VL_POSITIONS_PER_SECOND),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config, Qwen2_5_VLForConditionalGeneration(config)


def _image_processor():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, patch_size=14,
        temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip


def _video_processor():
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(
        min_pixels=IMAGE_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS, patch_size=14,
        temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip


def _omni_processor(tokenizer):
    from transformers import Qwen2_5OmniProcessor, WhisperFeatureExtractor

    features = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400,
        padding_value=0.0, return_attention_mask=True,
    )  # fmt: skip
    return Qwen2_5OmniProcessor(
        image_processor=_image_processor(),
        video_processor=_video_processor(),
        feature_extractor=features,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def _vl_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor

    return Qwen2_5_VLProcessor(
        image_processor=_image_processor(),
        video_processor=_video_processor(),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def _save_weights(model, out: Path, prefix: str) -> None:
    from safetensors.torch import save_file

    state = {prefix + name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_generation_config(out: Path, ids: dict[str, int]) -> None:
    gen = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": False}  # fmt: skip
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
