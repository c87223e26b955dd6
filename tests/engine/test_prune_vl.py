"""Per-request video pruning on the tiny Qwen2.5-VL, served by real vLLM on CPU.

Uses the session's ``vl_server`` (one server for the module). Expected counts are closed
forms: the HF processor's unpruned prompt length, minus the video's T * H'W' tokens, plus
``method.kept_count(T, H'W', ratio)``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

from tests.media_expect import expected_prompt_tokens, sampled_frames
from vllm_tokenzip import methods
from vllm_tokenzip.launch import Server
from vllm_tokenzip.models.mm_pruning import (
    ALWAYS_PRUNES_ATTR,
    METHOD_ID,
    NO_METHOD,
    NUM_KEEP,
    PATCH_LOG_MARKER,
    POSITION_CHANNELS,
    RATIO,
    PruneCountMismatch,
    decode_positions,
    encode_positions,
    install_runner_patch,
    keep_indices,
)
from vllm_tokenzip.models.qwen2_5_vl import TokenZipQwen2_5_VL

QUESTION = "What happens here?"


def chat(server: Server, video: Path, tokenzip: dict | None = None) -> requests.Response:
    """Greedy 4-token chat completion over one video, with log-probs."""
    content = [{"type": "video_url", "video_url": {"url": video.as_uri()}},
               {"type": "text", "text": QUESTION}]  # fmt: skip
    body = {"model": server.model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 4, "temperature": 0.0, "logprobs": True}  # fmt: skip
    if tokenzip is not None:
        body["mm_processor_kwargs"] = {"tokenzip": tokenzip}
    return requests.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300)


def result(reply: requests.Response) -> tuple[int, list[str], list[float]]:
    """(prompt_tokens, completion tokens, their log-probs) of a successful reply."""
    assert reply.status_code == 200, reply.text
    body = reply.json()
    steps = body["choices"][0]["logprobs"]["content"]
    return (
        body["usage"]["prompt_tokens"],
        [s["token"] for s in steps],
        [s["logprob"] for s in steps],
    )


@lru_cache(maxsize=8)
def video_grid(model_dir: Path, video: Path) -> tuple[int, int]:
    """(T, tokens per frame H'W') of the video as vLLM samples it, from the HF processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    out = processor.video_processor(videos=[sampled_frames(video)], do_sample_frames=False)
    t, h, w = out["video_grid_thw"][0].tolist()
    merge = processor.video_processor.merge_size
    return t, (h // merge) * (w // merge)


def expected_tokens(model_dir: Path, video: Path, method: str, ratio: float) -> int:
    t, per_frame = video_grid(model_dir, video)
    unpruned = expected_prompt_tokens(model_dir, text=QUESTION, video=video)
    return unpruned - t * per_frame + methods.get(method).kept_count(t, per_frame, ratio)


def test_runner_patch_applied_in_worker(vl_server):
    lines = [line for line in vl_server.log_text().splitlines() if PATCH_LOG_MARKER in line]
    assert any("Worker" in line and "ModelRunner" in line for line in lines), lines


def test_ratio_zero_matches_no_settings(vl_server, vl_tiny, clips):
    video = clips["bigbuckbunny"]
    plain = result(chat(vl_server, video))
    assert plain[0] == expected_prompt_tokens(vl_tiny, text=QUESTION, video=video)
    # ratio 0 (no pruning), and a ratio so small that the method keeps every token
    for tokenzip in ({"method": "divprune", "ratio": 0.0}, {"method": "random", "ratio": 1e-4}):
        prompt, tokens, logprobs = result(chat(vl_server, video, tokenzip))
        assert prompt == expected_tokens(vl_tiny, video, tokenzip["method"], tokenzip["ratio"])
        assert (prompt, tokens) == plain[:2]
        assert logprobs == pytest.approx(plain[2], abs=1e-5)


@pytest.mark.parametrize("clip", ["bigbuckbunny", "moving_16k"])
@pytest.mark.parametrize("method", ["evs", "divprune", "uniform_spatial", "random"])
def test_prompt_tokens_closed_form(vl_server, vl_tiny, clips, clip, method):
    for ratio in (0.25, 0.5, 0.75):
        prompt, tokens, _ = result(chat(vl_server, clips[clip], {"method": method, "ratio": ratio}))
        assert prompt == expected_tokens(vl_tiny, clips[clip], method, ratio), ratio
        assert len(tokens) == 4


def test_concurrent_requests_match_solo(vl_server, clips):
    """Different settings in one batch each give their solo result.

    The solo pass spells the same settings as ``video_ratio`` so that its multimodal hash,
    and hence its encoder and prefix cache entries, differ from the concurrent pass.
    """
    video = clips["bigbuckbunny"]
    settings = [("divprune", 0.3), ("uniform_temporal", 0.6), ("dycoke", 0.4), ("evs", 0.7)]
    with ThreadPoolExecutor(len(settings)) as pool:
        replies = pool.map(
            lambda s: chat(vl_server, video, {"method": s[0], "ratio": s[1]}), settings
        )
        together = [result(reply)[:2] for reply in replies]
    solo = [
        result(chat(vl_server, video, {"method": m, "video_ratio": r}))[:2] for m, r in settings
    ]
    assert together == solo
    assert len({prompt for prompt, _ in solo}) == len(settings)


@pytest.mark.parametrize(
    ("tokenzip", "field"),
    [
        ({"method": "divprune", "ratio": 1.5}, "ratio"),
        ({"method": "no-such-method", "ratio": 0.5}, "method"),
        ({"method": "divprune", "ratoi": 0.5}, "ratoi"),
        ({"method": "omnizip", "ratio": 0.5}, "omnizip"),
    ],
)
def test_bad_settings_rejected_and_server_keeps_serving(vl_server, clips, tokenzip, field):
    reply = chat(vl_server, clips["moving_16k"], tokenzip)
    assert reply.status_code == 400, reply.text
    assert field in reply.json()["error"]["message"]
    assert chat(vl_server, clips["moving_16k"]).status_code == 200


def test_runner_patch_is_idempotent_and_covers_model_runner_v2():
    """In-process: V2's pruner factory serves our adapters only; patching twice wraps once."""
    from vllm.v1.worker import cpu_model_runner
    from vllm.v1.worker.gpu.model_states import default
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    install_runner_patch()
    install_runner_patch()
    load_model = cpu_model_runner.CPUModelRunner.load_model
    assert load_model._tokenzip_patched and not hasattr(load_model.__wrapped__, "_tokenzip_patched")
    config = SimpleNamespace(
        multimodal_config=None, get_inputs_embeds_size=lambda: 8, served_model_name="m"
    )
    adapter = SimpleNamespace(**{ALWAYS_PRUNES_ATTR: True})
    pruner = default.maybe_create_mm_pruner(config, adapter, object(), object())
    assert isinstance(pruner, MultiModalPruner) and pruner.inputs_embeds_size == 8
    assert default.maybe_create_mm_pruner(config, SimpleNamespace(), object(), object()) is None


def test_count_mismatch_fails_loudly():
    fields = {
        METHOD_ID: torch.tensor(NO_METHOD),
        RATIO: torch.tensor(0.0),
        NUM_KEEP: torch.tensor(5),
    }
    with pytest.raises(
        PruneCountMismatch, match="kept 8 video tokens but the processor promised 5"
    ):
        keep_indices(torch.zeros(8, 3), (2, 4, 4), 2, fields, lambda: torch.arange(8))


# ---------------------------------------------------------------- positions (in-process)

VISION_START, IMAGE, VIDEO, TEXT = 1, 2, 3, 7
POSITIONS_CONFIG = SimpleNamespace(
    vision_config=SimpleNamespace(spatial_merge_size=2, tokens_per_second=2),
    vision_start_token_id=VISION_START,
    image_token_id=IMAGE,
    video_token_id=VIDEO,
)


def test_position_digits_round_trip_in_bf16():
    values = torch.cat([torch.arange(0, 100_001, 7), torch.tensor([255, 256, 257, 16383, 16384])])
    values = values[torch.randperm(len(values))][: len(values) // 4 * 4].reshape(-1, 4)
    channels = encode_positions(values).bfloat16()
    assert channels.shape == (len(values), POSITION_CHANNELS)
    assert torch.equal(decode_positions(channels), values)


def fake_adapter(pruning_rate: float | None) -> SimpleNamespace:
    """Just enough of a TokenZipQwen2_5_VL (no weights) to run its position code."""
    adapter = SimpleNamespace(
        config=POSITIONS_CONFIG,
        visual=SimpleNamespace(spatial_merge_size=2),
        video_pruning_rate=pruning_rate,
        _video_fields={},
        _video_attention=(),
    )
    adapter._stock_keep = partial(TokenZipQwen2_5_VL._stock_keep, adapter)
    adapter.iter_mm_grid_thw = partial(Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw, adapter)
    return adapter


def media_prompt(modality: str, grid: list[int], second_per_grid: float, count: int):
    """(token ids [N], mm feature) for: 5 text, vision_start, ``count`` media tokens, 4 text."""
    token = IMAGE if modality == "image" else VIDEO
    ids = [TEXT] * 5 + [VISION_START] + [token] * count + [TEXT] * 4
    data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(grid))}
    if modality == "video":
        data["second_per_grid_ts"] = SimpleNamespace(data=torch.tensor(second_per_grid))
    feature = SimpleNamespace(modality=modality, data=data, mm_position=SimpleNamespace(offset=6))
    return ids, feature


