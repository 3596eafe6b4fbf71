"""PyTorch reference of upstream ``unified_attention`` (vLLM's unified Triton attention).

Semantics, per sequence ``s`` with ``query_len = cu_seqlens_q[s+1] - cu_seqlens_q[s]`` and
``seqused_k[s]`` the total KV length (cached context plus the new tokens already in the cache):

* ``context_len = seqused_k - query_len``; query ``i`` sits at position ``context_len + i`` and sees
  keys ``0 .. context_len + i`` (causal, bottom-right aligned);
* sliding window ``W = 1 + window_size[0]`` (off when ``window_size[0] < 0``): key ``j`` is kept
  only if ``(context_len + i) - j < W``;
* scores ``s = softmax_scale * q_descale * k_descale * (q . k)``, then the soft cap
  ``cap * tanh(s / cap)`` (``softcap > 0``), then ALiBi ``slope[h] * (j - context_len)``, then
  ``qq_bias[i, j - context_len]`` for the new keys (``j >= context_len``);
* ``sinks[h]`` is one more logit in the softmax denominator with no value;
* ``out = softmax(s) @ v * v_descale``, divided by ``output_scale`` when given (fp8 output,
  saturated to the fp8 range).

Index metadata follows README.md's rule (the kernels' too): ``cu_seqlens_q`` entries are
clamped into ``[0, num_tokens]``, ``seqused_k`` into ``[0, table width x block size]``, keys of an
out-of-range block id are skipped, rows ``i >= max_seqlen_q`` are NaN (when given), a row that sees
no key is 0, and a key a row does not see never reaches it (no ``0 x NaN``).

The KV cache is NHD paged: ``k, v [num_blocks, block_size, Hk, D]``, ``block_table[s, j]`` is the
physical block of logical block ``j``. Computed in fp32 on the host (one sequence at a time; it
syncs, so it is for tests, not CUDA graphs).
"""

from __future__ import annotations

import torch

__all__ = ["unified_attention_ref", "gather_paged_kv", "valid_paged_tokens", "sequence_ranges", "covered_rows"]


