"""vLLM-style shim (upstream ``aiter.paged_attn``): :class:`PagedAttention` over aiter-pa's ops.

The cache is one buffer ``[2, num_blocks, block_size * Hk * D]`` split into vLLM-layout views
(``key [nb, Hk, D/x, bs, x]``, ``value [nb, Hk, D, bs]``); decode runs ``paged_attention_rocm``
with partition 256, as upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import api
from .layouts import vector_width

_PARTITION_SIZE_ROCM = 256


@dataclass
class PagedAttentionMetadata:
    seq_lens_tensor: torch.Tensor | None
    max_decode_seq_len: int
    block_tables: torch.Tensor | None


class PagedAttention:
    @staticmethod
    def get_supported_head_sizes() -> list[int]:
        return [64, 80, 96, 112, 120, 128, 192, 256]

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size * num_kv_heads * head_size)

    @staticmethod
    def split_kv_cache(kv_cache: torch.Tensor, num_kv_heads: int, head_size: int):
        x = vector_width(kv_cache.dtype)
        num_blocks = kv_cache.shape[1]
        key_cache = kv_cache[0].view(num_blocks, num_kv_heads, head_size // x, -1, x)
        value_cache = kv_cache[1].view(num_blocks, num_kv_heads, head_size, -1)
        return key_cache, value_cache

    @staticmethod
    def write_to_paged_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype: str, k_scale=None,
                             v_scale=None, asm_layout: bool = False) -> None:
        api.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping.flatten(), kv_cache_dtype, k_scale,
                              v_scale, asm_layout)

    @staticmethod
    def forward_decode(query, key_cache, value_cache, block_tables, seq_lens, max_seq_len: int, kv_cache_dtype: str,
                       num_kv_heads: int, scale: float, alibi_slopes, k_scale, v_scale, q_scale=None, tp_rank: int = 0,
                       blocksparse_local_blocks: int = 0, blocksparse_vert_stride: int = 0,
                       blocksparse_block_size: int = 64, blocksparse_head_sliding_step: int = 0,
                       fp8_out_scale=None, mtp: int = 1, output_dtype=None) -> torch.Tensor:
        if blocksparse_vert_stride > 1:
            raise ValueError("block-sparse paged attention is not supported (blocksparse_vert_stride must be <= 1)")
        out = torch.empty(query.shape, dtype=output_dtype or query.dtype, device=query.device)
        rows, heads, dim = query.shape
        P = max(1, -(-max_seq_len // _PARTITION_SIZE_ROCM))
        exp_sums = torch.empty(rows, heads, P, dtype=torch.float32, device=query.device)
        max_logits = torch.empty_like(exp_sums)
        tmp_out = torch.empty(rows, heads, P, dim, dtype=out.dtype, device=query.device)
        block_size = value_cache.shape[3] if value_cache.dim() == 4 else value_cache.shape[2] * value_cache.shape[4]
        return api.paged_attention_rocm(out, exp_sums, max_logits, tmp_out, query, key_cache, value_cache,
                                        num_kv_heads, scale, block_tables, seq_lens, block_size, max_seq_len,
                                        alibi_slopes, kv_cache_dtype, k_scale, v_scale, fp8_out_scale,
                                        _PARTITION_SIZE_ROCM, mtp, q_scale)

    @staticmethod
    def swap_blocks(src_kv_cache: torch.Tensor, dst_kv_cache: torch.Tensor, src_to_dst: torch.Tensor) -> None:
        api.swap_blocks(src_kv_cache[0], dst_kv_cache[0], src_to_dst)
        api.swap_blocks(src_kv_cache[1], dst_kv_cache[1], src_to_dst)

    @staticmethod
    def copy_blocks(kv_caches: list[torch.Tensor], src_to_dists: torch.Tensor) -> None:
        api.copy_blocks([c[0] for c in kv_caches], [c[1] for c in kv_caches], src_to_dists)
