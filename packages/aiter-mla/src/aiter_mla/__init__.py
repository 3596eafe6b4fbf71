"""aiter-mla: DeepSeek multi-head latent attention with upstream AITER's API, in Triton.

Absorbed decode (``mla_decode_fwd``: paged, split-KV or persistent, MTP, fp8, any head count)
and prefill, the non-absorbed prefill (``mla_prefill_ps_fwd``), the persistent metadata and
reduce, SGLang's decode forms and the MLA cache ops (all in :mod:`aiter_mla.api`), and the
block-table forms of upstream's Triton module (:mod:`aiter_mla.triton_api`).

Importing the package is cheap; the public functions (and the ``torch.ops.aiter.*`` ops) load
on first attribute access, so entry-point discovery never pulls in torch or Triton.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "mla_decode_fwd": "api",
    "mla_prefill_fwd": "api",
    "mla_prefill_ps_fwd": "api",
    "mla_reduce_v1": "api",
    "get_mla_metadata_info_v1": "api",
    "get_mla_metadata_v1": "api",
    "get_mla_decode_fwd_max_splits": "api",
    "choose_num_kv_splits": "triton.launch",
    "decode_attention_fwd_grouped_rope": "api",
    "decode_attention_fwd": "api",
    "concat_and_cache_mla": "api",
    "fused_qk_rope_concat_and_cache_mla": "api",
    "fused_qk_rope_cat_and_cache_mla": "api",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aiter_mla' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
