"""Backends of the MHA ops, as registered with ``aiter_core``'s registry, and their adaptors.

Two backends implement each of ``mha_fwd``, ``mha_varlen_fwd``, ``mha_bwd``, ``mha_varlen_bwd``:

* ``triton`` (priority 100): the kernels in :mod:`aiter_mha.triton`. Runs on CUDA/ROCm devices,
  or on CPU tensors when ``TRITON_INTERPRET=1`` (how CI exercises the kernels).
* ``reference`` (priority 0): :mod:`aiter_mha.reference` in PyTorch, on any device.

Importing this module is cheap (no torch, no Triton): the entry points ``aiter.backends`` ->
:func:`backend_specs` and ``aiter.families`` -> :data:`family` only describe. The adaptors
(``triton_*`` / ``reference_*``) import their dependencies on first call. Every adaptor takes the
op's arguments as keywords and returns ``(out, lse, s_dmask)`` for forward ops and
``(dq, dk, dv, delta, dsink, dbias)`` for backward ops; ``aiter_mha.ops`` normalises the rest.
"""

from __future__ import annotations

from aiter_core.registry import (
    BackendSpec,
    Family,
    reference_specs,
    specs_for,
    triton_available,
    triton_device_reasons,
    triton_dtype_reasons,
)

OPS = ("mha_fwd", "mha_varlen_fwd", "mha_bwd", "mha_varlen_bwd")
TRITON_PRIORITY = 100
REFERENCE_PRIORITY = 0
MAX_HEAD_DIM = 256

__all__ = ["OPS", "backend_specs", "family", "triton_supports"]


# -- support checks -----------------------------------------------------------------------------


def triton_supports(problem) -> list[str]:
    """Why the Triton kernels cannot run ``problem`` (empty list: they can)."""
    import torch

    reasons = list(triton_device_reasons(problem.device))
    interpreted = problem.device_type == "cpu"
    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if problem.fp8:
        if problem.dtype != torch.float8_e4m3fn:
            reasons.append(f"fp8 dtype {problem.dtype} is not supported (only float8_e4m3fn)")
        if problem.backward:
            reasons.append("fp8 has no backward")
    elif problem.dtype not in allowed:
        reasons.append(f"dtype {problem.dtype} is not supported (fp16, bf16, fp32, fp8 e4m3fn)")
    reasons += triton_dtype_reasons(problem.device, [problem.dtype])
    if interpreted and problem.fp8:
        # the fp8 kernel multiplies P and V in bf16, and bf16 tl.dot is silently wrong when interpreted
        reasons.append("fp8 is not supported by the Triton interpreter (its bf16 tl.dot is wrong there)")
    for name, d in (("q/k", problem.head_dim_qk), ("v", problem.head_dim_v)):
        if d > MAX_HEAD_DIM:
            reasons.append(f"{name} head dim {d} > {MAX_HEAD_DIM}")
    if problem.backward and problem.paged:
        reasons.append("paged KV has no backward")
    return reasons


def backend_specs() -> list[BackendSpec]:
    """Entry point ``aiter.backends`` -> ``mha``: every backend of every MHA op."""
    triton = specs_for(OPS, backend="triton", impl="aiter_mha.backends:triton_{op}", priority=TRITON_PRIORITY,
                       available=triton_available, supports=triton_supports, cuda_graph=True,
                       description="Triton flash attention (CUDA/ROCm; CPU under TRITON_INTERPRET=1)")
    return triton + reference_specs(OPS, "aiter_mha.backends", priority=REFERENCE_PRIORITY)


family = Family(name="mha", distribution="aiter-mha", smoke="aiter_mha.smoke:run", bench="aiter_mha.bench:main", ops=OPS)


# -- helpers shared by the adaptors ---------------------------------------------------------------


def _seq_starts(batch: int, stride: int, device):
    import torch

    return torch.arange(0, (batch + 1) * stride, stride, dtype=torch.int32, device=device)


def _lengths(cu):
    return cu[1:] - cu[:-1]


