"""Triton kernels (with PyTorch references) for per-head sparse page selection.

    update_page_minmax / update_page_minmax_torch  -- page key min/max metadata, updated on KV write
    quest_scores / quest_scores_torch               -- Quest upper bound per (request, kv head, page)
    select_topk_pages / select_topk_pages_torch     -- per-(request, head) variable-k page selection
    block_sparse_prefill / block_sparse_prefill_torch -- prefill attention over per-(query block, head) pages

The torch references work without Triton (its import is guarded). Triton decides at import time of
this package whether kernels run compiled or interpreted: set TRITON_INTERPRET=1 before importing
`kernels` to run them on CPU.
"""
from .block_sparse_prefill import attend_selection, block_sparse_prefill, block_sparse_prefill_torch
from .page_meta import update_page_minmax, update_page_minmax_torch
from .page_score import page_table_from_req_to_token, quest_scores, quest_scores_torch
from .topk_select import select_topk_pages, select_topk_pages_torch

__all__ = [
    "attend_selection", "block_sparse_prefill", "block_sparse_prefill_torch",
    "update_page_minmax", "update_page_minmax_torch",
    "page_table_from_req_to_token", "quest_scores", "quest_scores_torch",
    "select_topk_pages", "select_topk_pages_torch",
]
