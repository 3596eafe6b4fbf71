"""Host side of the Triton backend: a validated :class:`~aiter_unified.checks.Call` -> kernel
launch(es): tile choice, the 2D/3D heuristic, the launch and the reduce.

Everything is decided from host integers (tensor shapes, ``max_seqlen_q``, ``max_seqlen_k``,
``num_seqs``) and the device's SM count, never from tensor values: no host sync, so the call can be
captured in a CUDA graph (the segment buffers come from the caching allocator).

Heuristic (:func:`plan`; a Call key's tiles are computed once, :func:`tile_config`), starting from
upstream's thresholds:

* ``GROUP_P2 = next_pow2(Hq / Hk)``; ``BLOCK_M = max(16, GROUP_P2)`` when every sequence has at most
  16 new tokens (decode, MTP), else ``max(64, GROUP_P2)`` (prefill rows feed bigger dots; the
  H100 tile sweep of 8 x 2048 prefills, d128, after the K/V address change: 64 rows x 64 keys on
  4 warps with 2 stages 306 TFLOP/s, 128 rows on 8 warps 293, 3 stages 273);
  ``BLOCK_Q = BLOCK_M / GROUP_P2``; head dims above 128 cap ``BLOCK_M`` at ``max(16, GROUP_P2)``
  to bound registers and shared memory.
* ``TILE_N``: 64 key tokens per step for head dims up to 128, 32 above.
* Mixed batches (``max_seqlen_q > 16``, single pass, head dim <= 128) run as two launches
  (:func:`plan`): sequences with at most 16 new tokens on the small decode tile, the rest on the
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
* ``AITER_UNIFIED_ATTENTION_CONFIG="BLOCK_M=64,TILE_N=32,num_warps=4,num_stages=3"`` (any of
  the :class:`TileConfig` fields, :func:`aiter_core.configs.override`) replaces the main tile of
  both ops (tuning sweeps; ``BLOCK_M`` is raised to the padded GQA group and to 16, tl.dot's
  minimum); the small-tile launch of a mixed batch keeps its default.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import triton.language as tl

from aiter_core import configs, env
from aiter_core import triton_attn as ta
from aiter_core.triton_utils import cdiv, install_compile_notice
from aiter_core.triton_utils import launch as launch_kernel

from ..checks import SHORT_Q, Call, Key
from .kernel import unified_attn_kernel

install_compile_notice()

CONFIG_OP = "unified_attention"  # AITER_UNIFIED_ATTENTION_CONFIG: the main tile of both ops (one kernel)
FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
TWO_D_PROGRAMS_PER_SM = 4  # this many single-pass programs per SM and the 2D kernel runs
SEGMENT_PROGRAMS_PER_SM = 4  # the 3D kernel cuts keys into segments until it has this many
QLEN_MAX = 2**31 - 1
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_F32 = torch.float32
_ENVIRON = env.raw_environ()
_CONFIG_ENV = env.environ_key(configs.variable(CONFIG_OP))

__all__ = ["TileConfig", "KernelConfig", "Launch", "tile_config", "plan", "run", "kernel_args", "segment_buffers",
           "unified_attention", "unified_attention_segments"]


class TileConfig(NamedTuple):
    """One launch's tile: the fields ``AITER_UNIFIED_ATTENTION_CONFIG`` may set."""

    BLOCK_M: int  # rows of a program: BLOCK_Q query tokens x GROUP_P2 query heads
    TILE_N: int  # keys per step
    num_warps: int
    num_stages: int


class KernelConfig(NamedTuple):
    """The compile-time side of a launch (one kernel specialisation), made once per Call key."""

    consts: dict  # the kernel's constexpr keywords, num_warps and num_stages included (shared: do not modify)
    constexpr_args: tuple  # the constexpr values in the kernel's parameter order (passed positionally: cheaper)
    options: dict  # num_warps, num_stages


