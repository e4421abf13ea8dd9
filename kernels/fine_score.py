"""Second stage of the two-stage selectors (selection.py's `shortlist`): re-score a shortlist of pages
with the sub-page bounds.

    fine_page_scores        -- Triton: per shortlisted page, per query head and sub-page the Quest bound,
                               max over the page's sub-pages and the KV group; forced pages +inf
    fine_page_scores_torch  -- the reference, from selection.py's quest_upper_bound

The shortlist (short_idx [bs, Hkv, C] logical pages, ascending, the first c[r, h] valid) comes from the
top-k kernel run with k = c over the coarse page scores. Sub-page metadata is the page metadata at
page size SUB (fmin/fmax [slots / SUB, Hkv, D]): sub-page s of the page starting at slot p*P is row
p*P/SUB + s. Output: out [bs, Hkv, C] float32, the shortlist positions' scores; positions past c get
-inf, so the top-k kernel can pick k of them over a fixed width (ties to the lower position = the lower
page, as selection.choose_pages re-ranks). Sub-pages are not checked for emptiness: only a request's
last page can hold unwritten sub-pages, and that page is forced (+inf) anyway.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch reference stays usable
    triton = None

from .sparse_decode import meta_args

FINE_BLOCK_C = 16     # shortlist positions per program
FINE_BLOCK_D = 32     # D in chunks: [16, 32] min/max tiles per sub-page stay in registers


def fine_page_scores_torch(q, fmin, fmax, req_to_token, req_pool_indices, seq_lens, short_idx, short_cnt, page_size,
                           sub, sink, recent):
    """q [bs,Hkv,G,D]; fmin/fmax [slots/sub,Hkv,D]; short_idx [bs,Hkv,C]; short_cnt [bs,Hkv] -> [bs,Hkv,C]."""
    from sglang_shplb import selection as S

    bs, H, G, D = q.shape
    P, C, SUBS = page_size, short_idx.shape[-1], page_size // sub
    n = ((seq_lens.long() + P - 1) // P).view(bs, 1, 1)
    listed = torch.arange(C, device=q.device) < short_cnt.long().unsqueeze(-1)
    j = torch.where(listed, short_idx.long(), 0)                                          # logical pages
    first = req_to_token[req_pool_indices.long().view(bs, 1, 1), (j * P).clamp(max=req_to_token.shape[1] - 1)]
    rows = first.long().unsqueeze(-1) // sub + torch.arange(SUBS, device=q.device)        # [bs,H,C,S]
    heads = torch.arange(H, device=q.device).view(1, H, 1, 1)
    lo, hi = fmin[rows, heads].float(), fmax[rows, heads].float()                         # [bs,H,C,S,D]
    b = S.quest_upper_bound(q, lo.flatten(2, 3), hi.flatten(2, 3))                        # [bs,H,G,C*S]
    s = b.unflatten(-1, (C, SUBS)).amax(-1).amax(-2)                                      # [bs,H,C]
    forced = S.is_forced(j, n, sink, recent)
    return s.masked_fill(forced, float("inf")).masked_fill(~listed, float("-inf"))


if triton is not None:
    from .sparse_decode import _load_meta

    @triton.jit
    def _shortlist_block(cnt_ptr, out_ptr, s_cb, width, H: tl.constexpr, BLOCK_C: tl.constexpr):
        """A second-stage program's (request, KV head, shortlist positions), the row's shortlist length c,
        which positions are listed, and its output row (label_score.py shares it)."""
        r = tl.program_id(0)
        h = tl.program_id(1)
        c = tl.load(cnt_ptr + r * s_cb + h)
        i = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        return r, h, c, i, i < c, out_ptr + (r.to(tl.int64) * H + h) * width

    @triton.jit
    def _shortlist_pages(r2t_ptr, rpi_ptr, npages_ptr, short_ptr, r, h, i, listed, s_r2t, width,
                         H: tl.constexpr, P: tl.constexpr):
        """A second stage's shortlist block: the request's page count, the positions' logical pages and
        each page's first slot (label_score.py shares it)."""
        n = tl.load(npages_ptr + r)
        j = tl.load(short_ptr + (r.to(tl.int64) * H + h) * width + i, mask=listed, other=0)
        row = tl.load(rpi_ptr + r).to(tl.int64)
        first = tl.load(r2t_ptr + row * s_r2t + j.to(tl.int64) * P, mask=listed, other=0).to(tl.int64)
        return n, j, first

    @triton.jit
    def _store_page_scores(row_out, i, width, score, j, n, sink, recent, listed):
        """selection.choose_pages' re-rank rule on the shortlist: forced pages +inf, positions past c -inf."""
        forced = (j < sink) | (j >= n - recent)
        score = tl.where(forced, float("inf"), score)
        score = tl.where(listed, score, float("-inf"))
        tl.store(row_out + i, score, mask=i < width)

    @triton.jit(do_not_specialize=["width", "sink", "recent"])
    def _fine_kernel(q_ptr, fmin_ptr, fmax_ptr, r2t_ptr, rpi_ptr, npages_ptr, short_ptr, cnt_ptr, out_ptr,
                     s_qb, s_qh, s_qg, s_r2t, s_cb, width, sink, recent,
                     H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, SUB: tl.constexpr,
                     BITS16: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (request r, KV head h, block of shortlist positions).
        r, h, c, i, listed, row_out = _shortlist_block(cnt_ptr, out_ptr, s_cb, width, H, BLOCK_C)
        if tl.program_id(2) * BLOCK_C >= c:             # past the shortlist: padding only
            tl.store(row_out + i, tl.full([BLOCK_C], float("-inf"), tl.float32), mask=i < width)
        else:
            n, j, first = _shortlist_pages(r2t_ptr, rpi_ptr, npages_ptr, short_ptr, r, h, i, listed, s_r2t, width, H, P)
            g = tl.arange(0, BLOCK_G)
            q_row = q_ptr + r.to(tl.int64) * s_qb + h * s_qh
            best = tl.full([BLOCK_G, BLOCK_C], float("-inf"), tl.float32)
            for s in tl.static_range(0, P // SUB):
                base = (first // SUB + s) * (H * D) + h * D
                acc = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
                for d0 in tl.static_range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    dm = d < D
                    qt = tl.load(q_row + g[:, None] * s_qg + d[None, :], mask=(g[:, None] < G) & dm[None, :],
                                 other=0.0).to(tl.float32)                                 # [BLOCK_G, BLOCK_D]
                    m2 = listed[:, None] & dm[None, :]
                    lo = _load_meta(fmin_ptr + base[:, None] + d[None, :], m2, BITS16)      # [BLOCK_C, BLOCK_D]
                    hi = _load_meta(fmax_ptr + base[:, None] + d[None, :], m2, BITS16)
                    qe = qt[:, None, :]
                    acc += tl.sum(tl.maximum(qe * lo[None, :, :], qe * hi[None, :, :]), axis=2)
                best = tl.maximum(best, acc)
            score = tl.max(tl.where(g[:, None] < G, best, float("-inf")), axis=0)       # max over the group
            _store_page_scores(row_out, i, width, score, j, n, sink, recent, listed)


def fine_page_scores(q, fmin, fmax, req_to_token, req_pool_indices, n_pages, short_idx, short_cnt, page_size, sub,
                     sink, recent, out, bs=None):
    """Triton: q [>=bs,Hkv,G,D] (last dim contiguous); fmin/fmax float32 or bf16 [slots/sub,Hkv,D]; n_pages [>=bs]
    int32; short_idx [>=bs,Hkv,W] int32 (W = out's width), short_cnt [>=bs,Hkv] int32 (any row stride);
    out [>=bs,Hkv,W] float32 contiguous: every position of rows r < bs is written. Returns out."""
    bs = q.shape[0] if bs is None else bs
    _, H, G, D = q.shape
    width = out.shape[2]
    assert page_size % sub == 0 and q.stride(3) == 1 and out.is_contiguous()
    assert short_idx.is_contiguous() and short_idx.shape[2] == width
    if bs == 0 or width == 0:
        return out
    lo, hi, bits16 = meta_args(fmin, fmax)
    _fine_kernel[(bs, H, triton.cdiv(width, FINE_BLOCK_C))](
        q, lo, hi, req_to_token, req_pool_indices, n_pages, short_idx, short_cnt, out,
        q.stride(0), q.stride(1), q.stride(2), req_to_token.stride(0), short_cnt.stride(0), width, sink, recent,
        H=H, G=G, D=D, P=page_size, SUB=sub, BITS16=bits16, BLOCK_C=FINE_BLOCK_C, BLOCK_G=triton.next_power_of_2(G),
        BLOCK_D=min(FINE_BLOCK_D, triton.next_power_of_2(D)))
    return out
