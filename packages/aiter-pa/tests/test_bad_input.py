"""Bad-input sweep over every public entry point of aiter_pa.api (issue 11).

Host checks (wrong dtype, rank, shape, device, strides, NaN/inf/negative scalars) run in-process:
each must raise a clear error naming the argument. Index *contents* (bad block ids, slots past the
cache, start offsets past the packed tensor, too-small length bounds, NaN in masked V rows, empty
sequences) run in subprocesses under TRITON_INTERPRET=1 (a crash fails one test, not the run): each
compares with the PyTorch reference, which implements the same documented rule, and checks that
memory around the given tensors (guard regions poisoned with NaN or a sentinel) is untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import aiter_pa
from aiter_pa.bench import host_cases

META = torch.device("meta")


# -- host checks, in-process ------------------------------------------------------------------------------


def _cases():
    return {c.op: c for c in host_cases("cpu")}


def _run_case(case, monkeypatch, **patch):
    """Run a bench host case with some of its closure's tensors replaced (by name)."""
    fn = case.call
    names = fn.__code__.co_freevars
    cells = dict(zip(names, fn.__closure__))
    for name, value in patch.items():
        assert name in cells, f"{case.op}: no {name} in {names}"
        monkeypatch.setattr(cells[name], "cell_contents", value)
    fn()


# (op, closure variable, replacement factory, error type, match): one row per category and entry point
def _sweep():
    rows = []
    add = rows.append
    for op in ("paged_attention_decode", "paged_attention_rocm", "paged_attention_v1", "paged_attention_ragged",
               "pa_fwd_asm", "paged_attention_common"):
        qname = {"pa_fwd_asm": "Q", "paged_attention_common": "(Q|query)"}.get(op, "query")
        add((op, "q", lambda c: c.to(torch.int32), TypeError, f"{qname} must be"))  # dtype
        add((op, "q", lambda c: c[0], ValueError, qname))  # rank
        add((op, "q", lambda c: c.to(META), ValueError, "must be on|device"))  # device
        add((op, "out", lambda c: c[:, :, :-1], ValueError, "out"))  # shape
    for op in ("paged_attention_decode", "paged_attention_rocm", "paged_attention_v1", "paged_attention_common"):
        add((op, "d", lambda c: float("nan"), ValueError, "must be a finite number|scale"))
    for op in ("context_attention_fwd", "chunked_prefill_paged_decode", "extend_attention_fwd", "prefill_attention"):
        add((op, "qp", lambda c: c.to(torch.int32), TypeError, "q"))
        add((op, "qp", lambda c: c[0], ValueError, "q"))
        add((op, "op", lambda c: c.to(META), ValueError, "must be on"))
        add((op, "starts", lambda c: c.to(torch.float32), TypeError, "b_start_loc|qo_indptr|query_start_loc"))
        add((op, "starts", lambda c: torch.stack([c, c], 1)[:, 0], ValueError, "must be contiguous"))
        add((op, "starts", lambda c: c.to(META), ValueError, "must be on"))
    for op in ("reshape_and_cache", "reshape_and_cache_flash", "reshape_and_cache_with_pertoken_quant",
               "reshape_and_cache_with_block_quant"):
        add((op, "slots", lambda c: c.float(), TypeError, "slot_mapping"))
        add((op, "slots", lambda c: c.to(META), ValueError, "slot_mapping must be on"))
        add((op, "slots", lambda c: torch.stack([c, c], 1)[:, 0], ValueError, "slot_mapping must be contiguous"))
        add((op, "key", lambda c: c[:, :1], ValueError, "key must be"))
        add((op, "key", lambda c: c.to(torch.int8), TypeError, "key must be"))
    for op in ("swap_blocks", "copy_blocks"):
        name = "swap_map" if op == "swap_blocks" else "copy_map"
        add((op, name, lambda c: c.float(), TypeError, "block_mapping"))
        add((op, name, lambda c: c + 1000, ValueError, "block_mapping"))
        add((op, name, lambda c: c - 1000, ValueError, "block_mapping"))
    add(("paged_attention_decode", "max_ctx", lambda c: -1, ValueError, "max_seq_len"))
    add(("paged_attention_v1", "max_ctx", lambda c: 10 ** 6, ValueError, "block_tables is too narrow"))
    add(("paged_attention_ragged", "kv_indptr", lambda c: c.view(1, -1), ValueError, "kv_indptr"))
    add(("paged_attention_ragged", "pages", lambda c: c.float(), TypeError, "kv_page_indices"))
    return rows


