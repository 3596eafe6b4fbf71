"""Bad input to every public entry point (issue 11): a clear error naming the argument, or the
documented skip/clamp result against the PyTorch reference with memory outside the given
tensors untouched.

Host checks run in-process (no kernel launches). Index *contents* (out-of-range, negative and
huge slots, page/token ids, positions; lengths past the buffers; too-small max_seqlen_q; NaN in
masked V rows) run the Triton kernels in the CPU interpreter, one subprocess per category, so a
crash fails one test, not the run. Outputs and caches are slices of larger poisoned buffers
whose guard regions are checked afterwards; inputs are surrounded by NaN guard regions, so a
read outside them shows as a non-finite output.

The documented rule (README, "Index metadata and NaN"): a slot outside ``[0, cache rows)``, a
page/token id outside ``[0, pool size)`` or negative is skipped; positions are clamped into
``[0, rows of the cos/sin table)``; rows past ``max_seqlen_q`` are still written (the tiling
covers every row of the sequence); a masked or skipped key contributes nothing, not ``0 x NaN``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from aiter_mla import api, triton_api

INTERPRET_OK = os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available()

# -- index contents: one subprocess per category -----------------------------------------------------

PRELUDE = """
import math, torch
from aiter_mla import api, triton_api
from aiter_mla import reference as R
torch.manual_seed(0)
NAN = float("nan")

def guarded(shape, dtype=torch.float32, fill=NAN, pad=3):
    # a tensor of `shape` inside a larger buffer whose first and last `pad` rows are `fill`
    big = torch.full((shape[0] + 2 * pad,) + tuple(shape[1:]), fill, dtype=dtype)
    return big, big[pad:pad + shape[0]]

def guards_intact(big, pad=3, fill=NAN):
    g = torch.cat([big[:pad].flatten(), big[-pad:].flatten()]).float()
    return bool(torch.isnan(g).all()) if fill != fill else bool((g == fill).all())

def close(a, b, tol=1e-4):
    a, b = a.float(), b.float()
    return bool(torch.allclose(a, b, atol=tol, rtol=1e-3, equal_nan=False)), float((a - b).abs().max()) if a.numel() else 0.0
