"""aiter-unified: AITER's ``unified_attention`` (one launch for mixed prefill, extend and decode
batches over a paged KV cache), in Triton.

Importing the package is cheap; the public function (and ``torch.ops.aiter.unified_attention``)
loads on first attribute access, so entry-point discovery never pulls in torch or Triton.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "unified_attention": "api",
    "unified_attention_ref": "reference",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aiter_unified' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
