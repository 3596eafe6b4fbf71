"""Random MLA problems for tests and benchmarks (CPU interpreter tier, GPU tier, bench).

Page tables are shuffled (pages of a sequence are scattered over the cache), the cache has
spare pages, lengths are fresh random numbers, and outputs are poisoned with NaN before calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
FP8 = torch.float8_e4m3fn


@dataclass
class PagedCase:
    q: torch.Tensor
    kv: torch.Tensor  # [pages, page_size, 1, D]
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_lens: torch.Tensor
    kv_lens: list
    q_lens: list
    page_size: int
    kv_lora_rank: int
    max_seqlen_q: int

    @property
    def block_tables(self) -> torch.Tensor:
        """The same page lists as ``[B, max_pages]`` block tables (padding: 0)."""
        ind = self.kv_indptr.cpu().tolist()
        width = max(1, max(ind[i + 1] - ind[i] for i in range(len(ind) - 1)))
        table = torch.zeros(len(ind) - 1, width, dtype=torch.int32)
        for b in range(len(ind) - 1):
            table[b, : ind[b + 1] - ind[b]] = self.kv_indices[ind[b]:ind[b + 1]].cpu()
        return table.to(self.q.device)


def make_paged_case(*, batch: int, heads: int, kv_lens, q_lens, page_size: int, kv_lora_rank: int, rope: int,
                    dtype: torch.dtype, kv_dtype: torch.dtype | None = None, seed: int = 0,
                    device: str = DEVICE) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or dtype
    kv_lens = list(kv_lens) if not isinstance(kv_lens, int) else [kv_lens] * batch
    q_lens = list(q_lens) if not isinstance(q_lens, int) else [q_lens] * batch
    pages = [-(-n // page_size) for n in kv_lens]
    spare = 3
    total_pages = sum(pages) + spare
    perm = torch.randperm(total_pages, generator=gen)[: sum(pages)].to(torch.int32)
    kv_indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages)], dtype=torch.int32)
    qo = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    dim = kv_lora_rank + rope
    q = torch.randn(int(qo[-1]), heads, dim, generator=gen)
    kv = torch.randn(total_pages, page_size, 1, dim, generator=gen)
    return PagedCase(q.to(device, dtype), kv.to(device, kv_dtype), qo.to(device), kv_indptr.to(device),
                     perm.to(device), last.to(device), kv_lens, q_lens, page_size, kv_lora_rank, max(q_lens))


def nan_like(shape, dtype, device=DEVICE) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Elementwise ``|got - ref| <= atol + rtol * |ref|`` with equal infinities accepted and no NaN."""
    got64, ref64 = got.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(got64).any(), f"{name}: NaN in output (unwritten or invalid)"
    same_inf = torch.isinf(got64) & torch.isinf(ref64) & (torch.sign(got64) == torch.sign(ref64))
    diff = torch.where(same_inf, torch.zeros_like(got64), (got64 - ref64).abs())
    bound = atol + rtol * torch.where(same_inf, torch.zeros_like(ref64), ref64.abs())
    bad = diff > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {got.numel()} elements off, max error "
                           f"{diff.max().item():.3e} (atol {atol}, rtol {rtol}) first at "
                           f"{tuple(bad.nonzero()[0].tolist())}")
