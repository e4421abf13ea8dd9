"""Triton kernels (with PyTorch references) for per-head sparse page selection.

    update_page_minmax / update_page_minmax_torch  -- page key min/max metadata, updated on KV write
    fold_page_minmax                                -- the same, graph-safe, float32 or outward-rounded bf16
    quest_scores / quest_scores_torch               -- Quest upper bound per (request, kv head, page)
    page_scores / page_scores_torch                 -- serving: per-head bound, group sum|max, pages read by id
    select_topk_pages / select_topk_pages_torch     -- per-(request, head) variable-k page selection
    fine_page_scores / fine_page_scores_torch       -- two-stage selectors: sub-page bounds of a shortlist
    label_page_scores / label_page_scores_torch     -- label selectors: label-cache log-mass of a shortlist
    sparse_decode_attend                            -- serving: fused split-KV decode over selected pages
    block_sparse_prefill / block_sparse_prefill_torch -- prefill attention over per-(query block, head) pages

The torch references work without Triton (its import is guarded). Triton decides at import time of
this package whether kernels run compiled or interpreted: set TRITON_INTERPRET=1 before importing
`kernels` to run them on CPU.
"""
from . import _interpreter_compat

_interpreter_compat.apply()

from .block_sparse_prefill import attend_selection, block_sparse_prefill, block_sparse_prefill_torch
from .fine_score import fine_page_scores, fine_page_scores_torch
from .label_score import aggregate_label_scores, label_page_scores, label_page_scores_torch
from .page_meta import (fold_page_minmax, fold_page_minmax_torch, new_page_metadata, round_bf16, update_page_minmax,
                        update_page_minmax_torch)
from .page_score import page_table_from_req_to_token, quest_scores, quest_scores_torch
from .sparse_decode import (AGGREGATIONS, page_scores, page_scores_torch, sparse_decode_attend,
                            sparse_decode_attend_torch, split_count)
from .topk_select import select_topk_pages, select_topk_pages_into, select_topk_pages_torch

__all__ = [
    "attend_selection", "block_sparse_prefill", "block_sparse_prefill_torch",
    "update_page_minmax", "update_page_minmax_torch",
    "page_table_from_req_to_token", "quest_scores", "quest_scores_torch",
    "select_topk_pages", "select_topk_pages_torch", "select_topk_pages_into",
    "fold_page_minmax", "fold_page_minmax_torch", "new_page_metadata", "round_bf16",
    "AGGREGATIONS", "page_scores", "page_scores_torch", "sparse_decode_attend", "sparse_decode_attend_torch",
    "split_count", "fine_page_scores", "fine_page_scores_torch", "label_page_scores", "label_page_scores_torch",
    "aggregate_label_scores",
]
