"""Triton building blocks shared by the paged, unified and MLA attention kernels.

Importing this module imports Triton: set ``TRITON_INTERPRET`` before (kernel modules import it).
Everything here is a ``@triton.jit`` device function, except the split-K merge, which also has
a launcher (:func:`splitk_merge`) and a PyTorch reference (:func:`splitk_merge_reference`).
The signatures below are stable; other families call them.

Conventions
-----------
* Scores in the online softmax are in **log2 units**: ``s = qk * softmax_scale * LOG2E``, masked
  entries ``-inf``. ``m`` (running max) is in the same units; finalize returns the natural-log
  LSE.
* KV quantization methods are the integer values of :class:`aiter_core.quant.KVQuant`
  (``KV_NONE 0, KV_PER_HEAD 1, KV_PER_TOKEN 2, KV_INT4_PER_TOKEN 3, KV_PER_TENSOR 4``); scales are
  dequantization scales (``x = stored * scale``); int4 packs element ``2i`` in the low nibble and
  ``2i+1`` in the high nibble of byte ``i`` along the head dim.
* Paged addresses are split into a token part and a column part so one formula covers every
  cache layout (NHD, HND, vLLM 5-D ``[nb, H, D/x, bs, x]``, V ``[nb, H, D, bs]`` and shuffled V
  ``[nb, H, bs/x, D, x]``):
  ``addr = phys_block * s_blk + head * s_head + (off // TX) * s_t_hi + (off % TX) * s_t_lo
  + (col // CX) * s_c_hi + (col % CX) * s_c_lo`` where ``off`` is the token offset inside its block
  and ``col`` the storage column (``d``, or ``d // 2`` for packed int4). A layout without a split
  uses ``TX = block_size`` / ``CX = storage columns`` (the ``hi`` part is then always 0).

Device functions (all ``@triton.jit``)
-------------------------------------
``online_softmax_step(m_i, l_i, s) -> (m_new, alpha, p, l_new)``
    one tile of scores ``s [M, N]`` (log2 units); the caller rescales its accumulator by
    ``alpha[:, None]`` and adds ``p @ V``. Rows that saw only ``-inf`` keep ``m = -inf``, ``l = 0``
    and produce ``p = 0``, ``alpha = 0`` (no NaN).
``online_softmax_step_scaled(m_i, l_i, s, scale_log2)``
    the same on raw scores whose log2 value is ``s * scale_log2`` (``scale_log2 > 0``): the scale
    rides in exp2's FMA (``online_softmax_step`` is this with 1.0).
``saturate_to_fp16(x)``: ``x`` clamped to +-65504 as fp16 (a bf16 query meeting 8-bit KV in fp16
    dots).
``online_softmax_finalize(acc, m_i, l_i) -> (out, lse)``
    ``out = acc / l`` (0 for empty rows) and the natural-log LSE (``-inf`` for empty rows).
``softcap_scores(s, softcap)``: ``softcap * tanh(s / softcap)``.
``paged_block_lookup(block_table_row_ptr, tok, BLOCK_SIZE, num_logical_blocks, num_physical_blocks,
mask) -> (phys, off, valid)``
    logical token index -> physical block id (int64), offset inside the block, and validity.
    Block ids outside ``[0, num_physical_blocks)`` (negative = padding) make the token invalid (the id is then clamped into range), so
    kernels skip it instead of reading out of bounds.
``paged_token_offset(phys, off, s_blk, TX, s_t_hi, s_t_lo)`` and
``packed_col_offset(col, CX, s_c_hi, s_c_lo)``: the two halves of the address formula (int64).
``paged_token_offset_from_tok(phys, tok, s_blk, BLOCK_SIZE, TX, s_t_hi, s_t_lo, OFFSET_BITS)``: the
    token half from the logical token index (``off = tok % BLOCK_SIZE`` implied); prefer it in
    kernels: it keeps contiguous token runs visible to the compiler, so token-contiguous layouts get
    vector loads. ``OFFSET_BITS`` 32 computes in int32 (the caller guarantees every offset of the
    cache fits, see :func:`max_element_offset`; saves a tenth of aiter-pa's fp8 decode
    instructions), 64 in int64. :func:`packed_col_offset` is always int32 (under
    ``block_size * head_dim``).
``kv_storage_col(d, QUANT) -> (col, shift)``: storage column and nibble shift of head-dim index d.
``kv_to_float(x, QUANT, shift)``: stored values -> fp32 (int4 nibble unpacked and sign-extended).
``load_kv_scale(scale_ptr, QUANT, head, phys, off, s_sblk, s_shead, s_stok, mask)``
    the dequantization scale: fp32 scalar (NONE: 1, per tensor, per head) or one per token
    (per token / int4: ``scale_ptr + phys*s_sblk + head*s_shead + off*s_stok``, 0 where masked).
``dequant_kv_tile(x, scale, QUANT, shift, TOKEN_AXIS)``
    fp32 values of a stored tile, times ``scale`` broadcast along ``TOKEN_AXIS`` (0 or 1) for the
    per-token methods.
``merge_two_partials(o_a, lse_a, o_b, lse_b) -> (o, lse)``: LSE-weighted merge of two normalised
    partial outputs (rows broadcast along the last axis).

Interpreter notes (Triton 3.9, ``TRITON_INTERPRET=1``): a masked ``tl.load`` of an fp8 tensor
with ``other=0`` fails ("cannot cast ... to fp8"): load without ``other`` and zero the masked
entries after conversion with ``tl.where`` (masked lanes are undefined on a GPU anyway). A mask
built from a scalar comparison (``row_ok & (n > 1)``) fails with "mask has unsupported dtype":
broadcast the scalar first (``(rows * 0 + n) > 1``). fp32 -> fp8 casts that round up across a
power of two come out halved in the interpreter (the GPU is right).

Performance notes (sm_90): Triton specialises integer arguments only on divisibility by 16, never
on "== 1", so pass the strides inside a block (``TX``, ``s_t_*``, ``CX``, ``s_c_*``) as
``tl.constexpr`` or the compiler cannot see the contiguous axis and loads bytes instead of 16-byte
vectors. For token-contiguous layouts also look blocks up once per group of tokens that share one
(``tl.max_constancy`` on the block id) and use :func:`paged_token_offset_from_tok`. A compile-only
test must pass ``attrs={(i,): [["tt.divisibility", 16]]}`` for pointers and 16-divisible ints to
``ASTSource``, as the launcher does at run time, or no load vectorizes.

Split-K merge
-------------
``splitk_merge(partial_out, partial_lse, out, lse_out=None, partial_sum=None)``
    ``partial_out [*rows, S, D]``, ``partial_lse [*rows, S]`` (natural log; ``-inf`` = empty
    split, its partial output is never read), ``out [*rows, D]``, ``lse_out [*rows]`` (optional),
    with 1 or 2 row dims and any strides. With ``partial_sum`` given, ``partial_lse`` holds each
    split's running max and ``partial_sum`` its exp-sum (upstream's ``max_logits`` /
    ``exp_sums``), and the split LSE is ``max + log(sum)``. Computes
    ``out = sum_k exp(lse_k - lse*) o_k / sum_k exp(lse_k - lse*)``,
    ``lse = lse* + log(sum_k exp(lse_k - lse*))``; a row whose splits are all empty gets out 0 and
    lse ``-inf``. No host sync, no allocation: safe inside CUDA-graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import cdiv, launch, next_pow2
from .triton_utils import max_element_offset as _max_element_offset

__all__ = [
    "LOG2E",
    "LN2",
    "KV_NONE",
    "KV_PER_HEAD",
    "KV_PER_TOKEN",
    "KV_INT4_PER_TOKEN",
    "KV_PER_TENSOR",
    "online_softmax_step",
    "online_softmax_step_scaled",
    "saturate_to_fp16",
    "online_softmax_finalize",
    "softcap_scores",
    "paged_block_lookup",
    "paged_token_offset",
    "paged_token_offset_from_tok",
    "packed_col_offset",
    "max_element_offset",
    "kv_storage_col",
    "kv_to_float",
    "load_kv_scale",
    "dequant_kv_tile",
    "merge_two_partials",
    "splitk_merge",
    "splitk_merge_reference",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# aiter_core.quant.KVQuant values, as plain ints usable as tl.constexpr
KV_NONE = 0
KV_PER_HEAD = 1
KV_PER_TOKEN = 2
KV_INT4_PER_TOKEN = 3
KV_PER_TENSOR = 4


# ----------------------------------------------------------------------------- online softmax


@triton.jit
def online_softmax_step_scaled(m_i, l_i, s, scale_log2):
    """One online-softmax step on raw scores ``s`` whose log2-domain value is ``s * scale_log2``
    (``scale_log2 > 0``; masked scores -inf): the scale rides in the exponent's FMA instead of a
    separate multiply over the whole tile. ``m_i`` is in the log2 domain."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    # rows that have seen only -inf: subtract 0 instead of -inf so exp2 gives 0, never NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s * scale_log2 - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return m_new, alpha, p, l_new