SWEEP = _sweep()


@pytest.mark.parametrize("op,var,bad,exc,match", SWEEP, ids=[f"{r[0]}-{r[1]}-{i}" for i, r in enumerate(SWEEP)])
def test_host_checks_name_the_argument(op, var, bad, exc, match, monkeypatch):
    case = _cases()[op]
    cells = dict(zip(case.call.__code__.co_freevars, case.call.__closure__))
    with pytest.raises(exc, match=match):
        _run_case(case, monkeypatch, **{var: bad(cells[var].cell_contents)})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["attn_scale", "logits_soft_cap"])
def test_non_finite_scalars_refused(name, value):
    case = _cases()["paged_attention_decode"]
    cells = dict(zip(case.call.__code__.co_freevars, case.call.__closure__))
    hnd, q, out = (cells[n].cell_contents for n in ("hnd", "q", "out"))
    args = dict(attn_scale=0.1, logits_soft_cap=0.0)
    args[name] = value
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        aiter_pa.paged_attention_decode(out, q, hnd.key_cache, hnd.value_cache, hnd.context_lens, hnd.block_tables,
                                        args["attn_scale"], 30, logits_soft_cap=args["logits_soft_cap"])


@pytest.mark.parametrize("fn,kw", [("context_attention_fwd", "sm_scale"), ("extend_attention_fwd", "logit_cap")])
def test_prefill_non_finite_scalars_refused(fn, kw):
    case = _cases()[fn]
    cells = dict(zip(case.call.__code__.co_freevars, case.call.__closure__))
    c = {n: cells[n].cell_contents for n in cells}
    with pytest.raises(ValueError, match=f"{kw} must be a finite number"):
        if fn == "context_attention_fwd":
            aiter_pa.context_attention_fwd(c["qp"], c["kp"], c["vp"], c["op"], "auto", c["vllm"].key_cache,
                                           c["vllm"].value_cache, c["vllm"].block_tables, c["starts"], c["seq_lens"], 3,
                                           sm_scale=float("inf"))
        else:
            aiter_pa.extend_attention_fwd(c["qp"], c["kp"], c["vp"], c["op"], *c["tokens"], c["starts"], c["kv_ptr"],
                                          c["kv_idx"], None, True, None, 3, logit_cap=float("nan"))


# -- index contents, one subprocess per category ---------------------------------------------------------

PRELUDE = """
import torch, aiter_pa
from aiter_core.quant import KVQuant
from aiter_pa.testing import make_paged_kv
torch.manual_seed(0)
def guarded(shape, dtype=torch.float32, guard=8, fill=float('nan')):
    # a tensor that is a slice of a bigger buffer whose guard rows hold `fill`
    buf = torch.full((shape[0] + 2 * guard,) + tuple(shape[1:]), fill, dtype=dtype)
    return buf, buf[guard:guard + shape[0]]
def same(a, b):
    a, b = a.float(), b.float()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (torch.isnan(a).sum(), torch.isnan(b).sum())
    torch.testing.assert_close(torch.nan_to_num(a), torch.nan_to_num(b), atol=2e-3, rtol=2e-3)
"""

