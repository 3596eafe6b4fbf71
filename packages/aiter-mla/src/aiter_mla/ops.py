"""Every aiter-mla op as a ``torch.ops.aiter.*`` custom op, and its dispatch.

All ops write their outputs in place and return nothing: the public functions in
:mod:`aiter_mla.api` allocate any buffer the caller did not give (shapes from arguments only,
so nothing syncs), call the op, and return upstream's values. ``mutates_args`` lists exactly
the buffers written; the fake implementations do nothing (no outputs to describe), which makes
every op traceable by ``torch.compile(fullgraph=True)`` and capturable in CUDA graphs.

Each op's body builds an :class:`aiter_core.Problem` (device and dtypes), asks the registry
for the backend (``triton`` or ``reference``; ``backend=`` forces one) and calls it with the
op's arguments as keywords.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from aiter_core.ops import register_op
from aiter_core.registry import Problem, dispatch

Tensor = torch.Tensor

__all__ = ["OPS", "make_problem"]


def make_problem(op: str, *tensors: Optional[Tensor]) -> Problem:
    first = next(t for t in tensors if t is not None)
    return Problem(op=op, device=first.device, device_type=first.device.type,
                   dtypes=tuple(t.dtype for t in tensors if t is not None))


def _register(fn, mutates: tuple[str, ...], dtype_args: tuple[str, ...]):
    """Register ``fn``'s signature as ``aiter::<name>``; the body dispatches to a backend."""
    name = fn.__name__
    signature = inspect.signature(fn)  # once: building it per call cost tens of microseconds
    params = [p for p in signature.parameters if p != "backend"]

    def impl(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        backend = values.pop("backend", None)
        problem = make_problem(name, *(values[a] for a in dtype_args))
        dispatch(name, problem, backend=backend)(**{p: values[p] for p in params})

    def fake(*args, **kwargs):
        return None

    impl.__signature__ = signature
    impl.__annotations__ = fn.__annotations__
    impl.__name__ = name
    fake.__signature__ = signature
    return register_op(name, impl, mutates_args=mutates, fake=fake)


# The signatures below are the op schemas (torch.library infers them from the annotations).


def mla_decode_fwd(q: Tensor, kv_buffer: Tensor, o: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                   kv_indices: Tensor, kv_last_page_lens: Tensor, max_seqlen_q: int, page_size: int,
                   sm_scale: float, causal: bool, num_kv_splits: int, logits: Optional[Tensor],
                   attn_lse: Optional[Tensor], final_lse: Optional[Tensor], q_scale: Optional[Tensor],
                   kv_scale: Optional[Tensor], backend: Optional[str] = None) -> None:
    ...


def mla_decode_fwd_persistent(q: Tensor, kv_buffer: Tensor, o: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                              kv_indices: Tensor, max_seqlen_q: int, page_size: int, sm_scale: float, causal: bool,
                              work_indptr: Tensor, work_info_set: Tensor, reduce_indptr: Tensor,
                              reduce_final_map: Tensor, reduce_partial_map: Tensor, partial_o: Tensor,
                              partial_lse: Tensor, final_lse: Optional[Tensor], q_scale: Optional[Tensor],
                              kv_scale: Optional[Tensor], backend: Optional[str] = None) -> None:
    ...


def mla_reduce_v1(partial_output: Tensor, partial_lse: Tensor, reduce_indptr: Tensor, reduce_final_map: Tensor,
                  reduce_partial_map: Tensor, max_seqlen_q: int, final_output: Tensor,
                  final_lse: Optional[Tensor], backend: Optional[str] = None) -> None:
    ...


def mla_prefill_fwd(q: Tensor, kv_buffer: Tensor, o: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                    kv_indices: Tensor, kv_last_page_lens: Tensor, max_seqlen_q: int, page_size: int,
                    sm_scale: float, causal: bool, lse: Optional[Tensor], backend: Optional[str] = None) -> None:
    ...


def mla_prefill_ps_fwd(q: Tensor, k: Tensor, v: Tensor, output: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                       kv_page_indices: Tensor, max_seqlen_q: int, is_causal: bool, softmax_scale: float,
                       q_scale: Optional[Tensor], k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                       lse: Optional[Tensor], backend: Optional[str] = None) -> None:
    ...


def mla_attention_block_table(q: Tensor, kv_buffer: Tensor, out: Tensor, cu_seqlens_q: Tensor, seqused_k: Tensor,
                              block_tables: Tensor, max_seqlen_q: int, softmax_scale: float, kv_lora_rank: int,
                              causal: bool, num_splits: int, partial_o: Optional[Tensor],
                              partial_lse: Optional[Tensor], lse: Optional[Tensor], q_descale: Optional[Tensor],
                              kv_descale: Optional[Tensor], backend: Optional[str] = None) -> None:
    ...


def decode_attention_fwd_grouped_rope(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, o: Tensor, kv_indptr: Tensor,
                                      kv_indices: Tensor, k_pe_tokens: Optional[Tensor], kv_lora_rank: int,
                                      rotary_dim: int, cos_sin_cache: Optional[Tensor], positions: Optional[Tensor],
                                      attn_logits: Tensor, num_kv_splits: int, sm_scale: float, logit_cap: float,
                                      use_rope: bool,
                                      is_neox_style: bool, backend: Optional[str] = None) -> None:
    ...


def decode_attention_fwd(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, o: Tensor, lse: Optional[Tensor],
                         req_to_token: Tensor, b_seq_len: Tensor, attn_logits: Tensor, attn_lse: Optional[Tensor],
                         num_kv_splits: int, sm_scale: float, page_size: int, logit_cap: float,
                         k_scale: Optional[Tensor], v_scale: Optional[Tensor], backend: Optional[str] = None) -> None:
    ...


def concat_and_cache_mla(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor, scale: Optional[Tensor],
                         backend: Optional[str] = None) -> None:
    ...


def fused_qk_rope_concat_and_cache_mla(q_nope: Tensor, q_pe: Tensor, kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor,
                                       q_out: Tensor, slot_mapping: Tensor, k_scale: Optional[Tensor],
                                       q_scale: Optional[Tensor], positions: Tensor, cos_cache: Tensor,
                                       sin_cache: Tensor, is_neox: bool, is_nope_first: bool,
                                       backend: Optional[str] = None) -> None:
    ...


def fused_qk_rope_cat_and_cache_mla(q_nope: Tensor, q_pe: Tensor, k_nope: Tensor, k_pe: Tensor, kv_cache: Tensor,
                                    slot_mapping: Tensor, pos: Tensor, cos: Tensor, sin: Tensor,
                                    k_scale: Optional[Tensor], is_neox: bool, apply_scale: bool, q_out: Tensor,
                                    k_pe_out: Tensor, decode_q_pe_out: Optional[Tensor],
                                    q_nope_zeros_out: Optional[Tensor], backend: Optional[str] = None) -> None:
    ...


_TABLE = [
    (mla_decode_fwd, ("o", "logits", "attn_lse", "final_lse"), ("q", "kv_buffer", "o")),
    (mla_decode_fwd_persistent, ("o", "partial_o", "partial_lse", "final_lse"), ("q", "kv_buffer", "o")),
    (mla_reduce_v1, ("final_output", "final_lse"), ("partial_output", "final_output")),
    (mla_prefill_fwd, ("o", "lse"), ("q", "kv_buffer", "o")),
    (mla_prefill_ps_fwd, ("output", "lse"), ("q", "k", "v", "output")),
    (mla_attention_block_table, ("out", "partial_o", "partial_lse", "lse"), ("q", "kv_buffer", "out")),
    (decode_attention_fwd_grouped_rope, ("o", "attn_logits", "k_pe_tokens"), ("q", "k_buffer", "v_buffer", "o")),
    (decode_attention_fwd, ("o", "lse", "attn_logits", "attn_lse"), ("q", "k_buffer", "v_buffer", "o")),
    (concat_and_cache_mla, ("kv_cache",), ("kv_c", "k_pe", "kv_cache")),
    (fused_qk_rope_concat_and_cache_mla, ("kv_cache", "q_out"), ("q_nope", "q_pe", "kv_c", "k_pe", "kv_cache", "q_out")),
    (fused_qk_rope_cat_and_cache_mla, ("kv_cache", "q_out", "k_pe_out", "decode_q_pe_out", "q_nope_zeros_out"),
     ("q_nope", "q_pe", "k_nope", "k_pe", "kv_cache", "q_out")),
]

OPS = {fn.__name__: _register(fn, mutates, dtype_args) for fn, mutates, dtype_args in _TABLE}