class Launch(NamedTuple):
    """One kernel launch of a call."""

    grid: tuple  # (query blocks, Hk, NUM_SEGMENTS)
    qlen_lo: int  # it attends the sequences with qlen_lo < new tokens <= qlen_hi
    qlen_hi: int
    config: KernelConfig

    @property
    def consts(self) -> dict:
        return self.config.consts


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for ``n >= 1``, without its host cost."""
    return 1 << (n - 1).bit_length()


def compute_dtype(q_dtype: torch.dtype):
    return tl.float16 if q_dtype in FP8_TYPES else _TL[q_dtype]


@lru_cache(maxsize=None)
def tile_config(head_dim: int, group_p2: int, short_q: bool, tile_n: int | None = None) -> TileConfig:
    """The default tile (see the module docstring); ``tile_n`` (a power of two >= 16) replaces
    TILE_N (tests)."""
    small_q = short_q or head_dim > 128
    block_m = max(16 if small_q else 64, group_p2)
    num_warps = 8 if block_m * next_pow2(head_dim) >= 64 * 256 else 4
    # 2 stages for prefill tiles (H100, 64 x 64 keys: 306 vs 273 TFLOP/s with 3) and above d128
    num_stages = 2 if head_dim > 128 or not small_q else 3
    return TileConfig(block_m, tile_n or (64 if head_dim <= 128 else 32), num_warps, num_stages)


def _override(default: TileConfig, group_p2: int) -> TileConfig:
    """``default`` through ``AITER_UNIFIED_ATTENTION_CONFIG``."""
    tuned = configs.override(CONFIG_OP, default)
    if tuned is default:
        return default
    block_m, tile_n = tuned.BLOCK_M, tuned.TILE_N
    if any(x < 1 or x & (x - 1) for x in (block_m, tile_n)) or tile_n < 16:
        raise ValueError(f"{configs.variable(CONFIG_OP)}: BLOCK_M and TILE_N must be powers of two (TILE_N >= 16), "
                         f"got BLOCK_M={block_m}, TILE_N={tile_n}")
    return tuned._replace(BLOCK_M=max(block_m, group_p2, 16))


def _kernel_config(key: Key, tile: TileConfig, num_segments: int, blocks_per_seq: int) -> KernelConfig:
    group = key.heads_q // key.heads_kv
    group_p2 = next_pow2(group)
    options = dict(num_warps=tile.num_warps, num_stages=tile.num_stages)
    consts = dict(
        HEAD_D=key.head_dim, BLOCK_D=next_pow2(key.head_dim), GROUP=group, GROUP_P2=group_p2,
        BLOCK_Q=tile.BLOCK_M // group_p2, BLOCK_M=tile.BLOCK_M, TILE_N=tile.TILE_N, KV_BLOCK=key.block_size,
        s_qd=1, s_od=1, s_kd=1, s_vd=1,  # the checks require unit strides along the head dim
        CDT=compute_dtype(key.dtype), USE_SOFTCAP=key.softcap, USE_WINDOW=key.window, HAS_ALIBI=key.alibi,
        HAS_QQ=key.qq_bias, HAS_SINKS=key.sinks, HAS_QDESC=key.q_descale, HAS_KVDESC=key.kv_descale,
        HAS_OSCALE=key.output_scale,
        OUT_FP8_MAX=float(torch.finfo(key.out_dtype).max) if key.out_dtype in FP8_TYPES else 0.0,
        NUM_SEGMENTS=num_segments, BLOCKS_PER_SEQ=blocks_per_seq, OFFSET_BITS=key.offset_bits,
        SAME_KV_OFFSETS=key.same_kv_offsets,
    )
    return KernelConfig({**consts, **options}, tuple(consts.values()), options)


class _Prepared:
    """The launch forms of one Call key: the main tile (through the config override) and its
    single-pass kernel config, the small tile of mixed batches, the split-KV configs per segment
    count (made on first use)."""

    def __init__(self, key: Key, tile_n: int | None):
        self.key = key
        group_p2 = next_pow2(key.heads_q // key.heads_kv)
        main = _override(tile_config(key.head_dim, group_p2, key.short_q, tile_n), group_p2)
        self.block_q = main.BLOCK_M // group_p2
        self.tile = main
        self.blocks_per_seq = 1 if key.decode else 0  # decode-only batches: block b is sequence b
        self.config_2d = _kernel_config(key, main, 1, self.blocks_per_seq)
        self.configs_3d: dict[int, KernelConfig] = {}
        self.short_config = None
        self.short_blocks = 0
        if not key.short_q and key.head_dim <= 128:  # a mixed batch: its short sequences on the small tile
            short = tile_config(key.head_dim, group_p2, True, tile_n)
            self.short_blocks = cdiv(SHORT_Q, short.BLOCK_M // group_p2)
            self.short_config = _kernel_config(key, short, 1, self.short_blocks)

    def split(self, num_segments: int) -> KernelConfig:
        config = self.configs_3d.get(num_segments)
        if config is None:
            config = _kernel_config(self.key, self.tile, num_segments, self.blocks_per_seq)
            self.configs_3d[num_segments] = config
        return config


@lru_cache(maxsize=512)
def _prepared(key: Key, config_env, tile_n: int | None) -> _Prepared:
    return _Prepared(key, tile_n)  # config_env (the override variable's value) only keys the cache


_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> int:
    count = _SM_COUNTS.get(device)
    if count is None:
        if device.type == "cuda":
            count = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            from aiter_core.arch import get_cu_num

            try:
                count = max(int(get_cu_num()), 1)
            except Exception:  # no device description on the host: assume an H100
                count = 132
        _SM_COUNTS[device] = count
    return count


def plan(call: Call, *, skip_reduce: bool = False, force: str | None = None, num_segments: int | None = None,
         tile_n: int | None = None) -> tuple[Launch, ...]:
    """The launches of one call (see the module docstring). ``force`` ("2d" / "3d"),
    ``num_segments`` and ``tile_n`` override the heuristic (tests and tuning); ``skip_reduce``
    always splits (the segment buffers are the result).

    A single-pass batch that may mix decodes with prefills gets a small-tile launch for sequences
    of at most ``SHORT_Q`` new tokens (a fixed ``SHORT_Q / BLOCK_Q`` blocks each) and the
    prefill-tile launch for the others. Which sequence is which is decided in the kernel (no host
    sync); programs of the other kind exit at once."""
    key = call.key
    p = _prepared(key, _ENVIRON.get(_CONFIG_ENV), tile_n)
    num_seqs, heads_kv = call.num_seqs, key.heads_kv
    query_blocks = num_seqs if key.decode else call.num_tokens // p.block_q + num_seqs
    if skip_reduce or force == "3d":
        single_pass = False
    elif force == "2d":
        single_pass = True
    else:
        single_pass = key.window or call.max_seqlen_k <= 512 or \
            query_blocks * heads_kv >= TWO_D_PROGRAMS_PER_SM * _sm_count(call.device)
    if single_pass:
        if p.short_config is None:
            return (Launch((query_blocks, heads_kv, 1), 0, QLEN_MAX, p.config_2d),)
        return (Launch((num_seqs * p.short_blocks, heads_kv, 1), 0, SHORT_Q, p.short_config),
                Launch((query_blocks, heads_kv, 1), SHORT_Q, QLEN_MAX, p.config_2d))
    if num_segments is None:
        seg_max = max(min(128, cdiv(call.max_seqlen_k, p.tile.TILE_N)), 1)
        target = SEGMENT_PROGRAMS_PER_SM * _sm_count(call.device)
        wanted = min(max(cdiv(target, max(query_blocks * heads_kv, 1)), min(8, seg_max)), seg_max)
        num_segments = max(next_pow2(wanted), 2)
    return (Launch((query_blocks, heads_kv, num_segments), 0, QLEN_MAX, p.split(num_segments)),)


def segment_buffers(call: Call, launch: Launch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(segm_output [T, Hq, S, BLOCK_D], segm_max [T, Hq, S], segm_expsum [T, Hq, S])`` fp32 of a split launch."""
    t, h, s = call.num_tokens, call.key.heads_q, launch.grid[2]
    device = call.device
    return (torch.empty(t, h, s, launch.consts["BLOCK_D"], dtype=_F32, device=device),
            torch.empty(t, h, s, dtype=_F32, device=device), torch.empty(t, h, s, dtype=_F32, device=device))


