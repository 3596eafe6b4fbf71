"""torch.ops.aiter registration, dispatch through the registry, and tracing (tier 1/2)."""

from __future__ import annotations

import pytest
import torch

from aiter_core import registry
from aiter_mla import api
from aiter_mla.backends import OPS
from aiter_mla.ops import OPS as TORCH_OPS
from aiter_mla.testing import INTERPRET, make_paged_case

LORA, ROPE = 32, 16


def test_every_op_is_registered_with_exact_mutations():
    expected = {
        "mla_decode_fwd": {"o", "logits", "attn_lse", "final_lse"},
        "mla_decode_fwd_persistent": {"o", "partial_o", "partial_lse", "final_lse"},
        "mla_reduce_v1": {"final_output", "final_lse"},
        "mla_prefill_fwd": {"o", "lse"},
        "mla_prefill_ps_fwd": {"output", "lse"},
        "mla_attention_block_table": {"out", "partial_o", "partial_lse", "lse"},
        "decode_attention_fwd_grouped_rope": {"o", "attn_logits", "k_pe_tokens"},
        "decode_attention_fwd": {"o", "lse", "attn_logits", "attn_lse"},
        "concat_and_cache_mla": {"kv_cache"},
        "fused_qk_rope_concat_and_cache_mla": {"kv_cache", "q_out"},
        "fused_qk_rope_cat_and_cache_mla": {"kv_cache", "q_out", "k_pe_out", "decode_q_pe_out", "q_nope_zeros_out"},
    }
    assert set(expected) == set(OPS) == set(TORCH_OPS)
    for name, mutated in expected.items():
        schema = getattr(torch.ops.aiter, name).default._schema
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert written == mutated, name
        assert len(schema.returns) == 0, name


def test_both_backends_are_discovered_through_entry_points():
    for op in OPS:
        backends = {s.backend for s in registry.specs(op)}
        assert {"triton", "reference"} <= backends, op
    fam = [f for f in registry.families() if f.name == "mla"]
    assert fam and fam[0].distribution == "aiter-mla"


def _case():
    return make_paged_case(batch=2, heads=4, kv_lens=[20, 7], q_lens=[1, 2], page_size=4, kv_lora_rank=LORA,
                           rope=ROPE, dtype=torch.float32, seed=1, device="cpu")


def _call(case, o, backend=None):
    return api.mla_decode_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                              case.kv_last_page_lens, 2, page_size=4, sm_scale=0.2, num_kv_splits=2, return_lse=True,
                              backend=backend)


def test_opcheck_decode_reference_backend():
    case = _case()
    o = torch.empty(case.q.shape[0], 4, LORA)
    logits = torch.empty(case.q.shape[0], 2, 4, LORA)
    attn_lse = torch.empty(case.q.shape[0], 2, 4)
    lse = torch.empty(case.q.shape[0], 4)
    torch.library.opcheck(
        torch.ops.aiter.mla_decode_fwd.default,
        (case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_lens, 2, 4, 0.2, True,
         2, logits, attn_lse, lse, None, None, "reference"),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_env_variable_selects_backend(monkeypatch):
    case = _case()
    monkeypatch.setenv("AITER_MLA_DECODE_FWD_BACKEND", "reference")
    o = torch.full((case.q.shape[0], 4, LORA), float("nan"))
    logits, _ = _call(case, o)
    # the reference backend reports a single-split decomposition: split 0 holds the result
    torch.testing.assert_close(logits[:, 0], o)
    monkeypatch.setenv("AITER_MLA_DECODE_FWD_BACKEND", "nonexistent")
    with pytest.raises(registry.UnsupportedError, match="names no backend"):
        _call(case, o)


@pytest.mark.skipif(not INTERPRET, reason="compares the Triton backend on CPU tensors (interpreter)")
def test_triton_and_reference_backends_agree():
    case = _case()
    o_t = torch.full((case.q.shape[0], 4, LORA), float("nan"))
    o_r = torch.full_like(o_t, float("nan"))
    _, lse_t = _call(case, o_t, backend="triton")
    _, lse_r = _call(case, o_r, backend="reference")
    torch.testing.assert_close(o_t, o_r, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse_t, lse_r, atol=2e-5, rtol=1e-4)


def test_torch_compile_fullgraph_traces_the_public_function():
    case = _case()

    def step(q, kv, o):
        _, lse = api.mla_decode_fwd(q, kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                    case.kv_last_page_lens, 2, page_size=4, sm_scale=0.2, num_kv_splits=2,
                                    return_lse=True, backend="reference")
        return lse * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    o1 = torch.full((case.q.shape[0], 4, LORA), float("nan"))
    o2 = torch.full_like(o1, float("nan"))
    got = compiled(case.q, case.kv, o1)
    want = step(case.q, case.kv, o2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(o1, o2)


def test_triton_backend_explains_why_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from aiter_mla.backends import triton_supports

    reasons = triton_supports(registry.Problem(device=torch.device("cpu"), dtypes=(torch.float32,)))
    assert any("CPU" in r for r in reasons)
