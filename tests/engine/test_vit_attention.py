"""Vision-encoder attention for fastvid / holitom / visionzip (vllm_tokenzip.models.vit_attention).

In-process: the blockwise reduction against a dense masked softmax, and the capture on vLLM's
own Qwen2.5-VL tower (tiny config, random weights) against a dense reference computed in the
patches' natural order. Served: the three methods on Qwen2.5-VL and fastvid on Qwen2.5-Omni.
"""

from __future__ import annotations

import itertools
import socket
import time

import pytest
import torch

from tests.engine.test_prune_omni import ask, assert_same_output, closed_form
from tests.engine.test_prune_vl import chat, expected_tokens, result
from vllm_tokenzip.models import vit_attention

ATTENTION_METHODS = ("fastvid", "holitom", "visionzip")
# Two videos; the second's merged grid (6 x 10) does not divide the 4 x 4 merged windows.
GRIDS = [[2, 8, 8], [3, 12, 20]]


def dense_received(query: torch.Tensor, key: torch.Tensor, bounds: list[int], scale: float):
    """Reference: one masked [H, S, S] softmax; query/key [S, H, d] -> [S] (0 outside)."""
    seg = torch.full((query.shape[0],), -1)
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        seg[start:end] = i
    logits = torch.einsum("ihd,jhd->hij", query.double(), key.double()) * scale
    allowed = (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0)
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()
    sizes = torch.tensor([end - start for start, end in itertools.pairwise(bounds)])
    per_query = torch.where(seg >= 0, sizes[seg.clamp(min=0)], 1)
    return (probs / per_query[None, :, None]).sum(dim=1).mean(dim=0)


def test_received_attention_matches_dense_reference(monkeypatch):
    monkeypatch.setattr(vit_attention, "QUERY_BLOCK_ELEMENTS", 40)  # several query blocks
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 30, 3, 8, generator=generator)
    bounds = [0, 7, 7, 19, 27]  # an empty segment; the last 3 patches in none
    got = vit_attention.received_attention(query, key, bounds, 0.5)
    torch.testing.assert_close(got.double(), dense_received(query, key, bounds, 0.5))
    for start, end in ((0, 7), (7, 19), (19, 27)):
        assert got[start:end].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_merged_token_attention_undoes_the_window_permutation():
    received = torch.arange(12.0)  # 3 merge groups of 4 patches, in window order
    reverse = torch.tensor([2, 0, 1])  # output token t is window group reverse[t]
    got = vit_attention.merged_token_attention(received, 4, reverse)
    assert got.tolist() == [9.5, 1.5, 5.5]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tower(vl_tiny):
    """vLLM's Qwen2.5-VL vision tower with the tiny model's config and seeded random weights."""
    from transformers import AutoConfig
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionTransformer

    vision_config = AutoConfig.from_pretrained(vl_tiny).vision_config
    with set_current_vllm_config(VllmConfig()):
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
                backend="gloo",
            )
            parallel_state.initialize_model_parallel(1, 1)
        visual = Qwen2_5_VisionTransformer(vision_config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in visual.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    for module in visual.modules():  # as vLLM's loader does (CPU linears repack here)
        if (method := getattr(module, "quant_method", None)) is not None:
            method.process_weights_after_loading(module)
    return visual


def _pixels(grids: list[list[int]], width: int) -> torch.Tensor:
    """Random flattened patches [sum T*H*W, width]."""
    count = sum(t * h * w for t, h, w in grids)
    return torch.randn(count, width, generator=torch.Generator().manual_seed(1))


def natural_order_reference(visual, call: dict, grids: list[list[int]]) -> list[torch.Tensor]:
    """Dense attention per frame on q/k put back in the patches' natural order; [T, N] each.

    The window permutation is the one vLLM's tower applies (its own encoder metadata).
    """
    unit = visual.spatial_merge_unit
    window_index = visual.prepare_encoder_metadata(grids)["window_index"].cpu()
    patch_order = (window_index[:, None] * unit + torch.arange(unit)).flatten()
    query, key = torch.empty_like(call["query"]), torch.empty_like(call["key"])
    query[patch_order], key[patch_order] = call["query"], call["key"]
    frames = [h * w for t, h, w in grids for _ in range(t)]
    bounds = [0, *torch.tensor(frames).cumsum(0).tolist()]
    received = dense_received(query, key, bounds, call["scale"]).float()
    tokens = received.view(-1, unit).mean(dim=1)
    return list(vit_attention.split_videos(tokens, grids, visual.spatial_merge_size))


def test_capture_on_vllm_tower_matches_dense_reference(tower):
    assert len(tower.blocks) - 1 in tower.fullatt_block_indexes  # the last block: per frame
    pixels = _pixels(GRIDS, 3 * 2 * 14 * 14)  # channels * temporal patch * patch * patch
    with torch.no_grad():
        stock = tower(pixels, grid_thw=GRIDS)
        started = time.perf_counter()
        with vit_attention.capture_last_attention(tower) as captured:
            embeds = tower(pixels, grid_thw=GRIDS)
        got = vit_attention.video_attention(tower, captured, GRIDS)
        elapsed = time.perf_counter() - started
    print(f"tiny tower forward + attention: {elapsed * 1e3:.1f} ms")
    torch.testing.assert_close(embeds, stock)  # capturing does not change the embeddings
    assert not tower.blocks[-1].attn.attn._forward_pre_hooks  # hook removed
    want = natural_order_reference(tower, captured[0], GRIDS)
    for attention, reference, (t, h, w) in zip(got, want, GRIDS, strict=True):
        assert attention.shape == (t, h * w // 4)
        torch.testing.assert_close(attention, reference, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(attention.sum(1), torch.full((t,), 0.25))


def test_video_attention_refuses_sharded_captures(tower):
    with pytest.raises(RuntimeError, match="one capture"):
        vit_attention.video_attention(tower, [], GRIDS)


# ---------------------------------------------------------------- served


@pytest.mark.parametrize("method", ATTENTION_METHODS)
def test_served_on_qwen2_5_vl(vl_server, vl_tiny, clips, method):
    """200 with the closed-form count; the same output when re-encoded (other spelling)."""
    video = clips["bigbuckbunny"]
    first = result(chat(vl_server, video, {"method": method, "ratio": 0.5}))
    again = result(chat(vl_server, video, {"method": method, "video_ratio": 0.5}))
    assert first[0] == expected_tokens(vl_tiny, video, method, 0.5)
    assert first[:2] == again[:2]
    assert first[2] == pytest.approx(again[2], abs=1e-5)


@pytest.mark.parametrize("mode", ["video", "av"])
@pytest.mark.parametrize("method", ["fastvid", "visionzip"])
def test_served_on_qwen2_5_omni(omni_server, omni_tiny, clips, method, mode):
    """Video-only methods prune the video (an audio track in the region is kept whole)."""
    video = clips["bigbuckbunny"]
    settings = {"method": method, "video_ratio": 0.5}
    first = ask(omni_server, video, mode, settings)
    again = ask(omni_server, video, mode, settings | {"audio_ratio": 0.0})
    assert first["usage"]["prompt_tokens"] == closed_form(omni_tiny, video, mode, settings)
    assert_same_output(first, again)
