"""GPU tier: the public API through the Triton backend in bf16 and fp8 on production-like shapes,
torch.compile and CUDA-graph replay. Tolerances in FlashAttention's style: a multiple of the
error the same computation has in the input precision (reference with upcast=False)."""

import pytest
import torch

import aiter_mha
from aiter_mha.reference import attention_ref, attention_ref_varlen, dropout_mask_from_s_dmask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"
BF16 = torch.bfloat16
TRITON = "triton"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rnd(*shape, dtype=BF16, grad=False):
    return torch.randn(*shape, device=DEV, dtype=dtype).requires_grad_(grad)


def check_fa_style(got, ref, low, mult, floor, what):
    tol = max(mult * (low.float() - ref.float()).abs().max().item(), floor)
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= tol, f"{what}: max err {err:.4g} > tol {tol:.4g}"


def run_and_compare(q, k, v, *, grads=True, ref_kw=None, **kw):
    ref_kw = ref_kw if ref_kw is not None else {}
    out = aiter_mha.flash_attn_func(q, k, v, backend=TRITON, **kw)
    ref = attention_ref(q, k, v, **ref_kw)[0]
    low = attention_ref(q, k, v, upcast=False, reorder_ops=True, **ref_kw)[0]
    assert torch.isfinite(out).all()
    check_fa_style(out, ref, low, 2, 1e-2, "out")
    if not grads:
        return
    leaves = [x for x in (q, k, v, ref_kw.get("sink"), ref_kw.get("bias")) if x is not None and x.requires_grad]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    low_g = torch.autograd.grad(low, leaves, g)
    for i, (a, b, c) in enumerate(zip(got, want, low_g)):
        check_fa_style(a, b, c, 10, 1e-2, f"grad {i}")


DIMS = [(32, 32), (59, 59), (64, 64), (96, 96), (111, 111), (128, 128), (160, 160), (192, 128), (224, 224), (256, 256)]
SEQS = [(113, 203), (128, 217), (512, 256), (1023, 1024), (2048, 2048)]


@pytest.mark.parametrize("dims", DIMS, ids=[f"d{a}-{b}" for a, b in DIMS])
@pytest.mark.parametrize("seqs", SEQS, ids=[f"s{a}x{b}" for a, b in SEQS])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(6, 6), (6, 2)], ids=["mha", "gqa3"])
def test_dense_bf16_sweep(dims, seqs, causal, heads):
    (d, dv), (sq, sk), (hq, hk) = dims, seqs, heads
    q, k, v = rnd(2, sq, hq, d, grad=True), rnd(2, sk, hk, d, grad=True), rnd(2, sk, hk, dv, grad=True)
    run_and_compare(q, k, v, causal=causal, ref_kw=dict(causal=causal))


@pytest.mark.parametrize("feature", ["bias", "alibi", "alibi_batch", "window", "sink_tokens", "sink", "softcap", "mqa"])
def test_dense_bf16_features(feature):
    sq, sk, hq, hk, d = 384, 512, 8, 2, 128
    q, k, v = rnd(2, sq, hq, d, grad=True), rnd(2, sk, hk, d, grad=True), rnd(2, sk, hk, d, grad=True)
    kw, ref_kw = {"causal": True}, {"causal": True}
    if feature == "bias":
        bias = rnd(sq, sk, dtype=torch.float32, grad=True)
        kw["bias"] = ref_kw["bias"] = bias
    elif feature.startswith("alibi"):
        slopes = torch.rand(2, hq, device=DEV) if feature == "alibi_batch" else torch.rand(hq, device=DEV)
        kw["alibi_slopes"] = ref_kw["alibi_slopes"] = slopes
    elif feature == "window":
        kw["window_size"], ref_kw["window"] = (100, 20, 0), (100, 20, 0)
        kw["causal"] = ref_kw["causal"] = False
    elif feature == "sink_tokens":
        kw["window_size"], ref_kw["window"] = (64, -1, 4), (64, 0, 4)
    elif feature == "sink":
        sink = rnd(hq, dtype=torch.float32, grad=True)
        kw["sink_ptr"] = ref_kw["sink"] = sink
    elif feature == "softcap":
        kw["logits_soft_cap"] = ref_kw["softcap"] = 10.0
    elif feature == "mqa":
        k, v = rnd(2, sk, 1, d, grad=True), rnd(2, sk, 1, d, grad=True)
    run_and_compare(q, k, v, ref_kw=ref_kw, **kw)


