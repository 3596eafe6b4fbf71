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

from .checks import DENSE, PADDED_BATCH, PAGED_DENSE_Q

__all__ = [
    "attention_ref",
    "attention_ref_varlen",
    "construct_mask",
    "normalize_window",
    "make_dropout_mask",
    "dropout_mask_from_s_dmask",
    "gather_paged_kv",
    "fwd",
    "bwd",
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


def gather_paged_kv(k_cache, v_cache, block_table, seqlens_k, *, with_valid: bool = False):
    """Packed (Tk, Hk, D) k/v plus int32 cu_seqlens_k from NHD paged caches.

    k_cache/v_cache (num_blocks, page_size, Hk, D); block_table (B, max_blocks) int32;
    seqlens_k (B,) logical lengths. Block ids outside ``[0, num_blocks)`` (negative = padding) are
    the kernels' skip rule (``aiter_core.triton_attn.paged_block_lookup``): with ``with_valid`` their
    keys come back as zeros and a fourth result, a (Tk,) bool tensor, is False for them.
    """
    page_size, num_blocks = k_cache.shape[1], k_cache.shape[0]
    ks, vs, valid = [], [], []
    lens = [int(x) for x in seqlens_k.tolist()]
    for b, n in enumerate(lens):
        pages = block_table[b, : math.ceil(n / page_size)].long()
        ok = (pages >= 0) & (pages < num_blocks)
        pages = pages.clamp(0, max(num_blocks - 1, 0))
        tok_ok = ok.repeat_interleave(page_size)[:n]
        kb = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n]
        vb = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n]
        ks.append(torch.where(tok_ok[:, None, None], kb, torch.zeros_like(kb)))
        vs.append(torch.where(tok_ok[:, None, None], vb, torch.zeros_like(vb)))
        valid.append(tok_ok)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=k_cache.device)
    cu[1:] = torch.cumsum(torch.tensor(lens, device=k_cache.device), 0).to(torch.int32)
    if with_valid:
        return torch.cat(ks), torch.cat(vs), cu, torch.cat(valid)
    return torch.cat(ks), torch.cat(vs), cu


# -- the reference backend: an op's Call in, the op's outputs out ------------------------------------
#
# Dropout: the reference draws its keep-mask with torch.rand from a generator seeded by
# rng_state, so a forward and its backward agree; the stream differs from the Triton kernel's
# Philox stream (both are reproducible for a given rng_state).


def _keep_generator(rng_state, device):
    seed, offset = (int(x) for x in rng_state.tolist())
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + offset) % (2**63 - 1))
    return gen


def _per_seq_descale(descale, b, batch, heads_kv):
    if descale is None:
        return None
    return descale.reshape(1) if descale.numel() == 1 else descale.reshape(batch, heads_kv)[b : b + 1]


def _ints(t):
    return [int(x) for x in t.tolist()]


class _Segments:
    """Per-sequence row ranges of a packed (thd) problem: logical lengths and physical starts."""

    def __init__(self, cu_q, cu_k, starts_q=None, starts_k=None):
        self.cu_q, self.cu_k = _ints(cu_q), _ints(cu_k)
        self.start_q = self.cu_q if starts_q is None else _ints(starts_q)
        self.start_k = self.cu_k if starts_k is None else _ints(starts_k)
        self.batch = len(self.cu_q) - 1

    def __iter__(self):
        for b in range(self.batch):
            sq = self.cu_q[b + 1] - self.cu_q[b]
            sk = self.cu_k[b + 1] - self.cu_k[b]
            yield b, self.start_q[b], sq, self.start_k[b], sk


def _score_kwargs(call) -> dict:
    return dict(softmax_scale=call.softmax_scale, causal=call.causal,
                window=(call.window_left, call.window_right, call.sink_size), softcap=call.softcap, sink=call.sink,
                dropout_p=call.dropout_p)


def _pack(x):
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _starts(batch: int, seqlen: int, device):
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen


def _padded_batch_segments(call, batch, seqlen_q, seqlen_k, device):
    starts_q, starts_k = _starts(batch, seqlen_q, device), _starts(batch, seqlen_k, device)
    cu_q = starts_q if call.cu_seqlens_q is None else call.cu_seqlens_q
    cu_k = starts_k if call.cu_seqlens_k is None else call.cu_seqlens_k
    return _Segments(cu_q, cu_k, starts_q, starts_k), cu_q


