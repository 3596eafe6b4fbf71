"""PyTorch reference for flash attention: the oracle for every kernel test and the CPU fallback.

FlashAttention-2 style golden model (semantics in notes/mha_contract.md):

* scores ``s = softmax_scale * q.k`` (fp8: times ``q_descale * k_descale``), then softcap
  ``cap * tanh(s / cap)``, then ``+ bias[i, j]``, then ALiBi ``- slope * |i + Sk - Sq - j|``;
* bottom-right aligned masks: causal, sliding window ``(left, right, sink_size)`` where the first
  ``sink_size`` keys stay visible (still bounded by the right edge);
* attention-sink logits (one per query head) enter only the softmax denominator;
* rows with no visible key and no sink give ``out = 0`` and ``lse = -inf``; their gradients are 0;
* dropout uses an explicit keep-mask (True = kept) and scales kept probabilities by ``1/(1-p)``.

Everything is differentiable through autograd (q, k, v, bias, sink), which gives the gradient
oracle for the backward kernels.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention_ref",
    "attention_ref_varlen",
    "construct_mask",
    "normalize_window",
    "make_dropout_mask",
    "dropout_mask_from_s_dmask",
    "gather_paged_kv",
]

_FP8_DTYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


def normalize_window(window, seqlen_k: int, causal: bool) -> tuple[int, int, int]:
    """(left, right, sink_size) with values >= seqlen_k turned into -1 and causal => right = 0."""
    if len(window) == 2:
        left, right, sink_size = window[0], window[1], 0
    else:
        left, right, sink_size = window
    left = -1 if left is None or left < 0 or left >= seqlen_k else int(left)
    right = -1 if right is None or right < 0 or right >= seqlen_k else int(right)
    if causal:
        right = 0
    return left, right, max(int(sink_size or 0), 0)


def construct_mask(seqlen_q: int, seqlen_k: int, *, causal: bool = False, window=(-1, -1, 0),
                   device=None, window_norm_len: int | None = None) -> torch.Tensor:
    """Bool (seqlen_q, seqlen_k), True where key j is visible to query i (bottom-right aligned).

    Window values >= window_norm_len (default seqlen_k) count as unbounded.
    """
    norm_len = seqlen_k if window_norm_len is None else window_norm_len
    left, right, sink_size = normalize_window(window, norm_len, causal)
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    diag = i + seqlen_k - seqlen_q  # key index aligned with query i
    right_ok = torch.ones_like(j, dtype=torch.bool) if right < 0 else (j <= diag + right)
    left_ok = torch.ones_like(j, dtype=torch.bool) if left < 0 else (j >= diag - left)
    sink_ok = j < sink_size
    return right_ok & (left_ok | sink_ok)


def make_dropout_mask(shape, dropout_p: float, *, generator=None, device=None) -> torch.Tensor:
    """Random keep-mask (True = kept) with keep probability 1 - dropout_p."""
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def dropout_mask_from_s_dmask(s_dmask: torch.Tensor) -> torch.Tensor:
    """Keep-mask from a kernel's S_dmask: dropped entries carry a negative sign (also -0.0)."""
    return ~torch.signbit(s_dmask)


def _expand_descale(descale, batch: int, heads_kv: int, device) -> torch.Tensor | None:
    if descale is None:
        return None
    d = torch.as_tensor(descale, dtype=torch.float32, device=device)
    if d.numel() == 1:
        return d.reshape(1, 1).expand(batch, heads_kv)
    return d.reshape(batch, heads_kv)


