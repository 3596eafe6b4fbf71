"""Bench helpers: counters against hand-computed values, writers, and timing refusing the CPU."""

import importlib.util
import io
import json
import random
import sys

import pytest
import torch

from aiter_core import bench
from aiter_core.bench import (
    BenchRun,
    Ceilings,
    attn_bwd_flops,
    attn_fwd_flops,
    decode_bytes,
    mla_decode_bytes,
    mla_decode_flops,
    mqa_logits_flops,
    mqa_logits_valid_pairs,
    sparse_mla_bytes,
    sparse_mla_flops,
    varlen_attn_fwd_flops,
    visible_pairs,
)


def test_attn_fwd_flops_dense_and_causal_square():
    # the anchors' shape: b2 h16 s8192 d128 -> 4 * b * h * s^2 * d
    assert attn_fwd_flops(2, 16, 8192, 8192, 128) == 4 * 2 * 16 * 8192**2 * 128
    assert attn_fwd_flops(2, 16, 8192, 8192, 128, causal=True) == 2 * 2 * 16 * 8192**2 * 128
    # d_qk != d_v: 2 * b * h * sq * sk * (d_qk + d_v)
    assert attn_fwd_flops(1, 2, 3, 5, 192, 128) == 2 * 1 * 2 * 3 * 5 * (192 + 128)
    assert attn_bwd_flops(2, 16, 8192, 8192, 128, causal=True) == 2.5 * 2 * 2 * 16 * 8192**2 * 128


def test_attn_fwd_flops_counts_real_pairs_otherwise():
    # causal sq=2 < sk=4, bottom-right: query 0 sees keys 0..2, query 1 sees 0..3 -> 7 pairs
    assert attn_fwd_flops(1, 1, 2, 4, 64, causal=True) == 2 * 7 * 128
    # causal sq=4 > sk=2: queries 0 and 1 see nothing, 2 sees key 0, 3 sees keys 0..1 -> 3 pairs
    assert attn_fwd_flops(1, 1, 4, 2, 64, causal=True) == 2 * 3 * 128
    # window (1, 0) on a square 4x4: 1 + 2 + 2 + 2 = 7 pairs (no halving convention with a window)
    assert attn_fwd_flops(1, 1, 4, 4, 64, causal=False, window=(1, 0)) == 2 * 7 * 128
    assert attn_fwd_flops(3, 2, 4, 4, 64, causal=True, window=(1, -1)) == 2 * 3 * 2 * 7 * 128


@pytest.mark.parametrize("sq, sk, causal, window, expected", [
    (3, 3, False, (-1, 1), 2 + 3 + 3),
    (3, 3, True, None, 6),
    (2, 4, True, None, 7),
    (4, 2, True, None, 3),
    (4, 4, False, (1, 0), 7),
    (4, 4, False, (0, 0), 4),
    (5, 3, False, (0, 0), 3),
    (0, 5, True, None, 0),
])
def test_visible_pairs_by_hand(sq, sk, causal, window, expected):
    assert visible_pairs(sq, sk, causal, window) == expected


def test_visible_pairs_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        sq, sk = rng.randint(0, 12), rng.randint(0, 12)
        causal = rng.random() < 0.5
        window = None if rng.random() < 0.3 else (rng.randint(-1, 6), rng.randint(-1, 6))
        left, right = window or (-1, -1)
        if causal:
            right = 0 if right == -1 else min(right, 0)
        count = 0
        for i in range(sq):
            for j in range(sk):
                diag = i + sk - sq
                if (left == -1 or j >= diag - left) and (right == -1 or j <= diag + right):
                    count += 1
        assert visible_pairs(sq, sk, causal, window) == count, (sq, sk, causal, window)


def test_varlen_flops_sum_sequences():
    expected = attn_fwd_flops(1, 4, 3, 7, 64, causal=True) + attn_fwd_flops(1, 4, 5, 5, 64, causal=True)
    assert varlen_attn_fwd_flops(4, [3, 5], [7, 5], 64, causal=True) == expected
    with pytest.raises(ValueError, match="same length"):
        varlen_attn_fwd_flops(4, [3], [7, 5], 64)


