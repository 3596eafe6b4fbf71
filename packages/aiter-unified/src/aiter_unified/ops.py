"""The ``aiter::`` ops of the family, one declaration each (:func:`aiter_core.ops.declare_op`).

An op's schema is its checks function's signature, its body ``registry.run(op, check(...))``: a
direct ``torch.ops.aiter.<op>(...)`` call is validated exactly like the public function.

* ``unified_attention`` writes ``out`` and returns nothing.
* ``unified_attention_segments`` (``skip_reduce=True``) leaves ``out`` alone and returns the three
  split-KV buffers; its fake gives their shapes from the launch plan.
"""

from __future__ import annotations

from typing import List

import torch

from aiter_core.ops import declare_op

from . import checks


def _segments_fake(*args, **kwargs):
    from .triton.launch import plan, segment_buffers

    call = checks.unified_attention_segments(*args, **kwargs)
    # the segment count is chosen from host ints: dynamic sizes it reads are specialised here (the
    # token dim of the buffers stays symbolic)
    sized = call._replace(key=checks.Key._make(map(_static, call.key)), num_tokens=_static(call.num_tokens),
                          num_seqs=_static(call.num_seqs), max_seqlen_k=_static(call.max_seqlen_k))
    return list(segment_buffers(call, plan(sized, skip_reduce=True)[-1]))


def _static(x):
    if isinstance(x, torch.SymInt):
        return int(x)
    return bool(x) if isinstance(x, torch.SymBool) else x


unified_attention = declare_op("unified_attention", checks.unified_attention, mutates_args=("out",))
unified_attention_segments = declare_op("unified_attention_segments", checks.unified_attention_segments,
                                        mutates_args=(), fake=_segments_fake, returns=List[torch.Tensor])
