"""Block-sparse prefill attention over the paged KV cache (flash-attention style), with a torch reference.

One request's extend queries q [n, Hq, D] sit at positions prefix_len + i. They are cut into query
blocks of `block` tokens; block b and KV head h attend only to the logical pages listed in
pages[b, h, :] (-1 = padding; any order), causally (key position <= query position). Page j holds
positions [j*P, (j+1)*P); a position's KV slot is slots[pos] (the request's req_to_token row),
so K/V are read straight from SGLang's [slots, Hkv, D] buffers, never gathered per request.
Query head qh uses KV head qh // (Hq // Hkv) (GQA). The page lists come from
sglang_shplb.sparse_prefill.select_prefill_pages (BlockSelection.page_lists()).
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch reference still usable
    triton = None


def _check(q, k_buf, v_buf, slots, pages, block):
    n, Hq, D = q.shape
    assert k_buf.dim() == 3 and k_buf.shape[2] == D and v_buf.shape[:2] == k_buf.shape[:2], (k_buf.shape, v_buf.shape)
    assert Hq % k_buf.shape[1] == 0, (Hq, k_buf.shape)
    assert pages.dim() == 3 and pages.shape[:2] == (math.ceil(n / block), k_buf.shape[1]), (pages.shape, n, block)


def block_sparse_prefill_torch(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor,
                               pages: torch.Tensor, prefix_len: int, scale: float, block: int,
                               page_size: int) -> torch.Tensor:
    """Reference: dense masked attention of every query over its block's listed pages -> [n, Hq, Dv]."""
    _check(q, k_buf, v_buf, slots, pages, block)
    n, Hq, D = q.shape
    Hkv, P, L = k_buf.shape[1], page_size, prefix_len + n
    kpos = (pages.long().unsqueeze(-1) * P + torch.arange(P, device=q.device)).flatten(2)   # [nb, Hkv, K*P]
    ok = (pages >= 0).repeat_interleave(P, -1) & (kpos < L)
    kslot = slots.long()[kpos.clamp(0, L - 1)]
    heads = torch.arange(Hkv, device=q.device).view(1, Hkv, 1)
    keys, vals = k_buf[kslot, heads].float(), v_buf[kslot, heads].float()                  # [nb, Hkv, T, D]
    qi = torch.arange(n, device=q.device)
    b, kvh = qi // block, torch.arange(Hq, device=q.device) // (Hq // Hkv)
    logits = torch.einsum("ihd,ihtd->iht", q.float(), keys[b][:, kvh]) * scale             # [n, Hq, T]
    causal = kpos[b][:, kvh] <= (prefix_len + qi).view(-1, 1, 1)
    logits = logits.masked_fill(~(ok[b][:, kvh] & causal), -math.inf)
    return torch.einsum("iht,ihtd->ihd", logits.softmax(-1), vals[b][:, kvh]).to(q.dtype)


if triton is not None:

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, slots_ptr, pages_ptr, n, L, prefix_len, num_k, scale,
                        s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, s_on, s_oh, s_pb, s_ph,
                        GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_M: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        # Program (query tile, query head qh): online softmax over the listed pages of the tile's query
        # block b. A block of BLOCK queries (the selector's unit) runs as BLOCK / BLOCK_M tiles.
        b = tl.program_id(0) // (BLOCK // BLOCK_M)
        qh = tl.program_id(1)
        kvh = qh // GROUP
        qi = b * BLOCK + (tl.program_id(0) % (BLOCK // BLOCK_M)) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        q = tl.load(q_ptr + qi[:, None].to(tl.int64) * s_qn + qh * s_qh + d[None, :],
                    mask=(qi[:, None] < n) & (d[None, :] < D), other=0.0)
        qpos = prefix_len + qi
        m_i = tl.full([BLOCK_M], -1e30, tl.float32)      # finite: a fully masked page adds exp(-inf) = 0
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        t = tl.arange(0, P)
        for i in range(0, num_k):
            page = tl.load(pages_ptr + b * s_pb + kvh * s_ph + i)
            pos = page * P + t
            ok = (pos >= 0) & (pos < L)                      # page -1 (padding) gives negative positions
            slot = tl.load(slots_ptr + pos, mask=ok, other=0).to(tl.int64)
            k = tl.load(k_ptr + slot[:, None] * s_kn + kvh * s_kh + d[None, :], mask=ok[:, None] & (d[None, :] < D),
                        other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale                    # [BLOCK_M, P]
            s = tl.where(ok[None, :] & (pos[None, :] <= qpos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(v_ptr + slot[:, None] * s_vn + kvh * s_vh + dv[None, :],
                        mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + qi[:, None].to(tl.int64) * s_on + qh * s_oh + dv[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(qi[:, None] < n) & (dv[None, :] < DV))


def query_tile(block: int, head_dim: int) -> int:
    """Query rows per program: the whole selection block up to D=128; above, half as many rows per
    doubling of D (min 16), so q, the [rows, D] accumulator and the P x D key tile stay in registers
    (D=256 at 64 rows spilled 76-516 B on sm_80/90; benchmark/results/compile_check.md)."""
    tile = block
    while head_dim * tile > 128 * 64 and tile > 16 and block % (tile // 2) == 0:
        tile //= 2
    return tile


def block_sparse_prefill(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor,
                         pages: torch.Tensor, prefix_len: int, scale: float, block: int,
                         page_size: int) -> torch.Tensor:
    """q [n, Hq, D] (last dim contiguous), k_buf/v_buf [slots, Hkv, D/Dv], slots [prefix_len + n] KV slots
    of the request's positions, pages [ceil(n/block), Hkv, K] int logical pages (-1 padded) -> [n, Hq, Dv].
    block and page_size must be >= 16 (tl.dot tiles). Triton (GPU or interpreter)."""
    _check(q, k_buf, v_buf, slots, pages, block)
    assert triton is not None, "Triton is not installed; use block_sparse_prefill_torch"
    assert block >= 16 and page_size >= 16, "tl.dot needs query blocks and pages of >= 16 tokens"
    n, Hq, D = q.shape
    Hkv, DV = k_buf.shape[1], v_buf.shape[2]
    out = torch.empty(n, Hq, DV, dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    pages = pages.to(torch.int32).contiguous()
    assert q.stride(2) == 1 and k_buf.stride(2) == 1 and v_buf.stride(2) == 1
    tile = query_tile(block, max(D, DV))
    grid = (pages.shape[0] * (block // tile), Hq)
    _prefill_kernel[grid](q, k_buf, v_buf, out, slots.contiguous(), pages, n, prefix_len + n, prefix_len,
                          pages.shape[2], scale, q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1),
                          v_buf.stride(0), v_buf.stride(1), out.stride(0), out.stride(1), pages.stride(0),
                          pages.stride(1), GROUP=Hq // Hkv, D=D, DV=DV, BLOCK=block, BLOCK_M=tile, P=page_size,
                          BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(DV))
    return out


def attend_selection(q, k_buf, v_buf, slots, chosen, prefix_len, scale, block):
    """The backend's GPU `attend` for sglang_shplb.sparse_prefill.sparse_prefill: q [n, Hkv, G, D]."""
    n, Hkv, G, D = q.shape
    out = block_sparse_prefill(q.reshape(n, Hkv * G, D), k_buf, v_buf, slots, chosen.page_lists(), prefix_len,
                               scale, block, chosen.page_size)
    return out.view(n, Hkv, G, -1)