def _pack(x):
    """(B, S, H, D) -> (B*S, H, D); a view when the batch and sequence dims are mergeable."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _lse_dense_from_packed(lse_packed, batch: int, seqlen: int, cu_q):
    """(H, B*S) packed LSE of a padded batch -> (B, H, S), -inf past each sequence's length."""
    import torch

    lse = lse_packed.reshape(lse_packed.shape[0], batch, seqlen).permute(1, 0, 2).contiguous()
    past = torch.arange(seqlen, device=lse.device)[None, :] >= _lengths(cu_q).to(torch.int64)[:, None]
    return lse.masked_fill(past[:, None, :], float("-inf"))


def _lse_packed_from_dense(lse, batch: int, seqlen: int):
    return lse.permute(1, 0, 2).reshape(lse.shape[1], batch * seqlen).contiguous()


def _padded_batch_cu(cu_q, cu_k, batch: int, seqlen_q: int, seqlen_k: int, device):
    starts_q = _seq_starts(batch, seqlen_q, device)
    starts_k = _seq_starts(batch, seqlen_k, device)
    return (starts_q if cu_q is None else cu_q), (starts_k if cu_k is None else cu_k), starts_q, starts_k


# -- triton adaptors ----------------------------------------------------------------------------


def triton_mha_fwd(*, q, k, v, dropout_p, softmax_scale, is_causal, window_size_left, window_size_right, sink_size,
                   return_softmax_lse, return_dropout_randval, cu_seqlens_q, cu_seqlens_kv, out, bias, alibi_slopes,
                   q_descale, k_descale, v_descale, sink_ptr, rng_state, logits_soft_cap):
    import torch

    from .triton.fwd import flash_fwd

    common = dict(
        softmax_scale=softmax_scale, causal=is_causal, window=(window_size_left, window_size_right, sink_size),
        alibi_slopes=alibi_slopes, bias=bias, sink=sink_ptr, softcap=logits_soft_cap, dropout_p=dropout_p,
        rng_state=rng_state, return_dropout_mask=return_dropout_randval, q_descale=q_descale, k_descale=k_descale,
        v_descale=v_descale, return_lse=True,
    )
    if cu_seqlens_q is None and cu_seqlens_kv is None:
        o, lse, s_dmask = flash_fwd(q, k, v, out=out, **common)
        return o, lse, s_dmask
    # Per-batch logical lengths inside a padded bshd batch: run it as padded varlen.
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k = k.shape[1]
    cu_q, cu_k, starts_q, starts_k = _padded_batch_cu(cu_seqlens_q, cu_seqlens_kv, batch, seqlen_q, seqlen_k, q.device)
    out_dtype = out.dtype if out is not None else (torch.bfloat16 if q.element_size() == 1 else q.dtype)
    o_packed = torch.zeros(batch * seqlen_q, heads_q, v.shape[-1], dtype=out_dtype, device=q.device)
    o_packed, lse, s_dmask = flash_fwd(
        _pack(q), _pack(k), _pack(v), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=seqlen_q,
        max_seqlen_k=seqlen_k, seqstart_q=starts_q, seqstart_k=starts_k, out=o_packed, **common,
    )
    o = o_packed.reshape(batch, seqlen_q, heads_q, -1)
    lse = _lse_dense_from_packed(lse, batch, seqlen_q, cu_q)
    if s_dmask is not None:
        s_dmask = s_dmask.reshape(heads_q, batch, seqlen_q, -1).permute(1, 0, 2, 3)
    return o, lse, s_dmask


def triton_mha_varlen_fwd(*, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                          softmax_scale, logits_soft_cap, is_causal, window_size_left, window_size_right, sink_size,
                          return_softmax_lse, return_dropout_randval, out, block_table, bias, alibi_slopes, q_descale,
                          k_descale, v_descale, rng_state, cu_seqlens_q_padded, cu_seqlens_k_padded, sink_ptr,
                          seqlens_k):
    from .triton.fwd import flash_fwd

    return flash_fwd(
        q, k, v, softmax_scale=softmax_scale, causal=is_causal, window=(window_size_left, window_size_right, sink_size),
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        seqstart_q=cu_seqlens_q_padded, seqstart_k=cu_seqlens_k_padded, block_table=block_table, seqlens_k=seqlens_k,
        alibi_slopes=alibi_slopes, bias=bias, sink=sink_ptr, softcap=logits_soft_cap, dropout_p=dropout_p,
        rng_state=rng_state, return_dropout_mask=return_dropout_randval, q_descale=q_descale, k_descale=k_descale,
        v_descale=v_descale, out=out, return_lse=True,
    )