def attention_ref(q, k, v, *, softmax_scale=None, causal=False, window=(-1, -1, 0),
                  alibi_slopes=None, bias=None, sink=None, softcap=0.0, dropout_p=0.0,
                  dropout_mask=None, upcast=True, reorder_ops=False, q_descale=None,
                  k_descale=None, v_descale=None, out_dtype=None, window_norm_len=None):
    """Dense (bshd) attention.

    q (B, Sq, Hq, Dq), k (B, Sk, Hk, Dq), v (B, Sk, Hk, Dv). Returns
    ``(out (B, Sq, Hq, Dv), attn_probs (B, Hq, Sq, Sk), lse (B, Hq, Sq) fp32)``.
    ``attn_probs`` are the normalised probabilities before dropout (sink column dropped).
    ``upcast=True`` computes in fp32 (the oracle), ``False`` in the input dtype.
    ``reorder_ops`` scales q before the product (the low-precision variant FA tests use).
    ``out_dtype`` defaults to q's dtype (bf16 for fp8 inputs). ``window_norm_len``: the key
    length window values are normalised against (default Sk; varlen passes max_seqlen_k).
    """
    batch, seqlen_q, heads_q, dim_qk = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    if heads_q % heads_kv != 0:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of k heads ({heads_kv})")
    group = heads_q // heads_kv
    is_fp8 = q.dtype in _FP8_DTYPES
    if out_dtype is None:
        out_dtype = torch.bfloat16 if is_fp8 else q.dtype
    if softmax_scale is None:
        softmax_scale = dim_qk ** -0.5
    if dropout_p > 0.0 and dropout_mask is None:
        raise ValueError("dropout_mask: required when dropout_p > 0 (use make_dropout_mask)")

    compute_dtype = torch.float32 if (upcast or is_fp8) else q.dtype
    qc, kc, vc = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    if group > 1:
        kc = kc.repeat_interleave(group, dim=2)
        vc = vc.repeat_interleave(group, dim=2)

    if reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", qc * softmax_scale, kc)
    else:
        scores = torch.einsum("bthd,bshd->bhts", qc, kc) * softmax_scale

    qd = _expand_descale(q_descale, batch, heads_kv, q.device)
    kd = _expand_descale(k_descale, batch, heads_kv, q.device)
    vd = _expand_descale(v_descale, batch, heads_kv, q.device)
    if qd is not None or kd is not None:
        factor = torch.ones(batch, heads_kv, device=q.device)
        if qd is not None:
            factor = factor * qd
        if kd is not None:
            factor = factor * kd
        factor = factor.repeat_interleave(group, dim=1).to(scores.dtype)
        scores = scores * factor[:, :, None, None]

    if softcap and softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32)
        slopes = slopes.reshape(1, heads_q) if slopes.dim() == 1 else slopes.reshape(batch, heads_q)
        i = torch.arange(seqlen_q, device=q.device).unsqueeze(1)
        j = torch.arange(seqlen_k, device=q.device).unsqueeze(0)
        dist = (i + seqlen_k - seqlen_q - j).abs().to(torch.float32)
        scores = scores + (-slopes[:, :, None, None] * dist).to(scores.dtype)

    visible = construct_mask(seqlen_q, seqlen_k, causal=causal, window=window, device=q.device,
                             window_norm_len=window_norm_len)
    scores = scores.masked_fill(~visible, float("-inf"))

    if sink is not None:
        sink_col = sink.to(scores.dtype).reshape(1, heads_q, 1, 1).expand(batch, heads_q, seqlen_q, 1)
        scores_all = torch.cat([scores, sink_col], dim=-1)
    else:
        scores_all = scores
    # Softmax by hand so that fully masked rows give 0 (and zero gradients), never NaN.
    row_max = scores_all.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    expd = torch.exp(scores_all - row_max)
    denom = expd.sum(dim=-1, keepdim=True)
    empty = denom == 0
    probs_all = expd / torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, torch.full_like(denom, float("-inf")),
                      row_max + torch.log(torch.where(empty, torch.ones_like(denom), denom)))
    lse = lse.squeeze(-1).float()
    probs = probs_all[..., :seqlen_k] if sink is not None else probs_all

    if dropout_p > 0.0:
        keep = dropout_mask.to(torch.bool)
        probs_dropped = probs.masked_fill(~keep, 0.0) * (1.0 / (1.0 - dropout_p))
    else:
        probs_dropped = probs
    out = torch.einsum("bhts,bshd->bthd", probs_dropped.to(vc.dtype), vc)
    if vd is not None:
        out = out * vd.repeat_interleave(group, dim=1).to(out.dtype)[:, None, :, None]
    return out.to(out_dtype), probs.to(compute_dtype), lse


