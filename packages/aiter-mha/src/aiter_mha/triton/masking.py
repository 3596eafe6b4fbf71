"""Score pipeline shared by the forward and backward kernels.

Both directions must produce bit-identical scores, masks and dropout decisions, so the whole
pipeline lives here once: scale -> softcap -> bias -> ALiBi, in base-2 units (log2(e) folded in),
then the bottom-right aligned window mask, then the Philox keep-mask.

Window bounds arrive as integers where "unbounded" (-1 upstream) has been replaced by
``UNBOUNDED`` on the host, which keeps the mask arithmetic branch-free.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# stands in for an unbounded window side; i + Sk - Sq +- UNBOUNDED stays inside int32
UNBOUNDED = 1 << 30


@triton.jit
def tanh_f32(x):
    # portable tanh (no libdevice): 1 - 2 / (exp(2x) + 1) saturates cleanly to +-1
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def scores_log2(qk, rows, cols, diag_off, qk_scale_log2, softcap_inv_scale, softcap_log2,
                bias_base, stride_bias_m, bias_mask, slope_log2,
                HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scores in log2 units from the raw q.k tile.

    Without softcap: qk * scale * log2(e). With softcap c: c * log2(e) * tanh(qk * scale / c).
    Then + bias * log2(e) and - slope * log2(e) * |i + Sk - Sq - j|.
    rows / cols are broadcastable 2-D index tiles (i[:, None], j[None, :] or transposed), so the
    backward can work on transposed tiles with the same code.
    """
    if HAS_SOFTCAP:
        s = softcap_log2 * tanh_f32(qk * softcap_inv_scale)
    else:
        s = qk * qk_scale_log2
    if HAS_BIAS:
        b_ptrs = bias_base + rows * stride_bias_m + cols
        b = tl.load(b_ptrs, mask=bias_mask, other=0.0).to(tl.float32)
        s += b * 1.4426950408889634
    if HAS_ALIBI:
        dist = rows + diag_off - cols
        dist = tl.where(dist < 0, -dist, dist)
        s -= slope_log2 * dist.to(tl.float32)
    return s


@triton.jit
def visible(rows, cols, seqlen_q, seqlen_k, diag_off, win_left, win_right, sink_size,
            HAS_WINDOW: tl.constexpr, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr = True,
            HAS_LEFT: tl.constexpr = True):
    """Bool tile: key j visible to query i (also false for j >= seqlen_k and, if asked, i >= seqlen_q).

    rows / cols: broadcastable 2-D index tiles. CHECK_COLS=False skips j < seqlen_k (for callers
    whose out-of-range key columns only feed results that are never stored). HAS_LEFT=False:
    the window has no left bound (then there are no sink tokens either).
    """
    ok = rows >= 0
    if CHECK_COLS:
        ok = ok & (cols < seqlen_k)
    if HAS_WINDOW:
        aligned = rows + diag_off
        ok = ok & (cols <= aligned + win_right)
        if HAS_LEFT:
            ok = ok & ((cols >= aligned - win_left) | (cols < sink_size))
    if CHECK_ROWS:
        ok = ok & (rows < seqlen_q)
    return ok


@triton.jit
def dropout_keep(seed, philox_base, rows, cols, stride_row, dropout_p):
    """Keep decisions for a tile; element index = philox_base + i * stride_row + j (int64).

    rows / cols: broadcastable 2-D index tiles.
    """
    idx = philox_base + rows.to(tl.int64) * stride_row + cols
    return tl.rand(seed, idx) >= dropout_p


@triton.jit
def key_block_range(m_lo, m_hi, seqlen_k, diag_off, win_left, win_right, sink_size,
                    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key ranges for query rows [m_lo, m_hi): (sink_end, lo, full_lo, full_hi, hi).

    Blocks in [0, sink_end) and [lo, full_lo) and [full_hi, hi) need the mask; blocks in
    [full_lo, full_hi) are fully visible to every row (no mask, no bounds check). Fully
    masked blocks are never visited. Without a left bound, [0, sink_end) and [lo, full_lo)
    are empty (callers may skip those loops).
    """
    if HAS_WINDOW:
        lo = tl.maximum(m_lo + diag_off - win_left, 0)
        hi = tl.minimum(m_hi - 1 + diag_off + win_right + 1, seqlen_k)
        lo = (lo // BLOCK_N) * BLOCK_N
        full_lo = tl.maximum(lo, m_hi - 1 + diag_off - win_left)
        full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
        full_hi = tl.minimum(hi, m_lo + diag_off + win_right + 1)
        full_hi = (full_hi // BLOCK_N) * BLOCK_N
        if full_hi <= full_lo:
            # no fully visible block: everything goes to the last (masked) segment
            full_lo = lo
            full_hi = lo
        sink_end = tl.minimum(tl.cdiv(sink_size, BLOCK_N) * BLOCK_N, lo)
    else:
        lo = 0
        sink_end = 0
        full_lo = 0
        full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
        hi = seqlen_k
    return sink_end, lo, full_lo, full_hi, hi


@triton.jit
def query_block_range(n_lo, n_hi, seqlen_q, diag_off, win_left, win_right, sink_size,
                      BLOCK_M: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query ranges for key columns [n_lo, n_hi): (lo, full_lo, full_hi, hi).

    Blocks in [lo, full_lo) and [full_hi, hi) need the mask (rows past seqlen_q included);
    [full_lo, full_hi) see every key of the column block. Without a left bound and with
    seqlen_q a multiple of BLOCK_M, [full_hi, hi) is empty (callers may skip that loop).
    """
    if HAS_WINDOW:
        # j <= i + diag + right  <=>  i >= j - diag - right
        lo = tl.maximum(n_lo - diag_off - win_right, 0)
        # j >= i + diag - left  <=>  i <= j - diag + left (sink columns are seen by every row)
        hi = tl.minimum(n_hi - 1 - diag_off + win_left + 1, seqlen_q)
        hi = tl.where(n_lo < sink_size, seqlen_q, hi)
        lo = (lo // BLOCK_M) * BLOCK_M
        full_lo = tl.maximum(lo, n_hi - 1 - diag_off - win_right)
        full_lo = tl.cdiv(full_lo, BLOCK_M) * BLOCK_M
        full_hi = tl.minimum(hi, n_lo - diag_off + win_left + 1)
        full_hi = (full_hi // BLOCK_M) * BLOCK_M
        if full_hi <= full_lo:
            # no fully visible block: everything goes to the first (masked) segment, so the
            # last one stays empty whenever the caller knows it has no ragged tail
            full_lo = tl.maximum(tl.cdiv(hi, BLOCK_M) * BLOCK_M, lo)
            full_hi = full_lo
    else:
        lo = 0
        full_lo = 0
        full_hi = (seqlen_q // BLOCK_M) * BLOCK_M
        hi = seqlen_q
    return lo, full_lo, full_hi, hi
