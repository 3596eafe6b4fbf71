"""The KV-cache side of ``flash_attn_with_kvcache`` (upstream spec §1.7, FA2 API), shared by both
backends: rotary embedding and the in-place append, before the attention itself.

All device-side (no host sync, so it can be captured in a CUDA graph):
1. optional rotary embedding of the new k (at positions ``cache_seqlens + i``) and of q (same
   positions when causal or windowed, else all at ``cache_seqlens``), interleaved (GPT-J) or
   not (GPT-NeoX), on the first ``2 * rotary_cos.shape[1]`` channels;
2. in-place append of the new k/v into the cache at ``cache_seqlens`` (paged through
   ``block_table``, or rows ``cache_batch_idx`` of a contiguous cache, which is a paged cache with
   one page per row, ``page_block_size = cache capacity``);
3. the key lengths grow by the appended rows; attention then runs over the cache.

The caller guarantees ``cache_seqlens + seqlen_new <= capacity`` (checking it would need a host
sync). ``cache_leftpad`` is not supported. No backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import FwdCall
from .ops import arange

__all__ = ["apply_rotary", "prepare"]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, *, interleaved: bool) -> Tensor:
    """Rotate the first ``2 * cos.shape[1]`` channels of x (B, S, H, D) at ``positions`` (B, S).

    ``interleaved``: channel pairs (2i, 2i+1) (GPT-J); otherwise halves (i, i + rd/2) (GPT-NeoX).
    Computed in fp32, returned in x's dtype; channels past the rotary dim pass through.
    """
    half = cos.shape[1]
    rot = 2 * half
    c = cos.float()[positions][:, :, None, :]  # (B, S, 1, rd/2)
    s = sin.float()[positions][:, :, None, :]
    xr = x[..., :rot].float()
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    else:
        x0, x1 = xr[..., :half], xr[..., half:]
        rotated = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    if rot == x.shape[-1]:
        return rotated.to(x.dtype)
    return torch.cat((rotated.to(x.dtype), x[..., rot:]), dim=-1)


def block_table(call: FwdCall) -> Tensor:
    """The Call's block table; for a contiguous cache without ``cache_batch_idx``, row b for sequence b."""
    if call.block_table is not None:
        return call.block_table
    return arange(call.batch, 1, device=call.q.device).view(call.batch, 1)


def prepare(call: FwdCall) -> tuple[Tensor, Tensor, Tensor]:
    """Apply rotary and append the new k/v of a kvcache Call: (q to attend with, key lengths, block table)."""
    q, lens, table = call.q, call.seqlens_k, block_table(call)
    k, v = call.k_new, call.v_new
    if k is None:
        return q, lens, table
    batch, seqlen_q = q.shape[0], q.shape[1]
    seqlen_new = k.shape[1]
    start = lens.to(torch.int64)[:, None]
    positions = start + torch.arange(seqlen_new, device=q.device)[None, :]  # (B, Snew)
    if call.rotary_cos is not None:
        cos, sin, interleaved = call.rotary_cos, call.rotary_sin, call.rotary_interleaved
        k = apply_rotary(k, cos, sin, positions, interleaved=interleaved)
        if call.causal or call.window_left >= 0 or call.window_right >= 0:
            q_pos = start + torch.arange(seqlen_q, device=q.device)[None, :]
        else:
            q_pos = start.expand(batch, seqlen_q)
        q = apply_rotary(q, cos, sin, q_pos, interleaved=interleaved)
    page = call.k.shape[1]  # a contiguous cache is one page of `capacity` rows per sequence
    blocks = torch.gather(table.to(torch.int64), 1, positions // page)
    slots = positions % page
    call.k[blocks, slots] = k
    call.v[blocks, slots] = v
    return q, lens + seqlen_new, table
