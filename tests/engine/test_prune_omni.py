"""Per-request pruning in the Qwen2.5-Omni thinker adapter (real vLLM on CPU, tiny Omni).

Offline checks on a weightless adapter (positions, saliency capture, count check), then HTTP
checks against the session's one Omni server: prompt sizes equal the closed form, ratio 0
equals no settings, concurrent requests equal their solo results.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoConfig
from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerForConditionalGeneration as StockThinker,
)
from vllm.multimodal.inputs import PlaceholderRange

from tests.engine.test_serve import audio_part, chat, text_part, video_part
from tests.media_expect import _processor, audio_16k_mono, expected_prompt_tokens, sampled_frames
from vllm_tokenzip import media, methods
from vllm_tokenzip.methods.omnizip import audio_saliency, omnizip_kept_counts
from vllm_tokenzip.models import qwen2_5_omni as omni
from vllm_tokenzip.models.mm_pruning import METHOD_ID, NUM_KEEP, PruneCountMismatch
from vllm_tokenzip.settings import omnizip_split

AV = {"use_audio_in_video": True}

# ---------------------------------------------------------------- offline helpers


@pytest.fixture(scope="module")
def thinker_config(omni_tiny: Path):
    return AutoConfig.from_pretrained(omni_tiny).thinker_config


def bare_thinker(config) -> omni.TokenZipQwen2_5OmniThinker:
    """The adapter without weights: enough for layouts, positions and count checks."""
    model = omni.TokenZipQwen2_5OmniThinker.__new__(omni.TokenZipQwen2_5OmniThinker)
    torch.nn.Module.__init__(model)
    model.config = config
    return model


def feature(modality: str, offset: int, tokens: list[int], embed_token: int | None, **data):
    """A stand-in MultiModalFeatureSpec; data values become field elements."""
    is_embed = None if embed_token is None else torch.tensor(tokens) == embed_token
    return SimpleNamespace(
        modality=modality,
        mm_position=PlaceholderRange(offset, len(tokens), is_embed),
        data={k: SimpleNamespace(data=torch.as_tensor(v)) for k, v in data.items()},
    )


def fill(model, ids, features, rel: torch.Tensor, keep: torch.Tensor, split: int | None = None):
    """Positions after the runner's recompute, the region's survivors given in 1 or 2 slices.

    rel: [3, L] unpruned region positions; keep: [L] bool. Returns (positions [3, N], delta).
    """
    positions, delta = model.get_mrope_input_positions(ids, features)
    hidden = model.config.text_config.hidden_size
    kept = int(keep.sum())
    channels = omni.encode_positions(torch.cat([rel[:, keep].T, torch.arange(kept)[:, None]], 1))
    embeds = torch.cat([torch.zeros(kept, hidden), channels], 1)
    start = omni.media_run(features[0].mm_position)[0]
    slices = (
        [(embeds, 0)] if split is None else [(embeds[:split], 0), (embeds[split:], start + split)]
    )
    for part, computed in slices:
        out, positions, new_delta = model.recompute_mrope_positions(
            ids, [part], positions, computed
        )
        assert out[0].shape == (len(part), hidden)
    assert new_delta == delta
    return positions, delta


def video_case(config, keep_every: int = 1, pruned: bool = True):
    """Prompt with one 4x8x12 video (96 tokens), its features and unpruned layout."""
    num = 96 // keep_every
    token = config.video_token_index
    ids = [1] * 5 + [config.vision_start_token_id] + [token] * num + [config.vision_end_token_id]
    ids += [1] * 7
    data = {"video_grid_thw": [4, 8, 12], "second_per_grid_ts": 1.0}
    if pruned:
        data |= {METHOD_ID: 0, NUM_KEEP: num}
    return ids, [feature("video", 6, [token] * num, None, **data)]


# ---------------------------------------------------------------- offline tests


@pytest.mark.parametrize("split", [None, 40])
def test_keep_all_video_positions_equal_stock(thinker_config, split):
    """Pruned path keeping everything (also in two prefill chunks) gives stock positions."""
    model = bare_thinker(thinker_config)
    ids, features = video_case(thinker_config)
    stock, stock_delta = StockThinker.get_mrope_input_positions(model, ids, video_case(
        thinker_config, pruned=False)[1])  # fmt: skip
    _, rel = model.region_layout([4, 8, 12], 1.0, None)
    got, delta = fill(model, ids, features, rel, torch.ones(96, dtype=torch.bool), split)
    assert torch.equal(got, stock) and delta == stock_delta


def test_keep_all_audio_positions_equal_stock(thinker_config):
    model = bare_thinker(thinker_config)
    token, frames = thinker_config.audio_token_index, 400
    num = model._compute_audio_token_count(frames)
    ids = [1] * 3 + [thinker_config.audio_start_token_id] + [token] * num + [2] * 4
    stock_feature = feature("audio", 4, [token] * num, None, audio_feature_lengths=frames)
    pruned = feature("audio", 4, [token] * num, None, audio_feature_lengths=frames,
                     tokenzip_audio_method_id=0)  # fmt: skip
    stock, stock_delta = StockThinker.get_mrope_input_positions(model, ids, [stock_feature])
    _, rel = model.region_layout(None, 1.0, frames)
    got, delta = fill(model, ids, [pruned], rel, torch.ones(num, dtype=torch.bool))
    assert torch.equal(got, stock) and delta == stock_delta


def test_pruned_video_keeps_original_positions(thinker_config):
    """Survivors keep their unpruned position; text and decode continue from the unpruned max."""
    model = bare_thinker(thinker_config)
    full_ids, full = video_case(thinker_config, pruned=False)
    stock, stock_delta = StockThinker.get_mrope_input_positions(model, full_ids, full)
    ids, features = video_case(thinker_config, keep_every=3)
    keep = torch.arange(96) % 3 == 1
    _, rel = model.region_layout([4, 8, 12], 1.0, None)
    got, delta = fill(model, ids, features, rel, keep)
    full_keep = torch.ones(len(full_ids), dtype=torch.bool)
    full_keep[6:102] = keep
    assert torch.equal(got, stock[:, full_keep])
    assert delta == int(stock.max()) + 1 - len(ids) == stock_delta + 96 - 32


def test_pruned_audio_in_video_positions(thinker_config):
    """Region survivors at region start + TMRoPE offset; audio bos/eos share the vision ones."""
    model = bare_thinker(thinker_config)
    cfg, frames = thinker_config, 240
    seq = omni.TokenZipQwen2_5OmniProcessor.omni_get_updates_use_audio_in_video(
        cfg, model._compute_audio_token_count(frames), [4, 8, 12], 1.0
    )
    ids_full, rel = model.region_layout([4, 8, 12], 1.0, frames)
    keep = torch.rand(len(ids_full), generator=torch.Generator().manual_seed(0)) < 0.4
    kept = int(keep.sum())
    region = [cfg.audio_start_token_id] + [cfg.video_token_index] * kept + [cfg.audio_end_token_id]
    ids = [1] * 5 + [cfg.vision_start_token_id] + region + [cfg.vision_end_token_id] + [1] * 3
    video = feature("video", 6, region, cfg.video_token_index, video_grid_thw=[4, 8, 12],
                    second_per_grid_ts=1.0, tokenzip_av_feature_lengths=frames,
                    **{METHOD_ID: 0, NUM_KEEP: kept})  # fmt: skip
    audio = feature("audio", 6, region, cfg.audio_token_index, audio_feature_lengths=frames)
    got, delta = fill(model, ids, [video, audio], rel, keep)
    assert len(seq) == len(ids_full) + 2
    assert got[:, :6].tolist() == [list(range(6))] * 3
    assert got[:, 6].tolist() == [5, 5, 5]  # <|audio_bos|> with <|vision_bos|>
    assert torch.equal(got[:, 7 : 7 + kept], rel[:, keep] + 6)
    end = 6 + int(rel.max()) + 1
    assert got[:, 7 + kept :].tolist() == [[end, end, end + 1, end + 2, end + 3]] * 3
    assert delta == end + 4 - len(ids)


def test_count_mismatch_fails_loudly(thinker_config):
    model = bare_thinker(thinker_config)
    ids, rel = model.region_layout([2, 4, 4], 1.0, None)
    keep = torch.ones(len(ids), dtype=torch.bool)
    with pytest.raises(PruneCountMismatch, match="promised 3"):
        model._survivors(torch.zeros(len(ids), 8), rel, keep, 3, "omnizip", ids, 0.0)


def test_engine_saliency_equals_audio_saliency_of_captured_qk(thinker_config, omni_tiny):
    """The adapter's saliency (pre-hook on the last layer) equals audio_saliency on Q/K taken
    from the projections' own outputs in the same forward, per audio item."""
    from safetensors.torch import load_file
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    tower = Qwen2_5OmniAudioEncoder(thinker_config.audio_config).eval()
    prefix = "thinker.audio_tower."
    weights = {k[len(prefix):]: v for f in sorted(omni_tiny.glob("*.safetensors"))
               for k, v in load_file(f).items() if k.startswith(prefix)}  # fmt: skip
    tower.load_state_dict(weights)
    model = bare_thinker(thinker_config)
    model.audio_tower = tower
    frames = torch.tensor([300, 217])
    features = torch.randn(thinker_config.audio_config.num_mel_bins, int(frames.sum()))
    attention = tower.layers[-1].self_attn
    outputs: dict[str, torch.Tensor] = {}  # first call = the real forward

    def keep_first(module, args, out, name):
        outputs.setdefault(name, out)

    hooks = [
        getattr(attention, name).register_forward_hook(partial(keep_first, name=name))
        for name in ("q_proj", "k_proj")
    ]
    with torch.no_grad():
        embeds, saliency = model._audio_with_saliency(features, frames)
    for hook in hooks:
        hook.remove()
    heads = attention.num_heads
    lengths = [(int(n) - 1) // 2 + 1 for n in frames]
    per_item = zip(outputs["q_proj"].split(lengths), outputs["k_proj"].split(lengths), strict=True)
    for i, (q, k) in enumerate(per_item):
        q, k = (x.reshape(len(x), heads, -1).transpose(0, 1) for x in (q, k))
        assert saliency[i].shape == (len(embeds[i]),)
        torch.testing.assert_close(saliency[i], audio_saliency(q, k))


# ---------------------------------------------------------------- engine helpers


@lru_cache(maxsize=16)
def media_counts(model_dir: Path, path: Path) -> tuple[int, int, int]:
    """(grid frames, video tokens per frame, audio tokens) of a clip as vLLM samples it,
    from the checkpoint's HF processor (as tests.media_expect counts whole prompts)."""
    processor = _processor(str(model_dir))
    content, kwargs = [{"type": "audio"}], {"audio": [audio_16k_mono(path)]}
    if path.suffix == ".mp4":
        content.append({"type": "video"})
        kwargs |= {"videos": [sampled_frames(path)], "do_sample_frames": False}
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = processor(text=[prompt], return_tensors="pt", **kwargs)
    frames, per_frame = 0, 0
    if "video_grid_thw" in out:
        t, h, w = out["video_grid_thw"][0].tolist()
        frames, per_frame = t, (h // 2) * (w // 2)
    audio = omni.audio_tokens(out["feature_attention_mask"].sum(-1))[0]
    return frames, per_frame, audio


def closed_form(model_dir: Path, path: Path, mode: str, settings: dict) -> int:
    """Expected prompt tokens: stock size minus the pruned audio and video tokens."""
    frames, per_frame, num_audio = media_counts(model_dir, path)
    num_video = frames * per_frame
    audio_ratio, video_ratio = settings.get("audio_ratio", 0.0), settings.get("video_ratio", 0.0)
    if mode == "audio":
        stock = expected_prompt_tokens(model_dir, text="What happens here?", audio=path)
        kept_audio, _ = omnizip_kept_counts(0, num_audio, audio_ratio, 0.0)
        return stock - (num_audio - kept_audio)
    with_audio = mode == "av"
    stock = expected_prompt_tokens(model_dir, text="What happens here?", video=path,
                                   use_audio_in_video=with_audio)  # fmt: skip
    if settings["method"] == "omnizip":
        kept_audio, kept_video = omnizip_kept_counts(
            num_video, num_audio if with_audio else 0, audio_ratio, video_ratio
        )
    else:
        kept_audio = num_audio if with_audio else 0
        kept_video = methods.get(settings["method"]).kept_count(frames, per_frame, video_ratio)
    return stock - (num_audio if with_audio else 0) + kept_audio - num_video + kept_video


def ask(server, path: Path, mode: str, settings: dict | None, max_tokens: int = 4) -> dict:
    """One chat request; returns the JSON reply (asserting HTTP 200)."""
    part = audio_part(path) if mode == "audio" else video_part(path)
    kwargs = dict(AV) if mode == "av" else {}
    if settings is not None:
        kwargs["tokenzip"] = settings
    reply = chat(server, [part, text_part()], mm_processor_kwargs=kwargs, logprobs=True,
                 max_tokens=max_tokens)  # fmt: skip
    assert reply.status_code == 200, reply.text
    return reply.json()


def tokens_and_logprobs(reply: dict) -> tuple[list[str], list[float]]:
    content = reply["choices"][0]["logprobs"]["content"]
    return [c["token"] for c in content], [c["logprob"] for c in content]


def assert_same_output(a: dict, b: dict) -> None:
    tokens_a, logprobs_a = tokens_and_logprobs(a)
    tokens_b, logprobs_b = tokens_and_logprobs(b)
    assert tokens_a == tokens_b
    np.testing.assert_allclose(logprobs_a, logprobs_b, atol=1e-3)
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]


# ---------------------------------------------------------------- engine tests

OMNIZIP_GRID = [
    {"method": "omnizip", "audio_ratio": 0.3, "video_ratio": 0.6},
    {"method": "omnizip", "audio_ratio": 0.75, "video_ratio": 0.15},
]


@pytest.mark.parametrize("settings", OMNIZIP_GRID, ids=["0.3-0.6", "0.75-0.15"])
@pytest.mark.parametrize("mode", ["av", "video"])
@pytest.mark.parametrize("clip", ["bigbuckbunny", "moving_16k", "static_48k_51"])
def test_prompt_tokens_closed_form_video(omni_server, omni_tiny, clips, clip, mode, settings):
    reply = ask(omni_server, clips[clip], mode, settings)
    assert reply["usage"]["prompt_tokens"] == closed_form(omni_tiny, clips[clip], mode, settings)


@pytest.mark.parametrize("ratio", [0.3, 0.8])
@pytest.mark.parametrize("clip", ["speech_16k", "speech_48k"])
def test_prompt_tokens_closed_form_audio(omni_server, omni_tiny, clips, clip, ratio):
    settings = {"method": "omnizip", "audio_ratio": ratio}
    reply = ask(omni_server, clips[clip], "audio", settings)
    assert reply["usage"]["prompt_tokens"] == closed_form(omni_tiny, clips[clip], "audio", settings)


@pytest.mark.parametrize(("seconds", "ratio"), [(0.3, 0.95), (0.1, 0.999999)])
def test_very_short_audio_keeps_one_token(omni_server, omni_tiny, seconds, ratio):
    """OmniZip on a 2-7 token audio at a high ratio keeps one token (an empty placeholder
    would fail the request)."""
    path = media.speech_wav(seconds=seconds, speech_start=0.0)
    settings = {"method": "omnizip", "audio_ratio": ratio}
    reply = ask(omni_server, path, "audio", settings)
    stock = expected_prompt_tokens(omni_tiny, text="What happens here?", audio=path)
    assert reply["usage"]["prompt_tokens"] == closed_form(omni_tiny, path, "audio", settings)
    assert reply["usage"]["prompt_tokens"] == stock - media_counts(omni_tiny, path)[2] + 1


@pytest.mark.parametrize("mode", ["av", "video"])
def test_prompt_tokens_closed_form_video_method(omni_server, omni_tiny, clips, mode):
    """A video-only method prunes the video of an audio-in-video region and keeps its audio."""
    settings = {"method": "divprune", "video_ratio": 0.5}
    reply = ask(omni_server, clips["moving_16k"], mode, settings)
    expected = closed_form(omni_tiny, clips["moving_16k"], mode, settings)
    assert reply["usage"]["prompt_tokens"] == expected


@pytest.mark.parametrize("mode", ["av", "video", "audio"])
def test_ratio_zero_equals_no_settings(omni_server, clips, mode):
    path = clips["speech_16k" if mode == "audio" else "bigbuckbunny"]
    zero = {"method": "omnizip", "audio_ratio": 0.0, "video_ratio": 0.0}
    assert_same_output(ask(omni_server, path, mode, zero), ask(omni_server, path, mode, None))


@pytest.mark.parametrize("mode", ["video", "audio"])
def test_pruned_path_keeping_everything_equals_stock(omni_server, clips, mode):
    """A tiny ratio keeps every token but takes the pruning path (channels, recompute)."""
    path = clips["speech_16k" if mode == "audio" else "moving_16k"]
    tiny = {"method": "omnizip", "audio_ratio": 1e-4, "video_ratio": 1e-4}
    assert_same_output(ask(omni_server, path, mode, tiny), ask(omni_server, path, mode, None))


def test_concurrent_requests_equal_solo(omni_server, clips):
    cases = [
        (clips["bigbuckbunny"], "av", OMNIZIP_GRID[0]),
        (clips["moving_16k"], "av", {"method": "omnizip", "ratio": 0.5}),
        (clips["static_48k_51"], "video", {"method": "divprune", "ratio": 0.4}),
        (clips["speech_48k"], "audio", {"method": "omnizip", "audio_ratio": 0.6}),
    ]  # fmt: skip
    solo = [ask(omni_server, *case) for case in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda case: ask(omni_server, *case), cases))
    for a, b in zip(solo, together, strict=True):
        assert_same_output(a, b)


