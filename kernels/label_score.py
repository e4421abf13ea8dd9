"""Second stage of the label selectors (selection.py's `label`, Double Sparsity): re-score a shortlist of pages
from the label cache.

    label_page_scores        -- Triton: per shortlisted page and query head, the log-sum-exp over the page's
                                tokens of the logits on the KV head's r label channels (scaled 1/sqrt(D), as
                                the full logits are), max over the KV group; forced pages +inf. With
                                `per_head`, each query head's log-sum-exp (tokens past the context masked)
                                instead, for `aggregate_label_scores` to combine by a selector's rule
                                (norm, psum, mix: per-head normalisations over the shortlist)
    label_page_scores_torch  -- the reference: selection.key_scores over the same rows

The label cache (labels [Hkv, slots, r], sparse_attention.fold_labels) holds each key's `channels` [Hkv, r];
a page's P tokens are its P contiguous slots from the slot of its first token (SGLang allocates whole
pages), so a (page, KV head) is one contiguous run of P*r values. Shortlist and output are laid out as in
fine_score.py: short_idx [bs, Hkv, C] logical pages, the
first c[r, h] valid; out [bs, Hkv, C] float32, -inf past c. Slots of a request's last page past its
length hold stale labels: forced (+inf) under max, and masked per token in the per-head mode (where the
forced page's mass enters the normalisation).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch reference stays usable
    triton = None

LABEL_BLOCK_C = 16    # shortlist positions per program: [G, 16, r] logits tiles stay in registers


def label_page_scores_torch(q, labels, channels, req_to_token, req_pool_indices, seq_lens, short_idx, short_cnt,
                            page_size, sink, recent, how="max"):
    """q [bs,Hkv,G,D]; labels [Hkv,slots,r]; channels [Hkv,r]; short_idx [bs,Hkv,C]; short_cnt [bs,Hkv]
    -> [bs,Hkv,C]; `how`: the selector's aggregate over the group."""
    from sglang_shplb import selection as S

    bs, H, G, D = q.shape
    P, C, r = page_size, short_idx.shape[-1], labels.shape[-1]
    n = ((seq_lens.long() + P - 1) // P).view(bs, 1, 1)
    listed = torch.arange(C, device=q.device) < short_cnt.long().unsqueeze(-1)
    j = torch.where(listed, short_idx.long(), 0)                                          # logical pages
    first = req_to_token[req_pool_indices.long().view(bs, 1, 1), (j * P).clamp(max=req_to_token.shape[1] - 1)]
    slots = first.long().unsqueeze(-1) + torch.arange(P, device=q.device)                 # [bs,H,C,P]
    heads = torch.arange(H, device=q.device).view(1, H, 1, 1)
    rule = S.Selector("label", how, None, 1.0, keys=r, label=True)
    stale = torch.arange(P, device=q.device) >= S.tokens_in_pages(seq_lens.long().view(bs, 1, 1), j, P).unsqueeze(-1)
    s = S.key_scores(rule, q, labels[heads, slots].float(), listed, channels, stale)     # [bs,H,C]
    forced = S.is_forced(j, n, sink, recent)
    return s.masked_fill(forced, float("inf")).masked_fill(~listed, float("-inf"))


def aggregate_label_scores(how, head_lse, short_idx, short_cnt, n_pages, sink, recent, out):
    """The per-head mode's second half, on the device without a sync: head_lse [bs,Hkv,G,W] (label_page_scores
    with per_head) -> out [bs,Hkv,W] by selection.aggregate's rule `how`, forced pages +inf, positions past the
    shortlist -inf, as selection.choose_pages re-ranks."""
    from sglang_shplb import selection as S

    bs, W = head_lse.shape[0], head_lse.shape[-1]
    listed = torch.arange(W, device=head_lse.device) < short_cnt[:bs].unsqueeze(-1)
    j = short_idx[:bs].long()
    n = n_pages[:bs].long().view(bs, 1, 1)
    forced = S.is_forced(j, n, sink, recent)
    s = S.aggregate(how, head_lse, listed)
    out[:bs].copy_(s.masked_fill(forced & listed, float("inf")).masked_fill(~listed, float("-inf")))
    return out


if triton is not None:
    from .fine_score import _shortlist_block, _shortlist_pages, _store_page_scores

    @triton.jit(do_not_specialize=["width", "sink", "recent", "scale"])
    def _label_kernel(q_ptr, lab_ptr, ch_ptr, r2t_ptr, rpi_ptr, npages_ptr, seq_ptr, short_ptr, cnt_ptr, out_ptr,
                      s_qb, s_qh, s_qg, s_r2t, s_cb, s_lh, width, sink, recent, scale,
                      H: tl.constexpr, G: tl.constexpr, R: tl.constexpr, P: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, PER_HEAD: tl.constexpr):
        # Program (request r, KV head h, block of shortlist positions).
        r, h, c, i, listed, row_out = _shortlist_block(cnt_ptr, out_ptr, s_cb, width, H, BLOCK_C)
        g = tl.arange(0, BLOCK_G)
        if PER_HEAD:   # out [bs, H, G, width]: this (request, head)'s G rows
            head_out = out_ptr + ((r.to(tl.int64) * H + h) * G + g[:, None]) * width + i[None, :]
            head_ok = (g[:, None] < G) & (i[None, :] < width)
        if tl.program_id(2) * BLOCK_C >= c:             # past the shortlist: padding only
            if PER_HEAD:
                tl.store(head_out, tl.full([BLOCK_G, BLOCK_C], float("-inf"), tl.float32), mask=head_ok)
            else:
                tl.store(row_out + i, tl.full([BLOCK_C], float("-inf"), tl.float32), mask=i < width)
        else:
            n, j, first = _shortlist_pages(r2t_ptr, rpi_ptr, npages_ptr, short_ptr, r, h, i, listed, s_r2t, width, H, P)
            if PER_HEAD:
                fill = tl.load(seq_ptr + r) - j * P       # tokens written in each page (stale slots after them)
            k = tl.arange(0, BLOCK_R)
            km = k < R
            ch = tl.load(ch_ptr + h * R + k, mask=km, other=0)                         # the head's label channels
            qt = tl.load(q_ptr + r.to(tl.int64) * s_qb + h * s_qh + g[:, None] * s_qg + ch[None, :],
                         mask=(g[:, None] < G) & km[None, :], other=0.0).to(tl.float32) * scale   # [BLOCK_G, BLOCK_R]
            m = tl.full([BLOCK_G, BLOCK_C], float("-inf"), tl.float32)             # online log-sum-exp over tokens
            s = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
            lab_h = lab_ptr + h.to(tl.int64) * s_lh                                  # the head's [slots, r]
            for p in tl.static_range(0, P):
                lab = tl.load(lab_h + (first + p)[:, None] * R + k[None, :],
                              mask=listed[:, None] & km[None, :], other=0.0).to(tl.float32)      # [BLOCK_C, BLOCK_R]
                x = tl.sum(qt[:, None, :] * lab[None, :, :], axis=2)                  # [BLOCK_G, BLOCK_C]
                if PER_HEAD:
                    x = tl.where((p < fill)[None, :], x, float("-inf"))
                m_new = tl.maximum(m, x)
                s = s * tl.exp(m - m_new) + tl.exp(x - m_new)       # token 0 of a listed page is always written
                m = m_new
            lse = m + tl.log(s)
            if PER_HEAD:
                tl.store(head_out, tl.where(listed[None, :], lse, float("-inf")), mask=head_ok)
            else:
                score = tl.max(tl.where(g[:, None] < G, lse, float("-inf")), axis=0)      # max over the group
                _store_page_scores(row_out, i, width, score, j, n, sink, recent, listed)


def label_page_scores(q, labels, channels, req_to_token, req_pool_indices, n_pages, short_idx, short_cnt, page_size,
                      sink, recent, out, bs=None, seq_lens=None):
    """Triton: q [>=bs,Hkv,G,D] (last dim contiguous); labels [Hkv,slots,r] contiguous (any float dtype);
    channels [Hkv,r] int32/int64 contiguous; n_pages [>=bs] int32; short_idx [>=bs,Hkv,W] int32 (W = out's width),
    short_cnt [>=bs,Hkv] int32 (any row stride); out [>=bs,Hkv,W] float32 contiguous: every position of rows
    r < bs is written. Per-head mode (seq_lens [>=bs] given): out [>=bs,Hkv,G,W], each query head's page
    log-mass, unforced, -inf past the shortlist. Returns out."""
    bs = q.shape[0] if bs is None else bs
    _, H, G, D = q.shape
    R = labels.shape[-1]
    per_head = seq_lens is not None
    width = out.shape[-1]
    assert out.dim() == (4 if per_head else 3) and (not per_head or out.shape[2] == G)
    assert q.stride(3) == 1 and out.is_contiguous() and labels.is_contiguous() and channels.is_contiguous()
    assert short_idx.is_contiguous() and short_idx.shape[2] == width and tuple(channels.shape) == (H, R) \
        and labels.shape[0] == H
    if bs == 0 or width == 0:
        return out
    _label_kernel[(bs, H, triton.cdiv(width, LABEL_BLOCK_C))](
        q, labels, channels, req_to_token, req_pool_indices, n_pages, n_pages if seq_lens is None else seq_lens,
        short_idx, short_cnt, out,
        q.stride(0), q.stride(1), q.stride(2), req_to_token.stride(0), short_cnt.stride(0), labels.stride(0), width,
        sink, recent, D ** -0.5, H=H, G=G, R=R, P=page_size, BLOCK_C=LABEL_BLOCK_C, BLOCK_G=triton.next_power_of_2(G),
        BLOCK_R=triton.next_power_of_2(R), PER_HEAD=per_head)
    return out