def test_counter_argument_errors():
    with pytest.raises(TypeError, match="b must be an int, got float"):
        attn_fwd_flops(1.0, 1, 2, 2, 64)
    with pytest.raises(ValueError, match="sq must be >= 0, got -1"):
        attn_fwd_flops(1, 1, -1, 2, 64, causal=True, window=(1, 0))
    with pytest.raises(TypeError, match="window must be None or a"):
        attn_fwd_flops(1, 1, 2, 2, 64, window=128)
    with pytest.raises(ValueError, match="window sizes"):
        visible_pairs(2, 2, window=(-2, 0))
    with pytest.raises(TypeError, match="kv_bytes must be a torch.dtype or a non-negative byte count"):
        decode_bytes(1, 1, 1, 1, 4, 64, kv_bytes="fp8")


def test_decode_bytes_by_hand():
    # b2 hq8 hkv2, one query token, kv_lens 10 and 20, d 64, bf16 everywhere
    q = 2 * 1 * 8 * 64 * 2
    kv = (10 + 20) * 2 * (64 + 64) * 2
    o = 2 * 1 * 8 * 64 * 2
    assert decode_bytes(2, 8, 2, 1, [10, 20], 64) == q + kv + o
    # one length for every sequence; fp8 KV as a dtype, 8 bytes of scales per token and head
    kv8 = 2 * 15 * 2 * 128 * 1
    scales = 2 * 15 * 2 * 8
    assert decode_bytes(2, 8, 2, 1, 15, 64, kv_bytes=torch.float8_e4m3fn, kv_scale_bytes=8) == q + kv8 + scales + o
    # packed int4 KV: half a byte per element
    assert decode_bytes(1, 1, 1, 1, 4, 64, q_bytes=0, o_bytes=0, kv_bytes=0.5) == 4 * 128 * 0.5


def test_mla_counters_by_hand():
    assert mla_decode_flops(4, 128, 1, 1000) == 2 * 4 * 128 * 1 * 1000 * (576 + 512)
    assert mla_decode_flops(4, 16, 2, 512.5, d_k=192, d_v=128) == 2 * 4 * 16 * 2 * 512.5 * 320
    q = 4 * 1 * 128 * 576 * 2
    kv = (100 + 200 + 300 + 400) * 576 * 2  # single latent head, V not read twice
    o = 4 * 1 * 128 * 512 * 2
    assert mla_decode_bytes(4, 128, 1, [100, 200, 300, 400]) == q + kv + o
    kv8 = 1000 * (576 * 1 + 4)
    assert mla_decode_bytes(4, 128, 1, 250, kv_bytes=1, kv_scale_bytes=4) == q + kv8 + o


def test_sparse_and_indexer_counters_by_hand():
    assert sparse_mla_flops(2048 * 3, 128) == 2 * 2048 * 3 * 128 * (576 + 512)
    assert sparse_mla_bytes(5000, 3, 128) == 5000 * 576 * 2 + 3 * 128 * 576 * 2 + 3 * 128 * 512 * 2
    assert mqa_logits_valid_pairs([0, 2, 5], [4, 2, 9]) == 4 + 0 + 4
    assert mqa_logits_valid_pairs(torch.tensor([3]), torch.tensor([1])) == 0
    assert mqa_logits_flops(8, 64, 128) == 2 * 8 * 64 * 128
    with pytest.raises(ValueError, match="same length"):
        mqa_logits_valid_pairs([0, 1], [3])


def test_rates():
    assert bench.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert bench.tbps(3e9, 1.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="ms must be positive"):
        bench.tflops(1.0, 0.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
def test_timing_refuses_the_cpu_clearly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for call in (lambda: bench.median_ms(lambda: None), lambda: bench.measure_copy_tbps("cpu"),
                 lambda: bench.measure_matmul_tflops("cpu", 64)):
        with pytest.raises(RuntimeError, match="needs a GPU: torch sees no CUDA/ROCm device"):
            call()


def test_timing_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="needs a GPU: TRITON_INTERPRET=1"):
        bench.median_ms(lambda: None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="times on a GPU")
def test_timing_on_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1 << 20, device="cuda")
    assert bench.median_ms(lambda: x.mul_(1.0), warmup=5, rep=10) > 0
    assert bench.measure_copy_tbps("cuda", 1 << 24, warmup=5, rep=10) > 0.01
    assert bench.measure_matmul_tflops("cuda", 1024, warmup=5, rep=10) > 0.1


def test_command_line_is_shell_quoted():
    assert bench.command_line(["bench_mha.py", "--name", "a b", "--x=$y"]) == "python bench_mha.py --name 'a b' '--x=$y'"
    assert bench.command_line(["/x/aiter_core/__main__.py", "bench"]) == "python -m aiter_core bench"
    assert bench.command_line(["relative-tool", "-v"]) == "relative-tool -v"