@pytest.mark.parametrize("num_audio,num_video", [(133, 3600), (150, 840), (150, 0), (7, 96)])
@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 0.9])
def test_omnizip_split_keeps_exact_total(num_audio, num_video, ratio):
    total = num_audio + num_video
    kept = omnizip_kept_counts(num_video, num_audio, *omnizip_split(ratio, num_audio, num_video))
    assert sum(kept) == total - round(ratio * total)


@pytest.mark.parametrize("num_audio", [1, 7, 20, 81, 134, 150])
@pytest.mark.parametrize("num_video", [0, 1, 4, 96, 432])
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.99, 0.999999])
def test_omnizip_split_is_exact_down_to_the_fewest_tokens_it_can_keep(num_audio, num_video, ratio):
    """Video at its floor of one token: the audio gives up the rest (134 audio + 432 video at
    0.9 kept 82 instead of 57 before). Below OmniZip's minimum, that minimum is kept."""
    total = num_audio + num_video
    kept = omnizip_kept_counts(num_video, num_audio, *omnizip_split(ratio, num_audio, num_video))
    anchors = round(0.05 * num_audio)
    fewest = anchors + 1 if num_video else max(anchors, 1)
    assert sum(kept) == max(total - round(ratio * total), fewest)
    assert kept[1] >= (1 if num_video else 0)


