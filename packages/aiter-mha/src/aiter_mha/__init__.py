"""aiter-mha: flash attention with upstream AITER's API (dense, varlen, fp8, KV cache), in Triton.

Importing the package is cheap; the public functions (and the ``torch.ops.aiter.mha_*`` ops)
load on first attribute access, so entry-point discovery never pulls in torch or Triton.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "flash_attn_func": "api",
    "flash_attn_varlen_func": "api",
    "flash_attn_fp8_pertensor_func": "api",
    "flash_attn_varlen_fp8_pertensor_func": "api",
    "mha_fwd": "api",
    "mha_varlen_fwd": "api",
    "mha_bwd": "api",
    "mha_varlen_bwd": "api",
    "flash_attn_fp8_func": "api",
    "flash_attn_varlen_fp8_func": "api",
    "flash_attn_with_kvcache": "api",
    "quantize_bshd_per_kv_head": "fp8",
    "quantize_thd_per_kv_head": "fp8",
    "apply_rotary": "kvcache",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aiter_mha' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
