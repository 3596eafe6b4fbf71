"""Test helpers: random mixed prefill/decode batches over a shuffled NHD paged cache."""

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
