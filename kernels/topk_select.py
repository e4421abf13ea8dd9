"""Per-(request, KV head) top-k page selection with a different k per row.

Same set as sglang_shplb.selection.select_pages: pages are ranked forced first (the first `sink`
pages and the last `recent` valid pages, as if their score were +inf), then by score descending,
ties going to the lower page index (a stable descending sort); the first k = min(k_pages, n_pages)
are kept. Output: sel_idx [bs, Hkv, Kmax] int32 logical page indices in ascending order, padded
with -1, and sel_count [bs, Hkv] int32.

The Triton kernel avoids sorting: per row it finds the k-th largest key by a 32-step bitwise
search on an order-preserving integer image of the float score, then compacts the pages above
it (plus the lowest-index ties) with a prefix sum. A row of up to BLOCK_N pages is read from
global memory once for the search (kept on chip) and twice more for the compaction; longer rows
fall back to re-reading chunks per bit.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch reference still usable
    triton = None


def _clamped_k(k_pages: torch.Tensor, n_pages: torch.Tensor) -> torch.Tensor:
    return torch.minimum(k_pages.long().clamp(min=0), n_pages.long().to(k_pages.device).unsqueeze(-1))


def select_topk_pages_torch(scores: torch.Tensor, n_pages: torch.Tensor, k_pages: torch.Tensor,
                            sink: int, recent: int, max_k: int | None = None):
    """Reference / fallback with the same outputs as `select_topk_pages` (torch.topk on unique
    int64 keys: (order-preserving score bits << 32) + reversed page index, so ties go low-index first)."""
    bs, H, N = scores.shape
    dev = scores.device
    n = n_pages.long().to(dev)
    k = _clamped_k(k_pages, n)
    K = int(k.max()) if max_k is None else max_k
    from sglang_shplb.selection import is_forced

    j = torch.arange(N, device=dev)
    forced = is_forced(j, n[:, None], sink, recent)[:, None, :]
    s = scores.float().masked_fill(forced, float("inf"))
    s = torch.where(s == 0, torch.zeros_like(s), s)                # -0.0 ties with +0.0, as in sort
    bits = s.view(torch.int32).long()
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)                       # int order == float order
    comp = (key << 32) + (N - 1 - j)
    comp = comp.masked_fill((j >= n[:, None])[:, None, :], torch.iinfo(torch.int64).min)
    top = comp.topk(min(K, N), dim=-1).indices                       # rank order
    keep = torch.arange(top.shape[-1], device=dev) < k.unsqueeze(-1)
    idx = torch.where(keep, top, N).sort(dim=-1).values             # ascending, padding last
    idx = torch.where(idx == N, -1, idx).to(torch.int32)
    if idx.shape[-1] < K:
        idx = torch.nn.functional.pad(idx, (0, K - idx.shape[-1]), value=-1)
    return idx, k.to(torch.int32)


if triton is not None:

    @triton.jit
    def _row_keys(row_ptr, stride_j, j, n, sink, recent):
        # Order-preserving int64 image in [0, 2^32) of the ranking score (forced pages -> +inf).
        valid = j < n
        s = tl.load(row_ptr + j * stride_j, mask=valid, other=0.0).to(tl.float32)
        forced = (j < sink) | ((j >= n - recent) & valid)
        s = tl.where(forced, float("inf"), s)
        s = tl.where(s == 0.0, 0.0, s)                              # -0.0 ties with +0.0
        bits = s.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)                    # flip magnitude of negatives
        return key.to(tl.int64) + 2147483648, valid

    @triton.jit
    def _count_ge(key, valid, cand):
        return tl.sum(((key >= cand) & valid).to(tl.int32), axis=0)

    @triton.jit(do_not_specialize=["max_k", "sink", "recent", "map_w"])
    def _select_kernel(scores_ptr, npages_ptr, k_ptr, idx_ptr, cnt_ptr, map_ptr,
                       stride_sb, stride_sh, stride_sj, stride_kb, stride_kh, max_k, sink, recent, map_w,
                       H: tl.constexpr, BLOCK_N: tl.constexpr, PAD: tl.constexpr, MAP: tl.constexpr):
        # MAP: the row's positions index a shortlist (map [bs, H, map_w]); store the shortlisted page instead.
        r = tl.program_id(0)
        h = tl.program_id(1)
        n = tl.load(npages_ptr + r).to(tl.int32)
        k = tl.load(k_ptr + r * stride_kb + h * stride_kh).to(tl.int32)
        k = tl.minimum(tl.maximum(k, 0), n)
        row = scores_ptr + r.to(tl.int64) * stride_sb + h * stride_sh
        offs = tl.arange(0, BLOCK_N)

        # T = k-th largest key: the largest T with #{key >= T} >= k, built bit by bit from the top.
        # A row that fits one block is loaded once and searched on chip (the serving case up to
        # BLOCK_N pages); longer rows re-read their chunks per bit (L2-resident).
        T = tl.zeros([], dtype=tl.int64)
        bit = tl.full([], 2147483648, dtype=tl.int64)
        if n <= BLOCK_N:
            key0, valid0 = _row_keys(row, stride_sj, offs, n, sink, recent)
            for _ in range(32):
                cand = T | bit
                T = tl.where(_count_ge(key0, valid0, cand) >= k, cand, T)
                bit = bit >> 1
        else:
            for _ in range(32):
                cand = T | bit
                cnt = tl.zeros([], dtype=tl.int32)
                for c in range(0, n, BLOCK_N):
                    key, valid = _row_keys(row, stride_sj, c + offs, n, sink, recent)
                    cnt += _count_ge(key, valid, cand)
                T = tl.where(cnt >= k, cand, T)
                bit = bit >> 1

        # Keep every key > T, and among keys == T the lowest-index ones until k are kept.
        n_gt = tl.zeros([], dtype=tl.int32)
        for c in range(0, n, BLOCK_N):
            key, valid = _row_keys(row, stride_sj, c + offs, n, sink, recent)
            n_gt += tl.sum(((key > T) & valid).to(tl.int32), axis=0)
        ties_left = k - n_gt
        out = idx_ptr + (r.to(tl.int64) * H + h) * max_k
        base_eq = tl.zeros([], dtype=tl.int32)
        base_sel = tl.zeros([], dtype=tl.int32)
        for c in range(0, n, BLOCK_N):
            j = c + offs
            key, valid = _row_keys(row, stride_sj, j, n, sink, recent)
            eq = ((key == T) & valid).to(tl.int32)
            tie_rank = base_eq + tl.cumsum(eq, axis=0) - eq
            sel = (((key > T) & valid) | ((eq == 1) & (tie_rank < ties_left))).to(tl.int32)
            pos = base_sel + tl.cumsum(sel, axis=0) - sel
            tl.store(out + pos, j, mask=(sel == 1) & (pos < max_k))
            base_eq += tl.sum(eq, axis=0)
            base_sel += tl.sum(sel, axis=0)
        if MAP:   # positions -> shortlisted pages, in place (a separate pass keeps the search's registers free)
            tl.debug_barrier()
            row_map = map_ptr + (r.to(tl.int64) * H + h) * map_w
            for c in range(0, k, BLOCK_N):
                p = c + offs
                m = p < k
                tl.store(out + p, tl.load(row_map + tl.load(out + p, mask=m, other=0), mask=m, other=0), mask=m)
        if PAD:
            for c in range(k, max_k, BLOCK_N):
                p = c + offs
                tl.store(out + p, tl.full([BLOCK_N], -1, tl.int32), mask=p < max_k)
        tl.store(cnt_ptr + r * H + h, k)


def select_topk_pages(scores: torch.Tensor, n_pages: torch.Tensor, k_pages: torch.Tensor,
                      sink: int, recent: int, max_k: int | None = None, block_n: int = 1024):
    """scores [bs,Hkv,maxN] (any float dtype/strides), n_pages [bs], k_pages [bs,Hkv] ints
    -> (sel_idx [bs,Hkv,Kmax] int32 ascending logical page indices padded with -1,
        sel_count [bs,Hkv] int32 = clamp(k_pages, 0, n_pages)).
    Kmax = max(sel_count) (one host sync) unless `max_k` is given (must be >= it; e.g. a static
    bound for CUDA graphs). Triton (GPU or interpreter)."""
    assert triton is not None, "Triton is not installed; use select_topk_pages_torch"
    bs, H, N = scores.shape
    assert n_pages.shape == (bs,) and k_pages.shape == (bs, H), (n_pages.shape, k_pages.shape)
    if max_k is None:
        max_k = int(_clamped_k(k_pages, n_pages).max()) if bs * H else 0
    sel_idx = torch.empty(bs, H, max_k, dtype=torch.int32, device=scores.device)
    sel_cnt = torch.empty(bs, H, dtype=torch.int32, device=scores.device)
    if bs * H == 0:
        return sel_idx, sel_cnt
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    _select_kernel[(bs, H)](scores, n_pages.contiguous(), k_pages, sel_idx, sel_cnt, sel_idx,
                            *scores.stride(), *k_pages.stride(), max_k, sink, recent, 0,
                            H=H, BLOCK_N=block_n, PAD=True, MAP=False)
    return sel_idx, sel_cnt


SELECT_BLOCK_N = 8192   # rows up to 8192 pages (128k tokens at P=16) are ranked on chip
SELECT_WARPS = 16       # 8192 int64 keys over 512 threads: 90 registers, no spills on sm_90 (compile_check)


def select_topk_pages_into(scores, n_pages, k_pages, sel_idx, sel_cnt, sink, recent, bs, page_map=None):
    """Serving variant, graph-safe: rows r < bs of scores [>=bs,Hkv,width] (float32 contiguous), n_pages [>=bs]
    int32, k_pages [>=bs,Hkv] int32 -> the first sel_cnt[r,h] entries of sel_idx[r,h] ([>=bs,Hkv,kcap] int32,
    ascending; the rest untouched). One compiled variant per (Hkv, block): widths and k never recompile.
    page_map [>=bs,Hkv,width] int32 (contiguous, ascending per row): scores are per shortlist position, and
    sel_idx gets page_map[r, h, position] (still ascending) — the second stage of a two-stage selector."""
    H = scores.shape[1]
    if bs == 0:
        return sel_idx, sel_cnt
    block_n = min(SELECT_BLOCK_N, max(16, triton.next_power_of_2(scores.shape[2])))
    use_map = page_map is not None
    assert not use_map or (page_map.is_contiguous() and page_map.shape[2] == scores.shape[2])
    _select_kernel[(bs, H)](scores, n_pages, k_pages, sel_idx, sel_cnt, page_map if use_map else sel_idx,
                            *scores.stride(), *k_pages.stride(), sel_idx.shape[2], sink, recent,
                            page_map.shape[2] if use_map else 0, H=H, BLOCK_N=block_n, PAD=False, MAP=use_map,
                            num_warps=SELECT_WARPS)
    return sel_idx, sel_cnt