def test_dropout_mask_matches_output_and_gradients():
    p = 0.17
    q, k, v = rnd(2, 256, 4, 64, grad=True), rnd(2, 384, 4, 64, grad=True), rnd(2, 384, 4, 64, grad=True)
    out, lse, s_dmask = aiter_mha.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_lse=True,
                                                  return_attn_probs=True, backend=TRITON)
    keep = dropout_mask_from_s_dmask(s_dmask)
    visible = torch.ones(256, 384, device=DEV).tril(384 - 256).bool()
    rate = (~keep[..., visible]).float().mean().item()
    assert abs(rate - p) < 0.02
    ref = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=keep)[0]
    low = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=keep, upcast=False)[0]
    check_fa_style(out, ref, low, 2, 1e-2, "out")
    g = torch.randn_like(out)
    for a, b, c in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(ref, [q, k, v], g),
                       torch.autograd.grad(low, [q, k, v], g)):
        check_fa_style(a, b, c, 10, 1e-2, "dropout grad")


def test_deterministic_backward_is_bitwise_reproducible():
    q, k, v = rnd(2, 1024, 8, 128, grad=True), rnd(2, 1024, 2, 128, grad=True), rnd(2, 1024, 2, 128, grad=True)
    g = torch.randn(2, 1024, 8, 128, device=DEV, dtype=BF16)
    runs = []
    for _ in range(2):
        out = aiter_mha.flash_attn_func(q, k, v, causal=True, deterministic=True, backend=TRITON)
        runs.append(torch.autograd.grad(out, [q, k, v], g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(9, 9), (8, 2)])
def test_varlen_bf16_fwd_bwd(causal, heads):
    hq, hk = heads
    lens_q, lens_k = [1, 147, 300, 77], [147, 300, 300, 513]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q, k, v = rnd(sum(lens_q), hq, 128, grad=True), rnd(sum(lens_k), hk, 128, grad=True), rnd(sum(lens_k), hk, 128, grad=True)
    out, lse = aiter_mha.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 300, 513, causal=causal, return_lse=True, backend=TRITON)
    ref, ref_lse = attention_ref_varlen(q, k, v, cu_q, cu_k, causal=causal)
    low, _ = attention_ref_varlen(q, k, v, cu_q, cu_k, causal=causal, upcast=False)
    check_fa_style(out, ref, low, 4, 1e-2, "varlen out")
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(out)
    for a, b, c in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(ref, [q, k, v], g),
                       torch.autograd.grad(low, [q, k, v], g)):
        check_fa_style(a, b, c, 10, 1e-2, "varlen grad")


