"""Pure-PyTorch stand-in for the few `sgl_kernel` symbols SGLang imports on its CPU platform.

Installed by sglang-shplb's `patches/apply.py` only when no real sgl_kernel exists. It defines no
`convert_weight_packed`, so SGLang's AMX check is false and every layer takes SGLang's own
pure-torch path. Speculative-decoding helpers are not provided (a plain model never calls them).
"""
import ctypes

import torch

SGLANG_SHPLB_COMPAT = True


def _ragged_rows(req_pool_indices, start_offset, end_offset):
    """(pool row, column) of every token in the ragged [start, end) ranges, in request order."""
    lens = (end_offset - start_offset).long()
    rows = torch.repeat_interleave(req_pool_indices.long(), lens)
    first = torch.repeat_interleave(start_offset.long(), lens)
    within = torch.arange(int(lens.sum()), device=lens.device) - torch.repeat_interleave(
        torch.cumsum(lens, 0) - lens, lens)
    return rows, first + within


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len):
    rows, cols = _ragged_rows(req_pool_indices, start_offset, end_offset)
    req_to_token[rows, cols] = out_cache_loc[: rows.numel()].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len):
    rows, cols = _ragged_rows(req_pool_indices, start_offset, end_offset)
    out_cache_loc[: rows.numel()] = req_to_token[rows, cols].to(out_cache_loc.dtype)


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """Copy slot src_loc[i] -> tgt_loc[i] in every buffer (raw pointers + per-slot byte strides)."""
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        for t, s in zip(tgt_loc.tolist(), src_loc.tolist()):
            ctypes.memmove(ptr + t * stride, ptr + s * stride, stride)


def _unsupported(name):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available in sglang-shplb's CPU compat module")
    fn.__name__ = name
    return fn


def __getattr__(name):
    # SGLang imports speculative-decoding `*_cpu` kernels at module scope; a plain model never
    # calls them. Anything else (e.g. `convert_weight_packed`) stays absent on purpose.
    if name.endswith("_cpu"):
        return _unsupported(name)
    raise AttributeError(name)