def gather_paged_kv(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence from an NHD paged cache: [length, Hk, D] fp32.
    Tokens of an out-of-range block id (negative or past the pool) read as NaN: callers mask them
    (:func:`valid_paged_tokens`)."""
    block_size = cache.shape[1]
    nblocks = -(-length // block_size)
    blocks = block_table_row[:nblocks].long()
    ok = (blocks >= 0) & (blocks < cache.shape[0])
    blocks = torch.where(ok, blocks, torch.zeros_like(blocks))
    if cache.element_size() == 1:  # gather fp8 blocks as bytes: not every build indexes fp8 tensors
        picked = cache.view(torch.uint8)[blocks].view(cache.dtype)
    else:
        picked = cache[blocks]
    picked = picked.float().masked_fill(~ok.view(-1, *([1] * (picked.dim() - 1))), float("nan"))
    return picked.reshape(nblocks * block_size, *cache.shape[2:])[:length]


def valid_paged_tokens(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """[length] bool: the tokens whose block id is in range (the others are skipped)."""
    block_size = cache.shape[1]
    ids = block_table_row[:-(-length // block_size)].long()
    ok = (ids >= 0) & (ids < cache.shape[0])
    return ok.repeat_interleave(block_size)[:length]


def sequence_ranges(cu_seqlens_q, seqused_k, block_table, num_tokens: int, block_size: int) -> list:
    """``(q0, q1, kv_len)`` per sequence after the documented clamps: cu_seqlens_q entries into
    ``[0, num_tokens]`` (``q1 <= q0``: an empty sequence), the KV length into ``[0, table width x
    block size]``."""
    cu = [min(max(int(x), 0), num_tokens) for x in cu_seqlens_q.tolist()]
    cap = block_table.shape[1] * block_size
    return [(cu[s], cu[s + 1], min(max(int(seqused_k[s]), 0), cap)) for s in range(len(cu) - 1)]


def _scalar(t) -> float:
    return 1.0 if t is None else float(t.reshape(-1)[0])


def _masked_pv(probs, allowed, vs):
    """``probs @ vs`` [q, h, d] where keys a row does not see contribute nothing, not 0 x NaN: the
    product with non-finite V values zeroed, and the exact sum over seen keys where a row sees one."""
    bad = ~torch.isfinite(vs)
    out = torch.einsum("hqk,khd->qhd", probs, vs.masked_fill(bad, 0.0))
    if bad.any():
        seen = torch.einsum("qk,khd->qhd", allowed.float(), bad.float()) > 0
        exact = (probs.permute(1, 2, 0)[..., None] * torch.where(allowed[:, :, None, None], vs[None], 0.0)).sum(1)
        out = torch.where(seen, exact, out)
    return out


def unified_attention_ref(q, k, v, cu_seqlens_q, seqused_k, block_table, softmax_scale, window_size=(-1, -1),
                          softcap=0.0, q_descale=None, k_descale=None, v_descale=None, alibi_slopes=None,
                          output_scale=None, qq_bias=None, sinks=None, out_dtype=None,
                          max_seqlen_q=None) -> torch.Tensor:
    """Returns the attention output ``[num_tokens, Hq, D]`` in ``out_dtype`` (default: q's dtype,
    bf16 for an fp8 q). The index rules of the README: cu_seqlens_q entries clamped into
    ``[0, num_tokens]``, KV lengths into ``[0, table width x block size]``, keys of out-of-range
    block ids skipped, rows ``i >= max_seqlen_q`` of a sequence NaN, a row that sees no key 0;
    rows of no sequence are 0."""
    num_tokens, heads_q, _ = q.shape
    heads_kv = k.shape[2]
    group = heads_q // heads_kv
    if out_dtype is None:
        out_dtype = torch.bfloat16 if q.element_size() == 1 else q.dtype
    window = 1 + int(window_size[0]) if int(window_size[0]) >= 0 else 0
    qk_scale = softmax_scale * _scalar(q_descale) * _scalar(k_descale)
    out = torch.zeros(num_tokens, heads_q, v.shape[-1], dtype=torch.float32, device=q.device)
    ranges = sequence_ranges(cu_seqlens_q, seqused_k, block_table, num_tokens, k.shape[1])
    for s, (q0, q1, kv_len) in enumerate(ranges):
        qlen = q1 - q0
        if qlen <= 0:
            continue
        ctx = kv_len - qlen
        ks = gather_paged_kv(k, block_table[s], kv_len).repeat_interleave(group, dim=1)  # [L, Hq, D]
        vs = gather_paged_kv(v, block_table[s], kv_len).repeat_interleave(group, dim=1)
        key_ok = valid_paged_tokens(k, block_table[s], kv_len).to(q.device)
        qs = q[q0:q1].float()
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * qk_scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        qpos = ctx + torch.arange(qlen, device=q.device)
        kpos = torch.arange(kv_len, device=q.device)
        allowed = (kpos[None, :] <= qpos[:, None]) & key_ok[None, :]
        if window > 0:
            allowed &= (qpos[:, None] - kpos[None, :]) < window
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float()[:, None, None] * (kpos - ctx).float()[None, None, :]
        if qq_bias is not None:
            # qq_bias[i, j - ctx] for the new keys (j >= ctx); entries past qq_bias are never seen
            rel = kpos - ctx
            rows = torch.arange(qlen, device=q.device)
            n0, n1 = qq_bias.shape
            inside = (rel[None, :] >= 0) & (rel[None, :] < n1) & (rows[:, None] < n0)
            bias = qq_bias.float()[rows.clamp(max=n0 - 1)[:, None], rel.clamp(0, n1 - 1)[None, :]]
            scores = scores + torch.where(inside, bias, 0.0)[None]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        if sinks is not None:
            scores = torch.cat([scores, sinks.float()[:, None, None].expand(heads_q, qlen, 1)], dim=-1)
        probs = torch.softmax(scores, dim=-1)
        if sinks is not None:
            probs = probs[..., :-1]
        # a row that sees no key (and has no sink) gets 0, not softmax's 0/0
        probs = torch.where(allowed.any(-1)[None, :, None] | (sinks is not None), probs, 0.0)
        res = _masked_pv(probs, allowed, vs)
        if max_seqlen_q is not None and qlen > max_seqlen_q:
            res[max_seqlen_q:] = float("nan")  # rows past the bound: flagged, as the kernel does
        out[q0:q1] = res
    out = out * _scalar(v_descale)
    if output_scale is not None:
        out = out / _scalar(output_scale)
    if out_dtype.itemsize == 1:
        fmax = torch.finfo(out_dtype).max
        out = torch.where(out.isnan(), out, out.clamp(-fmax, fmax))
    return out.to(out_dtype)


def covered_rows(cu_seqlens_q, num_tokens: int) -> torch.Tensor:
    """[num_tokens] bool: the rows that belong to a sequence (after the cu_seqlens_q clamp); the
    kernels leave the others alone."""
    cu = [min(max(int(x), 0), num_tokens) for x in cu_seqlens_q.tolist()]
    rows = torch.zeros(num_tokens, dtype=torch.bool)
    for a, b in zip(cu[:-1], cu[1:]):
        rows[a:max(a, b)] = True
    return rows