@pytest.mark.parametrize(
    ("modality", "grid", "second_per_grid"),
    [
        ("video", [20, 16, 8], 1.0),  # portrait: text continues after t (38), not w (4)
        ("video", [10, 8, 16], 1.075),  # 10.75 s at 4 fps: t = int(k * 2.15)
        ("video", [300, 4, 4], 1.0),  # long: positions past 256, inexact as raw bf16
        ("image", [1, 16, 8], 1.0),  # portrait image: text continues after h
    ],
)
@pytest.mark.parametrize("pruning_rate", [None, 0.5])
def test_recompute_matches_stock_positions(modality, grid, second_per_grid, pruning_rate):
    """bf16 embeddings through the adapter's postprocess and recompute land every kept token
    (and the text after it) at stock vLLM's unpruned position, with stock's decode delta."""
    adapter = fake_adapter(pruning_rate if modality == "video" else None)
    full = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    ids, feature = media_prompt(modality, grid, second_per_grid, full)
    stock, stock_delta = Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(
        adapter, ids, [feature]
    )
    embeds = torch.randn(full, 8).bfloat16()
    media_input = {key: value.data[None] for key, value in feature.data.items()}
    if modality == "video":
        count = full if pruning_rate is None else compute_retained_tokens_count(
            full // grid[0], grid[0], pruning_rate
        )  # fmt: skip
        adapter._video_fields = {METHOD_ID: torch.tensor([NO_METHOD]), RATIO: torch.zeros(1),
                                 NUM_KEEP: torch.tensor([count])}  # fmt: skip
        (pruned,) = TokenZipQwen2_5_VL._postprocess_video_embeds_evs(
            adapter, (embeds,), media_input
        )
    else:
        (pruned,) = TokenZipQwen2_5_VL._postprocess_image_embeds_evs(
            adapter, (embeds,), media_input
        )
    kept_ids, _ = media_prompt(modality, grid, second_per_grid, len(pruned))
    kept = kept_columns(adapter, embeds, grid, ids, len(pruned))
    start = torch.zeros(3, len(kept_ids), dtype=torch.long)
    start[:, :6] = stock[:, :6]  # the runner's positions up to vision_start are stock's
    (stripped,), positions, delta = TokenZipQwen2_5_VL.recompute_mrope_positions(
        adapter, kept_ids, [pruned], start, 0
    )
    assert stripped.shape == (len(pruned), 8) and torch.equal(stripped, embeds[kept[6:-4] - 6])
    assert torch.equal(positions, stock[:, kept])
    assert delta == stock_delta + len(ids) - len(kept_ids)


def kept_columns(
    adapter: SimpleNamespace, embeds: torch.Tensor, grid: list[int], ids: list[int], count: int
) -> torch.Tensor:
    """Columns [N'] of the unpruned prompt ``ids`` [N] that survive stock pruning."""
    media = torch.arange(count) if count == len(embeds) else adapter._stock_keep(embeds, grid)
    columns = torch.arange(len(ids))
    return torch.cat([columns[:6], media + 6, columns[6 + len(embeds) :]])
