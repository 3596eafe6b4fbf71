"""Triton kernels of aiter-mla (see attention.py, launch.py, rope.py, cache.py)."""