def _bwd_result(result, compute_dsink, compute_dbias):
    dq, dk, dv, delta, dsink, dbias = result
    return dq, dk, dv, delta, (dsink if compute_dsink else None), (dbias if compute_dbias else None)


def triton_mha_bwd(*, dout, q, k, v, out, softmax_lse, dropout_p, softmax_scale, is_causal, window_size_left,
                   window_size_right, deterministic, dq, dk, dv, bias, alibi_slopes, rng_state, sink, sink_size,
                   logits_soft_cap, cu_seqlens_q, cu_seqlens_kv, compute_dsink, compute_dbias):
    import torch

    from .triton.bwd import flash_bwd

    common = dict(
        softmax_scale=softmax_scale, causal=is_causal, window=(window_size_left, window_size_right, sink_size),
        alibi_slopes=alibi_slopes, bias=bias, sink=sink, softcap=logits_soft_cap, dropout_p=dropout_p,
        rng_state=rng_state, deterministic=deterministic, compute_dbias=compute_dbias,
    )
    if cu_seqlens_q is None and cu_seqlens_kv is None:
        return _bwd_result(flash_bwd(dout, q, k, v, out, softmax_lse, dq=dq, dk=dk, dv=dv, **common),
                           compute_dsink, compute_dbias)
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k = k.shape[1]
    cu_q, cu_k, starts_q, starts_k = _padded_batch_cu(cu_seqlens_q, cu_seqlens_kv, batch, seqlen_q, seqlen_k, q.device)
    # Padding rows/keys are never touched by the kernel: start from zeros so they get zero gradients.
    gq = torch.zeros(batch * seqlen_q, *q.shape[2:], dtype=q.dtype, device=q.device)
    gk = torch.zeros(batch * seqlen_k, *k.shape[2:], dtype=k.dtype, device=q.device)
    gv = torch.zeros(batch * seqlen_k, *v.shape[2:], dtype=v.dtype, device=q.device)
    lse_packed = _lse_packed_from_dense(softmax_lse, batch, seqlen_q)
    gq, gk, gv, delta, dsink, dbias = flash_bwd(
        _pack(dout), _pack(q), _pack(k), _pack(v), _pack(out), lse_packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=seqlen_q, max_seqlen_k=seqlen_k, seqstart_q=starts_q, seqstart_k=starts_k, dq=gq, dk=gk, dv=gv,
        **common,
    )
    delta = delta.reshape(heads_q, batch, seqlen_q).permute(1, 0, 2)
    return _bwd_result(
        (gq.reshape(q.shape), gk.reshape(k.shape), gv.reshape(v.shape), delta, dsink, dbias),
        compute_dsink, compute_dbias,
    )


def triton_mha_varlen_bwd(*, dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          dropout_p, softmax_scale, is_causal, window_size_left, window_size_right, deterministic, dq,
                          dk, dv, alibi_slopes, rng_state, cu_seqlens_q_padded, cu_seqlens_k_padded, sink, sink_size,
                          logits_soft_cap, bias, compute_dsink, compute_dbias):
    import torch

    from .triton.bwd import flash_bwd

    padded = cu_seqlens_q_padded is not None or cu_seqlens_k_padded is not None
    if padded:
        # Rows between sequences belong to no sequence: their gradients must come out zero.
        dq = torch.zeros_like(q) if dq is None else dq.zero_()
        dk = torch.zeros_like(k) if dk is None else dk.zero_()
        dv = torch.zeros_like(v) if dv is None else dv.zero_()
    result = flash_bwd(
        dout, q, k, v, out, softmax_lse, softmax_scale=softmax_scale, causal=is_causal,
        window=(window_size_left, window_size_right, sink_size), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, seqstart_q=cu_seqlens_q_padded,
        seqstart_k=cu_seqlens_k_padded, alibi_slopes=alibi_slopes, bias=bias, sink=sink, softcap=logits_soft_cap,
        dropout_p=dropout_p, rng_state=rng_state, deterministic=deterministic, dq=dq, dk=dk, dv=dv,
        compute_dbias=compute_dbias,
    )
    return _bwd_result(result, compute_dsink, compute_dbias)


