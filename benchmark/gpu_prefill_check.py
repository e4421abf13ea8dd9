"""The block-sparse prefill stage of benchmark/gpu_check.py (kept apart so each file stays short).

One request on a scattered paged cache (gpu_check's shapes: 32 q / 8 kv heads, head_dim 128, bf16), bf16
page metadata folded by the served kernel, through the server's own extend function (sparse_prefill):
  * attend with the Triton kernel (as the backend on CUDA) == the CPU path, small case with a cached prefix,
    pages ranked by the label estimate (from a label cache as GpuSparseDecode keeps it) and by centre;
  * at 100% budget the kernel equals dense causal SDPA (bf16 tolerance) at every context;
  * timing per layer: dense causal SDPA over the gathered K/V vs our selection + kernel at --budget, per estimate.
Dry run: tiny sizes on CPU in fp16 (the interpreter's numpy has no bf16), the torch reference as
the kernel unless TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math

import torch

import sglang_shplb_kernels as K
from sglang_shplb.sparse_prefill import DENSE_TAIL, select_prefill_pages, sparse_prefill

BLOCK = 64


class PrefillCase:
    """A request of ctx tokens on scattered pages; the last n of them are the chunk being prefilled."""

    def __init__(self, run, ctx, n):
        P, dev = run.args.page_size, run.dev
        N = math.ceil(ctx / P)
        perm = torch.randperm(N + 1)[:N] + 1                                      # page 0 unused
        self.slots = (perm.view(-1, 1) * P + torch.arange(P)).flatten()[:ctx].to(dev)
        shape = ((N + 2) * P, run.Hkv, run.D)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
        self.k = torch.randn(shape, dtype=dtype, device=dev)
        self.v = torch.randn(shape, dtype=dtype, device=dev)
        self.kmin, self.kmax = K.new_page_metadata(N + 2, run.Hkv, run.D, torch.bfloat16, dev)   # as served
        run.update(self.k[self.slots], self.slots, self.kmin, self.kmax, P)
        self.prefix, self.n, self.P = ctx - n, n, P
        self.q = torch.randn(n, run.Hq, run.D, dtype=dtype, device=dev)

    def select(self, run, budget):
        phys = self.slots[:: self.P] // self.P
        q4 = self.q.view(self.n, run.Hkv, -1, run.D)
        return select_prefill_pages(q4, self.kmin[phys].float().transpose(0, 1),
                                    self.kmax[phys].float().transpose(0, 1), self.prefix,
                                    self._budgets(run, budget), self.P, 1, 2, run.block)

    @staticmethod
    def _budgets(run, budget):
        b = torch.full((run.Hkv,), budget) * torch.linspace(0.5, 1.5, run.Hkv) if budget < 1 else torch.ones(run.Hkv)
        return b.clamp(max=1.0)

    def sparse(self, run, kernel, budget, dense_tail=DENSE_TAIL):
        """The server's own extend path (sparse_prefill.sparse_prefill), attending with the Triton kernel
        (kernel=K.block_sparse_prefill, what the backend passes on CUDA) or the CPU path (the torch reference)."""
        attend = K.attend_selection if kernel is K.block_sparse_prefill else None
        out = sparse_prefill(self.q.view(self.n, run.Hkv, -1, run.D), self.k, self.v, self.kmin, self.kmax,
                             self.slots.view(1, -1), torch.zeros(1, dtype=torch.int64), [self.prefix], [self.n],
                             self._budgets(run, budget), self.P, 1, 2, run.D ** -0.5, block=run.block, attend=attend,
                             dense_tail=dense_tail)
        return out.reshape(self.n, run.Hq, -1)

    def dense(self, run):
        """Causal SDPA over the request's gathered K/V (what a dense paged prefill computes)."""
        keys, vals = self.k[self.slots].transpose(0, 1), self.v[self.slots].transpose(0, 1)
        qf = torch.zeros(run.Hq, self.prefix + self.n, run.D, dtype=self.q.dtype, device=self.q.device)
        qf[:, self.prefix:] = self.q.transpose(0, 1)
        o = torch.nn.functional.scaled_dot_product_attention(qf[None], keys[None], vals[None], is_causal=True,
                                                             enable_gqa=True, scale=run.D ** -0.5)
        return o[0, :, self.prefix:].transpose(0, 1)


def prefill_check(run):
    gpu = run.dev.type == "cuda"
    kernel = K.block_sparse_prefill if run.impl == "triton" else K.block_sparse_prefill_torch
    run.block = BLOCK if gpu else 16
    small = PrefillCase(run, 2048 if gpu else 200, 1024 if gpu else 120)
    tail = small.n // 4              # a sparse body and a dense tail (the served default 256 on the GPU case)
    got, want = (small.sparse(run, k, run.args.budget, tail) for k in (kernel, K.block_sparse_prefill_torch))
    err = float((got.float() - want.float()).abs().max())
    run.check(f"sparse_prefill: Triton kernel == CPU path (ctx={small.prefix + small.n}, "
              f"chunk {small.n}, dense tail {tail})", err < 2e-2, f"max abs err {err:.2e}")
    for ctx in ((8192, 32768) if gpu else (64, 200)):
        if run.elapsed() > run.args.time_limit:
            run.notes.append(f"skipped prefill ctx={ctx}: past --time-limit")
            continue
        case = PrefillCase(run, ctx, ctx)
        dense = case.dense(run)
        full = case.sparse(run, kernel, 1.0)
        rel = float((full.float() - dense.float()).abs().max() / dense.float().abs().max())
        run.check(f"prefill sparse@100% == dense causal SDPA (ctx={ctx})", rel < 2e-2, f"max rel err {rel:.2e}")
        run.timed(f"prefill dense causal SDPA ctx={ctx} (per layer)", lambda: case.dense(run))
        run.timed(f"prefill shplb {run.args.budget:.0%} select+{run.impl} ctx={ctx} (per layer)",
                  lambda: case.sparse(run, kernel, run.args.budget))
        run.timed(f"prefill select only ctx={ctx}", lambda: case.select(run, run.args.budget))
        del case
        if gpu:
            torch.cuda.empty_cache()
