"""The CPU decode path against brute force: page metadata, selection, attention."""
import math

import pytest
import torch

from sglang_shplb import recovery
from sglang_shplb import selection as sel
from sglang_shplb.sparse_attention import (attend_selected, fold_labels, new_label_cache, new_page_metadata,
                                           plan_decode, select_decode_tokens, update_page_minmax)

P, HKV, G, D = 4, 3, 2, 8


def paged_cache(seq_lens, page_size=P, seed=0):
    """A KV pool whose requests own whole pages in scrambled physical order, like SGLang's."""
    g = torch.Generator().manual_seed(seed)
    n_pages = [math.ceil(s / page_size) for s in seq_lens]
    total_pages = sum(n_pages) + 3
    perm = torch.randperm(total_pages, generator=g)
    req_to_token = torch.zeros(len(seq_lens) + 1, max(n_pages) * page_size + 5, dtype=torch.int32)
    k_buf = torch.randn(total_pages * page_size, HKV, D, generator=g) * 2
    v_buf = torch.randn(total_pages * page_size, HKV, D, generator=g)
    kmin, kmax = new_page_metadata(k_buf.shape[0], HKV, D, page_size, "cpu")
    used = 0
    for r, s in enumerate(seq_lens):
        pages = perm[used: used + n_pages[r]]
        used += n_pages[r]
        slots = (pages.view(-1, 1) * page_size + torch.arange(page_size)).flatten()[:s]
        req_to_token[r + 1, :s] = slots.int()
        for start in range(0, s, 5):  # written in chunks, as prefill chunks + decode steps would
            loc = slots[start: start + 5]
            update_page_minmax(kmin, kmax, loc, k_buf[loc], page_size)
    return req_to_token, k_buf, v_buf, kmin, kmax


def fine_metadata(req_to_token, k_buf, seq_lens, sub):
    """Sub-page metadata (page metadata at page size `sub`) of the requests in rows 1.. of req_to_token."""
    fine = new_page_metadata(k_buf.shape[0], k_buf.shape[1], k_buf.shape[2], sub, "cpu")
    for r, s in enumerate(seq_lens):
        slots = req_to_token[r + 1, :s].long()
        for start in range(0, s, 5):
            update_page_minmax(*fine, slots[start: start + 5], k_buf[slots[start: start + 5]], sub)
    return fine


def label_cache(req_to_token, k_buf, seq_lens, r, seed=0, page_size=P):
    """Channels [Hkv, r] (random, as calibration might give) and the label cache of the requests in rows
    1.., folded in chunks as the backend folds written keys."""
    g = torch.Generator().manual_seed(seed)
    channels = torch.stack([torch.randperm(k_buf.shape[-1], generator=g)[:r] for _ in range(k_buf.shape[1])])
    cache = new_label_cache(k_buf.shape[0], channels, page_size, k_buf.dtype, "cpu")
    for row, s in enumerate(seq_lens):
        slots = req_to_token[row + 1, :s].long()
        for start in range(0, s, 5):
            fold_labels(cache, channels, slots[start: start + 5], k_buf[slots[start: start + 5]])
    return cache, channels


def test_label_cache_holds_each_keys_channels():
    seq_lens = [13, 30]
    req_to_token, k_buf, *_ = paged_cache(seq_lens)
    cache, channels = label_cache(req_to_token, k_buf, seq_lens, 3)
    for r, s in enumerate(seq_lens):
        for slot in req_to_token[r + 1, :s].tolist():
            for h in range(HKV):
                assert cache[h, slot].tolist() == [k_buf[slot, h, c].item() for c in channels[h].tolist()]


def dense_reference(q, k_buf, v_buf, req_to_token, rows, seq_lens, scale):
    outs = []
    for b, (r, s) in enumerate(zip(rows.tolist(), seq_lens.tolist())):
        slots = req_to_token[r, :s].long()
        keys, vals = k_buf[slots].transpose(0, 1), v_buf[slots].transpose(0, 1)   # [Hkv, s, D]
        p = (torch.einsum("hgd,hsd->hgs", q[b], keys) * scale).softmax(-1)
        outs.append(torch.einsum("hgs,hsd->hgd", p, vals))
    return torch.stack(outs)


def test_metadata_matches_pages():
    seq_lens = [13, 30, 7]
    req_to_token, k_buf, _, kmin, kmax = paged_cache(seq_lens)
    for r, s in enumerate(seq_lens):
        slots = req_to_token[r + 1, :s].long()
        lo, hi = sel.page_minmax(k_buf[slots].transpose(0, 1), P)                  # [Hkv, pages, D]
        phys = slots[::P] // P
        assert torch.equal(kmin[phys], lo.transpose(0, 1)) and torch.equal(kmax[phys], hi.transpose(0, 1))


