"""Sparse decode kernels that read SGLang's paged cache directly (no host values, CUDA-graph safe).

    page_scores         -- per-head Quest bound of every page, aggregated over the KV group (sum | max)
    sparse_decode_attend -- fused split-KV decode over each (request, KV head)'s selected pages,
                            all G query heads of the group in one program, ragged k per head

Logical page j of request r starts at slot req_to_token[req_pool_indices[r], j*P] and its P tokens
are contiguous slots (SGLang allocates whole pages; P divides SGLang's page size), so pages are
read by id, never expanded into per-token index lists. Lengths come from seq_lens on the device
(n_pages = ceil(seq_len / P)); per-head page counts k come from a [bs, Hkv] device buffer the host
planned once per step. Nothing here syncs with the host or allocates per call except the output.

Page metadata (kmin/kmax [pages, Hkv, D]) is float32, or bfloat16 passed as its raw int16 bits
(see page_meta.py: rounded outward, so the bound stays an upper bound).
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch references stay usable
    triton = None

AGGREGATIONS = ("sum", "max")   # how a KV group's per-query-head bounds become one page score
LOG2E = 1.4426950408889634


def meta_args(kmin: torch.Tensor, kmax: torch.Tensor):
    """Kernel views of the metadata: bf16 travels as int16 bits (integer-only decode in-kernel)."""
    if kmin.dtype == torch.bfloat16:
        return kmin.view(torch.int16), kmax.view(torch.int16), True
    assert kmin.dtype == torch.float32, kmin.dtype
    return kmin, kmax, False


# ------------------------------------------------------------------ torch references
def page_scores_torch(q, kmin, kmax, req_to_token, req_pool_indices, seq_lens, page_size, agg="sum"):
    """q [bs,Hkv,G,D], kmin/kmax [pages,Hkv,D] -> [bs,Hkv,maxN] float32, -inf past each request's
    pages. The rule is selection.py's (group_upper_bound for sum, quest_upper_bound's max for max)."""
    from sglang_shplb import selection as S

    P = page_size
    n = (seq_lens.long() + P - 1) // P
    maxN = int(n.max()) if n.numel() else 0
    j = torch.arange(maxN, device=q.device)
    valid = j < n[:, None]
    first = (j * P).clamp(max=req_to_token.shape[1] - 1)
    pid = torch.where(valid, req_to_token[req_pool_indices.long()[:, None], first[None, :]].long() // P, 0)
    lo, hi = kmin[pid].float().transpose(1, 2), kmax[pid].float().transpose(1, 2)    # [bs,Hkv,N,D]
    s = S.group_upper_bound(q, lo, hi) if agg == "sum" else S.quest_upper_bound(q, lo, hi).amax(-2)
    return s.masked_fill(~valid[:, None, :], float("-inf"))


def sparse_decode_attend_torch(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, sel_idx, sel_cnt,
                               page_size, scale):
    """Reference: attention of q [bs,Hkv,G,D] over the first sel_cnt[r,h] pages of sel_idx[r,h]
    (sel_idx None: all pages) -> [bs,Hkv,G,Dv]."""
    bs, Hkv, G, D = q.shape
    P = page_size
    n = (seq_lens.long() + P - 1) // P
    if sel_idx is None:
        K = int(n.max())
        sel_idx = torch.arange(K, device=q.device).expand(bs, Hkv, K)
        sel_cnt = n[:, None].expand(bs, Hkv)
    K = sel_idx.shape[-1]
    page_ok = torch.arange(K, device=q.device) < sel_cnt.long()[..., None]
    j = torch.where(page_ok, sel_idx.long(), 0)
    pos = (j[..., None] * P + torch.arange(P, device=q.device)).flatten(2)         # [bs,Hkv,K*P]
    ok = page_ok.repeat_interleave(P, -1) & (pos < seq_lens.long().view(bs, 1, 1))
    slots = req_to_token[req_pool_indices.long().view(bs, 1, 1), pos.clamp(max=req_to_token.shape[1] - 1)].long()
    heads = torch.arange(Hkv, device=q.device).view(1, Hkv, 1)
    keys, vals = k_buf[slots, heads].float(), v_buf[slots, heads].float()
    logits = torch.einsum("bhgd,bhtd->bhgt", q.float(), keys) * scale
    logits = logits.masked_fill(~ok[:, :, None, :], float("-inf"))
    return torch.einsum("bhgt,bhtd->bhgd", logits.softmax(-1), vals)


if triton is not None:

    @triton.jit
    def _load_meta(ptr, mask, BITS16: tl.constexpr):
        if BITS16:   # bf16 bits -> float32: the high half of a float32 word
            b = tl.load(ptr, mask=mask, other=0).to(tl.int32)
            return (b << 16).to(tl.float32, bitcast=True)
        else:
            return tl.load(ptr, mask=mask, other=0.0)

    @triton.jit(do_not_specialize=["width"])
    def _score_kernel(q_ptr, kmin_ptr, kmax_ptr, r2t_ptr, rpi_ptr, npages_ptr, out_ptr,
                      s_qb, s_qh, s_qg, s_r2t, width,
                      H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                      AGG_MAX: tl.constexpr, BITS16: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
        # Program (request r, KV head h, block of pages); blocks past the request's pages exit at once,
        # so a grid sized for the longest context costs little for short ones (static CUDA-graph grids).
        r = tl.program_id(0)
        h = tl.program_id(1)
        n = tl.load(npages_ptr + r)
        if tl.program_id(2) * BLOCK_N < n:
            j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = j < n
            row = tl.load(rpi_ptr + r).to(tl.int64)
            page = tl.load(r2t_ptr + row * s_r2t + j.to(tl.int64) * P, mask=valid, other=0).to(tl.int64) // P
            base = page * (H * D) + h * D
            g = tl.arange(0, BLOCK_G)
            q_row = q_ptr + r.to(tl.int64) * s_qb + h * s_qh
            if AGG_MAX:
                acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
            else:
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            # D in chunks keeps the [BLOCK_N, BLOCK_D] min/max tiles small: no spills at D = 256.
            for d0 in tl.static_range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = d < D
                qt = tl.load(q_row + g[:, None] * s_qg + d[None, :], mask=(g[:, None] < G) & dm[None, :],
                             other=0.0).to(tl.float32)                                  # [BLOCK_G, BLOCK_D]
                m2 = valid[:, None] & dm[None, :]
                lo = _load_meta(kmin_ptr + base[:, None] + d[None, :], m2, BITS16)       # [BLOCK_N, BLOCK_D]
                hi = _load_meta(kmax_ptr + base[:, None] + d[None, :], m2, BITS16)
                if AGG_MAX:   # per query head: sum_d max(q*lo, q*hi), then max over the group
                    qe = qt[:, None, :]
                    acc += tl.sum(tl.maximum(qe * lo[None, :, :], qe * hi[None, :, :]), axis=2)
                else:         # the bound is linear in the clamped queries: sum them over the group first
                    pos = tl.sum(tl.maximum(qt, 0.0), axis=0)
                    neg = tl.sum(tl.minimum(qt, 0.0), axis=0)
                    acc += tl.sum(pos[None, :] * hi + neg[None, :] * lo, axis=1)
            if AGG_MAX:
                s = tl.max(tl.where(g[:, None] < G, acc, float("-inf")), axis=0)
            else:
                s = acc
            tl.store(out_ptr + (r.to(tl.int64) * H + h) * width + j, s, mask=valid)

    @triton.jit(do_not_specialize=["kcap", "nsplit", "scale"])
    def _attend_kernel(q_ptr, k_ptr, v_ptr, r2t_ptr, rpi_ptr, seq_ptr, kcnt_ptr, sel_ptr, po_ptr, plse_ptr,
                       s_qb, s_qh, s_qg, s_kn, s_kh, s_vn, s_vh, s_r2t, s_kcb, kcap, nsplit, scale,
                       H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, P: tl.constexpr,
                       DENSE: tl.constexpr, IEEE: tl.constexpr, BLOCK_G: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        # Program (request r, KV head h, split s): online softmax of the group's G queries over split
        # s's share of the head's k selected pages; partial (o, log2-sum-exp) per query head.
        r = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        seq = tl.load(seq_ptr + r)
        n = (seq + P - 1) // P
        if DENSE:
            k = n
        else:
            k = tl.minimum(tl.maximum(tl.load(kcnt_ptr + r * s_kcb + h), 0), n)
        chunk = (k + nsplit - 1) // nsplit
        start = s * chunk
        end = tl.minimum(start + chunk, k)
        row = tl.load(rpi_ptr + r).to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        t = tl.arange(0, P)
        q = tl.load(q_ptr + r.to(tl.int64) * s_qb + h * s_qh + g[:, None] * s_qg + d[None, :],
                    mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)
        qk_scale = scale * 1.4426950408889634
        m_i = tl.full([BLOCK_G], -1e30, tl.float32)     # finite: an all-masked page adds exp2(-inf) = 0
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        sel_row = sel_ptr + (r.to(tl.int64) * H + h) * kcap
        for i in range(start, end):
            if DENSE:
                j = i
            else:
                j = tl.load(sel_row + i)
            slot0 = tl.load(r2t_ptr + row * s_r2t + j.to(tl.int64) * P).to(tl.int64)
            ok = j * P + t < seq
            slots = slot0 + t
            kt = tl.load(k_ptr + slots[:, None] * s_kn + h * s_kh + d[None, :],
                         mask=ok[:, None] & (d[None, :] < D), other=0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(kt), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(kt))
            sc = tl.where(ok[None, :], sc * qk_scale, float("-inf"))                 # [BLOCK_G, P]
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            vt = tl.load(v_ptr + slots[:, None] * s_vn + h * s_vh + dv[None, :],
                         mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
            if IEEE:
                pv = tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
            else:
                pv = tl.dot(p.to(vt.dtype), vt)
            acc = acc * alpha[:, None] + pv
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        has = l_i > 0
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        part = ((r.to(tl.int64) * H + h) * nsplit + s) * G
        gm = g < G
        tl.store(plse_ptr + part + g, lse, mask=gm)
        tl.store(po_ptr + (part + g[:, None]) * DV + dv[None, :], o, mask=gm[:, None] & (dv[None, :] < DV))

    @triton.jit(do_not_specialize=["nsplit"])
    def _combine_kernel(po_ptr, plse_ptr, out_ptr, s_ob, nsplit, H: tl.constexpr, G: tl.constexpr,
                        DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr):
        # Program (request r, KV head h): merge the splits' partials by their log-sum-exp weights.
        r = tl.program_id(0)
        h = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        dv = tl.arange(0, BLOCK_DV)
        gm = g < G
        base = (r.to(tl.int64) * H + h) * nsplit * G
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        for s in range(0, nsplit):
            m = tl.maximum(m, tl.load(plse_ptr + base + s * G + g, mask=gm, other=float("-inf")))
        m_safe = tl.where(m > float("-inf"), m, 0.0)
        wsum = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        om = gm[:, None] & (dv[None, :] < DV)
        for s in range(0, nsplit):
            w = tl.exp2(tl.load(plse_ptr + base + s * G + g, mask=gm, other=float("-inf")) - m_safe)
            o = tl.load(po_ptr + (base + s * G + g[:, None]) * DV + dv[None, :], mask=om, other=0.0)
            acc += w[:, None] * o
            wsum += w
        out = acc / tl.where(wsum > 0, wsum, 1.0)[:, None]
        tl.store(out_ptr + r.to(tl.int64) * s_ob + (h * G + g[:, None]) * DV + dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=om)


SCORE_BLOCK_N = 16       # pages per scoring program: [16, 32] min/max tiles stay in registers
SCORE_BLOCK_D = 32        # 40-64 registers, no spills for D 128/256, G 1-8, sum|max (compile_check)


def page_scores(q, kmin, kmax, req_to_token, req_pool_indices, n_pages, page_size, out, agg="sum",
                grid_pages=None):
    """Triton: q [bs,Hkv,G,D] (last dim contiguous), metadata (float32 or bf16), n_pages [bs] int32 (device),
    out [>=bs, Hkv, width] float32 (row stride = width): fills out[r, h, :n_pages[r]]. grid_pages bounds the
    pages scored (default: out's width); entries past n_pages[r] are left untouched."""
    assert agg in AGGREGATIONS, agg
    bs, H, G, D = q.shape
    width = out.shape[2]
    assert q.stride(3) == 1 and out.is_contiguous() and kmin.is_contiguous() and kmax.is_contiguous()
    lo, hi, bits16 = meta_args(kmin, kmax)
    grid = (bs, H, triton.cdiv(grid_pages or width, SCORE_BLOCK_N))
    _score_kernel[grid](q, lo, hi, req_to_token, req_pool_indices, n_pages, out,
                        q.stride(0), q.stride(1), q.stride(2), req_to_token.stride(0), width,
                        H=H, G=G, D=D, P=page_size, AGG_MAX=agg == "max", BITS16=bits16,
                        BLOCK_N=SCORE_BLOCK_N, BLOCK_G=triton.next_power_of_2(G),
                        BLOCK_D=min(SCORE_BLOCK_D, triton.next_power_of_2(D)))
    return out


def sparse_decode_attend(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, sel_idx, sel_cnt, page_size,
                         scale, out, part_o, part_lse, nsplit):
    """Triton: q [bs,Hkv,G,D]; k_buf/v_buf [slots,Hkv,D/Dv]; sel_idx [>=bs,Hkv,kcap] int32 logical pages
    (first sel_cnt[r,h] used) or None for every page (dense); sel_cnt [>=bs,Hkv] int32 (row stride any);
    out [bs, Hkv*G*Dv] (last dim contiguous); part_o / part_lse float32 scratch of at least
    bs*Hkv*nsplit*G*Dv / bs*Hkv*nsplit*G elements. Returns out."""
    bs, H, G, D = q.shape
    DV = v_buf.shape[2]
    assert page_size >= 16, "tl.dot needs pages of >= 16 tokens"
    assert q.stride(3) == 1 and k_buf.stride(2) == 1 and v_buf.stride(2) == 1 and out.stride(1) == 1
    assert part_o.numel() >= bs * H * nsplit * G * DV and part_lse.numel() >= bs * H * nsplit * G
    if bs == 0:
        return out
    dense = sel_idx is None
    kcap = 0 if dense else sel_idx.shape[2]
    sel = req_pool_indices if dense else sel_idx            # any valid pointer when unused
    cnt = req_pool_indices if dense else sel_cnt
    bg = max(16, triton.next_power_of_2(G))                 # tl.dot tiles need >= 16 rows
    _attend_kernel[(bs, H, nsplit)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, cnt, sel, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0), 0 if dense else sel_cnt.stride(0), kcap, nsplit, float(scale),
        H=H, G=G, D=D, DV=DV, P=page_size, DENSE=dense, IEEE=q.dtype == torch.float32, BLOCK_G=bg,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV))
    _combine_kernel[(bs, H)](part_o, part_lse, out, out.stride(0), nsplit, H=H, G=G, DV=DV,
                             BLOCK_G=triton.next_power_of_2(G), BLOCK_DV=triton.next_power_of_2(DV))
    return out


def split_count(bs: int, kv_heads: int, max_k_pages: int, num_sms: int, max_split: int = 32) -> int:
    """KV splits per (request, head): enough programs to fill the GPU twice, never more than pages."""
    want = math.ceil(2 * num_sms / max(1, bs * kv_heads))
    return max(1, min(want, max_split, max(1, max_k_pages)))
