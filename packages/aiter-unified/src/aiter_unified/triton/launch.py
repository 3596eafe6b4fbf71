"""Host side of the Triton backend: tile choice, the 2D/3D heuristic, the launch and the reduce.

Everything is decided from host integers (tensor shapes, ``max_seqlen_q``, ``max_seqlen_k``,
``num_seqs``) and the device's SM count, never from tensor values: no host sync, so the call can be
captured in a CUDA graph (the segment buffers come from the caching allocator).

Heuristic (:func:`plan`), starting from upstream's thresholds:

* ``GROUP_P2 = next_pow2(Hq / Hk)``; ``BLOCK_M = max(16, GROUP_P2)`` when every sequence has at most
  16 new tokens (decode, MTP), else ``max(64, GROUP_P2)`` (prefill rows feed bigger dots; the
  H100 tile sweep of 8 x 2048 prefills, d128, after the K/V address change: 64 rows x 64 keys on
  4 warps with 2 stages 306 TFLOP/s, 128 rows on 8 warps 293, 3 stages 273);
  ``BLOCK_Q = BLOCK_M / GROUP_P2``; head dims above 128 cap ``BLOCK_M`` at ``max(16, GROUP_P2)``
  to bound registers and shared memory.
* ``TILE_N``: 64 key tokens per step for head dims up to 128, 32 above.
* Mixed batches (``max_seqlen_q > 16``, single pass, head dim <= 128) run as two launches
  (:func:`plans`): sequences with at most 16 new tokens on the small decode tile, the rest on the
  prefill tile. On one 64-row tile a decode sequence's 4 real rows would pay for 64 in every
  dot (the H100 mixed shape ran 0.689 ms that way against 0.547 for aiter-mha + aiter-pa).
* query blocks: ``num_seqs`` when ``max_seqlen_q == 1`` else ``num_tokens // BLOCK_Q + num_seqs``;
  ``programs_2d = query_blocks * Hk``.
* The 2D kernel (single pass) runs when the sliding window is on, or ``max_seqlen_k <= 512``, or
  ``programs_2d >= 4 * SMs`` (enough programs to fill the GPU, upstream's threshold: on the H100
  the issue's decode shape, 512 programs on 132 SMs, ran 0.405 ms split (3D) against 0.437 in one
  pass, CUDA-graph timed twice on 2026-11-24; an earlier run that had 2D ahead did not repeat),
  unless ``skip_reduce`` asks for the segment buffers. Otherwise the 3D kernel splits every program's keys into
  ``NUM_SEGMENTS = next_pow2(clamp(ceil(4 * SMs / programs_2d), min(8, S_max), S_max))`` segments,
  ``S_max = min(128, ceil(max_seqlen_k / TILE_N))``, and aiter_core's ``splitk_merge`` reduces them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from aiter_core import triton_attn as ta
from aiter_core.triton_utils import cdiv

from .kernel import unified_attn_kernel

FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SHORT_Q = 16  # sequences with at most this many new tokens run on the small (decode) row tile
TWO_D_PROGRAMS_PER_SM = 4  # this many single-pass programs per SM and the 2D kernel runs
SEGMENT_PROGRAMS_PER_SM = 4  # the 3D kernel cuts keys into segments until it has this many
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True)
class Plan:
    group_p2: int
    block_m: int
    block_q: int
    tile_n: int
    block_d: int
    query_blocks: int
    num_segments: int  # 1: the 2D kernel
    num_warps: int
    num_stages: int
    blocks_per_seq: int  # > 0: query block b is block b % n of sequence b // n (0: searched)
    qlen_lo: int = 0  # this launch attends sequences with qlen_lo < new tokens <= qlen_hi
    qlen_hi: int = 2**31 - 1

    @property
    def use_2d(self) -> bool:
        return self.num_segments == 1


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    from aiter_core.arch import get_cu_num

    try:
        return max(int(get_cu_num()), 1)
    except Exception:  # no device description on the host: assume an H100
        return 132


def plan(*, num_tokens: int, num_seqs: int, heads_q: int, heads_kv: int, head_dim: int, max_seqlen_q: int,
         max_seqlen_k: int, sliding_window: int, device: torch.device, skip_reduce: bool = False,
         force: str | None = None, num_segments: int | None = None, tile_n: int | None = None,
         use_env_config: bool = True) -> Plan:
    """Launch parameters; ``force`` ("2d" / "3d"), ``num_segments`` and ``tile_n`` (a power of two
    >= 16) override the heuristic (tests and tuning), as does ``AITER_UNIFIED_CONFIG`` unless
    ``use_env_config`` is off."""
    group = heads_q // heads_kv
    group_p2 = triton.next_power_of_2(group)
    small_q = max_seqlen_q <= SHORT_Q or head_dim > 128
    block_m = max(16 if small_q else 64, group_p2)
    block_q = block_m // group_p2
    tile_n = tile_n or (64 if head_dim <= 128 else 32)
    block_d = triton.next_power_of_2(head_dim)
    tuned = _config_override() if use_env_config else None
    if tuned is not None:
        block_m, tile_n = max(tuned[0], group_p2, 16), tuned[1]
        block_q = block_m // group_p2
    query_blocks = num_seqs if max_seqlen_q == 1 else num_tokens // block_q + num_seqs
    programs_2d = query_blocks * heads_kv
    sms = _sm_count(device)
    target = SEGMENT_PROGRAMS_PER_SM * sms
    use_2d = sliding_window > 0 or max_seqlen_k <= 512 or programs_2d >= TWO_D_PROGRAMS_PER_SM * sms
    if force == "2d":
        use_2d = True
    elif force == "3d" or skip_reduce:
        use_2d = False
    if use_2d:
        segments = 1
    elif num_segments is not None:
        segments = num_segments
    else:
        seg_max = max(min(128, cdiv(max(max_seqlen_k, 1), tile_n)), 1)
        seg_min = min(8, seg_max)
        segments = triton.next_power_of_2(min(max(cdiv(target, max(programs_2d, 1)), seg_min), seg_max))
        segments = max(segments, 2)
    num_warps = 8 if block_m * block_d >= 64 * 256 else 4
    # 2 stages for prefill tiles (H100, 64 x 64 keys: 306 vs 273 TFLOP/s with 3) and above d128
    num_stages = 2 if head_dim > 128 or not small_q else 3
    if tuned is not None:
        num_warps, num_stages = tuned[2], tuned[3]
    return Plan(group_p2, block_m, block_q, tile_n, block_d, query_blocks, segments, num_warps, num_stages,
                1 if max_seqlen_q == 1 else 0)


def plans(*, num_tokens: int, num_seqs: int, heads_q: int, heads_kv: int, head_dim: int, max_seqlen_q: int,
          max_seqlen_k: int, sliding_window: int, device: torch.device, skip_reduce: bool = False,
          force: str | None = None, num_segments: int | None = None, tile_n: int | None = None) -> tuple[Plan, ...]:
    """The launches of one call: :func:`plan`'s, or for a single-pass batch that may mix decodes
    with prefills, a small-tile launch for sequences of at most ``SHORT_Q`` new tokens (a fixed
    ``SHORT_Q / BLOCK_Q`` blocks each) and the prefill-tile launch for the others. Which sequence
    is which is decided in the kernel (no host sync); programs of the other kind exit at once."""
    shape = dict(num_tokens=num_tokens, num_seqs=num_seqs, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
                 max_seqlen_k=max_seqlen_k, sliding_window=sliding_window, device=device)
    main = plan(max_seqlen_q=max_seqlen_q, skip_reduce=skip_reduce, force=force, num_segments=num_segments,
                tile_n=tile_n, **shape)
    if not main.use_2d or max_seqlen_q <= SHORT_Q or head_dim > 128 or skip_reduce:
        return (main,)
    short = plan(max_seqlen_q=SHORT_Q, force="2d", tile_n=tile_n, use_env_config=False, **shape)
    per_seq = cdiv(SHORT_Q, short.block_q)
    short = replace(short, query_blocks=num_seqs * per_seq, blocks_per_seq=per_seq, qlen_hi=SHORT_Q)
    return short, replace(main, qlen_lo=SHORT_Q)


def _config_override() -> tuple[int, int, int, int] | None:
    """``AITER_UNIFIED_CONFIG="block_m,tile_n,num_warps,num_stages"`` replaces the tile choice (tuning
    sweeps; ``block_m`` is raised to the padded GQA group and to 16, tl.dot's minimum)."""
    env = os.environ.get("AITER_UNIFIED_CONFIG")
    if not env:
        return None
    try:
        block_m, tile_n, warps, stages = (int(x) for x in env.split(","))
    except ValueError:
        raise ValueError(f"AITER_UNIFIED_CONFIG must be 'block_m,tile_n,num_warps,num_stages', got {env!r}") from None
    if any(v & (v - 1) or v < 1 for v in (block_m, tile_n)) or tile_n < 16:
        raise ValueError(f"AITER_UNIFIED_CONFIG: block_m and tile_n must be powers of two (tile_n >= 16), got {env!r}")
    return block_m, tile_n, warps, stages


def compute_dtype(q_dtype: torch.dtype):
    return tl.float16 if q_dtype in FP8_TYPES else _TL[q_dtype]


def kernel_args(q, k, v, out, cu_seqlens_q, seqused_k, block_table, *, softmax_scale, softcap, sliding_window,
                sinks, alibi_slopes, qq_bias, q_descale, k_descale, v_descale, output_scale, p: Plan,
                segm_out=None, segm_max=None, segm_sum=None):
    """(positional args, constexpr kwargs) of :func:`unified_attn_kernel` for one call."""
    num_seqs = cu_seqlens_q.shape[0] - 1
    dummy = seqused_k  # never read: its flag is off
    use_kv_desc = k_descale is not None and v_descale is not None
    so = segm_out if segm_out is not None else out
    sm = segm_max if segm_max is not None else seqused_k
    ss = segm_sum if segm_sum is not None else seqused_k
    so_strides = segm_out.stride()[:3] if segm_out is not None else (0, 0, 0)
    sm_strides = segm_max.stride() if segm_max is not None else (0, 0, 0)
    qq_stride = qq_bias.stride(0) if qq_bias is not None else 0
    args = (
        q, k, v, out, cu_seqlens_q, seqused_k, block_table,
        sinks if sinks is not None else dummy, alibi_slopes if alibi_slopes is not None else dummy,
        qq_bias if qq_bias is not None else dummy, q_descale if q_descale is not None else dummy,
        k_descale if use_kv_desc else dummy, v_descale if use_kv_desc else dummy,
        output_scale if output_scale is not None else dummy,
        so, sm, ss,
        num_seqs, p.qlen_lo, p.qlen_hi, block_table.shape[1], k.shape[0],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        block_table.stride(0), qq_stride,
        *so_strides, *sm_strides,
        float(softmax_scale), float(softcap), int(sliding_window),
    )
    out_fp8_max = float(torch.finfo(out.dtype).max) if out.dtype in FP8_TYPES else 0.0
    consts = dict(
        HEAD_D=q.shape[2], BLOCK_D=p.block_d, GROUP=q.shape[1] // k.shape[2], GROUP_P2=p.group_p2,
        BLOCK_Q=p.block_q, BLOCK_M=p.block_m, TILE_N=p.tile_n, KV_BLOCK=k.shape[1],
        s_qd=q.stride(2), s_od=out.stride(2), s_kd=k.stride(3), s_vd=v.stride(3),
        CDT=compute_dtype(q.dtype), USE_SOFTCAP=softcap > 0, USE_WINDOW=sliding_window > 0,
        HAS_ALIBI=alibi_slopes is not None, HAS_QQ=qq_bias is not None, HAS_SINKS=sinks is not None,
        HAS_QDESC=q_descale is not None, HAS_KVDESC=use_kv_desc, HAS_OSCALE=output_scale is not None,
        OUT_FP8_MAX=out_fp8_max, NUM_SEGMENTS=p.num_segments, BLOCKS_PER_SEQ=p.blocks_per_seq,
        OFFSET_BITS=32 if max(ta.max_element_offset(k), ta.max_element_offset(v)) < 2**31 else 64,
        SAME_KV_OFFSETS=k.stride()[:2] == v.stride()[:2],
    )
    return args, consts


def unified_attention_triton(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale,
                             window_size, block_table, softcap, q_descale, k_descale, v_descale, alibi_slopes=None,
                             output_scale=None, qq_bias=None, sinks=None, skip_reduce=False, force=None,
                             num_segments=None, tile_n=None):
    """Runs the kernels; returns ``None`` (``out`` written) or, with ``skip_reduce``, the segment
    buffers ``(segm_output [T, Hq, S, next_pow2(D)], segm_max [T, Hq, S], segm_expsum [T, Hq, S])``
    (``segm_output`` holds each segment's normalised output, ``segm_max`` its running max in
    natural-log units)."""
    num_tokens, heads_q, head_dim = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    sliding_window = 1 + int(window_size[0]) if int(window_size[0]) >= 0 else 0
    launches = plans(num_tokens=num_tokens, num_seqs=num_seqs, heads_q=heads_q, heads_kv=k.shape[2],
                     head_dim=head_dim, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                     sliding_window=sliding_window, device=q.device, skip_reduce=skip_reduce, force=force,
                     num_segments=num_segments, tile_n=tile_n)
    p = launches[-1]
    if num_tokens == 0 or num_seqs == 0:
        if skip_reduce:
            return _segment_buffers(q, p.num_segments, p.block_d)
        return None
    common = dict(softmax_scale=softmax_scale, softcap=float(softcap or 0.0), sliding_window=sliding_window,
                  sinks=sinks, alibi_slopes=alibi_slopes, qq_bias=qq_bias, q_descale=q_descale,
                  k_descale=k_descale, v_descale=v_descale, output_scale=output_scale)
    if p.use_2d:
        def launch(lp):
            args, consts = kernel_args(q, k, v, out, cu_seqlens_q, seqused_k, block_table, p=lp, **common)
            unified_attn_kernel[(lp.query_blocks, k.shape[2], 1)](*args, **consts, num_warps=lp.num_warps,
                                                                 num_stages=lp.num_stages)

        if len(launches) == 2 and q.is_cuda:
            # the two launches write disjoint rows: the memory-bound decode launch on a side
            # stream so the prefill launch's blocks can fill SMs it leaves idle (CUDA-graph safe:
            # fork and join through stream waits)
            main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                launch(launches[0])
            launch(launches[1])
            main.wait_stream(side)
        else:
            for lp in launches:
                launch(lp)
        return None
    grid = (p.query_blocks, k.shape[2], p.num_segments)
    segm_out, segm_max, segm_sum = _segment_buffers(q, p.num_segments, p.block_d)
    args, consts = kernel_args(q, k, v, out, cu_seqlens_q, seqused_k, block_table, segm_out=segm_out,
                               segm_max=segm_max, segm_sum=segm_sum, p=p, **common)
    unified_attn_kernel[grid](*args, **consts, num_warps=p.num_warps, num_stages=p.num_stages)
    if skip_reduce:
        return segm_out, segm_max, segm_sum
    view = segm_out[..., :head_dim]
    if output_scale is None and out.dtype not in FP8_TYPES:
        ta.splitk_merge(view, segm_max, out, partial_sum=segm_sum)
        return None
    # fp8 output: merge in fp32, then scale, saturate and cast (all on the device)
    merged = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    ta.splitk_merge(view, segm_max, merged, partial_sum=segm_sum)
    if output_scale is not None:
        merged.div_(output_scale.reshape(()).float())
    if out.dtype in FP8_TYPES:
        fmax = float(torch.finfo(out.dtype).max)
        merged.clamp_(-fmax, fmax)
    out.copy_(merged)
    return None


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def _segment_buffers(q, segments: int, block_d: int):
    t, h = q.shape[0], q.shape[1]
    return (torch.empty(t, h, segments, block_d, dtype=torch.float32, device=q.device),
            torch.empty(t, h, segments, dtype=torch.float32, device=q.device),
            torch.empty(t, h, segments, dtype=torch.float32, device=q.device))
