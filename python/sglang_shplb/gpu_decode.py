"""GPU decode path: Triton selection kernels + FlashInfer attention over each head's selected pages.

Same contract as the CPU path in sparse_attention.py (plan on the host, run on the device):
  * page metadata update, Quest page scores and per-(request, head) variable top-k are Triton
    kernels (`sglang_shplb_kernels`);
  * attention runs FlashInfer's BatchDecodeWithPagedKVCacheWrapper with one row per
    (request, KV head) over SGLang's [slots, Hkv, D] buffer viewed as [slots*Hkv, 1, 1, D], so
    every (slot, head) is its own page (id slot*Hkv + h) and each row lists only its selection.
Without FlashInfer the selected tokens are gathered and attended in PyTorch.
Not yet run on a GPU in CI; `benchmark/gpu_check.py` is the prepared check.
"""
from __future__ import annotations

import torch

from . import selection as sel
from .sparse_attention import DecodeSelection, attend_selected

WORKSPACE_BYTES = 128 << 20


class GpuSparseDecode:
    def __init__(self, device):
        import sglang_shplb_kernels as K

        self.K = K
        self.wrapper = None
        try:
            import flashinfer

            ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
        except Exception:  # noqa: BLE001 - no FlashInfer (or its JIT failed): torch attention instead
            self.wrapper = None

    def update_metadata(self, kmin, kmax, locs, k, page_size):
        self.K.update_page_minmax(k, locs, kmin, kmax, page_size)

    def select(self, q, kmin, kmax, req_to_token, req_pool_indices, seq_lens, seq_lens_cpu, budgets,
               page_size, sink, recent) -> DecodeSelection:
        """q [bs, Hkv, G, D] -> slots/valid [bs, Hkv, T] of the selected tokens."""
        bs, Hkv = q.shape[:2]
        P = page_size
        n_pages = (seq_lens.long() + P - 1) // P
        n_cpu = (seq_lens_cpu.long() + P - 1) // P
        k_pages = sel.pages_for_budget(budgets.view(1, Hkv).double(), n_pages.view(bs, 1).double(), sink + recent)
        # Host-side bound on k (no device sync): budgets live on the host too.
        k_max = int(sel.pages_for_budget(budgets.cpu().max().double(), n_cpu.max().double(), sink + recent))
        page_ids = self.K.page_table_from_req_to_token(req_to_token, req_pool_indices, int(n_cpu.max()), P)
        scores = self.K.quest_scores(q, kmin, kmax, page_ids, n_pages)
        sel_idx, _ = self.K.select_topk_pages(scores, n_pages, k_pages, sink, recent, max_k=k_max)
        pos = (sel_idx.long().unsqueeze(-1) * P + torch.arange(P, device=q.device)).flatten(2)
        valid = (pos >= 0) & (pos < seq_lens.view(bs, 1, 1))
        rows = req_pool_indices.long().view(bs, 1, 1)
        slots = req_to_token[rows, pos.clamp(min=0, max=req_to_token.shape[1] - 1)].long()
        return DecodeSelection(slots, valid, dense=False)

    def attend(self, q, k_buf, v_buf, chosen: DecodeSelection, scale: float) -> torch.Tensor:
        if self.wrapper is None:
            return attend_selected(q, k_buf, v_buf, chosen, scale)
        bs, Hkv, G, D = q.shape
        ids = (chosen.slots * Hkv + torch.arange(Hkv, device=q.device).view(1, Hkv, 1)).flatten(0, 1)
        valid = chosen.valid.flatten(0, 1)
        indptr = torch.nn.functional.pad(valid.sum(-1).cumsum(0), (1, 0)).int().cpu()  # plan() wants host indptr
        last = torch.ones(bs * Hkv, dtype=torch.int32)
        self.wrapper.plan(indptr, ids[valid].int(), last, G, 1, D, 1, sm_scale=scale,
                          q_data_type=q.dtype, kv_data_type=k_buf.dtype)
        kv = (k_buf.view(-1, 1, 1, D), v_buf.view(-1, 1, 1, D))
        return self.wrapper.run(q.reshape(bs * Hkv, G, D), kv).view(bs, Hkv, G, D)
