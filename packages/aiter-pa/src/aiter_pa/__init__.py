"""aiter-pa: paged attention with upstream AITER's API, in Triton.

KV-cache layouts and writes, paged decode (v1 single pass / v2 split-K) with every KV
quantization, MTP, prefill, extend. Importing the package is cheap; the public functions (and
the ``torch.ops.aiter.*`` ops) load on first attribute access, so entry-point discovery never
pulls in torch or Triton.
"""

__version__ = "0.1.0"

_EXPORTS = {
    **{name: "api" for name in (
        "reshape_and_cache", "reshape_and_cache_flash", "reshape_and_cache_with_pertoken_quant",
        "reshape_and_cache_with_block_quant", "swap_blocks", "copy_blocks", "paged_attention_decode",
        "paged_attention_rocm", "paged_attention_v1", "paged_attention_ragged", "pa_fwd_asm",
        "paged_attention_common", "context_attention_fwd", "chunked_prefill_paged_decode", "extend_attention_fwd",
        "prefill_attention", "paged_attention_workspace_size", "decode_partials", "should_use_asm_kernel")},
    **{name: "layouts" for name in (
        "LAYOUTS", "describe_kv_cache", "allocate_kv_cache", "kv_cache_shapes", "to_nhd", "from_nhd",
        "convert_kv_cache", "asm_V_shuffle", "vector_width")},
    "choose_num_partitions": "triton.launch",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aiter_pa' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
