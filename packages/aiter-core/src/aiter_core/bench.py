"""Benchmark helpers shared by every family's ``benchmarks/`` CLI.

* timing: :func:`median_ms`, the median of ``triton.testing.do_bench`` (GPU only), and
  :func:`graph_median_ms`, the same over a CUDA-graph replay (kernel time without Python launch
  overhead, the way serving frameworks run decode);
* counting: FLOPs and bytes exactly as ``spec/anchors.md`` defines them, so figures from
  different families and peers compare fairly;
* ceilings: :func:`measure_copy_tbps` and :func:`measure_matmul_tflops`, measured in the same
  run as the kernels they judge;
* results: :class:`BenchRun` collects rows plus the metadata a committed result must carry
  (UTC date, versions, device, the exact command, git commit) and writes a terminal table,
  JSON, Markdown and a PNG plot.

Importing this module does not import Triton (the CLI must set ``TRITON_INTERPRET`` first).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .triton_utils import interpreter_active

__all__ = [
    "smoke_instead",
    "median_ms",
    "graph_replay",
    "graph_median_ms",
    "tflops",
    "tbps",
    "visible_pairs",
    "attn_fwd_flops",
    "attn_bwd_flops",
    "varlen_attn_fwd_flops",
    "decode_bytes",
    "mla_decode_flops",
    "mla_decode_bytes",
    "sparse_mla_flops",
    "sparse_mla_bytes",
    "mqa_logits_flops",
    "mqa_logits_valid_pairs",
    "measure_copy_tbps",
    "measure_matmul_tflops",
    "Ceilings",
    "measure_ceilings",
    "BenchRun",
    "command_line",
    "environment_info",
    "progress",
]


# ----------------------------------------------------------------------------- timing


def _require_gpu(what: str) -> None:
    if interpreter_active():
        raise RuntimeError(f"{what} needs a GPU: TRITON_INTERPRET=1 runs kernels in the CPU "
                           "interpreter, which cannot be timed; unset it on a GPU machine")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a GPU: torch sees no CUDA/ROCm device on this machine "
                           "(run `aiter check` for the CPU correctness demo instead)")


def median_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """Median runtime of ``fn()`` in milliseconds, by ``triton.testing.do_bench``.

    ``warmup`` and ``rep`` are milliseconds of runtime (do_bench's convention), not counts.
    do_bench flushes the L2 cache between runs. Raises RuntimeError on a machine without GPU.
    """
    _require_gpu("median_ms")
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_replay(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph; returns the graph's ``replay``.

    ``fn`` runs twice on a side stream first (Triton compiles and the caching allocator settles
    outside the capture), so it must not sync the host (a ``.item()`` would fail the capture).
    """
    _require_gpu("graph_replay")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def graph_median_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """:func:`median_ms` of a CUDA-graph replay of ``fn`` (see :func:`graph_replay`)."""
    return median_ms(graph_replay(fn), warmup=warmup, rep=rep)


def tflops(flops: float, ms: float) -> float:
    """FLOPs done in ``ms`` milliseconds -> TFLOP/s."""
    if ms <= 0:
        raise ValueError(f"ms must be positive, got {ms}")
    return flops / (ms * 1e-3) / 1e12


def tbps(nbytes: float, ms: float) -> float:
    """Bytes moved in ``ms`` milliseconds -> TB/s (10^12 bytes per second)."""
    if ms <= 0:
        raise ValueError(f"ms must be positive, got {ms}")
    return nbytes / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- counting


def _nonneg_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _window(window: Any) -> tuple[int, int]:
    if window is None:
        return (-1, -1)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be None or a (left, right) pair of ints (-1 = unbounded), got {window!r}")
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"window sizes must be >= 0 or -1 (unbounded), got {window!r}")
    return (left, right)


