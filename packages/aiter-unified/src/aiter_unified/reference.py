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

The KV cache is NHD paged: ``k, v [num_blocks, block_size, Hk, D]``, ``block_table[s, j]`` is the
physical block of logical block ``j``. Computed in fp32 on the host (one sequence at a time; it
syncs, so it is for tests, not CUDA graphs).
"""

from __future__ import annotations

import torch

__all__ = ["unified_attention_ref", "gather_paged_kv"]


def gather_paged_kv(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence from an NHD paged cache: [length, Hk, D] fp32."""
    block_size = cache.shape[1]
    nblocks = -(-length // block_size)
    blocks = block_table_row[:nblocks].long()
    if cache.element_size() == 1:  # gather fp8 blocks as bytes: not every build indexes fp8 tensors
        picked = cache.view(torch.uint8)[blocks].view(cache.dtype)
    else:
        picked = cache[blocks]
    return picked.reshape(nblocks * block_size, *cache.shape[2:])[:length].float()


def _scalar(t) -> float:
    return 1.0 if t is None else float(t.reshape(-1)[0])


def unified_attention_ref(q, k, v, cu_seqlens_q, seqused_k, block_table, softmax_scale, window_size=(-1, -1),
                          softcap=0.0, q_descale=None, k_descale=None, v_descale=None, alibi_slopes=None,
                          output_scale=None, qq_bias=None, sinks=None, out_dtype=None) -> torch.Tensor:
    """Returns the attention output ``[num_tokens, Hq, D]`` in ``out_dtype`` (default: q's dtype,
    bf16 for an fp8 q)."""
    num_tokens, heads_q, _ = q.shape
    heads_kv = k.shape[2]
    group = heads_q // heads_kv
    if out_dtype is None:
        out_dtype = torch.bfloat16 if q.element_size() == 1 else q.dtype
    window = 1 + int(window_size[0]) if int(window_size[0]) >= 0 else 0
    qk_scale = softmax_scale * _scalar(q_descale) * _scalar(k_descale)
    out = torch.zeros(num_tokens, heads_q, v.shape[-1], dtype=torch.float32, device=q.device)
    cu = [int(x) for x in cu_seqlens_q.tolist()]
    for s in range(len(cu) - 1):
        q0, q1 = cu[s], cu[s + 1]
        qlen = q1 - q0
        if qlen == 0:
            continue
        kv_len = int(seqused_k[s])
        ctx = kv_len - qlen
        ks = gather_paged_kv(k, block_table[s], kv_len).repeat_interleave(group, dim=1)  # [L, Hq, D]
        vs = gather_paged_kv(v, block_table[s], kv_len).repeat_interleave(group, dim=1)
        qs = q[q0:q1].float()
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * qk_scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        qpos = ctx + torch.arange(qlen, device=q.device)
        kpos = torch.arange(kv_len, device=q.device)
        allowed = kpos[None, :] <= qpos[:, None]
        if window > 0:
            allowed &= (qpos[:, None] - kpos[None, :]) < window
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float()[:, None, None] * (kpos - ctx).float()[None, None, :]
        if qq_bias is not None:
            bias = torch.zeros(qlen, kv_len, device=q.device)
            bias[:, ctx:] = qq_bias[:qlen, :qlen].float()
            scores = scores + bias[None]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        if sinks is not None:
            scores = torch.cat([scores, sinks.float()[:, None, None].expand(heads_q, qlen, 1)], dim=-1)
        probs = torch.softmax(scores, dim=-1)
        if sinks is not None:
            probs = probs[..., :-1]
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, vs)
    out = out * _scalar(v_descale)
    if output_scale is not None:
        out = out / _scalar(output_scale)
    if out_dtype.itemsize == 1:
        fmax = torch.finfo(out_dtype).max
        out = out.clamp(-fmax, fmax)
    return out.to(out_dtype)
