"""Test helpers: random mixed prefill/decode batches over a shuffled NHD paged cache, and the
Triton launcher with its heuristic overridden."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seqused_k: torch.Tensor
    block_table: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def make_batch(seqs, *, heads_q, heads_kv, head_dim, block_size, dtype, device="cpu", kv_dtype=None, seed=0,
               extra_blocks=3, q_scale=1.0) -> Batch:
    """``seqs``: (query_len, total_kv_len) per sequence. Blocks are a random permutation of the
    pool (so neighbouring logical blocks are far apart), with spare blocks never referenced; block
    table padding past each sequence holds -1 (never read by a correct kernel)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # the bulk data is drawn on the target device (a CPU randn of a GPU-sized cache takes seconds)
    data_gen = torch.Generator(device=device).manual_seed(seed)
    kv_dtype = kv_dtype or dtype
    nblocks = [-(-kv // block_size) for _, kv in seqs]
    width = max(nblocks)
    pool = sum(nblocks) + extra_blocks
    perm = torch.randperm(pool, generator=gen)
    table = torch.full((len(seqs), width), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(nblocks):
        table[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
    total_q = sum(ql for ql, _ in seqs)

    def rnd(*shape):
        return torch.randn(*shape, generator=data_gen, device=device)

    q = (rnd(total_q, heads_q, head_dim) * q_scale).to(dtype)
    k = rnd(pool, block_size, heads_kv, head_dim).to(kv_dtype)
    v = rnd(pool, block_size, heads_kv, head_dim).to(kv_dtype)
    cu = torch.tensor([0] + [ql for ql, _ in seqs], dtype=torch.int64).cumsum(0).to(torch.int32)
    used_k = torch.tensor([kv for _, kv in seqs], dtype=torch.int32)
    to = dict(device=device)
    return Batch(q.to(**to), k.to(**to), v.to(**to), cu.to(**to), used_k.to(**to), table.to(**to),
                 max(ql for ql, _ in seqs), max(kv for _, kv in seqs))


def random_seqs(n, *, max_q, max_ctx, gen: torch.Generator, decode_fraction=0.5):
    """n random (query_len, total_kv_len) pairs mixing decodes (1 token) and prefills/extends."""
    seqs = []
    for _ in range(n):
        ctx = int(torch.randint(0, max_ctx + 1, (1,), generator=gen))
        if float(torch.rand(1, generator=gen)) < decode_fraction:
            ql = 1
        else:
            ql = int(torch.randint(1, max_q + 1, (1,), generator=gen))
        seqs.append((ql, ctx + ql))
    return seqs


def run_triton(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, window_size,
               block_table, softcap, q_descale, k_descale, v_descale, alibi_slopes=None, output_scale=None,
               qq_bias=None, sinks=None, *, skip_reduce=False, force=None, num_segments=None, tile_n=None):
    """The Triton backend on a checked call, with ``force`` ("2d" / "3d"), ``num_segments`` and
    ``tile_n`` overriding its heuristic (:func:`aiter_unified.triton.launch.run`)."""
    from .checks import unified_attention
    from .triton.launch import run

    call = unified_attention(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, True,
                             window_size, block_table, softcap, q_descale, k_descale, v_descale,
                             alibi_slopes=alibi_slopes, output_scale=output_scale, qq_bias=qq_bias, sinks=sinks)
    return run(call, skip_reduce=skip_reduce, force=force, num_segments=num_segments, tile_n=tile_n)


def sized_call(*, num_tokens, num_seqs, heads_q, heads_kv, head_dim, max_seqlen_q, max_seqlen_k, window_left=-1,
               block_size=16, dtype=torch.float16, device="meta"):
    """A checked Call of the given sizes on meta tensors (no data): for the launch plan."""
    from .checks import unified_attention

    q = torch.empty(num_tokens, heads_q, head_dim, dtype=dtype, device=device)
    k = torch.empty(num_seqs * -(-max_seqlen_k // block_size), block_size, heads_kv, head_dim, dtype=dtype,
                    device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return unified_attention(q, k, k, torch.empty_like(q), torch.empty(num_seqs + 1, **i32), max_seqlen_q,
                             torch.empty(num_seqs, **i32), max_seqlen_k, 0.1, True, (window_left, 0),
                             torch.empty(num_seqs, -(-max_seqlen_k // block_size), **i32), 0.0, None, None, None)