def visible_pairs(sq: int, sk: int, causal: bool = False, window: tuple[int, int] | None = None) -> int:
    """Exact number of (query, key) pairs attention computes for one sequence and head.

    Masks are bottom-right aligned: query ``i`` sits at key position ``i + sk - sq``. ``causal``
    keeps keys ``j <= i + sk - sq``; ``window=(left, right)`` keeps keys with
    ``i + sk - sq - left <= j <= i + sk - sq + right`` (-1 = unbounded on that side). With both,
    the right side is the tighter of the two, as in FlashAttention.
    """
    sq = _nonneg_int("sq", sq)
    sk = _nonneg_int("sk", sk)
    left, right = _window(window)
    if causal:
        right = 0 if right == -1 else min(right, 0)
    if sq == 0 or sk == 0:
        return 0
    diag = torch.arange(sq, dtype=torch.int64) + (sk - sq)
    hi = torch.full_like(diag, sk - 1) if right == -1 else torch.clamp(diag + right, max=sk - 1)
    lo = torch.zeros_like(diag) if left == -1 else torch.clamp(diag - left, min=0)
    return int(torch.clamp(hi - lo + 1, min=0).sum().item())


def attn_fwd_flops(b: int, h: int, sq: int, sk: int, d_qk: int, d_v: int | None = None,
                   causal: bool = False, window: tuple[int, int] | None = None) -> float:
    """MHA forward FLOPs: ``2 * b * h * pairs * (d_qk + d_v)`` (``spec/anchors.md``).

    ``pairs`` is ``sq * sk``; causal with ``sq == sk`` and no window halves it (the convention
    every published figure uses); any other mask counts the real visible pairs
    (:func:`visible_pairs`), which is what "the real mean window" means.
    """
    b = _nonneg_int("b", b)
    h = _nonneg_int("h", h)
    d_qk = _nonneg_int("d_qk", d_qk)
    d_v = d_qk if d_v is None else _nonneg_int("d_v", d_v)
    _window(window)
    if window is None and not causal:
        pairs = float(_nonneg_int("sq", sq) * _nonneg_int("sk", sk))
    elif window is None and causal and sq == sk:
        pairs = _nonneg_int("sq", sq) * sk / 2.0
    else:
        pairs = float(visible_pairs(sq, sk, causal, window))
    return 2.0 * b * h * pairs * (d_qk + d_v)


def attn_bwd_flops(b: int, h: int, sq: int, sk: int, d_qk: int, d_v: int | None = None,
                   causal: bool = False, window: tuple[int, int] | None = None) -> float:
    """MHA backward FLOPs: 2.5 x forward (``spec/anchors.md``)."""
    return 2.5 * attn_fwd_flops(b, h, sq, sk, d_qk, d_v, causal, window)


def varlen_attn_fwd_flops(h: int, seqlens_q: Sequence[int], seqlens_k: Sequence[int], d_qk: int,
                          d_v: int | None = None, causal: bool = False,
                          window: tuple[int, int] | None = None) -> float:
    """Forward FLOPs of a varlen batch: the sum of :func:`attn_fwd_flops` per sequence."""
    seqlens_q, seqlens_k = list(seqlens_q), list(seqlens_k)
    if len(seqlens_q) != len(seqlens_k):
        raise ValueError(f"seqlens_q and seqlens_k must have the same length, got {len(seqlens_q)} "
                         f"and {len(seqlens_k)}")
    return sum(attn_fwd_flops(1, h, sq, sk, d_qk, d_v, causal, window) for sq, sk in zip(seqlens_q, seqlens_k))


def _nbytes_per_element(name: str, value: int | float | torch.dtype) -> float:
    if isinstance(value, torch.dtype):
        return float(value.itemsize)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise TypeError(f"{name} must be a torch.dtype or a non-negative byte count, got {value!r}")
    return float(value)