@triton.jit
def online_softmax_step(m_i, l_i, s):
    """:func:`online_softmax_step_scaled` on scores already in log2 units (x * 1.0 folds away)."""
    return online_softmax_step_scaled(m_i, l_i, s, 1.0)


@triton.jit
def saturate_to_fp16(x):
    """``x`` as fp16, clamped to +-65504: a bf16/fp32 query meeting 8-bit KV tiles in fp16 dots
    (fp8 -> fp16 is one cheap conversion, fp8 -> bf16 is not) must not overflow to inf."""
    return tl.minimum(tl.maximum(x.to(tl.float32), -65504.0), 65504.0).to(tl.float16)


@triton.jit
def online_softmax_finalize(acc, m_i, l_i):
    empty = l_i == 0.0
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    out = acc * inv[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return out, lse


@triton.jit
def softcap_scores(s, softcap):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both tails (exp overflow gives 1, underflow -1)
    x = s / softcap
    t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return softcap * t


@triton.jit
def merge_two_partials(o_a, lse_a, o_b, lse_b):
    mx = tl.maximum(lse_a, lse_b)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w_a = tl.exp(lse_a - mx_safe)
    w_b = tl.exp(lse_b - mx_safe)
    denom = w_a + w_b
    inv = tl.where(denom > 0.0, 1.0 / tl.where(denom > 0.0, denom, 1.0), 0.0)
    o = (tl.where(w_a[:, None] > 0.0, o_a * w_a[:, None], 0.0)
         + tl.where(w_b[:, None] > 0.0, o_b * w_b[:, None], 0.0)) * inv[:, None]
    lse = tl.where(denom > 0.0, mx_safe + tl.log(tl.where(denom > 0.0, denom, 1.0)), float("-inf"))
    return o, lse


# ----------------------------------------------------------------------------- paged addressing


@triton.jit
def paged_block_lookup(block_table_row_ptr, tok, BLOCK_SIZE: tl.constexpr, num_logical_blocks,
                       num_physical_blocks, mask):
    logical = tok // BLOCK_SIZE
    off = tok % BLOCK_SIZE
    valid = mask & (logical < num_logical_blocks)
    phys = tl.load(block_table_row_ptr + logical, mask=valid, other=-1).to(tl.int64)
    valid = valid & (phys >= 0) & (phys < num_physical_blocks)
    # Clamp rather than tl.where(valid, phys, 0): callers use the id in both tile orientations
    # (K as [D, N], V and scales as [N, D]) and Triton 3.6's layout-conversion pass re-creates a
    # select per orientation ahead of its condition ("operand #0 does not dominate this use").
    # Either way the address is in bounds and the caller masks the load with `valid`.
    phys = tl.minimum(tl.maximum(phys, 0), num_physical_blocks - 1)
    return phys, off, valid


@triton.jit
def paged_token_offset(phys, off, s_blk, TX: tl.constexpr, s_t_hi, s_t_lo):
    return phys.to(tl.int64) * s_blk + ((off // TX) * s_t_hi + (off % TX) * s_t_lo).to(tl.int64)


@triton.jit
def paged_token_offset_from_tok(phys, tok, s_blk, BLOCK_SIZE: tl.constexpr, TX: tl.constexpr, s_t_hi, s_t_lo,
                                OFFSET_BITS: tl.constexpr):
    # Same address as paged_token_offset(phys, tok % BLOCK_SIZE, ...), written so that Triton's
    # axis analysis still sees runs of contiguous tokens (a remainder of a remainder hides them,
    # which turns token-contiguous V loads into byte loads).
    if OFFSET_BITS == 32:
        if TX == BLOCK_SIZE:
            rest = (tok % BLOCK_SIZE) * s_t_lo
        else:
            rest = ((tok // TX) % (BLOCK_SIZE // TX)) * s_t_hi + (tok % TX) * s_t_lo
        return phys.to(tl.int32) * s_blk + rest
    else:
        if TX == BLOCK_SIZE:
            rest = (tok % BLOCK_SIZE).to(tl.int64) * s_t_lo
        else:
            rest = ((tok // TX) % (BLOCK_SIZE // TX)).to(tl.int64) * s_t_hi + (tok % TX).to(tl.int64) * s_t_lo
        return phys.to(tl.int64) * s_blk + rest


@triton.jit
def packed_col_offset(col, CX: tl.constexpr, s_c_hi, s_c_lo):
    # int32: a column offset stays inside one (block, head) slice, under block_size * head_dim
    return (col // CX) * s_c_hi + (col % CX) * s_c_lo


# ----------------------------------------------------------------------------- KV dequantization


@triton.jit
def kv_storage_col(d, QUANT: tl.constexpr):
    if QUANT == 3:
        col = d // 2
        shift = (d % 2) * 4
    else:
        col = d
        shift = d * 0
    return col, shift


@triton.jit
def kv_to_float(x, QUANT: tl.constexpr, shift):
    if QUANT == 3:
        nib = (x.to(tl.int32) >> shift) & 0xF
        return (nib - (nib >= 8).to(tl.int32) * 16).to(tl.float32)
    else:
        return x.to(tl.float32)


@triton.jit
def load_kv_scale(scale_ptr, QUANT: tl.constexpr, head, phys, off, s_sblk, s_shead, s_stok, mask):
    if QUANT == 2 or QUANT == 3:
        ptrs = scale_ptr + phys.to(tl.int64) * s_sblk + head * s_shead + off.to(tl.int64) * s_stok
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    elif QUANT == 1:
        return tl.load(scale_ptr + head * s_shead).to(tl.float32)
    elif QUANT == 4:
        return tl.load(scale_ptr).to(tl.float32)
    else:
        return 1.0


@triton.jit
def dequant_kv_tile(x, scale, QUANT: tl.constexpr, shift, TOKEN_AXIS: tl.constexpr):
    v = kv_to_float(x, QUANT, shift)
    if QUANT == 2 or QUANT == 3:
        if TOKEN_AXIS == 0:
            v = v * scale[:, None]
        else:
            v = v * scale[None, :]
    elif QUANT != 0:
        v = v * scale
    return v


# ----------------------------------------------------------------------------- split-K merge


@triton.jit
def _split_lse(lse_base, sum_base, k, km, s_plk, s_psk, HAS_SUM: tl.constexpr):
    """Natural-log LSE of splits ``k`` (``-inf`` where masked or empty): the stored LSE, or with
    ``HAS_SUM`` the stored running max plus the log of the stored exp-sum."""
    lse = tl.load(lse_base + k * s_plk, mask=km, other=float("-inf")).to(tl.float32)
    if HAS_SUM:
        ssum = tl.load(sum_base + k * s_psk, mask=km, other=0.0).to(tl.float32)
        live = (ssum > 0.0) | (ssum != ssum)  # a NaN sum is kept (the NaN rule), a zero one is empty
        lse = tl.where(live, lse + tl.log(tl.where(live, ssum, 1.0)), float("-inf"))
    return lse


@triton.jit
def _splitk_merge_kernel(
    po_ptr, plse_ptr, psum_ptr, out_ptr, lse_out_ptr,
    R1, num_splits, head_dim,
    s_po0, s_po1, s_pok, s_pod,
    s_pl0, s_pl1, s_plk,
    s_ps0, s_ps1, s_psk,
    s_o0, s_o1, s_od,
    s_l0, s_l1,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SUM: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    row = tl.program_id(0)
    pid_d = tl.program_id(1)
    r0 = (row // R1).to(tl.int64)
    r1 = (row % R1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    lse_base = plse_ptr + r0 * s_pl0 + r1 * s_pl1
    sum_base = psum_ptr + r0 * s_ps0 + r1 * s_ps1
    # pass 1: the largest split LSE
    mx = tl.full([BLOCK_K], float("-inf"), tl.float32)
    for k0 in range(0, num_splits, BLOCK_K):
        k = k0 + offs_k
        km = k < num_splits
        mx = tl.maximum(mx, _split_lse(lse_base, sum_base, k, km, s_plk, s_psk, HAS_SUM))
    m_all = tl.max(mx, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    # pass 2: weighted sum of the partial outputs; empty splits are never read
    acc = tl.zeros([BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_K], tl.float32)
    po_base = po_ptr + r0 * s_po0 + r1 * s_po1
    for k0 in range(0, num_splits, BLOCK_K):
        k = k0 + offs_k
        km = k < num_splits
        w = tl.exp(_split_lse(lse_base, sum_base, k, km, s_plk, s_psk, HAS_SUM) - m_safe)
        # the NaN rule: a split whose LSE (max or sum) is NaN reaches the output; an empty one is never read
        live = km & ((w > 0.0) | (w != w))
        o = tl.load(po_base + k[:, None].to(tl.int64) * s_pok + offs_d[None, :] * s_pod,
                    mask=live[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(o * tl.where(live, w, 0.0)[:, None], 0)
        den += tl.where(live, w, 0.0)
    denom = tl.sum(den, 0)
    has = (denom > 0.0) | (denom != denom)
    out = tl.where(has, acc / tl.where(has, denom, 1.0), 0.0)
    tl.store(out_ptr + r0 * s_o0 + r1 * s_o1 + offs_d * s_od, out.to(out_ptr.dtype.element_ty), mask=d_mask)
    if WRITE_LSE:
        if pid_d == 0:
            lse_row = tl.where(has, m_safe + tl.log(tl.where(has, denom, 1.0)), float("-inf"))
            tl.store(lse_out_ptr + r0 * s_l0 + r1 * s_l1, lse_row)


def max_element_offset(t: torch.Tensor) -> int:
    """The largest element offset from ``t``'s data pointer that indexing ``t`` can reach (-1 for
    an empty tensor): under ``2**31`` a kernel may address it with int32 offsets. The same as
    ``triton_utils.max_element_offset(t.shape, t.stride())``, which host code with the shape and
    strides at hand calls without importing Triton."""
    return _max_element_offset(t.shape, t.stride())


def _row_strides(t: torch.Tensor, name: str, rows: int, trailing: int) -> tuple[int, int]:
    """Strides of ``t``'s 1 or 2 leading row dims (0 for a missing second one)."""
    stride = t.stride()
    if rows == 1:
        return stride[0], 0
    if rows == 2:
        return stride[0], stride[1]
    raise ValueError(f"{name} must have 1 or 2 row dims before its last {trailing}, got shape {tuple(t.shape)}")


def splitk_merge(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor,
                 lse_out: torch.Tensor | None = None, partial_sum: torch.Tensor | None = None,
                 block_d: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """Merge split-K partial attention outputs in one launch (see the module docstring).

    Shapes are checked on the host (no device sync). Returns ``out``.
    """
    po_shape = partial_out.shape
    if len(po_shape) < 3:
        raise ValueError(f"partial_out must be [*rows, splits, head_dim], got shape {tuple(po_shape)}")
    rows_shape = po_shape[:-2]
    splits, head_dim = po_shape[-2], po_shape[-1]
    split_shape = rows_shape + (splits,)
    for name, t, want in (("partial_lse", partial_lse, split_shape), ("partial_sum", partial_sum, split_shape),
                          ("out", out, rows_shape + (head_dim,)), ("lse_out", lse_out, rows_shape)):
        if t is not None and t.shape != want:
            raise ValueError(f"{name} must have shape {tuple(want)}, got {tuple(t.shape)}")
    if lse_out is not None and lse_out.dtype != torch.float32:
        raise TypeError(f"lse_out must be float32, got {lse_out.dtype}")
    nrows = len(rows_shape)
    s_po0, s_po1 = _row_strides(partial_out, "partial_out", nrows, 2)
    s_pl0, s_pl1 = _row_strides(partial_lse, "partial_lse", nrows, 1)
    s_o0, s_o1 = _row_strides(out, "out", nrows, 1)
    if partial_sum is not None:
        s_ps0, s_ps1 = _row_strides(partial_sum, "partial_sum", nrows, 1)
        s_psk = partial_sum.stride(-1)
    else:
        s_ps0 = s_ps1 = s_psk = 0
    s_l0, s_l1 = _row_strides(lse_out, "lse_out", nrows, 0) if lse_out is not None else (0, 0)
    r1 = rows_shape[1] if nrows == 2 else 1
    total_rows = rows_shape[0] * r1
    if total_rows == 0 or head_dim == 0:
        return out
    block_d = block_d or min(next_pow2(head_dim), 256)
    block_k = min(max(next_pow2(splits), 2), 32)
    grid = (total_rows, cdiv(head_dim, block_d))
    po_stride = partial_out.stride()
    launch(
        _splitk_merge_kernel, grid,
        partial_out, partial_lse, partial_sum if partial_sum is not None else partial_lse, out,
        lse_out if lse_out is not None else partial_lse,
        r1, splits, head_dim,
        s_po0, s_po1, po_stride[-2], po_stride[-1],
        s_pl0, s_pl1, partial_lse.stride(-1),
        s_ps0, s_ps1, s_psk,
        s_o0, s_o1, out.stride(-1),
        s_l0, s_l1,
        block_k, block_d, partial_sum is not None, lse_out is not None,  # BLOCK_K, BLOCK_D, HAS_SUM, WRITE_LSE
        num_warps=num_warps,
    )
    return out


def splitk_merge_reference(partial_out: torch.Tensor, partial_lse: torch.Tensor,
                           partial_sum: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch version of :func:`splitk_merge`: returns ``(out fp32 [*rows, D], lse fp32 [*rows])``."""
    lse = partial_lse.double()
    if partial_sum is not None:
        s = partial_sum.double()
        kept = (s > 0) | s.isnan()
        lse = torch.where(kept, lse + torch.log(torch.where(kept, s, torch.ones_like(s))),
                          torch.full_like(lse, float("-inf")))
    mx = lse.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isinf(mx) & (mx < 0), torch.zeros_like(mx), mx)
    w = torch.exp(lse - mx)
    live = (w > 0) | w.isnan()  # a NaN split reaches the output (the NaN rule), an empty one adds nothing
    o = torch.where(live[..., None], partial_out.double() * w[..., None], torch.zeros((), dtype=torch.float64))
    den = torch.where(live, w, torch.zeros((), dtype=torch.float64)).sum(-1)
    has = (den > 0) | den.isnan()
    out = torch.where(has[..., None], o.sum(-2) / torch.where(has, den, torch.ones_like(den))[..., None],
                      torch.zeros((), dtype=torch.float64))
    lse_out = torch.where(has, mx.squeeze(-1) + torch.log(torch.where(has, den, torch.ones_like(den))),
                          torch.full_like(den, float("-inf")))
    return out.float(), lse_out.float()