@pytest.mark.parametrize("page", [16, 128, 256])
def test_paged_varlen_equals_contiguous(page):
    lens_q, lens_k = [1, 16, 3], [700, 129, 1000]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q, k, v = rnd(sum(lens_q), 8, 128), rnd(sum(lens_k), 2, 128), rnd(sum(lens_k), 2, 128)
    max_blocks = -(-1000 // page)
    num_blocks = 3 * max_blocks + 5
    perm = torch.randperm(num_blocks, device=DEV)[: 3 * max_blocks].reshape(3, max_blocks).to(torch.int32)
    k_cache, v_cache = rnd(num_blocks, page, 2, 128), rnd(num_blocks, page, 2, 128)
    for b, n in enumerate(lens_k):
        for j0 in range(0, n, page):
            m = min(page, n - j0)
            k_cache[perm[b, j0 // page], :m] = k[int(cu_k[b]) + j0 : int(cu_k[b]) + j0 + m]
            v_cache[perm[b, j0 // page], :m] = v[int(cu_k[b]) + j0 : int(cu_k[b]) + j0 + m]
    got = aiter_mha.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 16, max_blocks * page, causal=True,
                                           block_table=perm, backend=TRITON)
    want = aiter_mha.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 16, 1000, causal=True, backend=TRITON)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_padded_varlen_and_batch_padding():
    lens = [100, 37, 256]
    cu = _cu(lens)
    starts = torch.tensor([0, 128, 256, 512], dtype=torch.int32, device=DEV)
    q, k, v = rnd(512, 8, 64, grad=True), rnd(512, 8, 64, grad=True), rnd(512, 8, 64, grad=True)
    out = aiter_mha.flash_attn_varlen_func(q, k, v, cu, cu, 256, 256, causal=True, cu_seqlens_q_padded=starts,
                                           cu_seqlens_k_padded=starts, backend=TRITON)
    ref, _ = attention_ref_varlen(q, k, v, cu, cu, seqstart_q=starts, seqstart_k=starts, causal=True)
    low, _ = attention_ref_varlen(q, k, v, cu, cu, seqstart_q=starts, seqstart_k=starts, causal=True, upcast=False)
    rows = torch.cat([torch.arange(int(starts[b]), int(starts[b]) + n, device=DEV) for b, n in enumerate(lens)])
    check_fa_style(out[rows], ref[rows], low[rows], 4, 1e-2, "padded out")
    (dq,) = torch.autograd.grad(out, [q], torch.randn_like(out))
    mask = torch.ones(512, dtype=torch.bool, device=DEV)
    mask[rows] = False
    assert torch.all(dq[mask] == 0)


@pytest.mark.parametrize("heads", [(8, 1), (40, 8), (32, 8), (5, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_fp8_pertensor_vs_bf16(heads, causal):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    hq, hk = heads
    fp8 = torch.float8_e4m3fn
    q, k, v = (torch.rand(2, 1024, h, 128, device=DEV, dtype=BF16) for h in (hq, hk, hk))
    scales = [x.float().abs().amax() / torch.finfo(fp8).max for x in (q, k, v)]
    q8, k8, v8 = ((x.float() / s).to(fp8) for x, s in zip((q, k, v), scales))
    out = aiter_mha.flash_attn_fp8_pertensor_func(q8, k8, v8, *(s.reshape(1) for s in scales), causal=causal, backend=TRITON)
    want = aiter_mha.flash_attn_func(q, k, v, causal=causal, backend=TRITON)
    assert out.dtype == BF16
    assert (out.float() - want.float()).abs().max().item() < 0.055


def test_fp8_func_and_varlen_fp8_func():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    q, k, v = rnd(2, 2048, 48, 128, grad=True), rnd(2, 2048, 8, 128, grad=True), rnd(2, 2048, 8, 128, grad=True)
    out = aiter_mha.flash_attn_fp8_func(q, k, v, causal=True, backend=TRITON)
    ref = attention_ref(q, k, v, causal=True)[0]
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0).item()
    assert out.dtype == BF16 and (out.float() - ref.float()).abs().max().item() <= 1.0 and cos >= 0.96
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(ref, [q, k, v], g)):
        assert (got.float() - want.float()).abs().max() <= 0.2 * want.float().abs().max()  # straight-through
    q, k, v = (x.detach() for x in (q, k, v))
    cu = _cu([2048, 2048])
    vout = aiter_mha.flash_attn_varlen_fp8_func(q.reshape(-1, 48, 128), k.reshape(-1, 8, 128), v.reshape(-1, 8, 128),
                                                cu, cu, 2048, 2048, causal=True, backend=TRITON)
    torch.testing.assert_close(vout.reshape(out.shape).float(), out.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_decode_with_rotary(paged):
    batch, hq, hk, d, cap = 4, 32, 8, 128, 4096
    lens = torch.tensor([1, 1328, 4000, 523], dtype=torch.int32, device=DEV)
    ang = torch.rand(cap, d // 4, device=DEV) * 3
    cos, sin = ang.cos().to(BF16), ang.sin().to(BF16)
    q, kn, vn = rnd(batch, 1, hq, d), rnd(batch, 1, hk, d), rnd(batch, 1, hk, d)
    if paged:
        page = 64
        table = torch.randperm(batch * cap // page, device=DEV).reshape(batch, cap // page).to(torch.int32)
        kc, vc = rnd(batch * cap // page, page, hk, d), rnd(batch * cap // page, page, hk, d)
        kw = dict(block_table=table)
    else:
        kc, vc = rnd(batch, cap, hk, d), rnd(batch, cap, hk, d)
        kw = {}
    kc2, vc2 = kc.clone(), vc.clone()
    got = aiter_mha.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, rotary_cos=cos, rotary_sin=sin,
                                            rotary_interleaved=False, backend=TRITON, **kw)
    want = aiter_mha.flash_attn_with_kvcache(q, kc2, vc2, kn, vn, cache_seqlens=lens, rotary_cos=cos, rotary_sin=sin,
                                             rotary_interleaved=False, backend="reference", **kw)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_torch_compile_fullgraph_inductor_fwd_bwd():
    q, k, v = rnd(2, 512, 8, 128, grad=True), rnd(2, 512, 2, 128, grad=True), rnd(2, 512, 2, 128, grad=True)

    def f(q, k, v):
        return aiter_mha.flash_attn_func(q, k, v, causal=True, backend=TRITON) * 2

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(q, k, v)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v], g)
    eager = f(q, k, v)
    want = torch.autograd.grad(eager, [q, k, v], g)
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_cuda_graph_replay_fwd_bwd_and_fresh_dropout():
    q, k, v = rnd(2, 256, 8, 64, grad=True), rnd(2, 256, 8, 64, grad=True), rnd(2, 256, 8, 64, grad=True)
    g = torch.randn(2, 256, 8, 64, device=DEV, dtype=BF16)

    def step():
        out = aiter_mha.flash_attn_func(q, k, v, causal=True, backend=TRITON)
        return (out,) + torch.autograd.grad(out, [q, k, v], g)

    def dropout_step():
        return aiter_mha.flash_attn_func(q, k, v, dropout_p=0.2, backend=TRITON)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up: compile every kernel before capture
        step()
        dropout_step()
    torch.cuda.current_stream().wait_stream(s)
    graph, graph_d = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.cuda.graph(graph_d):
        static_d = dropout_step()
    with torch.no_grad():
        for x in (q, k, v):
            x.copy_(torch.randn_like(x))
    graph.replay()
    want = step()
    for a, b in zip(static, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    graph_d.replay()
    first = static_d.clone()
    graph_d.replay()
    assert not torch.equal(first, static_d)  # each replay draws a fresh dropout seed


def test_cuda_graph_kvcache_decode_sees_updated_lengths():
    batch, hq, hk, d, cap = 2, 8, 2, 64, 1024
    kc, vc = rnd(batch, cap, hk, d), rnd(batch, cap, hk, d)
    q, kn, vn = rnd(batch, 1, hq, d), rnd(batch, 1, hk, d), rnd(batch, 1, hk, d)
    lens = torch.tensor([10, 500], dtype=torch.int32, device=DEV)

    def decode():
        return aiter_mha.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, backend=TRITON)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        decode()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = decode()
    lens.copy_(torch.tensor([700, 3], dtype=torch.int32, device=DEV))
    graph.replay()
    kc2, vc2 = kc.clone(), vc.clone()
    want = aiter_mha.flash_attn_with_kvcache(q, kc2, vc2, kn, vn, cache_seqlens=lens, backend="reference")
    torch.testing.assert_close(static, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("layout", ["bhsd", "sbhd", "kvpacked"])
def test_strided_layouts(layout):
    b, s, h, d = 2, 333, 6, 128
    if layout == "bhsd":
        q, k, v = (torch.randn(b, h, s, d, device=DEV, dtype=BF16).transpose(1, 2).requires_grad_() for _ in range(3))
    elif layout == "sbhd":
        q, k, v = (torch.randn(s, b, h, d, device=DEV, dtype=BF16).transpose(0, 1).requires_grad_() for _ in range(3))
    else:
        q = rnd(b, s, h, d, grad=True)
        kv = rnd(b, s, 2, h, d, grad=True)
        k, v = kv[:, :, 0], kv[:, :, 1]
    run_and_compare(q, k, v, causal=True, ref_kw=dict(causal=True))
