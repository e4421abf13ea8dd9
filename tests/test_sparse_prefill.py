"""Block-sparse prefill: the selector against brute force, blockwise attention against a dense masked
reference (one request, chunked with a cached prefix, a batch on a scrambled paged pool), and the
real server: full prefill budget == torch_native, 10% still answers."""
import math

import pytest
import torch

from sglang_shplb.sparse_attention import new_page_metadata, update_page_minmax
from sglang_shplb.sparse_prefill import (attend_blocks, block_scores, request_pages, select_prefill_pages,
                                         sparse_prefill)

P, HKV, G, D, B = 4, 3, 2, 8, 8   # small pages and query blocks: many blocks and pages per test


def paged_pool(seq_lens, seed=0):
    """Requests owning whole pages in scrambled physical order, metadata folded chunk by chunk."""
    g = torch.Generator().manual_seed(seed)
    n_pages = [math.ceil(s / P) for s in seq_lens]
    perm = torch.randperm(sum(n_pages) + 2, generator=g)
    req_to_token = torch.zeros(len(seq_lens) + 1, max(n_pages) * P + 3, dtype=torch.int64)
    k_buf = torch.randn((sum(n_pages) + 2) * P, HKV, D, generator=g) * 2
    v_buf = torch.randn_like(k_buf)
    kmin, kmax = new_page_metadata(k_buf.shape[0], HKV, D, P, "cpu")
    used = 0
    for r, s in enumerate(seq_lens):
        slots = (perm[used: used + n_pages[r]].view(-1, 1) * P + torch.arange(P)).flatten()[:s]
        used += n_pages[r]
        req_to_token[r + 1, :s] = slots
        for c in range(0, s, 7):
            update_page_minmax(kmin, kmax, slots[c: c + 7], k_buf[slots[c: c + 7]], P)
    return req_to_token, k_buf, v_buf, kmin, kmax