def _total(name: str, value: int | Sequence[int], count: int | None = None) -> int:
    """An int, or a per-sequence list summed."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return _nonneg_int(name, value) * (1 if count is None else count)
    values = list(value)
    for v in values:
        _nonneg_int(name, v)
    return sum(values)


def decode_bytes(b: int, h_q: int, h_kv: int, s_q: int, kv_lens: int | Sequence[int], d_qk: int,
                 d_v: int | None = None, q_bytes: int | float | torch.dtype = 2,
                 kv_bytes: int | float | torch.dtype = 2, o_bytes: int | float | torch.dtype = 2,
                 kv_scale_bytes: int | float = 0) -> float:
    """Bytes a decode call must move at least once (``spec/anchors.md``).

    ``Q [b, s_q, h_q, d_qk]`` + K and V of every attended token (``kv_lens``: one int for every
    sequence, or the per-sequence list; paged caches count only the tokens actually attended)
    + their scales (``kv_scale_bytes`` per token and KV head, K and V together) + ``O``.
    Element sizes are byte counts or dtypes (fp8 KV: 1; packed int4: 0.5).
    """
    b, h_q, h_kv, s_q, d_qk = (_nonneg_int(n, v) for n, v in
                               (("b", b), ("h_q", h_q), ("h_kv", h_kv), ("s_q", s_q), ("d_qk", d_qk)))
    d_v = d_qk if d_v is None else _nonneg_int("d_v", d_v)
    tokens = _total("kv_lens", kv_lens, b)
    q = b * s_q * h_q * d_qk * _nbytes_per_element("q_bytes", q_bytes)
    kv = tokens * h_kv * (d_qk + d_v) * _nbytes_per_element("kv_bytes", kv_bytes)
    scales = tokens * h_kv * _nbytes_per_element("kv_scale_bytes", kv_scale_bytes)
    o = b * s_q * h_q * d_v * _nbytes_per_element("o_bytes", o_bytes)
    return q + kv + scales + o


def mla_decode_flops(b: int, h_q: int, s_q: int, mean_sk: float, d_k: int = 576, d_v: int = 512) -> float:
    """MLA decode FLOPs ``2 * b * h_q * s_q * mean_sk * (d_k + d_v)``, d_k 576 and d_v 512."""
    if mean_sk < 0:
        raise ValueError(f"mean_sk must be >= 0, got {mean_sk}")
    return 2.0 * _nonneg_int("b", b) * _nonneg_int("h_q", h_q) * _nonneg_int("s_q", s_q) * mean_sk * (
        _nonneg_int("d_k", d_k) + _nonneg_int("d_v", d_v))


def mla_decode_bytes(b: int, h_q: int, s_q: int, kv_lens: int | Sequence[int], d_k: int = 576,
                     d_v: int = 512, q_bytes: int | float | torch.dtype = 2,
                     kv_bytes: int | float | torch.dtype = 2, o_bytes: int | float | torch.dtype = 2,
                     kv_scale_bytes: int | float = 0) -> float:
    """MLA decode bytes: Q + every KV row once (one latent KV head of ``d_k``; V is its first
    ``d_v`` columns, not read twice) + their scales + O."""
    b, h_q, s_q = (_nonneg_int(n, v) for n, v in (("b", b), ("h_q", h_q), ("s_q", s_q)))
    d_k, d_v = _nonneg_int("d_k", d_k), _nonneg_int("d_v", d_v)
    rows = _total("kv_lens", kv_lens, b)
    return (b * s_q * h_q * d_k * _nbytes_per_element("q_bytes", q_bytes)
            + rows * (d_k * _nbytes_per_element("kv_bytes", kv_bytes)
                      + _nbytes_per_element("kv_scale_bytes", kv_scale_bytes))
            + b * s_q * h_q * d_v * _nbytes_per_element("o_bytes", o_bytes))


def sparse_mla_flops(total_topk: int, h_q: int, d_qk: int = 576, d_v: int = 512) -> float:
    """Sparse MLA FLOPs ``2 * total_topk * h_q * (d_qk + d_v)``; ``total_topk`` counts the valid
    selected keys summed over query tokens."""
    return 2.0 * _nonneg_int("total_topk", total_topk) * _nonneg_int("h_q", h_q) * (
        _nonneg_int("d_qk", d_qk) + _nonneg_int("d_v", d_v))


def sparse_mla_bytes(kv_rows: int, q_tokens: int, h_q: int, d_qk: int = 576, d_v: int = 512,
                     q_bytes: int | float | torch.dtype = 2, kv_bytes: int | float | torch.dtype = 2,
                     o_bytes: int | float | torch.dtype = 2, kv_scale_bytes: int | float = 0) -> float:
    """Sparse MLA bytes: the gathered valid KV rows (``kv_rows``, each ``d_qk`` wide plus
    scales) + Q + O."""
    kv_rows, q_tokens, h_q = (_nonneg_int(n, v) for n, v in
                              (("kv_rows", kv_rows), ("q_tokens", q_tokens), ("h_q", h_q)))
    d_qk, d_v = _nonneg_int("d_qk", d_qk), _nonneg_int("d_v", d_v)
    return (kv_rows * (d_qk * _nbytes_per_element("kv_bytes", kv_bytes)
                       + _nbytes_per_element("kv_scale_bytes", kv_scale_bytes))
            + q_tokens * h_q * d_qk * _nbytes_per_element("q_bytes", q_bytes)
            + q_tokens * h_q * d_v * _nbytes_per_element("o_bytes", o_bytes))


def mqa_logits_valid_pairs(ks: Sequence[int] | torch.Tensor, ke: Sequence[int] | torch.Tensor) -> int:
    """Valid (q, k) pairs of the MQA-logits indexer: ``sum(max(0, ke[i] - ks[i]))`` where query
    ``i`` sees keys ``[ks[i], ke[i])``."""
    ks_t = torch.as_tensor(ks, dtype=torch.int64).flatten()
    ke_t = torch.as_tensor(ke, dtype=torch.int64).flatten()
    if ks_t.shape != ke_t.shape:
        raise ValueError(f"ks and ke must have the same length, got {ks_t.numel()} and {ke_t.numel()}")
    return int(torch.clamp(ke_t - ks_t, min=0).sum().item())


def mqa_logits_flops(valid_pairs: int, heads: int, head_dim: int) -> float:
    """MQA logits FLOPs ``2 * valid(q, k) pairs * heads * head_dim``."""
    return 2.0 * _nonneg_int("valid_pairs", valid_pairs) * _nonneg_int("heads", heads) * _nonneg_int(
        "head_dim", head_dim)


# ----------------------------------------------------------------------------- ceilings


def measure_copy_tbps(device: str | torch.device = "cuda", nbytes: int = 1 << 30,
                      warmup: int = 25, rep: int = 100) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read + written (2 x nbytes)."""
    _require_gpu("measure_copy_tbps")
    nbytes = _nonneg_int("nbytes", nbytes)
    if nbytes < 4:
        raise ValueError(f"nbytes must be at least 4, got {nbytes}")
    n = nbytes // 4
    src = torch.randn(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=warmup, rep=rep)
    return tbps(2 * n * 4, ms)