def _sample_run():
    run = BenchRun.start("mha_fwd", argv=["bench_mha.py", "--causal"], include_families=False)
    run.ceilings = Ceilings(copy_tbps=3.0, matmul_tflops=800.0)
    flops = attn_fwd_flops(2, 16, 8192, 8192, 128)
    run.add("mha_fwd", "aiter-triton", flops / 500e12 * 1e3, flops=flops, b=2, s=8192)
    run.add("mha_fwd", "sdpa-cudnn", flops / 400e12 * 1e3, flops=flops, b=2, s=8192)
    run.add("mha_fwd", "aiter-triton", flops / 100e12 * 1e3, flops=flops, b=1, s=128)
    run.add("decode", "aiter-triton", 1.0, nbytes=2.4e9, b=64)
    run.add("decode", "flex", None, nbytes=2.4e9, b=64, error="unsupported")
    return run


def test_benchrun_ratios():
    run = _sample_run().finalize()
    big_aiter, big_sdpa, small, decode, failed = run.rows
    assert big_aiter["tflops"] == pytest.approx(500.0)
    assert big_aiter["ratio_to_best_peer"] == pytest.approx(1.25)
    assert big_sdpa["ratio_to_best_peer"] == pytest.approx(0.8)
    assert small["ratio_to_best_peer"] is None  # no peer measured this case
    assert big_aiter["ratio_to_ceiling"] == pytest.approx(500 / 800)
    assert decode["tbps"] == pytest.approx(2.4) and decode["ratio_to_ceiling"] == pytest.approx(0.8)
    assert failed["tbps"] is None and failed["ratio_to_ceiling"] is None
    with pytest.raises(ValueError, match="ms must be a positive number or None"):
        run.add("x", "y", 0.0)


def test_benchrun_metadata():
    meta = _sample_run().metadata
    assert meta["command"] == "python bench_mha.py --causal"
    assert meta["date_utc"].endswith("+00:00")
    assert meta["torch_version"] == torch.__version__
    for key in ("triton_version", "cuda_version", "device_name", "arch", "aiter_core_version", "git_commit"):
        assert key in meta


def test_writers(tmp_path):
    run = _sample_run()
    written = run.write_all(tmp_path / "h100", stem="mha")
    data = json.loads(written["json"].read_text())
    assert data["name"] == "mha_fwd" and len(data["rows"]) == 5
    assert data["ceilings"] == {"copy_tbps": 3.0, "matmul_tflops": 800.0, "matmul_dtype": "bf16"}
    assert data["metadata"]["command"] == "python bench_mha.py --causal"
    md = written["markdown"].read_text()
    assert "command: python bench_mha.py --causal" in md
    header = next(line for line in md.splitlines() if line.startswith("| op"))
    assert header.split("|")[1:3] == [" op ", " provider "] and "ratio_to_ceiling" in header
    assert "| mha_fwd | aiter-triton | 2 | 8192 |" in md and "| 1.25 |" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # matplotlib is optional (aiter-core[bench]); without it the run still writes JSON and Markdown
        assert "png" not in written


def test_print_table(tmp_path):
    from rich.console import Console

    buffer = io.StringIO()
    _sample_run().print_table(Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "aiter-triton" in text and "sdpa-cudnn" in text and "1.25" in text and "bench_mha.py" in text


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    written = _sample_run().write_all(tmp_path)
    assert "png" not in written and written["json"].exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_progress_yields_everything():
    assert list(bench.progress(iter(range(5)), "sweep")) == [0, 1, 2, 3, 4]
    assert list(bench.progress([1, 2], "sweep", quiet=True)) == [1, 2]


def test_command_line_of_a_module_run(tmp_path):
    import subprocess
    import sys as _sys

    (tmp_path / "bench_cmd_probe.py").write_text("from aiter_core.bench import command_line\nprint(command_line())\n")
    out = subprocess.run([_sys.executable, "-m", "bench_cmd_probe", "--out", "x y"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "python -m bench_cmd_probe --out 'x y'"


def test_smoke_instead_runs_the_smoke_and_says_so(capsys):
    from aiter_core.bench import smoke_instead

    assert smoke_instead("aiter-x", lambda: "x: all good") == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "x: all good"
    assert "aiter-x bench: no GPU" in captured.err and "smoke test instead" in captured.err
