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
        self.gen, self.P, self.dtype, self.device = g, page_size, dtype, torch.device(device)
        self.bs, self.L, self.H, self.D = len(seq_lens), num_layers, kv_heads, head_dim
        need = sum(math.ceil((s + 64) / page_size) for s in seq_lens) + spare_pages + 1
        self.num_pages = need
        self.free = [int(p) for p in torch.randperm(need - 1, generator=g) + 1]   # page 0: SGLang's dummy page
        rows = self.bs + 2
        self.req_to_token = torch.zeros(rows, max_context, dtype=torch.int32)
        self.req_pool_indices = (torch.randperm(rows - 1, generator=g)[: self.bs] + 1).long()
        self.seq_lens = torch.zeros(self.bs, dtype=torch.int64)
        slots = need * page_size
        self.k = [(torch.randn(slots, kv_heads, head_dim, generator=g)).to(dtype) for _ in range(num_layers)]
        self.v = [(torch.randn(slots, kv_heads, head_dim, generator=g)).to(dtype) for _ in range(num_layers)]
        self.prefill_locs = self._append([int(s) for s in seq_lens])
        self._to_device()

    def _to_device(self):
        for name in ("req_to_token", "req_pool_indices", "seq_lens"):
            setattr(self, name + "_dev", getattr(self, name).to(self.device))
        self.k_dev = [t.to(self.device) for t in self.k]
        self.v_dev = [t.to(self.device) for t in self.v]

    def _append(self, counts: list[int]) -> torch.Tensor:
        """Give request r counts[r] more positions; returns their slots, request by request (contiguous)."""
        locs = []
        for r, c in enumerate(counts):
            row = int(self.req_pool_indices[r])
            for pos in range(int(self.seq_lens[r]), int(self.seq_lens[r]) + c):
                if pos % self.P == 0:
                    self.req_to_token[row, pos: pos + self.P] = self.free.pop() * self.P + torch.arange(self.P)
                locs.append(int(self.req_to_token[row, pos]))
            self.seq_lens[r] += c
        return torch.tensor(locs, dtype=torch.int64)

    def step(self):
        """One decode token per request: new random K/V written at fresh slots -> (locs, [k_new per layer])."""
        locs = self._append([1] * self.bs)
        k_new = []
        for layer in range(self.L):
            k = torch.randn(self.bs, self.H, self.D, generator=self.gen).to(self.dtype)
            v = torch.randn(self.bs, self.H, self.D, generator=self.gen).to(self.dtype)
            self.k[layer][locs], self.v[layer][locs] = k, v
            k_new.append(k)
        self._to_device()
        return locs.to(self.device), [k.to(self.device) for k in k_new]

    def query(self, q_heads: int):
        return torch.randn(self.bs, q_heads * self.D, generator=self.gen).to(self.dtype).to(self.device)