def measure_matmul_tflops(device: str | torch.device = "cuda", n: int = 8192,
                          dtype: torch.dtype = torch.bfloat16, warmup: int = 25, rep: int = 100) -> float:
    """Dense ``n x n x n`` matmul throughput in TFLOP/s (``2 n^3`` FLOPs) on random data."""
    _require_gpu("measure_matmul_tflops")
    n = _nonneg_int("n", n)
    if n == 0:
        raise ValueError("n must be positive")
    a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.matmul(a, b, out=out), warmup=warmup, rep=rep)
    return tflops(2.0 * n**3, ms)


@dataclass
class Ceilings:
    """The measured limits a run's figures are divided by."""

    copy_tbps: float
    matmul_tflops: float
    matmul_dtype: str = "bf16"

    def as_dict(self) -> dict[str, Any]:
        return {"copy_tbps": self.copy_tbps, "matmul_tflops": self.matmul_tflops,
                "matmul_dtype": self.matmul_dtype}


def measure_ceilings(device: str | torch.device = "cuda", copy_bytes: int = 1 << 30, matmul_n: int = 8192,
                     matmul_dtype: torch.dtype = torch.bfloat16) -> Ceilings:
    """Both ceilings, measured now on ``device``."""
    return Ceilings(
        copy_tbps=measure_copy_tbps(device, copy_bytes),
        matmul_tflops=measure_matmul_tflops(device, matmul_n, matmul_dtype),
        matmul_dtype=str(matmul_dtype).removeprefix("torch."),
    )


