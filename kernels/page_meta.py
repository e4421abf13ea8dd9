"""Page key metadata (Quest min/max) kept up to date as K is written into the paged KV cache.

kmin/kmax are [num_pages, Hkv, D] float32; physical page p covers KV slots [p*P, (p+1)*P).
Writing K for slots `locs` updates page locs // P: a token at in-page offset 0 starts the page
afresh (its old contents belong to a freed request), any other token widens the page's min/max.
Several tokens of one call may land in the same page (an extend), so the update is done in two
steps: reset the pages that receive an offset-0 token, then min/max-reduce every token into its page.
Both steps are order-independent, so the result is deterministic and needs no host sync (CUDA-graph safe).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch reference still usable
    triton = None


def _check(k_new, locs, kmin, kmax, page_size):
    assert k_new.dim() == 3 and locs.dim() == 1 and k_new.shape[0] == locs.shape[0], (k_new.shape, locs.shape)
    assert kmin.shape == kmax.shape and kmin.shape[1:] == k_new.shape[1:], (kmin.shape, k_new.shape)
    assert kmin.dtype == torch.float32 and kmax.dtype == torch.float32
    assert page_size >= 1


def update_page_minmax_torch(k_new: torch.Tensor, locs: torch.Tensor, kmin: torch.Tensor,
                             kmax: torch.Tensor, page_size: int) -> None:
    """Reference: the CPU serving path's update (sglang_shplb.sparse_attention), same semantics."""
    from sglang_shplb.sparse_attention import update_page_minmax as torch_update

    _check(k_new, locs, kmin, kmax, page_size)
    if locs.numel():
        torch_update(kmin, kmax, locs, k_new, page_size)


if triton is not None:

    @triton.jit
    def _reset_pages_kernel(locs_ptr, kmin_ptr, kmax_ptr, P: tl.constexpr, ROW: tl.constexpr,
                            BLOCK: tl.constexpr):
        # One program per written token; only offset-0 tokens reset their page (row of Hkv*D floats).
        i = tl.program_id(0)
        loc = tl.load(locs_ptr + i).to(tl.int64)
        if loc % P == 0:
            page = loc // P
            offs = tl.arange(0, BLOCK)
            m = offs < ROW
            tl.store(kmin_ptr + page * ROW + offs, tl.full([BLOCK], float("inf"), tl.float32), mask=m)
            tl.store(kmax_ptr + page * ROW + offs, tl.full([BLOCK], float("-inf"), tl.float32), mask=m)

    @triton.jit
    def _reduce_tokens_kernel(k_ptr, locs_ptr, kmin_ptr, kmax_ptr, stride_kn, stride_kh, stride_kd,
                              P: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per written token: atomically fold its [H, D] keys into its page.
        # Float atomic min/max are exact (order-independent), so shared pages need no sorting.
        i = tl.program_id(0)
        page = tl.load(locs_ptr + i).to(tl.int64) // P
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        m = (h < H) & (d < D)
        k = tl.load(k_ptr + i.to(tl.int64) * stride_kn + h * stride_kh + d * stride_kd, mask=m).to(tl.float32)
        dst = page * (H * D) + h * D + d
        tl.atomic_min(kmin_ptr + dst, k, mask=m)
        tl.atomic_max(kmax_ptr + dst, k, mask=m)


def update_page_minmax(k_new: torch.Tensor, locs: torch.Tensor, kmin: torch.Tensor,
                       kmax: torch.Tensor, page_size: int) -> None:
    """In place: fold keys k_new [n, Hkv, D] (any float dtype, any strides) written at KV slots
    locs [n] (int32/int64) into the page metadata kmin/kmax [num_pages, Hkv, D] float32 (contiguous).
    A token at slot offset 0 within its page resets that page first. Triton (GPU or interpreter)."""
    _check(k_new, locs, kmin, kmax, page_size)
    assert triton is not None, "Triton is not installed; use update_page_minmax_torch"
    assert kmin.is_contiguous() and kmax.is_contiguous()
    n, H, D = k_new.shape
    if n == 0:
        return
    locs = locs.contiguous()
    row = H * D
    _reset_pages_kernel[(n,)](locs, kmin, kmax, P=page_size, ROW=row, BLOCK=triton.next_power_of_2(row))
    _reduce_tokens_kernel[(n,)](k_new, locs, kmin, kmax, *k_new.stride(), P=page_size, H=H, D=D,
                                BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D))


# ------------------------------------------------------------------ serving variant: any metadata dtype
def round_bf16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 -> bfloat16 rounded outward: the largest bf16 <= x (up=False) or smallest >= x (up=True),
    so page min/max stored in half precision still bound every key (the Quest bound stays an upper bound)."""
    b = x.float().contiguous().view(torch.int32)
    hi = b >> 16                                             # truncation toward zero, sign kept
    lost = (b & 0xFFFF) != 0
    bump = lost & ((b < 0) != up)                            # negatives round down by growing magnitude
    return (hi + bump.to(torch.int32)).to(torch.int16).view(torch.bfloat16)


def fold_page_minmax_torch(k_new, locs, kmin, kmax, page_size) -> None:
    """Reference of fold_page_minmax: the CPU path's update in float32, then outward rounding to bf16."""
    if kmin.dtype == torch.float32:
        return update_page_minmax_torch(k_new, locs, kmin, kmax, page_size)
    lo, hi = kmin.float(), kmax.float()
    update_page_minmax_torch(k_new, locs, lo, hi, page_size)
    kmin.copy_(round_bf16(lo, up=False))
    kmax.copy_(round_bf16(hi, up=True))


