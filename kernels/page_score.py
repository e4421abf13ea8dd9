"""Quest page scores for decode: an upper bound on each page's best logit, per KV head.

score(r, h, j) = sum over the G query heads g of KV head h of sum_d max(q[r,h,g,d] * kmin[p,h,d],
q[r,h,g,d] * kmax[p,h,d]), with p = page_ids[r, j] the physical page of request r's logical page j.
Pages j >= n_pages[r] get -inf. This is selection.quest_upper_bound summed over the group.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch reference still usable
    triton = None


def page_table_from_req_to_token(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                                 max_pages: int, page_size: int) -> torch.Tensor:
    """Physical page of each logical page: req_to_token[r, j*P] // P -> [bs, max_pages] int64.
    Entries past a request's last page are whatever the pool holds there; n_pages masks them."""
    slots = req_to_token[req_pool_indices.long(), ::page_size][:, :max_pages]
    if slots.shape[1] < max_pages:  # pool narrower than asked (never in practice): pad with page 0
        slots = torch.nn.functional.pad(slots, (0, max_pages - slots.shape[1]))
    return slots.long() // page_size


def quest_scores_torch(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                       page_ids: torch.Tensor, n_pages: torch.Tensor) -> torch.Tensor:
    """Reference: q [bs,Hkv,G,D], kmin/kmax [num_pages,Hkv,D], page_ids [bs,maxN], n_pages [bs]
    -> [bs,Hkv,maxN] float32 (selection.group_upper_bound on the gathered page metadata)."""
    from sglang_shplb.selection import group_upper_bound

    bs, maxN = page_ids.shape
    valid = torch.arange(maxN, device=q.device) < n_pages.to(q.device).unsqueeze(-1)   # [bs, maxN]
    pid = torch.where(valid, page_ids.long(), 0)
    lo = kmin[pid].transpose(1, 2)                                  # [bs, Hkv, maxN, D]
    hi = kmax[pid].transpose(1, 2)
    s = group_upper_bound(q, lo, hi)
    return s.masked_fill(~valid.unsqueeze(1), float("-inf"))


if triton is not None:

    @triton.jit
    def _quest_kernel(q_ptr, kmin_ptr, kmax_ptr, pid_ptr, npages_ptr, out_ptr,
                      stride_qb, stride_qh, stride_qg, stride_qd, stride_pb, stride_pj, maxN,
                      H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (request r, kv head h, block of pages): the metadata is read once for all G queries.
        r = tl.program_id(0)
        h = tl.program_id(1)
        j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        n = tl.load(npages_ptr + r)
        valid = j < n
        page = tl.load(pid_ptr + r * stride_pb + j * stride_pj, mask=valid, other=0).to(tl.int64)
        m2 = valid[:, None] & (d[None, :] < D)
        meta = page[:, None] * (H * D) + h * D + d[None, :]
        lo = tl.load(kmin_ptr + meta, mask=m2, other=0.0)
        hi = tl.load(kmax_ptr + meta, mask=m2, other=0.0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        q_row = q_ptr + r.to(tl.int64) * stride_qb + h * stride_qh
        for g in tl.static_range(G):
            qg = tl.load(q_row + g * stride_qg + d * stride_qd, mask=d < D, other=0.0).to(tl.float32)
            acc += tl.sum(tl.maximum(qg[None, :] * lo, qg[None, :] * hi), axis=1)
        acc = tl.where(valid, acc, float("-inf"))
        out = out_ptr + (r.to(tl.int64) * H + h) * maxN + j
        tl.store(out, acc, mask=j < maxN)


def quest_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                 page_ids: torch.Tensor, n_pages: torch.Tensor, block_n: int = 64) -> torch.Tensor:
    """q [bs,Hkv,G,D] (any float dtype/strides), kmin/kmax [num_pages,Hkv,D] float32 contiguous,
    page_ids [bs,maxN] int32/int64 physical pages, n_pages [bs] -> [bs,Hkv,maxN] float32,
    -inf for pages j >= n_pages[r]. Triton (GPU or interpreter)."""
    assert triton is not None, "Triton is not installed; use quest_scores_torch"
    bs, H, G, D = q.shape
    assert kmin.shape[1:] == (H, D) and kmin.shape == kmax.shape and kmin.is_contiguous() and kmax.is_contiguous()
    assert page_ids.shape[0] == bs and n_pages.shape == (bs,)
    maxN = page_ids.shape[1]
    out = torch.empty(bs, H, maxN, dtype=torch.float32, device=q.device)
    if bs == 0 or maxN == 0:
        return out
    block_n = min(block_n, triton.next_power_of_2(maxN))
    grid = (bs, H, triton.cdiv(maxN, block_n))
    _quest_kernel[grid](q, kmin, kmax, page_ids, n_pages.contiguous(), out,
                        *q.stride(), *page_ids.stride(), maxN,
                        H=H, G=G, D=D, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D))
    return out