# ----------------------------------------------------------------------------- metadata


def command_line(argv: Sequence[str] | None = None) -> str:
    """The exact command, shell-quoted so it can be pasted back (``sys.argv`` by default)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    first = argv[0]
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_spec is not None and Path(first).resolve() == Path(main_spec.origin or "").resolve():
        # started as `python -m pkg.mod`: argv[0] holds the file's path, show the module
        argv = ["python", "-m", main_spec.name.removesuffix(".__main__")] + argv[1:]
    elif first.endswith("__main__.py"):
        # `python -m pkg` leaves the module's path in argv[0]; show how it was started
        argv = ["python", "-m", Path(first).parent.name] + argv[1:]
    elif first.endswith(".py"):
        argv = ["python"] + argv
    elif os.path.isabs(first) and shutil.which(Path(first).name) == first:
        argv = [Path(first).name] + argv[1:]  # a console script found on PATH: `aiter ...`
    return shlex.join(argv)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.getcwd())
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if out.returncode != 0 or not commit:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, timeout=5, cwd=os.getcwd())
    return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _dist_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def environment_info(include_families: bool = True) -> dict[str, Any]:
    """Versions, device and arch of this machine, without importing Triton."""
    from . import __version__ as core_version
    from .arch import get_arch_info

    arch = get_arch_info()
    info: dict[str, Any] = {
        "aiter_core_version": core_version,
        "torch_version": torch.__version__,
        "triton_version": _dist_version("triton", "pytorch-triton", "pytorch-triton-rocm"),
        "cuda_version": torch.version.cuda,
        "hip_version": torch.version.hip,
        "python_version": platform.python_version(),
        "device_name": arch.device_name,
        "arch": arch.name,
        "num_sms": arch.num_cu,
        "interpreter": interpreter_active(),
    }
    if include_families:
        from .registry import families

        info["families"] = {f.name: f.version for f in families()}
    return info


# ----------------------------------------------------------------------------- results

_THROUGHPUT_KEYS = ("tflops", "tbps")


@dataclass
class BenchRun:
    """Rows of one benchmark run plus the metadata that makes them reproducible.

    Each row is a dict with ``op``, ``provider``, the case's shape parameters, ``ms`` and,
    when FLOPs/bytes were given, ``tflops``/``tbps``. :meth:`finalize` adds
    ``ratio_to_best_peer`` (this provider's throughput over the best *other* provider of the
    same case) and ``ratio_to_ceiling`` (the larger of ``tflops / matmul ceiling`` and
    ``tbps / copy ceiling``: the fraction of whichever limit binds).
    """

    name: str
    metadata: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    ceilings: Ceilings | None = None

    @classmethod
    def start(cls, name: str, argv: Sequence[str] | None = None, include_families: bool = True) -> "BenchRun":
        """A run stamped with the UTC date, versions, device, command and git commit."""
        metadata = {
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(argv),
            "git_commit": _git_commit(),
            **environment_info(include_families=include_families),
        }
        return cls(name=name, metadata=metadata)

    def add(self, op: str, provider: str, ms: float | None, *, flops: float | None = None,
            nbytes: float | None = None, **params: Any) -> dict[str, Any]:
        """Record one measurement (``ms=None`` for a provider that could not run the case:
        pass ``error=...`` to say why)."""
        if ms is not None and (not isinstance(ms, (int, float)) or not ms > 0):
            raise ValueError(f"ms must be a positive number or None, got {ms!r}")
        row: dict[str, Any] = {"op": op, "provider": provider, **params, "ms": ms}
        if flops is not None:
            row["tflops"] = tflops(flops, ms) if ms else None
        if nbytes is not None:
            row["tbps"] = tbps(nbytes, ms) if ms else None
        self.rows.append(row)
        return row

    def _case(self, row: dict[str, Any]) -> tuple:
        skip = {"provider", "ms", "tflops", "tbps", "ratio_to_best_peer", "ratio_to_ceiling", "error"}
        return tuple(sorted((k, repr(v)) for k, v in row.items() if k not in skip))

    @staticmethod
    def _throughput(row: dict[str, Any]) -> float | None:
        for key in _THROUGHPUT_KEYS:
            if row.get(key):
                return row[key]
        return 1.0 / row["ms"] if row.get("ms") else None

    def finalize(self) -> "BenchRun":
        """Fill in the ratios (idempotent)."""
        by_case: dict[tuple, list[dict[str, Any]]] = {}
        for row in self.rows:
            by_case.setdefault(self._case(row), []).append(row)
        for rows in by_case.values():
            for row in rows:
                mine = self._throughput(row)
                peers = [self._throughput(r) for r in rows if r["provider"] != row["provider"]]
                peers = [p for p in peers if p]
                row["ratio_to_best_peer"] = (mine / max(peers)) if (mine and peers) else None
        for row in self.rows:
            ratios = []
            if self.ceilings is not None:
                if row.get("tflops"):
                    ratios.append(row["tflops"] / self.ceilings.matmul_tflops)
                if row.get("tbps"):
                    ratios.append(row["tbps"] / self.ceilings.copy_tbps)
            row["ratio_to_ceiling"] = max(ratios) if ratios else None
        return self

    def as_dict(self) -> dict[str, Any]:
        self.finalize()
        return {
            "name": self.name,
            "metadata": self.metadata,
            "ceilings": self.ceilings.as_dict() if self.ceilings else None,
            "rows": self.rows,
        }

    # -- writers ---------------------------------------------------------------------------

    def columns(self) -> list[str]:
        cols: list[str] = []
        for row in self.rows:
            for key in row:
                if key not in cols:
                    cols.append(key)
        tail = [c for c in ("ms", "tflops", "tbps", "ratio_to_best_peer", "ratio_to_ceiling", "error") if c in cols]
        return [c for c in cols if c not in tail] + tail

    @staticmethod
    def _fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
        return str(value)

    def _header_lines(self) -> list[str]:
        m = self.metadata
        lines = [f"{self.name}: {m.get('device_name', '?')} ({m.get('arch', '?')}), {m.get('date_utc', '?')}",
                 f"torch {m.get('torch_version')} / triton {m.get('triton_version')} / CUDA {m.get('cuda_version')}"
                 f" / aiter-core {m.get('aiter_core_version')}"
                 + (f" / git {m['git_commit']}" if m.get("git_commit") else ""),
                 f"command: {m.get('command', '?')}"]
        if self.ceilings:
            lines.append(f"ceilings: copy {self.ceilings.copy_tbps:.3g} TB/s, {self.ceilings.matmul_dtype} "
                         f"matmul {self.ceilings.matmul_tflops:.4g} TFLOP/s")
        return lines

    def print_table(self, console: Any = None) -> None:
        """The rows as a rich table on the terminal (stdout), headed by the metadata."""
        from rich.console import Console
        from rich.table import Table

        self.finalize()
        console = console or Console()
        header = self._header_lines()
        table = Table(title=header[0], caption="\n".join(header[1:]))
        cols = self.columns()
        short = {"ratio_to_best_peer": "x best peer", "ratio_to_ceiling": "x ceiling"}
        numeric = ("ms", "ratio_to_best_peer", "ratio_to_ceiling") + _THROUGHPUT_KEYS
        for col in cols:
            # fold instead of truncating, so a narrow terminal still shows every figure
            table.add_column(short.get(col, col), justify="right" if col in numeric else "left", overflow="fold")
        for row in self.rows:
            table.add_row(*(self._fmt(row.get(c)) for c in cols))
        console.print(table)

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        return path

    def to_markdown(self) -> str:
        self.finalize()
        cols = self.columns()
        lines = [f"## {self.name}", ""] + [f"- {line}" for line in self._header_lines()] + [""]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("| " + " | ".join("---:" if c in ("ms",) + _THROUGHPUT_KEYS else "---" for c in cols) + " |")
        for row in self.rows:
            lines.append("| " + " | ".join(self._fmt(row.get(c)).replace("|", "\\|") for c in cols) + " |")
        return "\n".join(lines) + "\n"

    def write_markdown(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_markdown(), encoding="utf-8")
        return path

    def plot(self, path: str | os.PathLike, metric: str | None = None) -> Path | None:
        """Grouped bar chart (cases on x, one bar per provider) of ``metric`` (default: tflops,
        else tbps, else ms) as PNG. Returns None, with a message on stderr, without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: skipping the PNG plot (pip install matplotlib)", file=sys.stderr)
            return None
        self.finalize()
        if metric is None:
            metric = next((k for k in _THROUGHPUT_KEYS if any(r.get(k) for r in self.rows)), "ms")
        cases: list[tuple] = []
        labels: list[str] = []
        for row in self.rows:
            case = self._case(row)
            if case not in cases:
                cases.append(case)
                labels.append(", ".join(f"{k}={v}" for k, v in row.items()
                                        if (k, repr(v)) in case and k != "op") or row["op"])
        providers = list(dict.fromkeys(r["provider"] for r in self.rows))
        width = 0.8 / max(len(providers), 1)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cases) + 2), 4.5))
        for i, provider in enumerate(providers):
            values = []
            for case in cases:
                match = [r for r in self.rows if r["provider"] == provider and self._case(r) == case]
                value = match[0].get(metric) if match else None
                values.append(value if value is not None else 0.0)
            ax.bar([c + i * width for c in range(len(cases))], values, width, label=provider)
        ax.set_xticks([c + width * (len(providers) - 1) / 2 for c in range(len(cases))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(metric)
        m = self.metadata
        ax.set_title(f"{self.name} on {m.get('device_name', '?')} ({m.get('date_utc', '?')})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def write_all(self, directory: str | os.PathLike, stem: str | None = None, plot: bool = True) -> dict[str, Path]:
        """JSON, Markdown and (if matplotlib is there and ``plot``) PNG into ``directory``."""
        stem = stem or self.name
        directory = Path(directory)
        written = {"json": self.write_json(directory / f"{stem}.json"),
                   "markdown": self.write_markdown(directory / f"{stem}.md")}
        if plot:
            png = self.plot(directory / f"{stem}.png")
            if png is not None:
                written["png"] = png
        return written


def progress(items: Iterable[Any], description: str, total: int | None = None, quiet: bool = False):
    """Iterate ``items`` showing a rich progress bar on stderr (off with ``quiet`` or when
    stderr is not a terminal, so JSON on stdout and CI logs stay clean)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    items = list(items) if total is None and not hasattr(items, "__len__") else items
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield from items
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def smoke_instead(family: str, smoke_run) -> int:
    """What a family's benchmark CLI does without a GPU: timing needs one, so it runs the family's
    correctness smoke test (``smoke_run() -> str``) instead and says so. Returns the exit code 0."""
    print(f"{family} bench: no GPU, timing needs one; running the correctness smoke test instead", file=sys.stderr)
    print(smoke_run())
    return 0



if __name__ == "__main__":  # `python -m aiter_core.bench host`: the host cost of every op (aiter_core.host)
    if sys.argv[1:2] != ["host"]:
        sys.exit("usage: python -m aiter_core.bench host [options]  (the families' benchmarks: aiter bench FAMILY)")
    from .host import main as _host_main

    sys.exit(_host_main(sys.argv[2:]))