def brute_force_pages(q, keys, prefix, budgets, sink, recent):
    """{(block, head): set of pages} from the definition: window + sink + top Quest-sum pages."""
    n, L = q.shape[0], prefix + q.shape[0]
    out = {}
    for b in range(math.ceil(n / B)):
        first, last = prefix + b * B, min(prefix + (b + 1) * B, L) - 1
        ctx = last // P + 1
        window = set(range(max(0, first // P - (recent - 1)), last // P + 1))
        forced = window | set(range(min(sink, ctx)))
        for h in range(HKV):
            qs = q[b * B: (b + 1) * B, h].reshape(-1, D)
            ub = []
            for j in range(ctx):
                page = keys[j * P: min((j + 1) * P, L), h]
                lo, hi = page.min(0).values, page.max(0).values
                ub.append(float(torch.maximum(qs * lo, qs * hi).sum()))
            k = min(max(math.ceil(float(budgets[h]) * ctx - 1e-6), len(forced)), ctx)
            rest = sorted((j for j in range(ctx) if j not in forced), key=lambda j: -ub[j])
            out[b, h] = forced | set(rest[: k - len(forced)])
    return out


def masked_reference(q, keys, vals, prefix, pages, scale):
    """Dense attention of every query over its block's pages, causal. pages: {(block, head): set}."""
    n, L = q.shape[0], prefix + q.shape[0]
    out = torch.empty(n, HKV, G, D)
    for i in range(n):
        for h in range(HKV):
            allowed = torch.tensor([(t // P) in pages[i // B, h] and t <= prefix + i for t in range(L)])
            logits = (q[i, h] @ keys[:, h].T) * scale
            out[i, h] = logits.masked_fill(~allowed, -math.inf).softmax(-1) @ vals[:, h]
    return out


def one_request(L, prefix, budgets, sink=1, recent=2, seed=0):
    req_to_token, k_buf, v_buf, kmin, kmax = paged_pool([L], seed)
    slots = req_to_token[1, :L]
    phys = slots[::P] // P
    q = torch.randn(L - prefix, HKV, G, D, generator=torch.Generator().manual_seed(seed + 1))
    chosen = select_prefill_pages(q, kmin[phys].transpose(0, 1), kmax[phys].transpose(0, 1), prefix,
                                  budgets, P, sink, recent, B)
    return q, k_buf[slots], v_buf[slots], chosen, (req_to_token, k_buf, v_buf, kmin, kmax)


def as_sets(chosen):
    lists = chosen.page_lists()
    return {(b, h): {int(j) for j in lists[b, h] if j >= 0}
            for b in range(lists.shape[0]) for h in range(lists.shape[1])}


@pytest.mark.parametrize("L,prefix,sink,recent", [(150, 0, 1, 2), (150, 67, 1, 2), (101, 20, 2, 1), (60, 0, 0, 3)])
def test_selector_matches_brute_force(L, prefix, sink, recent):
    budgets = torch.tensor([0.3, 0.6, 0.05])
    q, keys, _, chosen, _ = one_request(L, prefix, budgets, sink, recent)
    want = brute_force_pages(q, keys, prefix, budgets, sink, recent)
    assert as_sets(chosen) == want
    assert bool((chosen.rest >= sink).any()), "the case must exercise ranked (non-forced) pages"
    assert torch.equal(chosen.count, torch.tensor([[len(want[b, h]) for h in range(HKV)]
                                                   for b in range(chosen.count.shape[0])]))


@pytest.mark.parametrize("prefix", [0, 29])
def test_blockwise_attention_matches_masked_reference(prefix):
    budgets = torch.tensor([0.3, 0.1, 1.0])
    q, keys, vals, chosen, _ = one_request(90, prefix, budgets)
    slots = torch.arange(90)
    got = attend_blocks(q, request_pages(keys, slots, P), request_pages(vals, slots, P), chosen, prefix, 0.3, B)
    want = masked_reference(q, keys, vals, prefix, as_sets(chosen), 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_full_budget_is_dense_causal():
    q, keys, vals, chosen, _ = one_request(70, 13, torch.ones(HKV))
    assert chosen.dense
    slots = torch.arange(70)
    got = attend_blocks(q, request_pages(keys, slots, P), request_pages(vals, slots, P), chosen, 13, 0.3, B)
    causal = torch.ones(57, 70, dtype=torch.bool).tril(13)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), keys.transpose(0, 1)[:, None], vals.transpose(0, 1)[:, None], attn_mask=causal,
        scale=0.3).permute(2, 0, 1, 3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_batch_on_paged_pool_matches_per_request():
    """A batch of chunks (different cached prefixes) on scrambled pages == each request alone."""
    seq_lens, prefixes = [75, 33, 50], [40, 0, 17]
    req_to_token, k_buf, v_buf, kmin, kmax = paged_pool(seq_lens, seed=5)
    extend = [s - p for s, p in zip(seq_lens, prefixes)]
    q = torch.randn(sum(extend), HKV, G, D)
    budgets = torch.tensor([0.25, 0.1, 0.6])
    got = sparse_prefill(q, k_buf, v_buf, kmin, kmax, req_to_token, torch.tensor([1, 2, 3]), prefixes, extend,
                         budgets, P, 1, 2, 0.3, B)
    start = 0
    for r, (s, p, n) in enumerate(zip(seq_lens, prefixes, extend)):
        slots = req_to_token[r + 1, :s]
        keys, vals = k_buf[slots], v_buf[slots]
        qr = q[start: start + n]
        pages = brute_force_pages(qr, keys, p, budgets, 1, 2)
        torch.testing.assert_close(got[start: start + n], masked_reference(qr, keys, vals, p, pages, 0.3),
                                   atol=1e-5, rtol=1e-5)
        start += n


def test_unknown_estimate_is_refused():
    with pytest.raises(ValueError, match="unknown prefill estimate"):
        block_scores(torch.zeros(1, 1, 2, 4), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), "magic")