def test_reused_page_forgets_stale_bounds():
    kmin, kmax = new_page_metadata(8, 1, 2, 4, "cpu")
    update_page_minmax(kmin, kmax, torch.arange(4), torch.full((4, 1, 2), 100.0), 4)
    update_page_minmax(kmin, kmax, torch.arange(2), torch.ones(2, 1, 2), 4)         # page freed and reused
    assert kmax[0].max() == 1.0


@pytest.mark.parametrize("budget", [1.0, 0.9])
def test_covered_heads_equal_dense(budget):
    """Budget 1: the dense shortcut. Budget 0.9: the sparse path, where the short requests' heads
    still cover their whole context and must match dense exactly."""
    seq_lens = torch.tensor([13, 30, 7, 41])
    req_to_token, k_buf, v_buf, kmin, kmax = paged_cache(seq_lens.tolist())
    rows = torch.arange(1, 5)
    q = torch.randn(4, HKV, G, D)
    labels = label_cache(req_to_token, k_buf, seq_lens.tolist(), sel.get_selector(sel.DEFAULT_SELECTOR).keys // 8)
    chosen = select_decode_tokens(q, kmin, kmax, req_to_token, rows, seq_lens, torch.full((HKV,), budget), P, 1, 1,
                                  labels=labels)      # the default selector: label channels
    assert chosen.dense == (budget == 1.0)
    got = attend_selected(q, k_buf, v_buf, chosen, 0.3)
    want = dense_reference(q, k_buf, v_buf, req_to_token, rows, seq_lens, 0.3)
    covered = (torch.ceil(budget * (seq_lens / P).ceil()) >= (seq_lens / P).ceil())
    assert covered.any() and (budget < 1.0) == (not covered.all())
    assert torch.allclose(got[covered], want[covered], atol=1e-5)
    assert torch.equal(chosen.tokens_read[0] == seq_lens.sum(), torch.tensor(budget == 1.0))


def brute_force_pages(rule, q, keys, n, k, P, sink, recent, channels=None):
    """Pages one (request, KV head) keeps, from the page's own keys, plain Python: q [G, D], keys [s, D];
    channels: a label selector's calibrated channels of this KV head."""
    def bound(qg, box):
        lo, hi = box.min(0).values, box.max(0).values
        return float(torch.maximum(qg * lo, qg * hi).sum())

    pages = [keys[j * P:(j + 1) * P] for j in range(n)]

    def agg(per_head, among, scale=q.shape[-1] ** -0.5, how=rule.aggregate):  # per_head [G][n] -> {page: score}
        rows = [torch.tensor([r[j] for j in among], dtype=torch.float64) * scale for r in per_head]
        if how == "sum":
            col = torch.stack(rows).sum(0)
        elif how == "max":
            col = torch.stack(rows).amax(0)
        elif how == "norm":
            col = torch.stack([r.log_softmax(0) for r in rows]).amax(0)
        else:
            col = torch.stack([r.softmax(0) for r in rows]).sum(0)
        return dict(zip(among, col.tolist()))

    forced = {j for j in range(n) if j < sink or j >= n - recent}

    def ranked(score):
        return sorted(forced & set(score)) + sorted(set(score) - forced, key=lambda j: (-score[j], j))
    coarse = agg([[bound(qg, pg) for pg in pages] for qg in q], list(range(n)), how=rule.coarse or rule.aggregate)
    if rule.sub is None and not rule.keys:
        return set(ranked(coarse)[:k])
    among = ranked(coarse)[: min(n, math.ceil(rule.shortlist * k - 1e-6))] if rule.shortlist else list(range(n))
    if rule.keys:   # SparQ: each head's r largest-|q| channels, log-sum-exp over the page's tokens, max
        def page_logmass(qg, pg):
            ch = channels if rule.label else sorted(range(len(qg)), key=lambda d: -abs(float(qg[d])))[: rule.keys]
            logits = [sum(float(qg[d]) * float(t[d]) for d in ch) * len(qg) ** -0.5 for t in pg]
            return math.log(sum(math.exp(x) for x in logits))
        fine = agg([[page_logmass(qg, pages[j]) if j in among else 0.0 for j in range(n)] for qg in q], among, 1.0)
        return set(ranked(fine)[:k])
    fine = agg([[max(bound(qg, pg[i: i + rule.sub]) for i in range(0, len(pg), rule.sub)) for pg in pages]
                for qg in q], sorted(among))
    return set(ranked(fine)[:k])


@pytest.mark.parametrize("ragged", [False, True], ids=["one_group", "ragged_shortlist"])
@pytest.mark.parametrize("selector", list(sel.SELECTORS))
def test_variable_budgets_pick_brute_force_pages(selector, ragged, monkeypatch):
    """Every served selector, end to end through the paged cache, against a plain-Python reference; ragged: with
    the second stage run per head group at each group's own shortlist width (a decode plan's `groups`)."""
    from sglang_shplb import sparse_attention as sa

    rule, P16 = sel.get_selector(selector), 16
    if ragged:
        monkeypatch.setattr(sa, "MIN_SAVED_PAGES", 0)
    seq_lens = torch.tensor([300, 411, 90])
    req_to_token, k_buf, v_buf, kmin, kmax = paged_cache(seq_lens.tolist(), page_size=P16, seed=3)
    fine = fine_metadata(req_to_token, k_buf, seq_lens.tolist(), rule.sub) if rule.sub else None
    labels = label_cache(req_to_token, k_buf, seq_lens.tolist(), rule.keys // 4, seed=2, page_size=P16) \
        if rule.label else None
    rows = torch.arange(1, 4)
    q = torch.randn(3, HKV, G, D, generator=torch.Generator().manual_seed(1))
    budgets = torch.tensor([0.2, 0.5, 0.05])
    sink, recent = 1, 2
    chosen = select_decode_tokens(q, kmin, kmax, req_to_token, rows, seq_lens, budgets, P16, sink, recent,
                                  selector, fine, k_buf=k_buf, labels=labels)
    groups = plan_decode(req_to_token, rows, seq_lens, budgets.view(1, -1), P16, sink, recent).ranks(0, rule).groups
    assert (groups is not None and len(groups) == 3) == ragged     # 0.2, 0.5, 0.05: three widths, split when asked
    for b, s in enumerate(seq_lens.tolist()):
        n = math.ceil(s / P16)
        slots = req_to_token[rows[b], :s].long()
        for h in range(HKV):
            k = min(max(math.ceil(float(budgets[h]) * n - 1e-6), sink + recent), n)
            ch = labels[1][h].tolist() if rule.label else None
            pages = brute_force_pages(rule, q[b, h], k_buf[slots, h], n, k, P16, sink, recent, ch)
            want = {int(slots[t]) for j in pages for t in range(j * P16, min((j + 1) * P16, s))}
            got = set(chosen.slots[b, h][chosen.valid[b, h]].tolist())
            assert got == want, (b, h)
    out = attend_selected(q, k_buf, v_buf, chosen, 0.3)
    assert out.shape == (3, HKV, G, D) and torch.isfinite(out).all()


def test_oracle_mass_serves_the_true_mass_ranking():
    """The diagnostic `oracle_mass` selector keeps, per (request, KV head), the pages with the most true
    attention mass summed over the group's query heads: softmax over the request's whole context."""
    P16, seq_lens = 16, [300, 411]
    req_to_token, k_buf, _, kmin, kmax = paged_cache(seq_lens, page_size=P16, seed=5)
    q = torch.randn(2, HKV, G, D, generator=torch.Generator().manual_seed(6))
    budgets, sink, recent = torch.tensor([0.2, 0.1, 0.3]), 1, 2
    chosen = select_decode_tokens(q, kmin, kmax, req_to_token, torch.arange(1, 3), torch.tensor(seq_lens), budgets,
                                  P16, sink, recent, "oracle_mass", k_buf=k_buf)
    for b, s in enumerate(seq_lens):
        n = math.ceil(s / P16)
        k_pages = sel.pages_for_budget(budgets.double(), torch.tensor(float(n)), sink + recent)
        for h in range(HKV):
            keys = k_buf[req_to_token[b + 1, :s].long(), h]                              # [s, D]
            mass = ((q[b, h] @ keys.T) * D ** -0.5).softmax(-1)                          # [G, s]
            page_mass = torch.nn.functional.pad(mass.sum(0), (0, n * P16 - s)).view(n, P16).sum(-1)
            want = set(sel.top_pages(page_mass, torch.tensor(n), int(k_pages[h]), sink, recent).tolist())
            logical = req_to_token[b + 1, :s].tolist()                                    # slot -> position
            got = {logical.index(t) // P16 for t in chosen.slots[b, h][chosen.valid[b, h]].tolist()}
            assert got == want, (b, h, got ^ want)


@pytest.mark.parametrize("selector", [n for n, s in sel.SELECTORS.items() if s.label])
def test_label_selectors_pick_brute_force_pages(selector):
    """Label selectors (channels fixed per KV head by calibration) through selection.choose_pages at
    the model's head size, against the plain-Python reference over those channels; and the
    calibration picks the channels with the largest summed mean |q| x mean |k|."""
    rule, P16, Dh, s = sel.get_selector(selector), 16, 64, 300
    g = torch.Generator().manual_seed(4)
    keys, q = torch.randn(HKV, s, Dh, generator=g), torch.randn(HKV, G, Dh, generator=g)
    q_abs, k_abs = torch.rand(HKV, G, Dh, generator=g), torch.rand(HKV, Dh, generator=g)
    channels = sel.label_channels(q_abs, k_abs, rule.keys)                         # [HKV, r]
    for h in range(HKV):
        imp = [float(sum(q_abs[h, j, d] for j in range(G)) * k_abs[h, d]) for d in range(Dh)]
        assert set(channels[h].tolist()) == set(sorted(range(Dh), key=lambda d: -imp[d])[: rule.keys])
    n, sink, recent = math.ceil(s / P16), 1, 2
    kmin, kmax = sel.page_minmax(keys, P16)
    fine = recovery.stage2_inputs(rule, keys, P16, channels)
    heads = torch.arange(HKV).view(-1, 1)
    k_pages = torch.tensor([3, 5, 8])
    chosen = sel.choose_pages(rule, q, kmin, kmax, lambda idx: tuple(t[heads, idx] for t in fine),
                              torch.full((HKV,), n), k_pages, sink, recent, channels)
    for h in range(HKV):
        want = brute_force_pages(rule, q[h], keys[h], n, int(k_pages[h]), P16, sink, recent, channels[h].tolist())
        assert set(chosen[h, : int(k_pages[h])].tolist()) == want, h
    with pytest.raises(ValueError, match="label channels"):
        recovery.stage2_inputs(rule, keys, P16)
    with pytest.raises(ValueError, match="label cache"):
        req_to_token, k_buf, _, kmin, kmax = paged_cache([40])
        select_decode_tokens(torch.randn(1, HKV, G, D), kmin, kmax, req_to_token, torch.tensor([1]),
                             torch.tensor([40]), torch.full((HKV,), 0.2), P, 1, 1, selector)


@pytest.mark.parametrize("sink, recent", [(1, 2), (0, 1), (3, 1), (2, 4)])
def test_written_slots_at_each_rank_are_known_before_scoring(sink, recent):
    """plan_decode marks the written slots of the page at each rank before any page is scored
    (selection.rank_fill): the rule puts the forced pages first, in page order, and with recent >= 1 the only
    partial page, the last, is forced. Checked against the fill of the pages the rule really ranks there, for
    scores with many ties and -inf, partial last pages and contexts of at most sink + recent pages."""
    P16 = 16
    seq_lens = torch.tensor([1, 16, 17, 40, 300, 411, 90])
    n = (seq_lens + P16 - 1) // P16
    N = int(n.max())
    pins = sel.page_pins(n, N, sink, recent)
    fill = sel.tokens_in_pages(seq_lens.view(-1, 1), torch.arange(N), P16)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(-3, 3, (len(n), N), generator=g).float()
        scores[scores == -3] = -math.inf
        ranked = sel.rank_pages(scores, n, sink, recent, pins)
        assert torch.equal(fill.gather(-1, ranked), sel.rank_fill(pins, fill))
    with pytest.raises(ValueError, match="recent must be >= 1"):
        plan_decode(torch.zeros(1, 64, dtype=torch.int32), torch.tensor([0]), torch.tensor([40]),
                    torch.full((1, HKV), 0.5), P16, sink, 0)


@pytest.mark.parametrize("selector", list(sel.SELECTORS))
def test_ties_go_to_the_lower_page_index_in_both_stages(selector):
    """THE rule's tie-break survives the two-stage re-rank (made in page space over the step's pins): pages
    whose keys are identical score alike in both stages, so the chosen pages are the forced ones, then the
    lowest page indices, in that order; the same with the ranks' inputs made once (a decode plan) as without."""
    rule, P16, Dh, n, sink, recent = sel.get_selector(selector), 16, 64, 20, 1, 2
    keys = torch.randn(1, P16, Dh).repeat(1, n, 1)                       # [1, n*P, D]: every page the same
    q = torch.randn(1, G, Dh)
    kmin, kmax = sel.page_minmax(keys, P16)
    channels = torch.arange(rule.keys).view(1, -1) if rule.label else None
    fine = recovery.stage2_inputs(rule, keys, P16, channels) if rule.fine else ()
    meta = (lambda idx: tuple(t[torch.zeros_like(idx), idx] for t in fine)) if rule.fine else None
    k = torch.tensor([5])
    want = [0, n - 2, n - 1, 1, 2]                                      # sink, recent (page order), then 1, 2
    n_pages = torch.tensor([n])
    ranks = sel.LayerRanks(sel.page_pins(n_pages, n, sink, recent), torch.full((1, n), P16), 5,
                           torch.arange(n) < sel.shortlist_len(rule, k, n_pages).unsqueeze(-1))
    for r in (None, ranks):
        got = sel.choose_pages(rule, q, kmin, kmax, meta, n_pages, k, sink, recent, channels, ranks=r)
        assert got[0].tolist() == want, (selector, r is None, got)


def test_unequal_budgets_run_in_width_buckets_and_match_padded(monkeypatch):
    """Ragged decode: heads with very different budgets are batched apart (no padding to the
    largest k) and give exactly the padded computation's output; a split saving too few reads
    stays one batch."""
    from sglang_shplb import sparse_attention as sa
    from sglang_shplb.sparse_attention import _attend, head_buckets

    seq_lens = torch.tensor([400, 333, 512])
    req_to_token, k_buf, v_buf, kmin, kmax = paged_cache(seq_lens.tolist(), seed=5)
    rows = torch.arange(1, 4)
    q = torch.randn(3, HKV, G, D)
    budgets = torch.tensor([0.05, 0.5, 0.06][:HKV])
    chosen = select_decode_tokens(q, kmin, kmax, req_to_token, rows, seq_lens, budgets, P, 1, 1,
                                  sel.Selector("quest_sum", "sum"))    # any single-stage rule: this tests attention
    assert head_buckets(chosen) == [([0, 1, 2], chosen.valid.shape[-1])]     # saves < MIN_SAVED_TOKENS
    monkeypatch.setattr(sa, "MIN_SAVED_TOKENS", 0)
    groups = head_buckets(chosen)
    assert len(groups) == 2 and sorted(h for g, _ in groups for h in g) == list(range(HKV))
    wide = next(t for g, t in groups if 1 in g)
    narrow = next(t for g, t in groups if 0 in g)
    assert narrow * 4 < wide                                    # the small-budget heads are not padded
    for g, t in groups:                                         # nothing selected lies past a bucket's width
        assert not chosen.valid[:, g, t:].any()
    padded = _attend(q, k_buf, v_buf, chosen.rows, chosen.valid, 0.3)
    assert torch.allclose(attend_selected(q, k_buf, v_buf, chosen, 0.3), padded, atol=1e-6)


@pytest.mark.parametrize("selector", [n for n, s in sel.SELECTORS.items() if s.keys and s.aggregate != "max"])
def test_stale_slots_of_the_last_page_do_not_move_a_normalised_selection(selector):
    """A partial last page's unwritten slots hold whatever a freed request left there. They must not enter a
    per-head normalisation over pages (psum / norm): the same context with huge stale keys there selects
    the same pages."""
    rule, P16, seq_lens = sel.get_selector(selector), 16, [300, 411]          # 300 and 411: partial last pages
    req_to_token, k_buf, _, kmin, kmax = paged_cache(seq_lens, page_size=P16, seed=7)
    q = torch.randn(2, HKV, G, D, generator=torch.Generator().manual_seed(8))
    args = (torch.arange(1, 3), torch.tensor(seq_lens), torch.tensor([0.2, 0.1, 0.3]), P16, 1, 2, selector)

    def pick(keys):
        labels = label_cache(req_to_token, keys, seq_lens, rule.keys // 4, seed=2, page_size=P16) if rule.label \
            else None
        if labels is not None:     # the label cache's stale slots too: fold every slot of the pages
            every = torch.arange(keys.shape[0])
            fold_labels(labels[0], labels[1], every, keys)
        return select_decode_tokens(q, kmin, kmax, req_to_token, *args[:-1], args[-1], k_buf=keys, labels=labels)

    clean = pick(k_buf)
    stale = k_buf.clone()
    for r, s in enumerate(seq_lens):   # the unwritten slots of each request's last page
        last = int(req_to_token[r + 1, s - 1])
        stale[last + 1: (last // P16 + 1) * P16] = 50.0 * q[r].mean(1).sign()   # keys every head would love
    got = pick(stale)
    assert torch.equal(got.slots[got.valid], clean.slots[clean.valid])