"""


def run_case(body: str, timeout: int = 300) -> str:
    """Run ``PRELUDE + body`` with TRITON_INTERPRET=1 in a fresh process; it must exit 0 and print
    its last line ``OK ...``. Returns that line."""
    code = PRELUDE + textwrap.dedent(body)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines and lines[-1].startswith("OK"), (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return lines[-1]


needs_interpreter = pytest.mark.skipif(not INTERPRET_OK, reason="index-content cases run the CPU interpreter")


@needs_interpreter
@pytest.mark.parametrize("slot_dtype", ["int64", "int32"])
def test_cache_slots_outside_the_cache_are_skipped(slot_dtype):
    """concat_and_cache_mla and both fused RoPE cache ops: slots >= capacity, negative and huge
    are skipped (nothing written); guard blocks around the cache unchanged."""
    run_case(f"""
    LORA, PE, blocks, bs = 16, 8, 3, 4
    cap = blocks * bs
    huge = 2**40 if "{slot_dtype}" == "int64" else 2**31 - 1
    slots = torch.tensor([0, -1, cap, cap + 3, 5, huge, -2**31, cap - 1], dtype=torch.{slot_dtype})
    T = slots.shape[0]
    # concat_and_cache_mla
    big, cache = guarded((blocks, bs, LORA + PE), fill=7.0, pad=2)
    cache.copy_(torch.randn(blocks, bs, LORA + PE))
    kv_c, k_pe = torch.randn(T, LORA), torch.randn(T, PE)
    ref = R.concat_and_cache_mla_ref(kv_c, k_pe, cache.clone(), slots, None)
    api.concat_and_cache_mla(kv_c, k_pe, cache, slots, "auto", None, backend="triton")
    assert torch.equal(cache, ref), "concat_and_cache_mla"
    assert guards_intact(big, 2, 7.0), "concat_and_cache_mla wrote outside the cache"
    # fused_qk_rope_concat_and_cache_mla
    H = 3
    big, cache = guarded((blocks, bs, LORA + PE), fill=7.0, pad=2)
    cache.copy_(torch.randn(blocks, bs, LORA + PE))
    q_nope, q_pe = torch.randn(T, H, LORA), torch.randn(T, H, PE)
    cos, sin = torch.randn(16, PE // 2), torch.randn(16, PE // 2)
    pos = torch.randint(0, 16, (T,))
    q_out = torch.full((T, H, LORA + PE), NAN)
    before = cache.clone()
    api.fused_qk_rope_concat_and_cache_mla(q_nope, q_pe, kv_c, k_pe, cache, q_out, slots, None, None, pos, cos, sin,
                                           True, True, backend="triton")
    rq, rc = R.fused_qk_rope_concat_and_cache_mla_ref(q_nope, q_pe, kv_c, k_pe, before, q_out, slots, None, None,
                                                      pos, cos, sin, True, True)
    assert close(q_out, rq)[0] and close(cache, rc)[0], "fused_qk_rope_concat_and_cache_mla"
    assert guards_intact(big, 2, 7.0), "fused_qk_rope_concat_and_cache_mla wrote outside the cache"
    # fused_qk_rope_cat_and_cache_mla (slot = row)
    KH, D1, D2 = 2, 16, 8
    rows = cap
    big, cache = guarded((rows, KH, D1 + D2), fill=7.0, pad=2)
    cache.copy_(torch.randn(rows, KH, D1 + D2))
    before = cache.clone()
    qn, qp = torch.randn(T, 4, D1), torch.randn(T, 4, D2)
    kn, kp = torch.randn(T, KH, D1), torch.randn(T, KH, D2)
    q_out, _, k_pe_out, _ = api.fused_qk_rope_cat_and_cache_mla(qn, qp, kn, kp, cache, slots, pos, cos, sin, None,
                                                                False, backend="triton")
    rq, rk, rc = R.fused_qk_rope_cat_and_cache_mla_ref(qn, qp, kn, kp, before, slots, pos, cos, sin, None, False)
    assert close(q_out, rq)[0] and close(k_pe_out, rk)[0] and close(cache, rc)[0], "fused_qk_rope_cat_and_cache_mla"
    assert guards_intact(big, 2, 7.0), "fused_qk_rope_cat_and_cache_mla wrote outside the cache"
    print("OK")
    """)


@needs_interpreter
def test_positions_past_the_rope_table_are_clamped():
    """Positions past the cos/sin table (and negative ones) use its last (first) row in all three
    RoPE ops: the rows after the table are NaN, so any read past it would show."""
    run_case("""
    LORA, PE, blocks, bs, H = 16, 8, 2, 4, 2
    rows = 10
    big_c, cos = guarded((rows, PE // 2)); big_s, sin = guarded((rows, PE // 2))
    cos.copy_(torch.randn(rows, PE // 2)); sin.copy_(torch.randn(rows, PE // 2))
    pos = torch.tensor([0, rows - 1, rows, rows + 50, -4, 2**40])
    T = pos.shape[0]
    slots = torch.arange(T)
    cache = torch.zeros(blocks, bs, LORA + PE)
    q_nope, q_pe = torch.randn(T, H, LORA), torch.randn(T, H, PE)
    kv_c, k_pe = torch.randn(T, LORA), torch.randn(T, PE)
    q_out = torch.full((T, H, LORA + PE), NAN)
    before = cache.clone()
    api.fused_qk_rope_concat_and_cache_mla(q_nope, q_pe, kv_c, k_pe, cache, q_out, slots, None, None, pos, cos, sin,
                                           False, True, backend="triton")
    rq, rc = R.fused_qk_rope_concat_and_cache_mla_ref(q_nope, q_pe, kv_c, k_pe, before, q_out, slots, None, None,
                                                      pos, cos, sin, False, True)
    assert torch.isfinite(q_out).all() and torch.isfinite(cache).all(), "read past the table"
    assert close(q_out, rq)[0] and close(cache, rc)[0]
    # the clamp rule itself (independent of the reference): position rows + 50 rotates like rows - 1, -4 like 0
    for t, like in ((3, rows - 1), (4, 0)):
        explicit = R.rope_ref(q_pe[t:t + 1], cos[like:like + 1], sin[like:like + 1], torch.tensor([0]), False)
        assert torch.allclose(q_out[t, :, LORA:], explicit[0], atol=1e-5), t
    qn, qp = torch.randn(T, 4, 16), torch.randn(T, 4, PE)
    kn, kp = torch.randn(T, 1, 16), torch.randn(T, 1, PE)
    c2 = torch.zeros(T, 1, 16 + PE)
    qo, _, kpo, _ = api.fused_qk_rope_cat_and_cache_mla(qn, qp, kn, kp, c2, slots, pos, cos, sin, None, True,
                                                        backend="triton")
    rq, rk, rc = R.fused_qk_rope_cat_and_cache_mla_ref(qn, qp, kn, kp, torch.zeros(T, 1, 16 + PE), slots, pos, cos,
                                                       sin, None, True)
    assert torch.isfinite(qo).all() and close(qo, rq)[0] and close(kpo, rk)[0] and close(c2, rc)[0]
    # grouped RoPE decode: positions per sequence, [B, 1] as upstream passes them
    B, HQ, ROT = 3, 4, 8
    rope = 11
    big_cs, cs = guarded((rows, ROT)); cs.copy_(torch.randn(rows, ROT))
    kb = torch.randn(20, 1, LORA + rope)
    ind = torch.arange(20, dtype=torch.int32)
    indptr = torch.tensor([0, 7, 12, 20], dtype=torch.int32)
    q = torch.randn(B, HQ, LORA + rope)
    p = torch.tensor([[rows + 3], [-1], [2]])
    o = torch.full((B, HQ, LORA), NAN); kpe = torch.full((B, rope), NAN)
    logits = torch.full((B, HQ, 2, LORA + 1), NAN)
    api.decode_attention_fwd_grouped_rope(q, kb, kb[..., :LORA], o, indptr, ind, kpe, LORA, ROT, cs, p, logits, 2,
                                          0.3, use_rope=True, is_neox_style=True, backend="triton")
    ro, rl, rk = R.decode_grouped_rope_ref(q, kb, kb[..., :LORA], indptr, ind, kv_lora_rank=LORA, rotary_dim=ROT,
                                           sm_scale=0.3, use_rope=True, is_neox_style=True, cos_sin_cache=cs,
                                           positions=p.reshape(-1))
    assert torch.isfinite(o).all() and close(o, ro)[0] and close(kpe, rk[:, 0])[0]
    print("OK")
    """)


PAGED = """
from aiter_mla.testing import make_paged_case
LORA, ROPE = 32, 16

def decode(case, heads, max_seqlen_q=None, splits=2, causal=True, o=None):
    o = torch.full((case.q.shape[0], heads, LORA), NAN) if o is None else o
    _, lse = api.mla_decode_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                case.kv_last_page_lens, case.max_seqlen_q if max_seqlen_q is None else max_seqlen_q,
                                page_size=case.page_size, sm_scale=0.3, num_kv_splits=splits, causal=causal,
                                return_lse=True, backend="triton")
    return o, lse

def ref(case, causal=True):
    return R.mla_decode_ref(case.q, case.kv, case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_lens,
                            kv_lora_rank=LORA, page_size=case.page_size, sm_scale=0.3, causal=causal)
"""


@needs_interpreter
def test_too_small_max_seqlen_q_flags_rows():
    """mla_decode_fwd (MTP), mla_prefill_fwd and the block-table form with max_seqlen_q below a
    sequence's query length: the rows within the bound are exact, the rows past it are NaN
    (flagged, never left unwritten: the output starts at a finite sentinel)."""
    run_case(PAGED + textwrap.dedent("""
    case = make_paged_case(batch=2, heads=4, kv_lens=[30, 12], q_lens=[4, 3], page_size=4, kv_lora_rank=LORA,
                           rope=ROPE, dtype=torch.float32, seed=1)
    ro, rl = ref(case)
    pos = torch.cat([torch.arange(n) for n in case.q_lens])
    for bound in (1, 2):
        for splits in (1, 3):
            o = torch.full((case.q.shape[0], 4, LORA), 123.0)
            o, lse = decode(case, 4, max_seqlen_q=bound, splits=splits, o=o)
            inside = pos < bound
            assert torch.allclose(o[inside], ro[inside], atol=1e-4), (bound, splits)
            assert torch.isnan(o[~inside]).all(), (bound, splits)
            if splits == 1:
                assert torch.isnan(lse[~inside]).all(), bound
    o = torch.full((case.q.shape[0], 4, LORA), 123.0)
    out, lse = api.mla_prefill_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                   case.kv_last_page_lens, 2, sm_scale=0.3, backend="triton")
    assert torch.allclose(o[pos < 2], ro[pos < 2], atol=1e-4) and torch.isnan(o[pos >= 2]).all()
    seqused = torch.tensor(case.kv_lens, dtype=torch.int32)
    o = torch.full((case.q.shape[0], 4, LORA), 123.0)
    triton_api.mla_prefill_fwd(case.q, case.kv, o, case.qo_indptr, seqused, max(case.kv_lens), case.block_tables,
                               0.3, LORA, ROPE, True, None, None, max_seqlen_q=1, backend="triton")
    assert torch.allclose(o[pos < 1], ro[pos < 1], atol=1e-4) and torch.isnan(o[pos >= 1]).all()
    print("OK")
    """))


@needs_interpreter
def test_bad_page_and_token_ids_are_skipped():
    """Page ids >= the pool, negative and huge in every decode form (page-level split-K decode,
    block-table decode, SGLang grouped decode and decode_attention_fwd): the key is skipped, so
    the output equals the reference without that page; the pool sits between NaN guard pages."""
    run_case(PAGED + textwrap.dedent("""
    torch.manual_seed(2)
    page, heads = 4, 4
    case = make_paged_case(batch=2, heads=heads, kv_lens=[17, 9], q_lens=1, page_size=page, kv_lora_rank=LORA,
                           rope=ROPE, dtype=torch.float32, seed=2)
    pages = case.kv.shape[0]
    big, pool = guarded(tuple(case.kv.shape), pad=2)
    pool.copy_(case.kv)
    ind = case.kv_indptr.tolist()
    clean = case.kv_indices.clone()
    for bad in (pages, -1, 2**31 - 1, -2**31):
        # insert a bad page before the last page of sequence 0 (decode: the query sees every key,
        # so skipping the page equals dropping it)
        seq0 = clean[ind[0]:ind[1]].tolist()
        idx = torch.tensor(seq0[:-1] + [bad] + seq0[-1:] + clean[ind[1]:ind[2]].tolist(), dtype=torch.int32)
        indptr = torch.tensor([0, ind[1] + 1, ind[2] + 1], dtype=torch.int32)
        bad_case = type(case)(case.q, pool, case.qo_indptr, indptr, idx, case.kv_last_page_lens,
                              [case.kv_lens[0] + page, case.kv_lens[1]], case.q_lens, page, LORA, 1)
        o, lse = decode(bad_case, heads)
        ro, rl = ref(case)
        assert torch.isfinite(o).all() and torch.allclose(o, ro, atol=1e-4), ("mla_decode_fwd", bad)
        # block-table form: the same page list as a table row
        tables = torch.zeros(2, 8, dtype=torch.int32)
        tables[0, :len(seq0) + 1] = idx[:len(seq0) + 1]
        tables[1, :ind[2] - ind[1]] = idx[len(seq0) + 1:]
        seqused = torch.tensor([case.kv_lens[0] + page, case.kv_lens[1]], dtype=torch.int32)
        out = torch.full((2, heads, LORA), NAN)
        triton_api.mla_decode_fwd(case.q, pool, out, case.qo_indptr, seqused, 40, tables, 0.3, LORA, ROPE, True,
                                  None, None, num_kv_splits=2, backend="triton")
        assert torch.isfinite(out).all() and torch.allclose(out, ro, atol=1e-4), ("block table", bad)
    # SGLang token-level forms: token ids outside [0, tokens) skipped
    tokens = 24
    bigk, kb = guarded((tokens, 1, LORA + ROPE), pad=2)
    kb.copy_(torch.randn(tokens, 1, LORA + ROPE))
    q = torch.randn(2, heads, LORA + ROPE)
    good = torch.tensor([3, 5, 7, 1, 2, 9, 11, 4], dtype=torch.int32)
    for bad in (tokens, -1, 2**31 - 1):
        idx = torch.tensor([3, 5, bad, 7, 1, 2, bad, 9, 11, 4], dtype=torch.int32)
        indptr = torch.tensor([0, 5, 10], dtype=torch.int32)
        o = torch.full((2, heads, LORA), NAN)
        logits = torch.full((2, heads, 2, LORA + 1), NAN)
        api.decode_attention_fwd_grouped_rope(q, kb, kb[..., :LORA], o, indptr, idx, None, LORA, 0, None, None,
                                              logits, 2, 0.3, backend="triton")
        ro, rl, _ = R.decode_grouped_rope_ref(q, kb, kb[..., :LORA], torch.tensor([0, 4, 8], dtype=torch.int32), good,
                                              kv_lora_rank=LORA, rotary_dim=0, sm_scale=0.3)
        assert torch.isfinite(o).all() and torch.allclose(o, ro, atol=1e-4), ("grouped", bad)
    # decode_attention_fwd: req_to_token entries outside the pool
    req = torch.tensor([[3, 5, tokens + 4, 7], [-1, 1, 2, 9]], dtype=torch.int32)
    seqlen = torch.tensor([4, 4], dtype=torch.int32)
    o = torch.full((2, heads, LORA), NAN)
    logits = torch.full((2, heads, 2, LORA + 1), NAN)
    api.decode_attention_fwd(q, kb, kb[..., :LORA], o, None, req, seqlen, logits, 2, 0.3, backend="triton")
    ro, _, _ = R.decode_grouped_rope_ref(q, kb, kb[..., :LORA], torch.tensor([0, 3, 6], dtype=torch.int32),
                                         torch.tensor([3, 5, 7, 1, 2, 9], dtype=torch.int32), kv_lora_rank=LORA,
                                         rotary_dim=0, sm_scale=0.3)
    assert torch.isfinite(o).all() and torch.allclose(o, ro, atol=1e-4), "decode_attention_fwd"
    print("OK")
    """))


@needs_interpreter
def test_bad_page_ids_are_skipped_in_the_persistent_decode():
    """The persistent (work-list) decode reads pages through the same tile code: page ids past
    the pool, negative and huge are skipped (output equals the reference without that page)."""
    run_case(PAGED + textwrap.dedent("""
    page, heads = 4, 16
    case = make_paged_case(batch=2, heads=heads, kv_lens=[17, 9], q_lens=1, page_size=page, kv_lora_rank=LORA,
                           rope=ROPE, dtype=torch.float32, seed=8)
    pages = case.kv.shape[0]
    big, pool = guarded(tuple(case.kv.shape), pad=2)
    pool.copy_(case.kv)
    ind = case.kv_indptr.tolist()
    ro, rl = ref(case)
    for bad in (pages, -1, 2**31 - 1):
        seq0 = case.kv_indices[ind[0]:ind[1]].tolist()
        idx = torch.tensor(seq0[:-1] + [bad] + seq0[-1:] + case.kv_indices[ind[1]:ind[2]].tolist(), dtype=torch.int32)
        indptr = torch.tensor([0, ind[1] + 1, ind[2] + 1], dtype=torch.int32)
        info = api.get_mla_metadata_info_v1(2, 1, heads, torch.float32, torch.float32, is_sparse=False,
                                            max_split_per_batch=4)
        bufs = [torch.empty(shape, dtype=dt) for shape, dt in info]
        meta, w_indptr, w_info, r_indptr, r_final, r_partial = bufs
        api.get_mla_metadata_v1(case.qo_indptr, indptr, case.kv_last_page_lens, heads, 1, True, meta, w_info,
                                w_indptr, r_indptr, r_final, r_partial, page_size=page, max_seqlen_qo=1,
                                max_split_per_batch=4)
        o = torch.full((2, heads, LORA), NAN)
        api.mla_decode_fwd(case.q, pool, o, case.qo_indptr, indptr, idx, case.kv_last_page_lens, 1, page_size=page,
                           sm_scale=0.3, work_meta_data=meta, work_indptr=w_indptr, work_info_set=w_info,
                           reduce_indptr=r_indptr, reduce_final_map=r_final, reduce_partial_map=r_partial,
                           backend="triton")
        assert torch.isfinite(o).all() and torch.allclose(o, ro, atol=1e-4), bad
    print("OK")
    """))


@needs_interpreter
def test_nan_in_a_masked_keys_latent_row_does_not_leak():
    """MTP decode and prefill (causal): NaN in the latent (V) row of a key that some query rows
    cannot see reaches exactly the rows that see it; the others match the reference computed
    with that key finite (they do not depend on it)."""
    run_case(PAGED + textwrap.dedent("""
    for q_lens, kv_lens, page in (([4, 3], [20, 9], 4), ([12, 5], [12, 40], 16)):
        case = make_paged_case(batch=2, heads=4, kv_lens=kv_lens, q_lens=q_lens, page_size=page, kv_lora_rank=LORA,
                               rope=ROPE, dtype=torch.float32, seed=3)
        ro, rl = ref(case)
        # poison the latent row of the last key of sequence 0: only its last query row sees it
        ind = case.kv_indptr.tolist()
        last_page = int(case.kv_indices[ind[1] - 1])
        slot = (kv_lens[0] - 1) % page
        case.kv[last_page, slot, 0, :LORA] = NAN
        want = torch.zeros(sum(q_lens), dtype=torch.bool)
        want[q_lens[0] - 1] = True
        for splits in (1, 2):
            o, lse = decode(case, 4, splits=splits)
            nan_rows = torch.isnan(o).any(-1).any(-1)
            # the rows that do not see the key: finite and exact (split-K too)
            assert not nan_rows[~want].any() and torch.allclose(o[~want], ro[~want], atol=1e-4), (q_lens, splits)
            if splits == 1:  # aiter_core's split-K merge drops a NaN split (reported), so one split here
                assert torch.equal(nan_rows, want), (q_lens, nan_rows.tolist())
    print("OK")
    """))



@needs_interpreter
def test_lengths_past_the_buffers_and_empty_batches():
    """kv_indptr past kv_indices, seqused_k past the block table, non-monotonic qo_indptr: reads
    stay inside the given tensors (entries past them point at a NaN page, so a read past the
    table would show as NaN) and rows outside every sequence are not written (a finite sentinel
    stays); an empty batch and zero-length sequences are valid (output 0, LSE -inf)."""
    run_case(PAGED + textwrap.dedent("""
    case = make_paged_case(batch=2, heads=4, kv_lens=[9, 6], q_lens=1, page_size=4, kv_lora_rank=LORA, rope=ROPE,
                           dtype=torch.float32, seed=4)
    pages = case.kv.shape[0]
    pool = torch.cat([case.kv, torch.full((1,) + tuple(case.kv.shape[1:]), NAN)])  # page `pages` is NaN
    n = case.kv_indices.shape[0]
    big_idx = torch.full((n + 8,), pages, dtype=torch.int32)
    big_idx[:n] = case.kv_indices
    idx = big_idx[:n]
    # the last sequence's indptr runs 3 pages past kv_indices: those entries are not read
    indptr = case.kv_indptr.clone()
    indptr[-1] += 3
    o = torch.full((2, 4, LORA), NAN)
    bad = type(case)(case.q, pool, case.qo_indptr, indptr, idx, case.kv_last_page_lens, case.kv_lens, case.q_lens,
                     4, LORA, 1)
    o, lse = decode(bad, 4)
    assert torch.isfinite(o).all(), "read past kv_indices"
    ro, rl = ref(case)
    assert torch.allclose(o[0], ro[0], atol=1e-4), "the first sequence is unaffected"
    # block-table form: seqused_k beyond the table's width x block size
    width = 3
    big_t = torch.full((2, width + 4), pages, dtype=torch.int32)
    big_t[:, :width] = case.block_tables[:, :width] if case.block_tables.shape[1] >= width else 0
    tables = big_t[:, :width]
    seqused = torch.tensor([40, 6], dtype=torch.int32)  # 40 > 3 x 4
    out = torch.full((2, 4, LORA), NAN)
    triton_api.mla_decode_fwd(case.q, pool, out, case.qo_indptr, seqused, 40, tables, 0.3, LORA, ROPE, True, None,
                              None, num_kv_splits=2, backend="triton")
    assert torch.isfinite(out).all(), "read past the block table"
    # non-monotonic qo_indptr: the empty sequence writes nothing (sentinel stays), no crash
    qo = torch.tensor([0, 2, 1], dtype=torch.int32)
    q2 = torch.randn(2, 4, LORA + ROPE)
    o = torch.full((2, 4, LORA), 5.0)
    c2 = type(case)(q2, case.kv, qo, case.kv_indptr, case.kv_indices, case.kv_last_page_lens, case.kv_lens,
                    [2, -1], 4, LORA, 2)
    decode(c2, 4, max_seqlen_q=2, o=o)
    assert torch.isfinite(o).all()
    # empty batch and zero-length sequences: valid, compared with the reference
    empty = make_paged_case(batch=3, heads=4, kv_lens=[0, 5, 0], q_lens=[1, 1, 0], page_size=4, kv_lora_rank=LORA,
                            rope=ROPE, dtype=torch.float32, seed=5)
    o, lse = decode(empty, 4)
    ro, rl = ref(empty)
    assert torch.allclose(o, ro, atol=1e-4) and torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    assert (o[0] == 0).all() and torch.isneginf(lse[0]).all()
    z = make_paged_case(batch=1, heads=4, kv_lens=[3], q_lens=[0], page_size=4, kv_lora_rank=LORA, rope=ROPE,
                        dtype=torch.float32, seed=6)
    o, lse = decode(z, 4, max_seqlen_q=1)
    assert o.shape[0] == 0
    print("OK")
    """))


# -- host checks: every public entry point, one bad argument at a time (in-process, no launch) ------

L_, R_ = 16, 8  # kv_lora_rank, rope
F32, I32 = torch.float32, torch.int32


def _paged():
    q = torch.randn(2, 4, L_ + R_)
    return dict(q=q, kv_buffer=torch.randn(6, 2, 1, L_ + R_), o=torch.empty(2, 4, L_),
                qo_indptr=torch.tensor([0, 1, 2], dtype=I32), kv_indptr=torch.tensor([0, 2, 5], dtype=I32),
                kv_indices=torch.tensor([0, 1, 2, 3, 4], dtype=I32), kv_last_page_lens=torch.tensor([2, 1], dtype=I32),
                max_seqlen_q=1)


def _decode():
    return dict(_paged(), page_size=2, sm_scale=0.3, logit_cap=0.0, num_kv_splits=2)


def _prefill():
    return dict(_paged(), sm_scale=0.3, logit_cap=0.0)


def _prefill_ps():
    return dict(Q=torch.randn(3, 2, 48), K=torch.randn(8, 1, 48), V=torch.randn(8, 1, 32), output=torch.empty(3, 2, 32),
                qo_indptr=torch.tensor([0, 2, 3], dtype=I32), kv_indptr=torch.tensor([0, 4, 8], dtype=I32),
                kv_page_indices=torch.arange(8, dtype=I32), work_indptr=None, work_info_set=None, max_seqlen_q=2,
                is_causal=True, softmax_scale=0.2)


def _reduce():
    return dict(partial_output=torch.randn(4, 1, 2, L_), partial_lse=torch.randn(4, 1, 2, 1),
                reduce_indptr=torch.tensor([0, 2, 4], dtype=I32),
                reduce_final_map=torch.tensor([[0, 0], [1, 0]], dtype=I32),
                reduce_partial_map=torch.tensor([0, 1, 2, 3], dtype=I32), max_seqlen_q=1, num_kv_splits=2,
                final_output=torch.empty(2, 2, L_))


def _grouped():
    k = torch.randn(10, 1, L_ + R_)
    return dict(q=torch.randn(2, 4, L_ + R_), k_buffer=k, v_buffer=k[..., :L_], o=torch.empty(2, 4, L_),
                kv_indptr=torch.tensor([0, 4, 10], dtype=I32), kv_indices=torch.arange(10, dtype=I32),
                k_pe_tokens=torch.empty(2, R_), kv_lora_rank=L_, rotary_dim=R_, cos_sin_cache=torch.randn(32, R_),
                positions=torch.tensor([3, 9]), attn_logits=torch.empty(2, 4, 2, L_ + 1), num_kv_splits=2,
                sm_scale=0.3, logit_cap=0.0, use_rope=True, is_neox_style=True)


def _sglang_decode():
    k = torch.randn(12, 1, L_ + R_)
    return dict(q=torch.randn(2, 4, L_ + R_), k_buffer=k, v_buffer=k[..., :L_], o=torch.empty(2, 4, L_), lse=None,
                req_to_token=torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=I32), b_seq_len=torch.tensor([5, 6], dtype=I32),
                attn_logits=torch.empty(2, 4, 2, L_), num_kv_splits=2, sm_scale=0.3, page_size=2)


def _concat():
    return dict(kv_c=torch.randn(3, L_), k_pe=torch.randn(3, R_), kv_cache=torch.zeros(2, 4, L_ + R_),
                slot_mapping=torch.tensor([0, 5, -1]), kv_cache_dtype="auto")


def _rope_concat():
    return dict(q_nope=torch.randn(3, 2, L_), q_pe=torch.randn(3, 2, R_), kv_c=torch.randn(3, L_),
                k_pe=torch.randn(3, R_), kv_cache=torch.zeros(2, 4, L_ + R_), q_out=torch.empty(3, 2, L_ + R_),
                slot_mapping=torch.tensor([0, 5, -1]), k_scale=None, q_scale=None, positions=torch.tensor([1, 2, 3]),
                cos_cache=torch.randn(16, R_ // 2), sin_cache=torch.randn(16, R_ // 2), is_neox=True,
                is_nope_first=True)


def _rope_cat():
    return dict(q_nope=torch.randn(3, 2, L_), q_pe=torch.randn(3, 2, R_), k_nope=torch.randn(3, 1, L_),
                k_pe=torch.randn(3, 1, R_), kv_cache=torch.zeros(8, 1, L_ + R_), slot_mapping=torch.tensor([0, 5, 7]),
                pos=torch.tensor([1, 2, 3]), cos=torch.randn(16, R_ // 2), sin=torch.randn(16, R_ // 2), k_scale=None,
                is_neox=True)


def _bt(decode):
    def make():
        return dict(q=torch.randn(2, 4, L_ + R_), kv_buffer=torch.randn(6, 2, 1, L_ + R_), out=torch.empty(2, 4, L_),
                    cu_seqlens_q=torch.tensor([0, 1, 2], dtype=I32), seqused_k=torch.tensor([3, 4], dtype=I32),
                    max_seqlen_kv=4, block_tables=torch.tensor([[0, 1], [2, 3]], dtype=I32), softmax_scale=0.3,
                    kv_lora_rank=L_, qk_rope_head_dim=R_, causal=True, q_descale=None, kv_descale=None)
    return make


ENTRY_POINTS = {
    "mla_decode_fwd": (api.mla_decode_fwd, _decode),
    "mla_prefill_fwd": (api.mla_prefill_fwd, _prefill),
    "mla_prefill_ps_fwd": (api.mla_prefill_ps_fwd, _prefill_ps),
    "mla_reduce_v1": (api.mla_reduce_v1, _reduce),
    "decode_attention_fwd_grouped_rope": (api.decode_attention_fwd_grouped_rope, _grouped),
    "decode_attention_fwd": (api.decode_attention_fwd, _sglang_decode),
    "concat_and_cache_mla": (api.concat_and_cache_mla, _concat),
    "fused_qk_rope_concat_and_cache_mla": (api.fused_qk_rope_concat_and_cache_mla, _rope_concat),
    "fused_qk_rope_cat_and_cache_mla": (api.fused_qk_rope_cat_and_cache_mla, _rope_cat),
    "triton_api.mla_decode_fwd": (triton_api.mla_decode_fwd, _bt(True)),
    "triton_api.mla_prefill_fwd": (triton_api.mla_prefill_fwd, _bt(False)),
}

INDEX_ARGS = {"qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_lens", "kv_page_indices", "reduce_indptr",
              "reduce_partial_map", "b_seq_len", "cu_seqlens_q", "seqused_k", "slot_mapping", "positions", "pos"}
# a shorter list is valid for these (fewer sequences, fewer ids: the kernels read within it)
SHORT_IS_VALID = {"qo_indptr", "cu_seqlens_q", "kv_indices", "kv_page_indices", "reduce_partial_map", "reduce_indptr"}
SCALAR_FLOATS = {"sm_scale", "softmax_scale", "logit_cap"}


def _mutations(args):
    """(argument, label, new value) per category for every argument of ``args``."""
    first = next(iter(v for v in args.values() if isinstance(v, torch.Tensor)))
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            if value is first:
                yield name, "wrong dtype", value.to(torch.float64 if value.is_floating_point() else torch.int16)
            else:
                yield name, "wrong dtype", value.to(torch.float64 if value.is_floating_point() else torch.float32)
                yield name, "other device", value.to("meta")
            yield name, "wrong rank", value[None, None, None]
            yield name, "not a tensor", value.tolist()
            if name in INDEX_ARGS and value.dim() == 1 and value.numel() > 1:
                yield name, "strided", torch.stack([value, value], 1)[:, 0]
                if name not in SHORT_IS_VALID:
                    yield name, "short", value[:-1]
        elif name in SCALAR_FLOATS:
            for bad in (float("nan"), float("inf"), -float("inf")):
                yield name, f"scalar {bad}", bad
        elif name in ("max_seqlen_q", "num_kv_splits", "page_size", "kv_lora_rank") and isinstance(value, int) and \
                "reduce_indptr" not in args:  # (mla_reduce_v1 ignores num_kv_splits, as upstream's)
            yield name, "zero", 0
            yield name, "negative", -3


CASES = [(ep, name, label, i) for ep, (fn, make) in ENTRY_POINTS.items()
         for i, (name, label, _) in enumerate(_mutations(make()))]


@pytest.mark.parametrize("ep,arg,label,i", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_host_check_names_the_argument(ep, arg, label, i):
    fn, make = ENTRY_POINTS[ep]
    args = make()
    name, _, value = list(_mutations(args))[i]
    args[name] = value
    with pytest.raises((TypeError, ValueError), match=name):
        fn(**args, backend="triton")


@pytest.mark.parametrize("arg,value,match", [
    ("kv_indices", lambda a: a["kv_indices"].long(), r"kv_indices must have dtype int32, got torch.int64"),
    ("attn_logits", lambda a: a["attn_logits"].bfloat16(), r"attn_logits must have dtype float32"),
])
def test_grouped_rope_upstream_forms_say_what_to_pass(arg, value, match):
    """Issue 14: AITER's test passes int64 kv_indices and bf16 attn_logits; the error says what to
    pass instead ([B, 1] positions are accepted: see test_positions_past_the_rope_table_are_clamped)."""
    args = _grouped()
    args[arg] = value(args)
    with pytest.raises(TypeError, match=match):
        api.decode_attention_fwd_grouped_rope(**args, backend="triton")
