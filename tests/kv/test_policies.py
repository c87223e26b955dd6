"""Eviction policies: exact budget, protected sinks and window, determinism (pure torch)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_tokenzip.kv.policies import (
    H2O,
    EvictionPolicy,
    Observation,
    SnapKV,
    StreamingLLM,
    attention_mass,
    make_policy,
)

SCALE = 0.125


@st.composite
def cases(draw) -> tuple[EvictionPolicy, Observation, int]:
    """A policy, an observation of P entries (H_kv heads, GQA group of 2) and a budget."""
    kind = draw(st.sampled_from(["streamingllm", "snapkv", "h2o"]))
    sinks, window = draw(st.integers(0, 4)), draw(st.integers(1, 6))
    policy = {
        "streamingllm": lambda: StreamingLLM(sinks=sinks),
        "snapkv": lambda: SnapKV(window=window, kernel_size=draw(st.sampled_from([1, 3, 5])),
                                 sinks=sinks),
        "h2o": lambda: H2O(window=window, sinks=sinks),
    }[kind]()  # fmt: skip
    heads, dim = draw(st.integers(1, 3)), 8
    length = draw(st.integers(policy.min_budget() + 1, 80))
    budget = draw(st.integers(max(policy.min_budget(), 1), length + 5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    keys = torch.randn(heads, length, dim, generator=gen)
    queries = torch.randn(2 * heads, min(window, length), dim, generator=gen)
    accumulated = torch.rand(heads, length, generator=gen)
    return policy, Observation(keys, queries, accumulated), budget


@settings(max_examples=150, deadline=None)
@given(cases())
def test_exact_budget_per_head_sorted_unique(case):
    policy, obs, budget = case
    heads, length, _ = obs.keys.shape
    keep = policy.select(obs, budget, SCALE)
    assert keep.shape == (heads, min(budget, length))
    for row in keep:
        assert torch.equal(row, row.unique()), "indices must be sorted and distinct"
        assert int(row.min()) >= 0 and int(row.max()) < length


@settings(max_examples=150, deadline=None)
@given(cases())
def test_sinks_and_window_always_kept(case):
    policy, obs, budget = case
    length = obs.keys.shape[1]
    keep = policy.select(obs, budget, SCALE)
    protected = set(range(min(policy.sinks, length))) | set(range(length - policy.window, length))
    for row in keep:
        assert protected <= set(row.tolist())


@settings(max_examples=60, deadline=None)
@given(cases())
def test_deterministic(case):
    policy, obs, budget = case
    assert torch.equal(policy.select(obs, budget, SCALE), policy.select(obs, budget, SCALE))


def test_streamingllm_keeps_sinks_then_most_recent():
    keys = torch.randn(2, 20, 4)
    keep = StreamingLLM(sinks=4).select(Observation(keys), 10, SCALE)
    expected = [0, 1, 2, 3, *range(14, 20)]
    assert keep.tolist() == [expected, expected]


def test_h2o_keeps_heavy_hitters_per_head():
    accumulated = torch.zeros(2, 10)
    accumulated[0, 2] = accumulated[1, 5] = 9.0
    keep = H2O(window=2).select(Observation(torch.randn(2, 10, 4), None, accumulated), 3, SCALE)
    assert keep.tolist() == [[2, 8, 9], [5, 8, 9]]


def test_snapkv_prefers_attended_keys():
    keys = torch.zeros(1, 12, 4)
    keys[0, 3] = torch.tensor([10.0, 0, 0, 0])
    queries = torch.tensor([[[1.0, 0, 0, 0]] * 2])  # [H_q=1, W=2, D]
    keep = SnapKV(window=2, kernel_size=1).select(Observation(keys, queries), 3, 1.0)
    assert keep.tolist() == [[3, 10, 11]]


def test_attention_mass_is_causal_and_sums_to_queries():
    queries, keys = torch.randn(4, 3, 8), torch.randn(2, 10, 8)
    mass = attention_mass(queries, keys, SCALE)
    assert mass.shape == (2, 10)
    torch.testing.assert_close(mass.sum(dim=1), torch.full((2,), 3.0))
    # Zero queries attend uniformly: query 0 (entry 1) over 2 keys, query 1 over all 3.
    uniform = attention_mass(torch.zeros(1, 2, 8), torch.randn(1, 3, 8), SCALE)
    torch.testing.assert_close(uniform, torch.tensor([[5 / 6, 5 / 6, 1 / 3]]))


def test_budget_below_protected_entries_rejected():
    with pytest.raises(ValueError, match="budget"):
        H2O(window=8, sinks=4).select(Observation(torch.randn(1, 40, 4)), 10, SCALE)
    with pytest.raises(ValueError, match="unknown"):
        make_policy("nope")
