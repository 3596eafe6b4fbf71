"""GPU tier of the bad-input sweep (issue 11): every index-content category of
``tests/bad_index_cases.py`` compiled for the GPU, in fp32, fp16 and bf16 (the interpreter cannot
run bf16), each in its own process so a device fault (an illegal address kills the CUDA context)
fails one test. Run the module under ``compute-sanitizer --tool memcheck`` for the memcheck
evidence (each child process inherits it when pytest itself runs under it).

Also on the GPU only: a KV cache whose offsets pass 2**31 elements (the 64-bit address path) with
out-of-range and negative block ids, which must be skipped there too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CASES_FILE = Path(__file__).parents[1] / "bad_index_cases.py"
INDEX_CASES = ["cu_past_tokens", "cu_negative_and_reversed", "cu_non_monotonic", "block_ids_out_of_range",
               "seqused_past_table", "max_seqlen_q_too_small", "max_seqlen_k_too_small", "nan_in_masked_keys",
               "empty_batches"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", INDEX_CASES)
def test_index_content_on_gpu(case, dtype):
    proc = subprocess.run([sys.executable, str(CASES_FILE), case, dtype], capture_output=True, text=True,
                          timeout=900)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"{case} ({dtype}) exited with {proc.returncode}:\n{tail}"
    assert proc.stdout.strip().splitlines()[-1].startswith("OK"), tail


def test_bad_block_ids_skipped_with_64_bit_offsets():
    """A bf16 cache of more than 2**31 elements (4.3 GB; the 64-bit offset path): bad ids planted
    in a decode and a prefill sequence, whose real blocks sit at the far end of the pool, are skipped
    exactly as the reference skips them."""
    import aiter_unified
    from aiter_unified.reference import unified_attention_ref

    dev, bf16 = "cuda", torch.bfloat16
    hk, d, bs = 8, 128, 16
    pool = 2**31 // (bs * hk * d) + 64  # past 2**31 elements
    try:
        k = torch.randn(pool, bs, hk, d, dtype=bf16, device=dev)
        v = torch.randn(pool, bs, hk, d, dtype=bf16, device=dev)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2**31-element cache")
    seqs = [(1, 200), (40, 120)]
    table = torch.full((2, 16), -1, dtype=torch.int32, device=dev)
    for s, (_, kv) in enumerate(seqs):
        n = -(-kv // bs)
        table[s, :n] = torch.arange(pool - 1 - s * 16, pool - 1 - s * 16 - n, -1, dtype=torch.int32)
    table[0, 2], table[0, 5], table[1, 1], table[1, 6] = pool, -1, 2**31 - 1, -(2**31)
    cu = torch.tensor([0, 1, 41], dtype=torch.int32, device=dev)
    used = torch.tensor([kv for _, kv in seqs], dtype=torch.int32, device=dev)
    q = torch.randn(41, 32, d, dtype=bf16, device=dev)
    want = unified_attention_ref(q, k, v, cu, used, table, d ** -0.5, max_seqlen_q=40).float()
    for skip_reduce in (False, True):
        out = torch.full_like(q, float("nan"))
        res = aiter_unified.unified_attention(q, k, v, out, cu, 40, used, 200, d ** -0.5, True, (-1, -1), table,
                                              0.0, None, None, None, skip_reduce=skip_reduce)
        if skip_reduce:
            from aiter_core.triton_attn import splitk_merge_reference

            got, _ = splitk_merge_reference(res[0][..., :d], res[1], res[2])
        else:
            got = out.float()
        torch.testing.assert_close(got.float(), want, atol=1.5e-2, rtol=1e-2)