# -- reference adaptors -------------------------------------------------------------------------
#
# Dropout: the reference draws its keep-mask with torch.rand from a generator seeded by
# rng_state, so a forward and its backward agree; the stream differs from the Triton kernel's
# Philox stream (both are reproducible for a given rng_state).


def _keep_generator(rng_state, device):
    import torch

    seed, offset = (int(x) for x in rng_state.tolist())
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + offset) % (2**63 - 1))
    return gen


def _draw_keep(gen, shape, dropout_p, device):
    from .reference import make_dropout_mask

    return make_dropout_mask(shape, dropout_p, generator=gen, device=device)


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


def _ref_kwargs(*, softmax_scale, is_causal, window_size_left, window_size_right, sink_size, logits_soft_cap, sink,
                dropout_p):
    return dict(softmax_scale=softmax_scale, causal=is_causal, window=(window_size_left, window_size_right, sink_size),
                softcap=logits_soft_cap, sink=sink, dropout_p=dropout_p)


def _ref_packed_fwd(q, k, v, seg, *, max_seqlen_k, kw, alibi_slopes, bias, q_descale, k_descale, v_descale,
                    rng_state, want_mask, out_dtype):
    """Packed forward, one sequence at a time. Returns (out (Tq,Hq,Dv), lse (Hq,Tq), s_dmask or None)."""
    import torch

    from .reference import attention_ref

    total_q, heads_q = q.shape[0], q.shape[1]
    heads_kv = k.shape[1]
    out = torch.zeros(total_q, heads_q, v.shape[-1], dtype=out_dtype, device=q.device)
    lse = torch.full((heads_q, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    s_dmask = torch.zeros(heads_q, total_q, max_seqlen_k, dtype=torch.float32, device=q.device) if want_mask else None
    gen = _keep_generator(rng_state, q.device) if kw["dropout_p"] > 0 else None
    for b, q0, sq, k0, sk in seg:
        keep = _draw_keep(gen, (1, heads_q, sq, sk), kw["dropout_p"], q.device) if gen is not None else None
        if sq == 0:
            continue
        slopes = alibi_slopes[b] if (alibi_slopes is not None and alibi_slopes.dim() == 2) else alibi_slopes
        o_b, p_b, lse_b = attention_ref(
            q[q0 : q0 + sq].unsqueeze(0), k[k0 : k0 + sk].unsqueeze(0), v[k0 : k0 + sk].unsqueeze(0),
            alibi_slopes=slopes, bias=None if bias is None else bias[:sq, :sk], dropout_mask=keep,
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


def _fwd_out_dtype(q, out):
    import torch

    if out is not None:
        return out.dtype
    return torch.bfloat16 if q.element_size() == 1 else q.dtype


def reference_mha_fwd(*, q, k, v, dropout_p, softmax_scale, is_causal, window_size_left, window_size_right, sink_size,
                      return_softmax_lse, return_dropout_randval, cu_seqlens_q, cu_seqlens_kv, out, bias, alibi_slopes,
                      q_descale, k_descale, v_descale, sink_ptr, rng_state, logits_soft_cap):
    import torch

    from .reference import attention_ref

    kw = _ref_kwargs(softmax_scale=softmax_scale, is_causal=is_causal, window_size_left=window_size_left,
                     window_size_right=window_size_right, sink_size=sink_size, logits_soft_cap=logits_soft_cap,
                     sink=sink_ptr, dropout_p=dropout_p)
    out_dtype = _fwd_out_dtype(q, out)
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k = k.shape[1]
    if cu_seqlens_q is None and cu_seqlens_kv is None:
        keep = None
        if dropout_p > 0:
            keep = _draw_keep(_keep_generator(rng_state, q.device), (batch, heads_q, seqlen_q, seqlen_k), dropout_p, q.device)
        o, p, lse = attention_ref(q, k, v, alibi_slopes=alibi_slopes, bias=bias, dropout_mask=keep, q_descale=q_descale,
                                  k_descale=k_descale, v_descale=v_descale, out_dtype=out_dtype, **kw)
        s_dmask = torch.where(keep, p.float(), -p.float()) if return_dropout_randval else None
        return o, lse, s_dmask
    cu_q, cu_k, starts_q, starts_k = _padded_batch_cu(cu_seqlens_q, cu_seqlens_kv, batch, seqlen_q, seqlen_k, q.device)
    o, lse, s_dmask = _ref_packed_fwd(
        _pack(q), _pack(k), _pack(v), _Segments(cu_q, cu_k, starts_q, starts_k), max_seqlen_k=seqlen_k, kw=kw,
        alibi_slopes=alibi_slopes, bias=bias, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        rng_state=rng_state, want_mask=return_dropout_randval, out_dtype=out_dtype,
    )
    o = o.reshape(batch, seqlen_q, heads_q, -1)
    lse = lse.reshape(heads_q, batch, seqlen_q).permute(1, 0, 2)
    if s_dmask is not None:
        s_dmask = s_dmask.reshape(heads_q, batch, seqlen_q, seqlen_k).permute(1, 0, 2, 3)
    return o, lse, s_dmask


def reference_mha_varlen_fwd(*, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                             softmax_scale, logits_soft_cap, is_causal, window_size_left, window_size_right, sink_size,
                             return_softmax_lse, return_dropout_randval, out, block_table, bias, alibi_slopes,
                             q_descale, k_descale, v_descale, rng_state, cu_seqlens_q_padded, cu_seqlens_k_padded,
                             sink_ptr, seqlens_k):

    from .reference import gather_paged_kv

    kw = _ref_kwargs(softmax_scale=softmax_scale, is_causal=is_causal, window_size_left=window_size_left,
                     window_size_right=window_size_right, sink_size=sink_size, logits_soft_cap=logits_soft_cap,
                     sink=sink_ptr, dropout_p=dropout_p)
    starts_k = cu_seqlens_k_padded
    if block_table is not None:
        lens_k = seqlens_k if seqlens_k is not None else _lengths(cu_seqlens_k)
        k, v, cu_seqlens_k = gather_paged_kv(k, v, block_table, lens_k)
        starts_k = None
    return _ref_packed_fwd(
        q, k, v, _Segments(cu_seqlens_q, cu_seqlens_k, cu_seqlens_q_padded, starts_k), max_seqlen_k=max_seqlen_k,
        kw=kw, alibi_slopes=alibi_slopes, bias=bias, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        rng_state=rng_state, want_mask=return_dropout_randval, out_dtype=_fwd_out_dtype(q, out),
    )


def _attention_grads(q, k, v, dout, *, kw, alibi_slopes, bias, keep):
    """Closed-form gradients of ``reference.attention_ref`` for one dense (bshd) problem, in fp32.

    Written out rather than taken from autograd so it also runs where autograd does not record
    (inside another op's kernel, under dispatch modes). Returns (dq, dk, dv, dsink, dbias).
    With P the softmax probabilities (sink column excluded), keep/(1-p) the dropout scaling:
    dV = Pd^T dO; dP = (dO V^T) * keep/(1-p); D = rowsum(P * dP) = rowsum(dO * O);
    dS = P * (dP - D); dsink_h = -sum P_sink * D; softcap chain rule 1 - tanh^2; dQ = scale dS K.
    """
    import torch

    from .reference import attention_ref

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


def _delta(dout, out):
    return (dout.float() * out.float()).sum(-1)


def _ref_packed_bwd(dout, q, k, v, seg, *, kw, alibi_slopes, bias, rng_state, compute_dbias):
    """Packed backward, one sequence at a time: (dq, dk, dv, dsink fp32 or None, dbias fp32 or None)."""
    import torch

    heads_q = q.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    # fp32 accumulators: keys shared by no two sequences, but GQA/bias/sink sums are accumulated
    dq, dk, dv = torch.zeros(q.shape, **f32), torch.zeros(k.shape, **f32), torch.zeros(v.shape, **f32)
    sink = kw.pop("sink")
    dsink = torch.zeros(heads_q, dtype=torch.float32, device=q.device) if sink is not None else None
    dbias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device) if compute_dbias else None
    gen = _keep_generator(rng_state, q.device) if kw["dropout_p"] > 0 else None
    for b, q0, sq, k0, sk in seg:
        keep = _draw_keep(gen, (1, heads_q, sq, sk), kw["dropout_p"], q.device) if gen is not None else None
        if sq == 0:
            continue
        slopes = alibi_slopes[b] if (alibi_slopes is not None and alibi_slopes.dim() == 2) else alibi_slopes
        gq, gk, gv, gs, gb = _attention_grads(
            q[q0 : q0 + sq].unsqueeze(0), k[k0 : k0 + sk].unsqueeze(0), v[k0 : k0 + sk].unsqueeze(0),
            dout[q0 : q0 + sq].unsqueeze(0), kw=dict(kw, sink=sink), alibi_slopes=slopes,
            bias=None if bias is None else bias[:sq, :sk], keep=keep,
        )
        dq[q0 : q0 + sq] = gq[0]
        dk[k0 : k0 + sk] += gk[0]
        dv[k0 : k0 + sk] += gv[0]
        if dsink is not None:
            dsink += gs
        if dbias is not None:
            dbias[:sq, :sk] += gb
    kw["sink"] = sink
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsink, dbias


def _write_grads(grads, dq, dk, dv):
    gq, gk, gv = grads
    results = []
    for given, g in zip((dq, dk, dv), (gq, gk, gv)):
        if given is not None:
            given.copy_(g)
            results.append(given)
        else:
            results.append(g)
    return results


def reference_mha_bwd(*, dout, q, k, v, out, softmax_lse, dropout_p, softmax_scale, is_causal, window_size_left,
                      window_size_right, deterministic, dq, dk, dv, bias, alibi_slopes, rng_state, sink, sink_size,
                      logits_soft_cap, cu_seqlens_q, cu_seqlens_kv, compute_dsink, compute_dbias):
    kw = _ref_kwargs(softmax_scale=softmax_scale, is_causal=is_causal, window_size_left=window_size_left,
                     window_size_right=window_size_right, sink_size=sink_size, logits_soft_cap=logits_soft_cap,
                     sink=sink, dropout_p=dropout_p)
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k = k.shape[1]
    delta = _delta(dout, out).transpose(1, 2)
    if cu_seqlens_q is None and cu_seqlens_kv is None:
        keep = None
        if dropout_p > 0:
            keep = _draw_keep(_keep_generator(rng_state, q.device), (batch, heads_q, seqlen_q, seqlen_k), dropout_p, q.device)
        gq, gk, gv, gs, gb = _attention_grads(q, k, v, dout, kw=kw, alibi_slopes=alibi_slopes, bias=bias, keep=keep)
        gq, gk, gv = _write_grads((gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)), dq, dk, dv)
        return gq, gk, gv, delta, (gs if compute_dsink else None), (gb if compute_dbias else None)
    cu_q, cu_k, starts_q, starts_k = _padded_batch_cu(cu_seqlens_q, cu_seqlens_kv, batch, seqlen_q, seqlen_k, q.device)
    gq, gk, gv, gs, gb = _ref_packed_bwd(
        _pack(dout), _pack(q), _pack(k), _pack(v), _Segments(cu_q, cu_k, starts_q, starts_k), kw=kw,
        alibi_slopes=alibi_slopes, bias=bias, rng_state=rng_state, compute_dbias=compute_dbias,
    )
    gq, gk, gv = _write_grads((gq.reshape(q.shape), gk.reshape(k.shape), gv.reshape(v.shape)), dq, dk, dv)
    return gq, gk, gv, delta, (gs if compute_dsink else None), gb


def reference_mha_varlen_bwd(*, dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, dropout_p, softmax_scale, is_causal, window_size_left, window_size_right,
                             deterministic, dq, dk, dv, alibi_slopes, rng_state, cu_seqlens_q_padded,
                             cu_seqlens_k_padded, sink, sink_size, logits_soft_cap, bias, compute_dsink,
                             compute_dbias):
    kw = _ref_kwargs(softmax_scale=softmax_scale, is_causal=is_causal, window_size_left=window_size_left,
                     window_size_right=window_size_right, sink_size=sink_size, logits_soft_cap=logits_soft_cap,
                     sink=sink, dropout_p=dropout_p)
    gq, gk, gv, gs, gb = _ref_packed_bwd(
        dout, q, k, v, _Segments(cu_seqlens_q, cu_seqlens_k, cu_seqlens_q_padded, cu_seqlens_k_padded), kw=kw,
        alibi_slopes=alibi_slopes, bias=bias, rng_state=rng_state, compute_dbias=compute_dbias,
    )
    gq, gk, gv = _write_grads((gq, gk, gv), dq, dk, dv)
    delta = _delta(dout, out).transpose(0, 1).contiguous()
    return gq, gk, gv, delta, (gs if compute_dsink else None), gb
