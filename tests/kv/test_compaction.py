"""Paged-KV compaction against vLLM's own CPU cache writer (no engine)."""

from __future__ import annotations

import pytest
import torch

from vllm_tokenzip.kv.compaction import (
    BlockLayout,
    compact_entries,
    cpu_regions,
    gather_entries,
    probe_cpu_layout,
)
from vllm_tokenzip.kv.request import eviction_settings

BLOCK, HEADS, DIM = 32, 2, 32


def cached_request(dtype: torch.dtype, length: int, block_ids: list[int]):
    """A CPU cache holding ``length`` random entries of one request, written by vLLM."""
    import vllm._custom_ops as ops

    kv = torch.zeros(6, HEADS, BLOCK, 2 * DIM, dtype=dtype)
    key_cache, value_cache = kv.view(6, HEADS, 2 * BLOCK, DIM).chunk(2, dim=2)
    keys = torch.randn(length, HEADS, DIM).to(dtype)
    values = torch.randn(length, HEADS, DIM).to(dtype)
    slots = torch.tensor([block_ids[t // BLOCK] * BLOCK + t % BLOCK for t in range(length)])
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, "vec")
    return kv, keys.transpose(0, 1), values.transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_reads_what_vllm_wrote(dtype):
    kv, keys, values = cached_request(dtype, 70, [4, 0, 2])
    layout = probe_cpu_layout("vec", dtype, BLOCK, DIM)
    entries = gather_entries(cpu_regions(kv), layout, [4, 0, 2], 70)
    assert torch.equal(entries[:, 0], keys) and torch.equal(entries[:, 1], values)


def test_probe_finds_dim_major_keys_on_vec():
    layout = probe_cpu_layout("vec", torch.float32, BLOCK, DIM)
    assert not torch.equal(layout.perm_k, BlockLayout.token_major(BLOCK, DIM).perm_k)
    assert torch.equal(layout.perm_v, torch.arange(BLOCK * DIM))


def test_compaction_keeps_per_head_entries_in_order():
    block_ids = [4, 0, 2]
    kv, keys, values = cached_request(torch.float32, 70, block_ids)
    layout = probe_cpu_layout("vec", torch.float32, BLOCK, DIM)
    regions = cpu_regions(kv)
    untouched = kv[[1, 3, 5]].clone()
    keep = torch.stack([torch.arange(0, 70, 2), torch.arange(1, 70, 2)])  # 35 per head
    compact_entries(
        regions, layout, block_ids, gather_entries(regions, layout, block_ids, 70), keep
    )
    after = gather_entries(regions, layout, block_ids, 35)
    for head in range(HEADS):
        assert torch.equal(after[head, 0], keys[head, keep[head]])
        assert torch.equal(after[head, 1], values[head, keep[head]])
    assert torch.equal(kv[[1, 3, 5]], untouched), "other requests' blocks must not change"


def test_settings_from_extra_args_and_env(monkeypatch):
    monkeypatch.delenv("TOKENZIP_KV_BUDGET", raising=False)
    assert eviction_settings(None) is None
    assert eviction_settings({"tokenzip_kv_budget": 64}).budget == 64
    monkeypatch.setenv("TOKENZIP_KV_BUDGET", "128")
    monkeypatch.setenv("TOKENZIP_KV_POLICY", "h2o")
    assert eviction_settings({}).policy == "h2o"
    assert eviction_settings({"tokenzip_kv_budget": 0}) is None
    with pytest.raises(ValueError):
        eviction_settings({"tokenzip_kv_budget": "x"})
    with pytest.raises(ValueError):
        eviction_settings({"tokenzip_kv_budget": 4, "tokenzip_kv_policy": "h2o"})