def kernel_args(call: Call, launch: Launch, buffers=None) -> tuple:
    """The positional arguments of :func:`unified_attn_kernel` for one launch (``buffers``: the
    split launch's :func:`segment_buffers`)."""
    dummy = call.seqused_k  # never read: its flag is off
    qs, os_, ks, vs = call.q_stride, call.out_stride, call.k_stride, call.v_stride
    qq_bias, k_descale = call.qq_bias, call.k_descale
    if buffers is None:
        so, sm, ss = call.out, dummy, dummy
        so_strides = sm_strides = (0, 0, 0)
    else:
        so, sm, ss = buffers
        h, s, block_d = call.key.heads_q, launch.grid[2], launch.consts["BLOCK_D"]
        so_strides, sm_strides = (h * s * block_d, s * block_d, block_d), (h * s, s, 1)  # contiguous
    return (
        call.q, call.k, call.v, call.out, call.cu_seqlens_q, call.seqused_k, call.block_table,
        dummy if call.sinks is None else call.sinks, dummy if call.alibi_slopes is None else call.alibi_slopes,
        dummy if qq_bias is None else qq_bias, dummy if call.q_descale is None else call.q_descale,
        dummy if k_descale is None else k_descale, dummy if k_descale is None else call.v_descale,
        dummy if call.output_scale is None else call.output_scale,
        so, sm, ss,
        call.num_seqs, call.num_tokens, call.max_seqlen_q, launch.qlen_lo, launch.qlen_hi, call.max_blocks,
        call.num_blocks,
        qs[0], qs[1], os_[0], os_[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        call.block_table_stride[0], 0 if qq_bias is None else qq_bias.stride(0),
        *so_strides, *sm_strides,
        call.softmax_scale, call.softcap, call.sliding_window,
    )


def run(call: Call, *, skip_reduce: bool = False, force: str | None = None, num_segments: int | None = None,
        tile_n: int | None = None):
    """Launch the kernels of ``call`` (:func:`plan`'s keywords); returns ``None`` (``out`` written) or,
    with ``skip_reduce``, the segment buffers ``[segm_output [T, Hq, S, next_pow2(D)], segm_max
    [T, Hq, S], segm_expsum [T, Hq, S]]`` (``segm_output`` holds each segment's normalised output,
    ``segm_max`` its running max in natural-log units)."""
    return _run(call, plan(call, skip_reduce=skip_reduce, force=force, num_segments=num_segments, tile_n=tile_n),
                skip_reduce)


def unified_attention(call: Call) -> None:
    """The ``triton`` backend of ``aiter::unified_attention``: writes ``call.out``."""
    _run(call, plan(call), False)


def unified_attention_segments(call: Call) -> list:
    """The ``triton`` backend of ``aiter::unified_attention_segments``: the split-KV buffers."""
    return _run(call, plan(call, skip_reduce=True), True)


def _launch(call: Call, launch: Launch, buffers=None) -> None:
    config = launch.config
    launch_kernel(unified_attn_kernel, launch.grid, *kernel_args(call, launch, buffers), *config.constexpr_args,
                  **config.options)


def _run(call: Call, launches: tuple[Launch, ...], skip_reduce: bool):
    last = launches[-1]
    if call.num_tokens == 0:
        return list(segment_buffers(call, last)) if skip_reduce else None
    if last.grid[2] == 1:  # single pass: out written
        if len(launches) == 2 and call.key.device_type == "cuda":
            # the two launches write disjoint rows: the memory-bound decode launch on a side
            # stream so the prefill launch's blocks can fill SMs it leaves idle (CUDA-graph safe:
            # fork and join through stream waits)
            main, side = torch.cuda.current_stream(call.device), _side_stream(call.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                _launch(call, launches[0])
            _launch(call, last)
            main.wait_stream(side)
        else:
            for launch in launches:
                _launch(call, launch)
        return None
    buffers = segment_buffers(call, last)
    _launch(call, last, buffers)
    if skip_reduce:
        return list(buffers)
    segm_out, segm_max, segm_sum = buffers
    view = segm_out[..., :call.key.head_dim]
    out = call.out
    if call.output_scale is None and call.key.out_dtype not in FP8_TYPES:
        ta.splitk_merge(view, segm_max, out, partial_sum=segm_sum)
        return None
    # fp8 output: merge in fp32, then scale, saturate and cast (all on the device)
    merged = torch.empty(out.shape, dtype=_F32, device=call.device)
    ta.splitk_merge(view, segm_max, merged, partial_sum=segm_sum)
    if call.output_scale is not None:
        merged.div_(call.output_scale.reshape(()).float())
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
