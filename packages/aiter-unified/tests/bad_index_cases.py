"""Index-content cases of the bad-input sweep, one per process (``python bad_index_cases.py NAME``,
TRITON_INTERPRET=1 on the CPU, or on a GPU): a crash or an out-of-bounds access fails one test.

Each case builds a tiny batch whose tensors are slices of larger buffers (guard regions: NaN
around q and the KV pool, a sentinel around out), breaks one piece of index metadata, runs the
Triton kernels (2D, 3D, the segment path and the heuristic through the public API) and checks
the documented rule of README.md against the PyTorch reference, which implements the same rule,
and that the guards are untouched. Prints ``OK <checks>`` on success.
"""

from __future__ import annotations

import sys

import torch

import aiter_unified
from aiter_core.triton_attn import splitk_merge_reference
from aiter_unified.reference import covered_rows, unified_attention_ref
from aiter_unified.testing import make_batch, run_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32  # ``python bad_index_cases.py NAME [float32|float16|bfloat16]``
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SENTINEL = 7.0
GUARD = 2  # rows / blocks of guard on each side


class Guarded:
    """A batch whose q, k, v, out and block table live inside guarded buffers."""

    def __init__(self, seqs, *, hq=2, hk=1, d=16, bs=4, dtype=None, seed=0):
        dtype = dtype or DTYPE
        b = make_batch(seqs, heads_q=hq, heads_kv=hk, head_dim=d, block_size=bs, dtype=dtype, device=DEV, seed=seed)
        self.dtype = dtype
        self.qbuf = self._wrap(b.q, float("nan"))
        self.kbuf = self._wrap(b.k, float("nan"))
        self.vbuf = self._wrap(b.v, float("nan"))
        self.q, self.k, self.v = (x[GUARD:-GUARD] for x in (self.qbuf, self.kbuf, self.vbuf))
        self.cu, self.used, self.table = b.cu_seqlens_q.clone(), b.seqused_k.clone(), b.block_table.clone()
        self.max_q, self.max_k = b.max_seqlen_q, b.max_seqlen_k
        self.pool = b.k.shape[0]

    @staticmethod
    def _wrap(x, fill):
        buf = torch.full((x.shape[0] + 2 * GUARD, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
        buf[GUARD:-GUARD] = x
        return buf

    def out_buffer(self):
        buf = torch.full((self.q.shape[0] + 2 * GUARD, *self.q.shape[1:]), SENTINEL, dtype=self.dtype, device=DEV)
        return buf, buf[GUARD:-GUARD]

    def args(self, out, **over):
        a = dict(q=self.q, k=self.k, v=self.v, out=out, cu_seqlens_q=self.cu, max_seqlen_q=self.max_q,
                 seqused_k=self.used, max_seqlen_k=self.max_k, softmax_scale=0.3, window_size=(-1, -1),
                 block_table=self.table, softcap=0.0, q_descale=None, k_descale=None, v_descale=None)
        a.update(over)
        return a

    def reference(self, **over):
        a = self.args(None, **over)
        return unified_attention_ref(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["seqused_k"], a["block_table"],
                                     a["softmax_scale"], window_size=a["window_size"], softcap=a["softcap"],
                                     qq_bias=a.get("qq_bias"), sinks=a.get("sinks"), max_seqlen_q=a["max_seqlen_q"])


def _same(label, got, want, rows, atol=None):
    """``got`` equals ``want`` on ``rows`` (NaN where ``want`` is NaN, close elsewhere)."""
    atol = atol or ATOL[DTYPE]
    g, w = got[rows.to(got.device)].float().cpu(), want[rows.to(want.device)].float().cpu()
    if not torch.equal(g.isnan(), w.isnan()):
        raise AssertionError(f"{label}: NaN rows differ: got {g.isnan().any(-1).any(-1).tolist()} "
                             f"want {w.isnan().any(-1).any(-1).tolist()}")
    torch.testing.assert_close(g.nan_to_num(), w.nan_to_num(), atol=atol, rtol=atol, msg=label)


def check_rule(g: Guarded, *, label, forms=("2d", "3d", "segments", "reference"), **over):
    """Every form of the kernel against the reference under the documented rule; guards intact."""
    want = g.reference(**over)
    rows = covered_rows(over.get("cu_seqlens_q", g.cu), g.q.shape[0])
    checks = 0
    for form in forms:
        buf, out = g.out_buffer()
        a = g.args(out, **over)
        if form in ("2d", "3d"):
            run_triton(**a, force=form, num_segments=3 if form == "3d" else None, tile_n=16)
            got = out
        elif form == "segments":
            segm_out, segm_max, segm_sum = aiter_unified.unified_attention(**a, causal=True, skip_reduce=True)
            d = out.shape[-1]
            got, _ = splitk_merge_reference(segm_out[..., :d], segm_max, segm_sum)
        else:
            aiter_unified.unified_attention(**a, causal=True, backend="triton" if form == "api" else "reference")
            got = out
        _same(f"{label} [{form}]", got, want, rows)
        if form != "segments":
            # rows of no sequence: the one-pass kernel leaves them; the split launch's merge writes
            # every row of out (unspecified values there, see README)
            if form != "3d" and not (out[~rows.to(out.device)] == SENTINEL).all():
                raise AssertionError(f"{label} [{form}]: a row of no sequence was written")
            if not ((buf[:GUARD] == SENTINEL).all() and (buf[-GUARD:] == SENTINEL).all()):
                raise AssertionError(f"{label} [{form}]: the guard rows around out were written")
        checks += 1
    return checks


# ----------------------------------------------------------------------------- the cases
# (query_len, kv_len): a decode, an extend whose body runs mask-free tiles, a prefill
SEQS = [(1, 19), (5, 37), (9, 9)]


def cu_past_tokens():
    g = Guarded(SEQS)
    t = g.q.shape[0]
    n = 0
    for last in (t + 3, 2**31 - 1):
        cu = g.cu.clone()
        cu[-1] = last
        n += check_rule(g, label=f"cu_seqlens_q[-1]={last}", cu_seqlens_q=cu, forms=("2d", "3d", "segments", "api",
                                                                                     "reference"))
    cu = g.cu.clone()
    cu[1:] += 4  # every sequence shifted: the last ones reach past q
    n += check_rule(g, label="shifted cu_seqlens_q", cu_seqlens_q=cu)
    return n


def cu_negative_and_reversed():
    g = Guarded(SEQS)
    n = 0
    for entries in ([-(2**31), -3, 6, 15], [0, 1, 1, 15], [0, 1, 6, 6]):
        n += check_rule(g, label=f"cu_seqlens_q={entries}", cu_seqlens_q=torch.tensor(entries, dtype=torch.int32,
                                                                                       device=DEV))
    return n


def cu_non_monotonic():
    """Non-monotonic entries: no documented result beyond memory safety (a sequence whose range
    is reversed attends nothing; which program serves which row is then unspecified)."""
    g = Guarded(SEQS)
    n = 0
    for entries in ([0, 9, 2, 15], [0, 15, 1, 6], [12, 1, 6, 3]):
        for form in ("2d", "3d"):
            buf, out = g.out_buffer()
            cu = torch.tensor(entries, dtype=torch.int32, device=DEV)
            run_triton(**g.args(out, cu_seqlens_q=cu, max_seqlen_q=g.q.shape[0]), force=form,
                       num_segments=3 if form == "3d" else None, tile_n=16)
            if not ((buf[:GUARD] == SENTINEL).all() and (buf[-GUARD:] == SENTINEL).all()):
                raise AssertionError(f"cu_seqlens_q={entries} [{form}]: the guard rows around out were written")
            # q's and the pool's NaN guards were never read (the split launch's merge also writes
            # the rows of no sequence, unspecified values: only the one-pass output is all finite)
            if form == "2d" and not torch.isfinite(buf).all():
                raise AssertionError(f"cu_seqlens_q={entries} [{form}]: a NaN guard was read")
            n += 1
    return n


def block_ids_out_of_range():
    """Ids past the pool (its first guard block, huge) and negative ones, planted in mask-free
    body tiles (decode, extend), at the diagonal and in a prefill: their keys are skipped."""
    g = Guarded(SEQS)
    n = 0
    spots = ((0, 0), (1, 2), (1, 9), (2, 2))  # decode body, extend body, extend diagonal, prefill
    for ids in ((g.pool, -1, 2**31 - 1, -(2**31)), (-5, g.pool + 1, -1, g.pool)):
        table = g.table.clone()
        for (s, col), bad in zip(spots, ids):
            table[s, col] = bad
        n += check_rule(g, label=f"block ids {ids} at {spots}", block_table=table)
    return n


def seqused_past_table():
    g = Guarded(SEQS)
    cap = g.table.shape[1] * g.k.shape[1]
    n = 0
    for values in ((cap + 1, cap + 40, 2**31 - 1), (-5, 2, -(2**31))):
        used = torch.tensor(values, dtype=torch.int32, device=DEV)
        n += check_rule(g, label=f"seqused_k={values} (table capacity {cap})", seqused_k=used)
    return n


def max_seqlen_q_too_small():
    """Rows at or past max_seqlen_q are written NaN (flagged), in every form."""
    n = 0
    for seqs, bound in (([(3, 10), (1, 19), (2, 2)], 1),  # the decode form: one fixed block per sequence
                        ([(5, 21), (1, 9), (9, 9)], 2),  # the small tile with the search
                        ([(22, 24), (1, 5), (3, 9)], 17)):  # prefill tile (a mixed batch: two launches)
        g = Guarded(seqs, hq=4 if bound == 1 else 2, hk=2 if bound == 1 else 1)
        qq = torch.randn(bound, bound, device=DEV)  # as small as the checks allow: rows past it are never read
        n += check_rule(g, label=f"max_seqlen_q={bound} for {seqs}", max_seqlen_q=bound, qq_bias=qq)
    return n


def max_seqlen_k_too_small():
    """max_seqlen_k only sizes the launch (segment count, 2D/3D): every key is still attended."""
    g = Guarded([(1, 60), (2, 35), (1, 3)])
    return check_rule(g, label="max_seqlen_k=2", max_seqlen_q=2, max_seqlen_k=2)


def nan_in_masked_keys():
    """NaN in the V (and K) row of a key only later query rows see: the earlier rows stay finite."""
    n = 0
    for seqs in ([(9, 20), (12, 12)], [(20, 40)]):
        g = Guarded(seqs)
        for s, (qlen, kv) in enumerate(seqs):
            ctx = kv - qlen
            key = ctx + qlen // 2  # a new token's key: rows before it never see it
            blk, off = g.table[s, key // g.k.shape[1]], key % g.k.shape[1]
            g.v[blk, off, 0, 3] = float("nan")
            g.k[blk, off, 0, 5] = float("nan")
        n += check_rule(g, label=f"NaN K/V of causally masked keys {seqs}", forms=("2d", "3d", "segments", "api",
                                                                                     "reference"))
        # rows before the poisoned key are finite, rows from it on are NaN
        buf, out = g.out_buffer()
        aiter_unified.unified_attention(**g.args(out), causal=True)
        first = out[: seqs[0][0]]
        half = seqs[0][0] // 2
        if not (torch.isfinite(first[:half]).all() and first[half:].isnan().any(-1).all()):
            raise AssertionError(f"{seqs}: NaN reached rows that never see the key (or missed rows that do)")
    g = Guarded(SEQS)  # NaN in a V row past a sequence's end (in its last block) and in a window-masked key
    for s, (qlen, kv) in enumerate(SEQS):
        blk = g.table[s, (kv - 1) // g.k.shape[1]]
        if kv % g.k.shape[1]:
            g.v[blk, kv % g.k.shape[1]:] = float("nan")
    g.v[g.table[1, 0], 0] = float("nan")  # key 0 of sequence 1: outside a window of 8
    n += check_rule(g, label="NaN past the end / outside the window", window_size=(7, 0))
    return n


def empty_batches():
    """Zero-length sequences and a batch with no new tokens: well-defined output (0 where nothing
    is seen), nothing else written."""
    n = 0
    g = Guarded([(0, 7), (3, 3), (0, 0), (1, 1)])
    n += check_rule(g, label="zero-length sequences", forms=("2d", "3d", "api", "reference"))
    g = Guarded([(2, 5)])
    cu = torch.zeros(3, dtype=torch.int32, device=DEV)  # two sequences with no new tokens
    used = torch.tensor([5, 0], dtype=torch.int32, device=DEV)
    table = torch.cat([g.table, g.table])
    n += check_rule(g, label="no new tokens", cu_seqlens_q=cu, seqused_k=used, block_table=table)
    # no tokens at all
    q = torch.empty(0, 2, 16, dtype=DTYPE, device=DEV)
    out = torch.empty(0, 2, 16, dtype=DTYPE, device=DEV)
    for skip in (False, True):
        res = aiter_unified.unified_attention(q, g.k, g.v, out, cu, 1, used, 4, 0.3, True, (-1, -1), table, 0.0,
                                              None, None, None, skip_reduce=skip)
        assert (res is out) if not skip else all(x.shape[0] == 0 for x in res)
        n += 1
    return n


CASES = {f.__name__: f for f in (cu_past_tokens, cu_negative_and_reversed, cu_non_monotonic, block_ids_out_of_range,
                                 seqused_past_table, max_seqlen_q_too_small, max_seqlen_k_too_small,
                                 nan_in_masked_keys, empty_batches)}

if __name__ == "__main__":
    if len(sys.argv) > 2:
        DTYPE = getattr(torch, sys.argv[2])
    print("OK", CASES[sys.argv[1]]())