def _sequences(seg, kw, rng_state, heads_q, alibi_slopes, device):
    """(b, q0, sq, k0, sk, dropout keep-mask or None, ALiBi slopes) of each non-empty sequence;
    keep-masks are drawn for every sequence (empty ones too), so a forward and its backward agree."""
    gen = _keep_generator(rng_state, device) if kw["dropout_p"] > 0 else None
    for b, q0, sq, k0, sk in seg:
        keep = make_dropout_mask((1, heads_q, sq, sk), kw["dropout_p"], generator=gen, device=device) \
            if gen is not None else None
        if sq == 0:
            continue
        slopes = alibi_slopes[b] if (alibi_slopes is not None and alibi_slopes.dim() == 2) else alibi_slopes
        yield b, q0, sq, k0, sk, keep, slopes


def _packed_fwd(q, k, v, seg, *, max_seqlen_k, kw, alibi_slopes, bias, descales, rng_state, want_mask, out_dtype,
                key_valid=None):
    """Packed forward, one sequence at a time. Returns (out (Tq,Hq,Dv), lse (Hq,Tq), s_dmask or None)."""
    total_q, heads_q = q.shape[0], q.shape[1]
    heads_kv = k.shape[1]
    q_descale, k_descale, v_descale = descales
    out = torch.zeros(total_q, heads_q, v.shape[-1], dtype=out_dtype, device=q.device)
    lse = torch.full((heads_q, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    s_dmask = torch.zeros(heads_q, total_q, max_seqlen_k, dtype=torch.float32, device=q.device) if want_mask else None
    for b, q0, sq, k0, sk, keep, slopes in _sequences(seg, kw, rng_state, heads_q, alibi_slopes, q.device):
        b_bias = None if bias is None else bias[:sq, :sk]
        if key_valid is not None:  # keys of invalid paged blocks are skipped
            skip = torch.where(key_valid[k0 : k0 + sk], 0.0, float("-inf"))[None, :].expand(sq, sk)
            b_bias = skip if b_bias is None else b_bias.float() + skip
        o_b, p_b, lse_b = attention_ref(
            q[q0 : q0 + sq].unsqueeze(0), k[k0 : k0 + sk].unsqueeze(0), v[k0 : k0 + sk].unsqueeze(0),
            alibi_slopes=slopes, bias=b_bias, dropout_mask=keep,
            q_descale=_per_seq_descale(q_descale, b, seg.batch, heads_kv),
            k_descale=_per_seq_descale(k_descale, b, seg.batch, heads_kv),
            v_descale=_per_seq_descale(v_descale, b, seg.batch, heads_kv), out_dtype=out_dtype, **kw,
        )
        out[q0 : q0 + sq] = o_b[0]
        lse[:, q0 : q0 + sq] = lse_b[0]
        if want_mask:
            p = p_b[0].float()
            s_dmask[:, q0 : q0 + sq, :sk] = torch.where(keep[0], p, -p)
    return out, lse, s_dmask


def fwd(call):
    """The reference backend of every forward op."""
    from .ops import fwd_result, rng_states

    q, k, v = call.q, call.k, call.v
    descales = (call.q_descale, call.k_descale, call.v_descale)
    if call.quantize:
        from .fp8 import quantize_call

        q, k, v, *descales = quantize_call(call)
    layout = call.layout
    rng_state, rng_out = rng_states(call, q.device)
    kw = _score_kwargs(call)
    want_mask = call.return_dropout_mask
    common = dict(kw=kw, alibi_slopes=call.alibi_slopes, bias=call.bias, descales=descales, rng_state=rng_state,
                  want_mask=want_mask, out_dtype=call.out_dtype)
    if layout == DENSE:
        batch, seqlen_q, heads_q, _ = q.shape
        seqlen_k = k.shape[1]
        keep = None
        if call.dropout_p > 0:
            keep = make_dropout_mask((batch, heads_q, seqlen_q, seqlen_k), call.dropout_p,
                                     generator=_keep_generator(rng_state, q.device), device=q.device)
        out, p, lse = attention_ref(q, k, v, alibi_slopes=call.alibi_slopes, bias=call.bias, dropout_mask=keep,
                                    q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
                                    out_dtype=call.out_dtype, **kw)
        s_dmask = torch.where(keep, p.float(), -p.float()) if want_mask else None
    elif layout == PADDED_BATCH:
        batch, seqlen_q, heads_q, _ = q.shape
        seqlen_k = k.shape[1]
        seg, _ = _padded_batch_segments(call, batch, seqlen_q, seqlen_k, q.device)
        out, lse, s_dmask = _packed_fwd(_pack(q), _pack(k), _pack(v), seg, max_seqlen_k=seqlen_k, **common)
        out = out.reshape(batch, seqlen_q, heads_q, -1)
        lse = lse.reshape(heads_q, batch, seqlen_q).permute(1, 0, 2).contiguous()
        if s_dmask is not None:
            s_dmask = s_dmask.reshape(heads_q, batch, seqlen_q, seqlen_k).permute(1, 0, 2, 3).contiguous()
    elif layout == PAGED_DENSE_Q:  # flash_attn_with_kvcache
        from .kvcache import prepare

        q, lens, table = prepare(call)
        batch, seqlen_q, heads_q, _ = q.shape
        k, v, cu_k, valid = gather_paged_kv(k, v, table, lens, with_valid=True)
        cu_q = _starts(batch, seqlen_q, q.device)
        out, lse, s_dmask = _packed_fwd(_pack(q), k, v, _Segments(cu_q, cu_k), max_seqlen_k=call.max_seqlen_k,
                                        key_valid=valid, **common)
        out = out.reshape(batch, seqlen_q, heads_q, -1)
        lse = lse.reshape(heads_q, batch, seqlen_q).permute(1, 0, 2).contiguous()
    else:  # PACKED, maybe paged
        starts_k, valid, cu_k = call.seqstart_k, None, call.cu_seqlens_k
        if call.block_table is not None:
            lens_k = call.seqlens_k if call.seqlens_k is not None else cu_k[1:] - cu_k[:-1]
            k, v, cu_k, valid = gather_paged_kv(k, v, call.block_table, lens_k, with_valid=True)
            starts_k = None
        out, lse, s_dmask = _packed_fwd(q, k, v, _Segments(call.cu_seqlens_q, cu_k, call.seqstart_q, starts_k),
                                        max_seqlen_k=call.max_seqlen_k, key_valid=valid, **common)
    if call.out is not None:
        call.out.copy_(out)
        out = call.out
    else:
        out = out.contiguous()
    if s_dmask is not None:
        s_dmask = s_dmask.contiguous()
    return fwd_result(call, out, lse.contiguous(), s_dmask, rng_out)


def _attention_grads(q, k, v, dout, *, kw, alibi_slopes, bias, keep):
    """Closed-form gradients of :func:`attention_ref` for one dense (bshd) problem, in fp32.

    Written out rather than taken from autograd so it also runs where autograd does not record
    (inside another op's kernel, under dispatch modes). Returns (dq, dk, dv, dsink, dbias).
    With P the softmax probabilities (sink column excluded), keep/(1-p) the dropout scaling:
    dV = Pd^T dO; dP = (dO V^T) * keep/(1-p); D = rowsum(P * dP) = rowsum(dO * O);
    dS = P * (dP - D); dsink_h = -sum P_sink * D; softcap chain rule 1 - tanh^2; dQ = scale dS K.
    """
    scale, cap, p_drop, sink = kw["softmax_scale"], kw["softcap"], kw["dropout_p"], kw["sink"]
    batch, seqlen_q, heads_q, dim_qk = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    _, probs, lse = attention_ref(q, k, v, alibi_slopes=alibi_slopes, bias=bias, dropout_mask=keep, **kw)
    probs = probs.float()
    qf, do = q.float(), dout.float()
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    drop_scale = None if p_drop <= 0 else keep.float() / (1.0 - p_drop)
    p_out = probs if drop_scale is None else probs * drop_scale
    dv = torch.einsum("bhts,bthd->bshd", p_out, do)
    dp = torch.einsum("bthd,bshd->bhts", do, vf)
    if drop_scale is not None:
        dp = dp * drop_scale
    delta = (probs * dp).sum(-1, keepdim=True)
    ds = probs * (dp - delta)
    dbias = ds.sum(dim=(0, 1)) if bias is not None else None
    dsink = None
    if sink is not None:
        p_sink = torch.exp(sink.float()[None, :, None] - lse)  # lse = -inf (empty row) gives 0
        dsink = -(p_sink * delta.squeeze(-1)).sum(dim=(0, 2))
    if cap and cap > 0:
        raw = torch.einsum("bthd,bshd->bhts", qf, kf) * scale
        ds = ds * (1.0 - torch.tanh(raw / cap) ** 2)
    dq = torch.einsum("bhts,bshd->bthd", ds, kf) * scale
    dk = torch.einsum("bhts,bthd->bshd", ds, qf) * scale
    dk = dk.reshape(batch, seqlen_k, heads_kv, group, dim_qk).sum(3)
    dv = dv.reshape(batch, seqlen_k, heads_kv, group, v.shape[-1]).sum(3)
    return dq, dk, dv, dsink, dbias


def _packed_bwd(dout, q, k, v, seg, *, kw, alibi_slopes, bias, rng_state, compute_dbias):
    """Packed backward, one sequence at a time: (dq, dk, dv, dsink fp32 or None, dbias fp32 or None)."""
    heads_q = q.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    # fp32 accumulators: keys shared by no two sequences, but GQA/bias/sink sums are accumulated
    dq, dk, dv = torch.zeros(q.shape, **f32), torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32)
    dsink = torch.zeros(heads_q, **f32) if kw["sink"] is not None else None
    dbias = torch.zeros(bias.shape, **f32) if compute_dbias else None
    for b, q0, sq, k0, sk, keep, slopes in _sequences(seg, kw, rng_state, heads_q, alibi_slopes, q.device):
        gq, gk, gv, gs, gb = _attention_grads(
            q[q0 : q0 + sq].unsqueeze(0), k[k0 : k0 + sk].unsqueeze(0), v[k0 : k0 + sk].unsqueeze(0),
            dout[q0 : q0 + sq].unsqueeze(0), kw=kw, alibi_slopes=slopes,
            bias=None if bias is None else bias[:sq, :sk], keep=keep,
        )
        dq[q0 : q0 + sq] = gq[0]
        dk[k0 : k0 + sk] += gk[0]
        dv[k0 : k0 + sk] += gv[0]
        if dsink is not None:
            dsink += gs
        if dbias is not None:
            dbias[:sq, :sk] += gb
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsink, dbias


def _delta(dout, out):
    return (dout.float() * out.float()).sum(-1)


def bwd(call):
    """The reference backend of both backward ops."""
    from .ops import bwd_result

    q, k, v, dout, out = call.q, call.k, call.v, call.dout, call.out
    if call.zero_tensors:
        for buf in (call.dq, call.dk, call.dv):
            if buf is not None:
                buf.zero_()
    kw = _score_kwargs(call)
    compute_dbias = call.dbias is not None
    layout = call.layout
    if layout == DENSE:
        batch, seqlen_q, heads_q, _ = q.shape
        keep = None
        if call.dropout_p > 0:
            keep = make_dropout_mask((batch, heads_q, seqlen_q, k.shape[1]), call.dropout_p,
                                     generator=_keep_generator(call.rng_state, q.device), device=q.device)
        gq, gk, gv, gs, gb = _attention_grads(q, k, v, dout, kw=kw, alibi_slopes=call.alibi_slopes, bias=call.bias,
                                              keep=keep)
        gq, gk, gv = gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)
        delta = _delta(dout, out).transpose(1, 2).contiguous()
    elif layout == PADDED_BATCH:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seg, _ = _padded_batch_segments(call, batch, seqlen_q, k.shape[1], q.device)
        gq, gk, gv, gs, gb = _packed_bwd(_pack(dout), _pack(q), _pack(k), _pack(v), seg, kw=kw,
                                         alibi_slopes=call.alibi_slopes, bias=call.bias, rng_state=call.rng_state,
                                         compute_dbias=compute_dbias)
        gq, gk, gv = gq.reshape(q.shape), gk.reshape(k.shape), gv.reshape(v.shape)
        delta = _delta(dout, out).transpose(1, 2).contiguous()
    else:  # PACKED
        seg = _Segments(call.cu_seqlens_q, call.cu_seqlens_k, call.seqstart_q, call.seqstart_k)
        gq, gk, gv, gs, gb = _packed_bwd(dout, q, k, v, seg, kw=kw, alibi_slopes=call.alibi_slopes, bias=call.bias,
                                         rng_state=call.rng_state, compute_dbias=compute_dbias)
        delta = _delta(dout, out).transpose(0, 1).contiguous()
    grads = []
    for given, g in ((call.dq, gq), (call.dk, gk), (call.dv, gv)):
        if given is not None:
            given.copy_(g)
        grads.append(given if given is not None else g.contiguous())
    if call.d_sink is not None:
        call.d_sink.copy_(gs)
    if compute_dbias:
        call.dbias.copy_(gb)
    return bwd_result(call, *grads, delta)
