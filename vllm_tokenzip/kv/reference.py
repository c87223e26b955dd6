"""Hugging Face transformers reference of decode-time eviction (no vLLM involved).

Greedy decoding of a text prompt on the Qwen2.5-VL language model, float32, with the same
policy, the same compaction schedule as the engine (before a decode step, a cache that
reached ``budget + block_size`` entries is cut to ``budget`` per layer and kv-head) and the
same observations (post-RoPE queries and cached keys, seen through a registered attention
function). HF's ``DynamicCache`` is compacted with the policy's kept indices; RoPE positions
stay semantic (3-D M-RoPE ids passed explicitly), while the mask follows the physical cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface, Qwen2_5_VLForConditionalGeneration
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vllm_tokenzip.kv.policies import EvictionPolicy, Observation, attention_mass

ATTENTION_NAME = "tokenzip_kv_observe"


@dataclass
class _Observations:
    """Per-layer SnapKV query windows ``[H_q, W, D]`` and H2O masses ``[H_kv, P]``."""

    policy: EvictionPolicy | None
    queries: dict[int, torch.Tensor]
    accumulated: dict[int, torch.Tensor]


_ACTIVE: list[_Observations] = []


def _observing_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa attention that also records the step for the active policy.

    query: ``[1, H_q, Q, D]``; key: ``[1, H_kv, P, D]`` (the whole cache, this step included).
    """
    if _ACTIVE and _ACTIVE[-1].policy is not None:
        record, layer = _ACTIVE[-1], module.layer_idx
        queries, keys = query[0].float(), key[0]
        if record.policy.needs_queries:
            previous = record.queries.get(layer)
            joined = queries if previous is None else torch.cat([previous, queries], dim=1)
            record.queries[layer] = joined[:, -record.policy.window :]
        if record.policy.needs_accumulated:
            mass = attention_mass(queries, keys, kwargs.get("scaling") or module.scaling)
            previous = record.accumulated.get(layer)
            if previous is not None:
                mass[:, : previous.shape[1]] += previous
            record.accumulated[layer] = mass
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _observing_attention)


@dataclass(frozen=True)
class Generation:
    """Greedy tokens and each token's log-prob under the (evicting) reference."""

    token_ids: list[int]
    logprobs: list[float]
    compactions: int


def load(model_dir: Path) -> Qwen2_5_VLForConditionalGeneration:
    """The checkpoint in float32, eval mode, attention through the observing function."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.set_attn_implementation(ATTENTION_NAME)
    return model.eval()


def generate(
    model: Qwen2_5_VLForConditionalGeneration,
    prompt_ids: list[int],
    max_tokens: int,
    policy: EvictionPolicy | None = None,
    budget: int = 0,
    block_size: int = 32,
    forced: list[int] | None = None,
) -> Generation:
    """Greedy decode ``max_tokens`` tokens (EOS ignored), evicting when ``policy`` is given.

    With ``forced`` (e.g. the engine's tokens), step ``i`` emits ``forced[i]`` instead of the
    argmax and reports its log-prob, so near-ties cannot make the two runs diverge.
    """
    from transformers import DynamicCache

    text_model = model.model.language_model
    cache = DynamicCache(config=text_model.config)
    record = _Observations(policy, {}, {})
    tokens, logprobs, compactions = [], [], 0
    step_ids, position = list(prompt_ids), 0
    _ACTIVE.append(record)
    try:
        with torch.no_grad():
            for _ in range(max_tokens):
                if policy is not None and tokens and cache.get_seq_length() >= budget + block_size:
                    _compact(cache, record, budget, text_model)
                    compactions += 1
                positions = torch.arange(position, position + len(step_ids)).view(1, 1, -1)
                hidden = text_model(
                    input_ids=torch.tensor([step_ids]),
                    position_ids=positions.expand(3, 1, -1),
                    past_key_values=cache,
                    use_cache=True,
                ).last_hidden_state
                step_logprobs = model.lm_head(hidden[0, -1]).float().log_softmax(-1)
                token = forced[len(tokens)] if forced else int(step_logprobs.argmax())
                tokens.append(token)
                logprobs.append(float(step_logprobs[token]))
                position += len(step_ids)
                step_ids = [token]
    finally:
        _ACTIVE.pop()
    return Generation(tokens, logprobs, compactions)


def _compact(cache, record: _Observations, budget: int, text_model) -> None:
    """Cut every layer of ``cache`` to ``budget`` entries per kv-head with the policy."""
    for layer_idx, layer in enumerate(cache.layers):
        keys, values = layer.keys[0], layer.values[0]  # [H_kv, P, D]
        observation = Observation(
            keys=keys,
            queries=record.queries.get(layer_idx),
            accumulated=record.accumulated.get(layer_idx),
        )
        scale = text_model.layers[layer_idx].self_attn.scaling
        keep = record.policy.select(observation, budget, scale)  # [H_kv, B]
        index = keep[:, :, None].expand(-1, -1, keys.shape[-1])
        layer.keys = keys.gather(1, index)[None].contiguous()
        layer.values = values.gather(1, index)[None].contiguous()
        if layer_idx in record.accumulated:
            record.accumulated[layer_idx] = record.accumulated[layer_idx].gather(1, keep)
