"""Triton KV-cache write kernels: plain, per-tensor, per-token (8-bit and int4) and per-block
quantized, plus block copies. One program per token writes all its heads; a negative slot writes
nothing. ``MODE`` is one of :mod:`aiter_pa.checks`' ``MODE_*``; the launches are in
:mod:`aiter_pa.triton.launch`.

Rounding: int8/int4 use round-half-up (``floor(y + 0.5)``) after an IEEE division
(``div_rn``), fp8 rounds to nearest even in the cast (``cvt.rn.satfinite`` on sm_90, the same
rounding as torch's ``.to(float8_e4m3fn)``); fp8 values are clamped to the finite range. The
kernels launch with ``enable_fp_fusion=False`` so ``x * ratio + 0.5`` (block re-quantization) is
two roundings, as in the PyTorch reference, not one fma: the stored bytes match it exactly.
"""

from __future__ import annotations

import triton
import triton.language as tl

from aiter_core import triton_attn as ta


@triton.jit
def _quantize(y, qmax, IS_INT: tl.constexpr, OUT_DT: tl.constexpr):
    if IS_INT:
        y = tl.minimum(tl.maximum(tl.floor(y + 0.5), -qmax - 1.0), qmax)
    else:
        y = tl.minimum(tl.maximum(y, -qmax), qmax)
    return y.to(OUT_DT)


@triton.jit
def _cache_write_kernel(
    src_ptr, slot_ptr, cache_ptr, scale_ptr,
    s_st, s_sh, s_sd,
    s_blk, s_head,
    s_sblk, s_shead, s_stok,
    num_heads, head_dim, qmax, num_slots,
    KV_BLOCK: tl.constexpr, TX: tl.constexpr, CX: tl.constexpr,
    s_t_hi: tl.constexpr, s_t_lo: tl.constexpr, s_c_hi: tl.constexpr, s_c_lo: tl.constexpr, MODE: tl.constexpr, IS_INT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    # negative or past-the-end slots write nothing (a vector condition: the interpreter rejects
    # masks built from a scalar comparison)
    h_ok = (h < num_heads) & ((h * 0 + slot) >= 0) & ((h * 0 + slot) < num_slots)
    slot = tl.maximum(slot, 0)
    blk = slot // KV_BLOCK
    off = slot % KV_BLOCK
    row = ta.paged_token_offset(blk, off, s_blk, TX, s_t_hi, s_t_lo) + h.to(tl.int64) * s_head
    src_row = src_ptr + t * s_st + h[:, None] * s_sh
    out_dt = cache_ptr.dtype.element_ty
    if MODE == 3:
        c = tl.arange(0, BLOCK_D)  # byte columns: elements 2c and 2c+1
        c_ok = c < head_dim // 2
        m = h_ok[:, None] & c_ok[None, :]
        xe = tl.load(src_row + (2 * c)[None, :] * s_sd, mask=m, other=0.0).to(tl.float32)
        xo = tl.load(src_row + (2 * c + 1)[None, :] * s_sd, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(xe), 1), tl.max(tl.abs(xo), 1))
        sc = tl.math.div_rn(tl.maximum(amax, 1e-12), 7.0)  # IEEE division: same bits as torch
        qe = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(xe, sc[:, None]) + 0.5), -8.0), 7.0).to(tl.int32)
        qo = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(xo, sc[:, None]) + 0.5), -8.0), 7.0).to(tl.int32)
        byte = ((qe & 0xF) | ((qo & 0xF) << 4)).to(tl.uint8)
        dst = cache_ptr + row[:, None] + ta.packed_col_offset(c, CX, s_c_hi, s_c_lo)[None, :]
        tl.store(dst, byte, mask=m)
        tl.store(scale_ptr + blk * s_sblk + h * s_shead + off * s_stok, sc, mask=h_ok)
    else:
        d = tl.arange(0, BLOCK_D)
        m = h_ok[:, None] & (d < head_dim)[None, :]
        x = tl.load(src_row + d[None, :] * s_sd, mask=m, other=0.0)
        dst = cache_ptr + row[:, None] + ta.packed_col_offset(d, CX, s_c_hi, s_c_lo)[None, :]
        if MODE == 0:
            tl.store(dst, x.to(out_dt), mask=m)
        elif MODE == 1:
            sc = tl.load(scale_ptr).to(tl.float32)
            tl.store(dst, _quantize(tl.math.div_rn(x.to(tl.float32), sc), qmax, IS_INT, out_dt), mask=m)
        elif MODE == 2:
            xf = x.to(tl.float32)
            sc = tl.math.div_rn(tl.maximum(tl.max(tl.abs(xf), 1), 1e-12), qmax)
            tl.store(dst, _quantize(tl.math.div_rn(xf, sc[:, None]), qmax, IS_INT, out_dt), mask=m)
            tl.store(scale_ptr + blk * s_sblk + h * s_shead + off * s_stok, sc, mask=h_ok)
        else:  # MODE 4: per-block scale, already grown by _block_absmax_kernel
            sc = tl.load(scale_ptr + blk * s_sblk + h * s_shead, mask=h_ok, other=1.0)
            tl.store(dst, _quantize(tl.math.div_rn(x.to(tl.float32), sc[:, None]), qmax, IS_INT, out_dt), mask=m)


