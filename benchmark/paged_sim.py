"""A synthetic SGLang-shaped paged KV cache for the GPU checks (offline tests and benchmark/gpu_check.py).

Same layout the backend sees: per layer k/v buffers [slots, Hkv, D]; req_to_token [pool rows, max context]
int32 with each request's pages scattered over the pool; req_pool_indices in a shuffled order; slots of
a page contiguous. `step()` appends one decode token per request (a fresh page when crossing a boundary)
and returns what SGLang hands the backend: the written slots and keys/values.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_kernels():
    """`sglang_shplb_kernels` from the repository's kernels/ without installing (device images carry the
    repo only); the installed package when there is one."""
    if str(ROOT / "python") not in sys.path:
        sys.path.insert(0, str(ROOT / "python"))
    try:
        import sglang_shplb_kernels
        return sglang_shplb_kernels
    except ImportError:
        spec = importlib.util.spec_from_file_location("sglang_shplb_kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sglang_shplb_kernels"] = mod
        spec.loader.exec_module(mod)
        return mod


class PagedCache:
    def __init__(self, seq_lens: list[int], num_layers: int, kv_heads: int, head_dim: int, page_size: int,
                 max_context: int, dtype=torch.float32, device="cpu", seed: int = 0, spare_pages: int = 8):
        g = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        self.dgen = torch.Generator(self.device).manual_seed(seed)       # K/V/q drawn where they live
        self.gen, self.P, self.dtype = g, page_size, dtype
        self.bs, self.L, self.H, self.D = len(seq_lens), num_layers, kv_heads, head_dim
        need = sum(math.ceil((s + 64) / page_size) for s in seq_lens) + spare_pages + 1
        self.num_pages = need
        self.free = (torch.randperm(need - 1, generator=g) + 1).tolist()   # page 0: SGLang's dummy page
        rows = self.bs + 2
        self.req_to_token = torch.zeros(rows, max_context, dtype=torch.int32)
        self.req_pool_indices = (torch.randperm(rows - 1, generator=g)[: self.bs] + 1).long()
        self.seq_lens = torch.zeros(self.bs, dtype=torch.int64)
        shape = (need * page_size, kv_heads, head_dim)
        self.k_dev = [self._randn(shape) for _ in range(num_layers)]
        self.v_dev = [self._randn(shape) for _ in range(num_layers)]
        self.prefill_locs = self._append([int(s) for s in seq_lens])
        self._to_device()

    def _randn(self, shape):
        return torch.randn(shape, generator=self.dgen, device=self.device, dtype=self.dtype)

    @property
    def k(self):      # host views (the same tensors on a CPU run)
        return [t.cpu() for t in self.k_dev]

    @property
    def v(self):
        return [t.cpu() for t in self.v_dev]

    def _to_device(self):
        for name in ("req_to_token", "req_pool_indices", "seq_lens"):
            setattr(self, name + "_dev", getattr(self, name).to(self.device))

    def _append(self, counts: list[int]) -> torch.Tensor:
        """Give request r counts[r] more positions (fresh pages where they cross a boundary); returns
        their slots, request by request (contiguous, as SGLang's out_cache_loc)."""
        locs, P = [], self.P
        for r, c in enumerate(counts):
            row, old = int(self.req_pool_indices[r]), int(self.seq_lens[r])
            first, last = -(-old // P), -(-(old + c) // P)                 # logical pages to allocate
            if last > first:
                pages = torch.tensor([self.free.pop() for _ in range(last - first)], dtype=torch.int32)
                self.req_to_token[row, first * P: last * P] = (pages[:, None] * P + torch.arange(P)).flatten()
            locs.append(self.req_to_token[row, old: old + c].long())
            self.seq_lens[r] += c
        return torch.cat(locs)

    def step(self):
        """One decode token per request: new random K/V written at fresh slots -> (locs, [k_new per layer])."""
        locs = self._append([1] * self.bs).to(self.device)
        k_new = []
        for layer in range(self.L):
            k, v = self._randn((self.bs, self.H, self.D)), self._randn((self.bs, self.H, self.D))
            self.k_dev[layer][locs], self.v_dev[layer][locs] = k, v
            k_new.append(k)
        self._to_device()
        return locs, k_new

    def query(self, q_heads: int):
        return self._randn((self.bs, q_heads * self.D))