@pytest.mark.parametrize(("clip", "mode"), [("bigbuckbunny", "av"), ("moving_16k", "video"),
                                            ("speech_48k", "audio")])  # fmt: skip
def test_overall_ratio_keeps_exact_total(omni_server, omni_tiny, clips, clip, mode):
    """An overall OmniZip ratio prunes exactly round(ratio * N) of the N audio + video tokens."""
    frames, per_frame, num_audio = media_counts(omni_tiny, clips[clip])
    total = frames * per_frame + (num_audio if mode != "video" else 0)
    stock = ask(omni_server, clips[clip], mode, None)["usage"]["prompt_tokens"]
    reply = ask(omni_server, clips[clip], mode, {"method": "omnizip", "ratio": 0.5})
    assert reply["usage"]["prompt_tokens"] == stock - round(0.5 * total)


def test_prompt_stats_from_processed_items():
    row = SimpleNamespace(data=torch.tensor([methods.available().index("omnizip"), 133, 100,
                                             3600, 1440], dtype=torch.float64))  # fmt: skip
    stats = omni.prompt_stats({"video": [{omni.VIDEO_STATS: row}], "audio": [None]})
    assert stats == {"method": "omnizip", "audio_original": 133, "audio_kept": 100,
                     "video_original": 3600, "video_kept": 1440}  # fmt: skip