@triton.jit
def _block_absmax_kernel(src_ptr, slot_ptr, scale_ptr, s_st, s_sh, s_sd, s_sblk, s_shead, num_heads, head_dim,
                         qmax, num_slots, KV_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = (h < num_heads) & ((h * 0 + slot) >= 0) & ((h * 0 + slot) < num_slots)
    blk = tl.minimum(tl.maximum(slot, 0), num_slots - 1) // KV_BLOCK
    x = tl.load(src_ptr + t * s_st + h[:, None] * s_sh + d[None, :] * s_sd,
                mask=h_ok[:, None] & (d < head_dim)[None, :], other=0.0).to(tl.float32)
    tl.atomic_max(scale_ptr + blk * s_sblk + h * s_shead, tl.math.div_rn(tl.max(tl.abs(x), 1), qmax), mask=h_ok)


@triton.jit
def _block_requant_kernel(cache_ptr, old_ptr, new_ptr, s_sblk, s_shead,
                          s_blk, s_head, s_t_hi, s_t_lo, s_c_hi, s_c_lo, head_dim, qmax,
                          KV_BLOCK: tl.constexpr, TX: tl.constexpr, CX: tl.constexpr, IS_INT: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    old = tl.load(old_ptr + blk * s_sblk + h * s_shead)
    new = tl.load(new_ptr + blk * s_sblk + h * s_shead)
    ratio = tl.where(new > old, tl.math.div_rn(old, tl.where(new > old, new, 1.0)), 1.0)
    d = tl.arange(0, BLOCK_D)
    col = ta.packed_col_offset(d, CX, s_c_hi, s_c_lo)
    grow_d = (d * 0.0 + new) > old  # vector form: interpreter masks cannot come from scalars
    for t0 in range(0, KV_BLOCK, BLOCK_T):
        off = t0 + tl.arange(0, BLOCK_T)
        m = (off < KV_BLOCK)[:, None] & ((d < head_dim) & grow_d)[None, :]
        ptrs = cache_ptr + h * s_head + ta.paged_token_offset(blk + off * 0, off, s_blk, TX, s_t_hi, s_t_lo)[:, None] \
            + col[None, :]
        x = tl.load(ptrs, mask=m)
        y = x.to(tl.float32) * ratio
        tl.store(ptrs, _quantize(y, qmax, IS_INT, cache_ptr.dtype.element_ty), mask=m)


@triton.jit
def _copy_blocks_kernel(cache_ptr, map_ptr, block_numel, num_blocks, BLOCK: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    src = tl.load(map_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(map_ptr + 2 * pair + 1).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    # out-of-range ids (not checked on the host when the mapping lives on the GPU) copy nothing
    inside = (offs * 0 + src >= 0) & (offs * 0 + src < num_blocks) & (offs * 0 + dst >= 0) & (offs * 0 + dst < num_blocks)
    m = (offs < block_numel) & inside
    src = tl.minimum(tl.maximum(src, 0), num_blocks - 1)
    dst = tl.minimum(tl.maximum(dst, 0), num_blocks - 1)
    x = tl.load(cache_ptr + src * block_numel + offs, mask=m)
    tl.store(cache_ptr + dst * block_numel + offs, x, mask=m)
