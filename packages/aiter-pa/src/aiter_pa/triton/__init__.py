"""Triton kernels of aiter-pa: paged attention (decode v1/v2, MTP, prefill) and cache writes."""
