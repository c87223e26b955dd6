"""Locally built checkpoints: real special tokens and ids, real processors, deterministic."""

from __future__ import annotations

import hashlib
import json

import pytest
from transformers import AutoProcessor, AutoTokenizer

from vllm_tokenzip.model_builder import (
    OMNI_SPECIAL_TOKENS,
    VL_SPECIAL_TOKENS,
    build_model,
    build_spec,
    model_dir,
)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_omni_special_tokens_in_published_order_and_config_ids_match(omni_tiny):
    tok = AutoTokenizer.from_pretrained(omni_tiny)
    ids = [tok.convert_tokens_to_ids(t) for t in OMNI_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    thinker = json.loads((omni_tiny / "config.json").read_text())["thinker_config"]
    assert thinker["audio_token_index"] == tok.convert_tokens_to_ids("<|AUDIO|>")
    assert thinker["video_token_index"] == tok.convert_tokens_to_ids("<|VIDEO|>")
    assert thinker["image_token_index"] == tok.convert_tokens_to_ids("<|IMAGE|>")
    assert thinker["text_config"]["vocab_size"] >= len(tok)


def test_omni_config_is_the_full_omni_config_vllm_expects(omni_tiny):
    config = json.loads((omni_tiny / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni"
    assert config["enable_audio_output"] is False
    assert "talker_config" in config and "thinker_config" in config
    assert config["architectures"] == ["Qwen2_5OmniModel"]


def test_vl_special_tokens_and_ids(vl_tiny):
    tok = AutoTokenizer.from_pretrained(vl_tiny)
    ids = [tok.convert_tokens_to_ids(t) for t in VL_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    config = json.loads((vl_tiny / "config.json").read_text())
    assert config["video_token_id"] == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")


def test_omni_processor_is_the_real_one(omni_tiny):
    processor = AutoProcessor.from_pretrained(omni_tiny)
    assert type(processor).__name__ == "Qwen2_5OmniProcessor"
    assert type(processor.feature_extractor).__name__ == "WhisperFeatureExtractor"
    assert processor.feature_extractor.feature_size == 128
    assert processor.feature_extractor.sampling_rate == 16000
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    assert processor.audio_token == "<|AUDIO|>" and processor.video_token == "<|VIDEO|>"


def test_chat_template_places_media_tokens(omni_tiny, vl_tiny):
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "audio"},
                                              {"type": "text", "text": "hi"}]}]  # fmt: skip
    omni = AutoProcessor.from_pretrained(omni_tiny).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert "<|vision_bos|><|VIDEO|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>hi" in omni
    assert omni.endswith("<|im_start|>assistant\n")
    vl = AutoProcessor.from_pretrained(vl_tiny).apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True
    )
    assert "<|vision_start|><|video_pad|><|vision_end|>" in vl


def test_builds_are_seeded_and_keyed_by_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENZIP_CACHE", str(tmp_path))
    small = {"text.num_hidden_layers": 1, "vision.depth": 1}
    first = build_model("vl", "tiny", small)
    digest = sha256(first / "model.safetensors")
    rebuilt = build_model("vl", "tiny", small, force=True)
    assert rebuilt == first and sha256(rebuilt / "model.safetensors") == digest
    other_seed = build_model("vl", "tiny", small, seed=1)
    assert other_seed != first
    assert sha256(other_seed / "model.safetensors") != digest
    assert first.parent == tmp_path / "models"


def test_overrides_change_the_spec_and_bad_ones_fail():
    assert model_dir(build_spec("omni", "tiny")) != model_dir(
        build_spec("omni", "tiny", {"text.num_hidden_layers": 3})
    )
    with pytest.raises(ValueError, match="head_dim 24"):
        build_spec("omni", "tiny", {"text.hidden_size": 96})
    with pytest.raises(ValueError, match="override"):
        build_spec("omni", "tiny", {"nope": 1})
    with pytest.raises(ValueError, match="size must be one of"):
        build_spec("omni", "huge")


def test_mid_size_is_a_prefill_dominated_model():
    spec = build_spec("omni", "mid")
    assert spec["text"]["hidden_size"] == 1024 and spec["text"]["num_hidden_layers"] == 8


def test_temporal_position_scale_matches_the_published_models(omni_tiny, vl_tiny):
    """vLLM reads the Omni thinker's TMRoPE scale from vision_config.tokens_per_second and HF
    from position_id_per_seconds: both 25 for Omni; Qwen2.5-VL uses 2."""
    thinker = json.loads((omni_tiny / "config.json").read_text())["thinker_config"]
    assert thinker["vision_config"]["tokens_per_second"] == thinker["position_id_per_seconds"] == 25
    vl = json.loads((vl_tiny / "config.json").read_text())
    assert vl["vision_config"]["tokens_per_second"] == 2