def attention_ref_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, seqstart_q=None, seqstart_k=None,
                         alibi_slopes=None, bias=None, dropout_mask=None, q_descale=None,
                         k_descale=None, v_descale=None, out_dtype=None, **kwargs):
    """Packed (thd) attention, one sequence at a time.

    q (Tq, Hq, Dq), k (Tk, Hk, Dq), v (Tk, Hk, Dv); int cu_seqlens_q/k (B+1) hold logical
    lengths; seqstart_q/k (B+1), when given, are the physical row offsets (padded varlen).
    Per-sequence slicing: alibi (B, Hq) -> row b; bias (max_sq, max_sk) -> bias[:sq, :sk];
    dropout_mask (Hq, Tq, max_sk) -> rows of the sequence, [:sk] columns; descales (B, Hk) -> row b.
    Returns ``(out (Tq, Hq, Dv), lse (Hq, Tq) fp32)``; rows outside every sequence (padding)
    are 0 with lse -inf.
    """
    cu_q = [int(x) for x in cu_seqlens_q.tolist()]
    cu_k = [int(x) for x in cu_seqlens_k.tolist()]
    start_q = cu_q if seqstart_q is None else [int(x) for x in seqstart_q.tolist()]
    start_k = cu_k if seqstart_k is None else [int(x) for x in seqstart_k.tolist()]
    is_fp8 = q.dtype in _FP8_DTYPES
    if out_dtype is None:
        out_dtype = torch.bfloat16 if is_fp8 else q.dtype
    heads_q, heads_kv = q.shape[1], k.shape[1]
    batch = len(cu_q) - 1
    out = torch.zeros(q.shape[0], heads_q, v.shape[-1], dtype=out_dtype, device=q.device)
    lse = torch.full((heads_q, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)

    def per_seq(descale, b):
        if descale is None:
            return None
        d = torch.as_tensor(descale, dtype=torch.float32, device=q.device)
        return d.reshape(1) if d.numel() == 1 else d.reshape(batch, heads_kv)[b:b + 1]

    # window values are normalised against the longest key sequence (as the kernels and
    # upstream's host code do), not per sequence
    max_sk = max((cu_k[b + 1] - cu_k[b] for b in range(batch)), default=0)
    kwargs.setdefault("window_norm_len", max_sk)
    for b in range(batch):
        sq, sk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        q0, k0 = start_q[b], start_k[b]
        if sq == 0:
            continue
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        b_bias = None if bias is None else bias[:sq, :sk]
        b_mask = None if dropout_mask is None else dropout_mask[:, q0:q0 + sq, :sk].unsqueeze(0)
        o_b, _, lse_b = attention_ref(
            q[q0:q0 + sq].unsqueeze(0), k[k0:k0 + sk].unsqueeze(0), v[k0:k0 + sk].unsqueeze(0),
            alibi_slopes=slopes, bias=b_bias, dropout_mask=b_mask,
            q_descale=per_seq(q_descale, b), k_descale=per_seq(k_descale, b),
            v_descale=per_seq(v_descale, b), out_dtype=out_dtype, **kwargs)
        out[q0:q0 + sq] = o_b[0]
        lse[:, q0:q0 + sq] = lse_b[0]
    return out, lse


def gather_paged_kv(k_cache, v_cache, block_table, seqlens_k):
    """Packed (Tk, Hk, D) k/v plus int32 cu_seqlens_k from NHD paged caches.

    k_cache/v_cache (num_blocks, page_size, Hk, D); block_table (B, max_blocks) int32;
    seqlens_k (B,) logical lengths.
    """
    page_size = k_cache.shape[1]
    ks, vs = [], []
    lens = [int(x) for x in seqlens_k.tolist()]
    for b, n in enumerate(lens):
        pages = block_table[b, : math.ceil(n / page_size)].long()
        ks.append(k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n])
        vs.append(v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n])
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=k_cache.device)
    cu[1:] = torch.cumsum(torch.tensor(lens, device=k_cache.device), 0).to(torch.int32)
    return torch.cat(ks), torch.cat(vs), cu
