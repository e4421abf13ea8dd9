"""Triton kernels in kernels/ against the PyTorch references (selection.py and the torch fallbacks).

The Triton checks run under TRITON_INTERPRET=1 (CPU) in a fresh subprocess each: Triton fixes
interpret vs compiled mode when `kernels` is imported, so the variable must be set before that,
whatever this pytest process already imported. `python tests/test_kernels.py CHECK` runs one check.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from sglang_shplb import selection as S  # noqa: E402

SINK, RECENT, P = 1, 2, 4


# ---------------------------------------------------------------- shared random inputs
def paged_requests(gen, seq_lens, num_pages, extra_cols=0):
    """Each request gets distinct random physical pages < num_pages: page table [bs, maxN] (0-padded)."""
    n_pages = [-(-s // P) for s in seq_lens]
    perm = torch.randperm(num_pages, generator=gen)
    table = torch.zeros(len(seq_lens), max(n_pages) + extra_cols, dtype=torch.int64)
    used = 0
    for r, n in enumerate(n_pages):
        table[r, :n] = perm[used:used + n]
        used += n
    return table, torch.tensor(n_pages)


def select_cases(gen):
    """(scores, n_pages, k_pages) cases: ties, -inf/-0.0 scores, dense, floor, k > n, n = 0 and 1."""
    bs, H, N = 5, 3, 37
    n = torch.tensor([37, 1, 0, 20, 9])
    scores = (torch.randn(bs, H, N, generator=gen) * 3).round()           # many ties
    scores[0, 0, 5:9] = float("-inf")
    scores[3, 1, :] = -0.0
    scores[3, 1, ::3] = 0.0
    floor = SINK + RECENT
    budget = torch.rand(bs, H, generator=gen) * 0.5
    budget[0, 1], budget[4, 2], budget[1, 0] = 1.0, 1.0, 0.0              # dense and floor rows
    k = S.pages_for_budget(budget, n[:, None].expand(bs, H), floor)
    k_over = k.clone()
    k_over[0, 2], k_over[4, 0] = 99, 0                                    # k > n, k = 0
    yield scores, n, k
    yield scores, n, k_over
    yield scores.transpose(0, 1).contiguous().transpose(0, 1), n, k      # non-contiguous scores
    big = torch.randn(2, 2, 300, generator=gen)
    nb = torch.tensor([300, 123])
    yield big, nb, S.pages_for_budget(torch.tensor([[0.1, 0.3], [1.0, 0.02]]), nb[:, None].expand(2, 2), floor)


def mask_of(sel_idx, n_cols):
    idx = torch.where(sel_idx < 0, n_cols, sel_idx).long()
    full = torch.zeros(*sel_idx.shape[:-1], n_cols + 1, dtype=torch.bool)
    return full.scatter(-1, idx, True)[..., :n_cols]


def check_selection(fn):
    gen = torch.Generator().manual_seed(1)
    for scores, n, k in select_cases(gen):
        bs, H, N = scores.shape
        kc = torch.minimum(k.clamp(min=0), n[:, None])
        expect = S.select_pages(scores, n[:, None].expand(bs, H), kc, SINK, RECENT)
        sel_idx, sel_cnt = fn(scores, n, k, SINK, RECENT)
        assert sel_idx.dtype == torch.int32 and sel_cnt.dtype == torch.int32
        assert sel_idx.shape == (bs, H, int(kc.max()))
        assert torch.equal(sel_cnt.long(), kc)
        assert torch.equal(mask_of(sel_idx, N), expect)
        # ascending indices, then -1 padding
        pos = torch.arange(sel_idx.shape[-1])
        assert torch.equal(sel_idx >= 0, pos < kc[..., None])
        valid = sel_idx[..., 1:] >= 0
        assert bool(((sel_idx[..., 1:] > sel_idx[..., :-1]) | ~valid).all())


def check_scores(fn):
    gen = torch.Generator().manual_seed(2)
    for G in (1, 3):
        H, D, num_pages = 2, 24, 40
        seq_lens = [37, 1, 0, 13]
        table, n = paged_requests(gen, seq_lens, num_pages)
        a, b = torch.randn(2, num_pages, H, D, generator=gen)
        kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
        q = torch.randn(len(seq_lens), H, G, D, generator=gen).to(torch.bfloat16)
        got = fn(q, kmin, kmax, table, n)
        assert got.shape == (len(seq_lens), H, table.shape[1]) and got.dtype == torch.float32
        for r, nr in enumerate(n.tolist()):
            assert torch.isneginf(got[r, :, nr:]).all()
            if nr:
                pages = table[r, :nr]
                exp = S.quest_upper_bound(q[r], kmin[pages].transpose(0, 1), kmax[pages].transpose(0, 1)).sum(-2)
                torch.testing.assert_close(got[r, :, :nr], exp, rtol=1e-5, atol=1e-4)


def check_page_meta(fn):
    """Extends (pages shared by many tokens, starting mid-page) then decodes, on stale metadata."""
    gen = torch.Generator().manual_seed(3)
    for H, D in ((2, 8), (3, 5)):
        seq_lens = [45, 9, 1, 30]
        num_pages = 40
        table, _ = paged_requests(gen, seq_lens, num_pages - 8, extra_cols=1)   # top 8 pages kept free
        kmin = torch.randn(num_pages, H, D, generator=gen)               # stale pages of freed requests
        kmax = kmin + 1.0
        hist = [torch.empty(0, H, D) for _ in seq_lens]
        # three rounds: extend 0..a, extend a..b (may start mid-page), then 3 single-token decodes
        cuts = [[0, s // 2, s] for s in seq_lens]
        steps = [(c[0], c[1]) for c in cuts], [(c[1], c[2]) for c in cuts]
        steps += tuple([(s + i, s + i + 1) for s in seq_lens] for i in range(3))
        for step in steps:
            locs, ks = [], []
            for r, (lo, hi) in enumerate(step):
                pos = torch.arange(lo, hi)
                locs.append(table[r, pos // P] * P + pos % P if hi <= seq_lens[r] else
                            _grow(table, r, pos, num_pages))
                k = (torch.randn(hi - lo, H, D, generator=gen) * 2).to(torch.bfloat16)
                ks.append(k)
                hist[r] = torch.cat([hist[r], k.float()])
            perm = torch.randperm(sum(len(x) for x in locs), generator=gen)   # order must not matter
            k_all, l_all = torch.cat(ks)[perm], torch.cat(locs)[perm]
            fn(k_all, l_all.to(torch.int32), kmin, kmax, P)
        for r, h in enumerate(hist):
            n = -(-len(h) // P)
            lo, hi = S.page_minmax(h.transpose(0, 1), P)                  # [H, n, D]
            pages = table[r, :n]
            assert torch.equal(kmin[pages].transpose(0, 1), lo) and torch.equal(kmax[pages].transpose(0, 1), hi)
    # a strided k (a view into a fused qkv buffer); page 0 gets offset 3 before offset 0 in the batch
    qkv = torch.randn(6, 3, 2, 8, generator=gen)
    k, locs = qkv[:, 1], torch.tensor([8, 9, 10, 3, 0, 1])
    kmin, kmax = torch.zeros(3, 2, 8), torch.zeros(3, 2, 8)
    fn(k, locs, kmin, kmax, P)
    assert torch.equal(kmin[2], k[:3].amin(0)) and torch.equal(kmax[2], k[:3].amax(0))
    assert torch.equal(kmin[0], k[3:].amin(0)) and torch.equal(kmax[0], k[3:].amax(0))
    assert not kmin[1].any() and not kmax[1].any()


def _grow(table, r, pos, num_pages):
    """Decode past the prefilled length: the request takes a fresh page when it crosses a boundary."""
    if int(pos[0]) % P == 0:
        table[r, int(pos[0]) // P] = num_pages - 1 - r                    # one of the free top pages
    return table[r, pos // P] * P + pos % P


# ---------------------------------------------------------------- torch references (in process)
def test_torch_select_matches_selection():
    from sglang_shplb_kernels.topk_select import select_topk_pages_torch
    check_selection(select_topk_pages_torch)


def test_torch_scores_match_selection():
    from sglang_shplb_kernels.page_score import quest_scores_torch
    check_scores(quest_scores_torch)


def test_torch_page_meta_matches_page_minmax():
    from sglang_shplb_kernels.page_meta import update_page_minmax_torch
    check_page_meta(update_page_minmax_torch)


def test_page_table_from_req_to_token():
    from sglang_shplb_kernels.page_score import page_table_from_req_to_token
    req_to_token = torch.arange(4 * 32, dtype=torch.int32).view(4, 32).flip(0)  # row r: slots of req 3-r
    t = page_table_from_req_to_token(req_to_token, torch.tensor([2, 0]), 5, 8)
    assert torch.equal(t, torch.tensor([[4, 5, 6, 7, 0], [12, 13, 14, 15, 0]]))


# ---------------------------------------------------------------- Triton, interpreted
def _triton_select():
    from sglang_shplb_kernels import select_topk_pages
    check_selection(select_topk_pages)                                    # whole row in one block
    check_selection(functools.partial(select_topk_pages, block_n=16))    # rows in chunks: carried counts


def _triton_scores():
    from sglang_shplb_kernels import quest_scores
    check_scores(quest_scores)
    check_scores(functools.partial(quest_scores, block_n=4))              # several page blocks per row


def _triton_page_meta():
    from sglang_shplb_kernels import update_page_minmax
    check_page_meta(update_page_minmax)


CHECKS = {"select": _triton_select, "scores": _triton_scores, "page_meta": _triton_page_meta}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_triton_kernel_interpreted(check):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "OK" in p.stdout, f"{check} failed:\n{p.stdout}\n{p.stderr[-4000:]}"


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before `kernels` (and so triton.jit) is imported
    CHECKS[sys.argv[1]]()
    print(f"{sys.argv[1]} OK")
