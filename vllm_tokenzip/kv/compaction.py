"""Physical compaction of one request's entries in a paged KV cache (pure torch).

A layer's cache is handled as ``[num_blocks, H_kv, 2, block_size * D]``: per block and
kv-head a K region and a V region. Inside a region the kernel may store the elements in any
fixed order; :class:`BlockLayout` holds that order as a permutation (``perm[t * D + d]`` is
where token ``t``, dim ``d`` lives), so gathering and writing entries is exact whatever the
kernel's tiling.

vLLM 0.32-0.33 CPU attention (``cpu_attn.py``) stores a block as the K region then the V
region (``[N, H, bs, 2*D]`` viewed as ``[N, H, 2*bs, D]`` and chunked), and its ``vec`` ISA
keeps K *dim-major* (``[D, bs]``) and V token-major. :func:`probe_cpu_layout` measures the
permutation with vLLM's own ``cpu_attn_reshape_and_cache`` for the layer's ISA instead of
assuming it. On CUDA (FlashAttention, ``[2, N, bs, H, D]``) regions are token-major: the
view is ``kv.permute(1, 3, 0, 2, 4).reshape(N, H, 2, bs * D)`` with identity permutations.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockLayout:
    """Element order inside a block's K and V regions.

    perm_k, perm_v: ``[bs * D]`` region offsets of token-major (token, dim) elements.
    """

    block_size: int
    head_dim: int
    perm_k: torch.Tensor
    perm_v: torch.Tensor

    @classmethod
    def token_major(cls, block_size: int, head_dim: int) -> BlockLayout:
        identity = torch.arange(block_size * head_dim)
        return cls(block_size, head_dim, identity, identity)


def cpu_regions(kv_cache: torch.Tensor) -> torch.Tensor:
    """``[N, H, bs, 2*D]`` CPU cache -> ``[N, H, 2, bs*D]`` view (shares storage)."""
    num_blocks, num_heads, block_size, two_d = kv_cache.shape
    return kv_cache.view(num_blocks, num_heads, 2, block_size * two_d // 2)


@cache
def probe_cpu_layout(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> BlockLayout:
    """Measure the CPU kernel's in-block order by caching known values with it.

    Two passes (token index, then dim index) keep every probe value exact in bfloat16.
    """
    import vllm._custom_ops as ops

    slots = torch.arange(block_size)
    found = []
    for pattern in (
        slots[:, None].expand(-1, head_dim),
        torch.arange(head_dim).expand(block_size, -1),
    ):
        kv = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
        key_cache, value_cache = kv.view(1, 1, 2 * block_size, head_dim).chunk(2, dim=2)
        values = pattern[:, None, :].to(dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(values, values, key_cache, value_cache, slots, isa)
        found.append(cpu_regions(kv)[0, 0].long())  # [2, bs*D]
    flat = found[0] * head_dim + found[1]  # token-major index held at each region offset
    perms = torch.empty_like(flat)
    perms.scatter_(1, flat, torch.arange(flat.shape[1]).expand_as(flat).contiguous())
    return BlockLayout(block_size, head_dim, perms[0], perms[1])


def cpu_layer_layout(layer: torch.nn.Module, kv_cache: torch.Tensor) -> BlockLayout:
    """The layout of a vLLM CPU attention layer's ``[N, H, bs, 2*D]`` cache."""
    _, _, block_size, two_d = kv_cache.shape
    return probe_cpu_layout(layer.isa, kv_cache.dtype, block_size, two_d // 2)


def gather_entries(
    regions: torch.Tensor, layout: BlockLayout, block_ids: list[int], length: int
) -> torch.Tensor:
    """The first ``length`` entries of a request: ``[H, 2, length, D]`` (a copy).

    regions: ``[N, H, 2, bs*D]``.
    """
    bs, dim = layout.block_size, layout.head_dim
    blocks = regions[torch.tensor(block_ids[: cdiv(length, bs)])]  # [n, H, 2, bs*D]
    keys = blocks[:, :, 0, layout.perm_k]
    values = blocks[:, :, 1, layout.perm_v]
    tokens = torch.stack([keys, values], dim=2).unflatten(-1, (bs, dim))  # [n, H, 2, bs, D]
    flat = tokens.permute(1, 2, 0, 3, 4).flatten(2, 3)  # [H, 2, n*bs, D]
    return flat[:, :, :length]


def compact_entries(
    regions: torch.Tensor,
    layout: BlockLayout,
    block_ids: list[int],
    entries: torch.Tensor,
    keep: torch.Tensor,
) -> None:
    """Write ``entries[h, :, keep[h]]`` into the request's first blocks, in order.

    regions: ``[N, H, 2, bs*D]``; entries: ``[H, 2, P, D]`` from :func:`gather_entries`;
    keep: ``[H, B]`` entry indices per head (the same count ``B`` for every head). Slots past
    ``B`` in the last written block are zeroed; the caller frees blocks past ``cdiv(B, bs)``.
    """
    num_heads, _, _, dim = entries.shape
    bs, kept_count = layout.block_size, keep.shape[1]
    index = keep[:, None, :, None].expand(num_heads, 2, kept_count, dim)
    num_blocks = cdiv(kept_count, bs)
    padded = entries.new_zeros(num_heads, 2, num_blocks * bs, dim)
    padded[:, :, :kept_count] = entries.gather(2, index)
    tokens = padded.unflatten(2, (num_blocks, bs)).permute(2, 0, 1, 3, 4).flatten(3)
    out = torch.empty_like(tokens)  # [nb, H, 2, bs*D]
    out[:, :, 0, layout.perm_k] = tokens[:, :, 0]
    out[:, :, 1, layout.perm_v] = tokens[:, :, 1]
    regions[torch.tensor(block_ids[:num_blocks])] = out