def new_page_metadata(num_pages: int, kv_heads: int, head_dim: int, dtype, device):
    """Empty pages (min +inf, max -inf), allocated once at start-up."""
    shape = (num_pages, kv_heads, head_dim)
    return (torch.full(shape, float("inf"), dtype=dtype, device=device),
            torch.full(shape, float("-inf"), dtype=dtype, device=device))


if triton is not None:

    @triton.jit
    def _store_bf16_bits(ptr, x, mask, UP: tl.constexpr):
        b = x.to(tl.int32, bitcast=True)
        lost = (b & 0xFFFF) != 0
        if UP:
            bump = lost & (b >= 0)
        else:
            bump = lost & (b < 0)
        tl.store(ptr, ((b >> 16) + bump.to(tl.int32)).to(tl.int16), mask=mask)

    @triton.jit(do_not_specialize=["n"])
    def _fold_kernel(k_ptr, locs_ptr, kmin_ptr, kmax_ptr, n, stride_kn, stride_kh,
                     P: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BITS16: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        # Program (token i, KV head h). The first token of each run of same-page tokens folds the
        # run (at most P tokens) into its page in float32 and writes it back once: no atomics, so the
        # metadata can be bf16. A run holding an in-page offset 0 token starts the page afresh.
        i = tl.program_id(0)
        h = tl.program_id(1)
        loc = tl.load(locs_ptr + i).to(tl.int64)
        page = loc // P
        prev = tl.load(locs_ptr + i - 1, mask=i > 0, other=0).to(tl.int64)
        if (i == 0) | (prev // P != page):
            d = tl.arange(0, BLOCK_D)
            dm = d < D
            mn = tl.full([BLOCK_D], float("inf"), tl.float32)
            mx = tl.full([BLOCK_D], float("-inf"), tl.float32)
            alive = tl.full([BLOCK_D], 1, tl.int1)     # vectors: scalar booleans do not mix with masks everywhere
            fresh = tl.full([BLOCK_D], 0, tl.int1)
            for t in range(P):                         # not unrolled: no spills at P = 32
                idx = i + t
                lt = tl.load(locs_ptr + idx, mask=idx < n, other=0).to(tl.int64)
                alive = alive & ((idx < n) & (lt // P == page))
                kt = tl.load(k_ptr + idx.to(tl.int64) * stride_kn + h * stride_kh + d, mask=dm & alive,
                             other=0.0).to(tl.float32)
                mn = tl.where(alive, tl.minimum(mn, kt), mn)
                mx = tl.where(alive, tl.maximum(mx, kt), mx)
                fresh = fresh | (alive & (lt % P == 0))
            dst = page * (H * D) + h * D + d
            keep = dm & ~fresh
            if BITS16:
                old_lo = (tl.load(kmin_ptr + dst, mask=keep, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
                old_hi = (tl.load(kmax_ptr + dst, mask=keep, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
            else:
                old_lo = tl.load(kmin_ptr + dst, mask=keep, other=0.0)
                old_hi = tl.load(kmax_ptr + dst, mask=keep, other=0.0)
            mn = tl.where(keep, tl.minimum(mn, old_lo), mn)
            mx = tl.where(keep, tl.maximum(mx, old_hi), mx)
            if BITS16:
                _store_bf16_bits(kmin_ptr + dst, mn, dm, UP=False)
                _store_bf16_bits(kmax_ptr + dst, mx, dm, UP=True)
            else:
                tl.store(kmin_ptr + dst, mn, mask=dm)
                tl.store(kmax_ptr + dst, mx, mask=dm)


def fold_page_minmax(k_new: torch.Tensor, locs: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                     page_size: int) -> None:
    """In place, graph-safe: fold keys k_new [n, Hkv, D] written at slots locs [n] into kmin/kmax
    [pages, Hkv, D] (float32, or bfloat16 rounded outward). Same result as update_page_minmax provided
    the tokens of any one page are adjacent in locs — true for SGLang's out_cache_loc (a request's
    tokens are consecutive and requests never write into the same page)."""
    assert kmin.dtype in (torch.float32, torch.bfloat16) and kmin.dtype == kmax.dtype
    assert kmin.is_contiguous() and kmax.is_contiguous() and k_new.stride(2) == 1
    n, H, D = k_new.shape
    if n == 0:
        return
    bits16 = kmin.dtype == torch.bfloat16
    lo, hi = (kmin.view(torch.int16), kmax.view(torch.int16)) if bits16 else (kmin, kmax)
    _fold_kernel[(n, H)](k_new, locs, lo, hi, n, k_new.stride(0), k_new.stride(1), P=page_size, H=H, D=D,
                         BITS16=bits16, BLOCK_D=triton.next_power_of_2(D))
