"""Host cost of an eager call, and first-call compile time: ``aiter bench host``.

Every family lists, in its ``bench.py``, one :class:`HostCase` per public op at a tiny shape (GPU
work of a few microseconds, so the loop is bound by the host) and, for ``aiter warmup``, the
calls that compile its default kernel specialisations (production-like head dims and dtypes at
small sizes). Its ``Family`` entry names both functions (``host=``, ``warmup=``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class HostCase:
    op: str  # the public function, as a user calls it: "paged_attention_decode"
    call: Callable[[], Any]  # one eager call (inputs made beforehand, outputs preallocated where the API allows)
    like: str = "decode"  # which torch SDPA call it is compared with: "decode" (1 query row) or "prefill"
