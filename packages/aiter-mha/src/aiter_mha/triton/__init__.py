"""Triton kernels for aiter-mha: forward (fwd.py), backward (bwd.py), shared score/mask helpers
(masking.py) and per-head-dim launch configs (configs.py)."""

from .bwd import flash_bwd
from .fwd import flash_fwd

__all__ = ["flash_fwd", "flash_bwd"]