CASES = {
    # block ids negative / past the pool / huge: skipped (padding); pool guard blocks hold NaN
    "decode_bad_block_ids": """
kv = make_paged_kv([20, 33], 2, 32, 16, "NHD", KVQuant.NONE, torch.float32, seed=1, extra_blocks=3)
used = {int(b) for b in kv.block_tables.flatten() if 0 <= b < kv.num_blocks}
unused = [b for b in range(kv.num_blocks) if b not in used]
assert unused
kv.key_cache[unused] = float('nan'); kv.value_cache[unused] = float('nan')   # blocks no valid id names
bt = kv.block_tables.clone()
bt[0, 0] = -1; bt[1, 1] = kv.num_blocks + 5; bt[1, 2] = 2**31 - 1
q = torch.randn(2, 4, 32)
for backend in ("triton", "reference"):
    buf, out = guarded((2, 4, 32))
    aiter_pa.paged_attention_decode(out, q, kv.key_cache, kv.value_cache, kv.context_lens, bt, 0.2, 40,
                                    kv_cache_layout="NHD", backend=backend)
    assert torch.isnan(buf[:8]).all() and torch.isnan(buf[-8:]).all(), "guard rows written"
    assert torch.isfinite(out).all()
    if backend == "triton": tri = out.clone()
same(tri, out)
""",
    # b_start_loc past the packed tensor: clamped into [0, total rows]; rows past it never written
    "prefill_start_loc_past_end": """
kv = make_paged_kv([10, 7], 2, 32, 16, "vllm", KVQuant.NONE, torch.float32, seed=2)
T = 6
q, k, v = torch.randn(T, 4, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32)
starts = torch.tensor([0, 4, 50], dtype=torch.int32)   # last entry past the 6 rows
seq = torch.tensor([14, 100], dtype=torch.int32)
res = {}
for backend in ("triton", "reference"):
    buf, o = guarded((T, 4, 32), fill=7.0)
    aiter_pa.context_attention_fwd(q, k, v, o, "auto", kv.key_cache, kv.value_cache, kv.block_tables, starts,
                                   seq, 64, backend=backend)
    assert (buf[:8] == 7.0).all() and (buf[-8:] == 7.0).all(), "rows past the packed tensor written"
    res[backend] = o.clone()
same(res["triton"], res["reference"])
starts = torch.tensor([-5, 2, 6], dtype=torch.int32)  # negative first entry: clamped to 0
for backend in ("triton", "reference"):
    buf, o = guarded((T, 4, 32), fill=7.0)
    aiter_pa.context_attention_fwd(q, k, v, o, "auto", kv.key_cache, kv.value_cache, kv.block_tables, starts,
                                   seq, 64, backend=backend)
    assert (buf[:8] == 7.0).all() and (buf[-8:] == 7.0).all()
    res[backend] = o.clone()
same(res["triton"], res["reference"])
""",
    # max_input_len smaller than a sequence: its rows past the bound are flagged NaN, never left unwritten
    "prefill_max_input_len_too_small": """
kv = make_paged_kv([10, 7], 2, 32, 16, "vllm", KVQuant.NONE, torch.float32, seed=3)
T = 9
q, k, v = torch.randn(T, 4, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32)
starts = torch.tensor([0, 6, 9], dtype=torch.int32)
seq = torch.tensor([16, 10], dtype=torch.int32)
res = {}
for backend in ("triton", "reference"):
    o = torch.full((T, 4, 32), 7.0)
    aiter_pa.context_attention_fwd(q, k, v, o, "auto", kv.key_cache, kv.value_cache, kv.block_tables, starts,
                                   seq, 4, backend=backend)
    assert not (o == 7.0).any(), "rows left unwritten"
    assert torch.isnan(o[4:6]).all() and torch.isfinite(o[:4]).all() and torch.isfinite(o[6:]).all()
    res[backend] = o.clone()
same(res["triton"], res["reference"])
""",
    # kv_indptr past the page list (extend): clamped to its length; pool guards untouched by reads
    "extend_kv_indptr_past_end": """
T = 5
q, k, v = torch.randn(T, 4, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32)
kb, vb = torch.randn(40, 2, 32), torch.randn(40, 2, 32)
idx_buf = torch.full((30,), 2**30, dtype=torch.int32); idx = idx_buf[:20]; idx.copy_(torch.arange(20))
qo = torch.tensor([0, 3, 5], dtype=torch.int32)
kvp = torch.tensor([0, 12, 25], dtype=torch.int32)     # 25 > 20 entries
res = {}
for backend in ("triton", "reference"):
    o = torch.full((T, 4, 32), 7.0)
    aiter_pa.extend_attention_fwd(q, k, v, o, kb, vb, qo, kvp, idx, None, True, None, 3, backend=backend)
    assert torch.isfinite(o).all()
    res[backend] = o.clone()
same(res["triton"], res["reference"])
""",
    # slots negative or >= num_blocks * block_size write nothing; the cache is a slice of a guarded buffer
    "cache_write_bad_slots": """
from aiter_pa.layouts import allocate_kv_cache
nb, bs, H, D = 4, 16, 2, 32
for fn in ("reshape_and_cache_flash", "reshape_and_cache"):
    if fn == "reshape_and_cache_flash":
        kbuf = torch.full((nb + 2, bs, H, D), 7.0); vbuf = kbuf.clone()
        kc, vc = kbuf[1:-1], vbuf[1:-1]
    else:
        k5, v5 = allocate_kv_cache(nb + 2, bs, H, D, torch.float32, "vllm", "cpu")
        k5.fill_(7.0); v5.fill_(7.0); kbuf, vbuf = k5, v5; kc, vc = k5[1:-1], v5[1:-1]
    key, val = torch.randn(5, H, D), torch.randn(5, H, D)
    slots = torch.tensor([3, -1, nb * bs, 2**40, nb * bs - 1])
    getattr(aiter_pa, fn)(key, val, kc, vc, slots)
    assert (kbuf[0] == 7.0).all() and (kbuf[-1] == 7.0).all() and (vbuf[0] == 7.0).all() and (vbuf[-1] == 7.0).all()
    changed = (kc != 7.0).reshape(nb, -1).any(-1)
    assert changed.tolist() == [True, False, False, True], changed   # slots 3 (block 0) and 63 (block 3) only
""",
    # NaN in the V row of keys a row must not see (MTP causal, prefill causal): only rows that see it get NaN
    "nan_in_masked_v": """
kv = make_paged_kv([20], 1, 32, 16, "NHD", KVQuant.NONE, torch.float32, seed=4)
blk = kv.block_tables[0, 1].item()
kv.value_cache[blk, 19 - 16] = float('nan')     # the last cached key (position 19)
q = torch.randn(4, 2, 32)                        # MTP 4: rows at positions 16..19; only row 3 sees key 19
res = {}
for backend in ("triton", "reference"):
    out = torch.empty(4, 2, 32)
    aiter_pa.paged_attention_decode(out, q, kv.key_cache, kv.value_cache, kv.context_lens, kv.block_tables, 0.2, 20,
                                    kv_cache_layout="NHD", mtp=4, backend=backend)
    assert torch.isfinite(out[:3]).all() and torch.isnan(out[3]).all(), backend
    res[backend] = out.clone()
same(res["triton"], res["reference"])
kv = make_paged_kv([5], 1, 32, 16, "vllm", KVQuant.NONE, torch.float32, seed=5)
q, k, v = torch.randn(6, 2, 32), torch.randn(6, 1, 32), torch.randn(6, 1, 32)
v[4] = float('nan')                              # new key 4: rows 4 and 5 see it, rows 0..3 must not
for backend in ("triton", "reference"):
    o = torch.empty(6, 2, 32)
    aiter_pa.context_attention_fwd(q, k, v, o, "auto", kv.key_cache, kv.value_cache, kv.block_tables,
                                   torch.tensor([0, 6], dtype=torch.int32), torch.tensor([11], dtype=torch.int32), 6,
                                   backend=backend)
    assert torch.isfinite(o[:4]).all() and torch.isnan(o[4:]).all(), backend
    res[backend] = o.clone()
same(res["triton"], res["reference"])
""",
    # empty batch members and zero-length sequences: well defined, equal to the reference
    "zero_length_sequences": """
kv = make_paged_kv([0, 12], 2, 32, 16, "vllm", KVQuant.NONE, torch.float32, seed=6)
T = 3
q, k, v = torch.randn(T, 4, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32)
starts = torch.tensor([0, 0, 3], dtype=torch.int32)   # sequence 0 has no new rows
seq = torch.tensor([0, 15], dtype=torch.int32)
res = {}
for backend in ("triton", "reference"):
    o = torch.full((T, 4, 32), 7.0)
    aiter_pa.context_attention_fwd(q, k, v, o, "auto", kv.key_cache, kv.value_cache, kv.block_tables, starts,
                                   seq, 4, backend=backend)
    assert torch.isfinite(o).all()
    res[backend] = o.clone()
same(res["triton"], res["reference"])
out = torch.empty(0, 4, 32)
aiter_pa.paged_attention_decode(out, torch.empty(0, 4, 32), kv.key_cache, kv.value_cache,
                                torch.empty(0, dtype=torch.int32), torch.empty(0, 1, dtype=torch.int32), 0.2, 16,
                                kv_cache_layout="HND")
""",
}


@pytest.mark.parametrize("name", list(CASES))
def test_index_contents(name):
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = PRELUDE + textwrap.dedent(CASES[name]) + "\nprint('CASE-OK')\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "CASE-OK" in proc.stdout, f"{name}: rc={proc.returncode}\n{proc.stderr[-3000:]}"
