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
