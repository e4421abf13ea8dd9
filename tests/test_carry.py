"""Pages carried between decode steps (carry.py), on the default selector's own code (selection.choose_pages).

The failure it fixes (issue 33): a needle page whose keys form a narrow box (digits) loses the page-bound
shortlist to haystack pages with wide boxes, though it holds nearly all of the head's attention; the answer then
loses the needle's last digits. The GPU objects carry the same pages (tests/gpu_offline_checks.py: carry)."""
from __future__ import annotations

import math
import types

import torch

from sglang_shplb import selection as S
from sglang_shplb.carry import forget, new_carry, next_carry

P, D, N, NEEDLE, SINK, RECENT = 16, 32, 40, 20, 1, 2


def _context():
    """Keys of N pages: haystack tokens each put 3.0 on one channel (a wide box: bound 48, best logit 3 for an
    all-ones query), the needle page's tokens 1.0 on every channel (a narrow box: bound 32, logit 32)."""
    keys = torch.zeros(N, P, D)
    t = torch.arange(N * P).view(N, P)
    keys.scatter_(-1, (t % D).unsqueeze(-1), 3.0)
    keys[NEEDLE] = 1.0
    kmin, kmax = keys.amin(1), keys.amax(1)
    return keys, kmin.view(1, 1, N, D), kmax.view(1, 1, N, D)


def _choose(k_pages: int, carry=None):
    rule = S.get_selector(S.DEFAULT_SELECTOR)
    keys, kmin, kmax = _context()
    channels = torch.arange(D)[: rule.keys].view(1, 1, -1)
    q = torch.ones(1, 1, 1, D)
    chosen = S.choose_pages(rule, q, kmin, kmax, lambda idx: (keys[idx][..., channels.flatten()],),
                            torch.tensor([[N]]), torch.tensor([[k_pages]]), SINK, RECENT, channels, None, None, carry)
    return set(chosen[0, 0, :k_pages].tolist())


def test_the_bound_alone_drops_the_needle_page():
    assert NEEDLE not in _choose(6)                              # shortlist of 18 pages: the needle ranks last
    assert NEEDLE in _choose(14)                                 # a shortlist of every page: the label stage finds it


def test_a_page_found_once_stays_while_it_ranks_high():
    carry = torch.full((1, 1, 2), -1, dtype=torch.long)
    assert NEEDLE in _choose(14, carry)                          # a step whose shortlist held it
    assert carry[0, 0, 0] == NEEDLE                              # the best free page by the label estimate
    for _ in range(3):                                           # later steps: the bound alone would drop it
        assert NEEDLE in _choose(6, carry) and carry[0, 0, 0] == NEEDLE


def test_a_carried_page_is_promoted_not_forced():
    """A carried haystack page joins the shortlist, but the label stage ranks it with the rest (ties to the
    lower page index): it is not read just because it was carried."""
    carry = torch.tensor([[[30, -1]]])
    chosen = _choose(6, carry)
    assert 30 not in chosen and len(chosen) == 6
    assert carry[0, 0, 0] != 30


def test_next_carry_and_forget():
    short = torch.tensor([[0, 5, 7, 9, 39]])
    fine = torch.tensor([[math.inf, 1.0, 3.0, 2.0, 9.0]])
    ok = torch.tensor([[False, True, True, True, False]])        # forced page 0, unlisted page 39
    assert next_carry(short, fine, ok).tolist() == [[7, 9]]
    assert next_carry(short, fine, torch.zeros_like(ok)).tolist() == [[-1, -1]]
    carry = new_carry(2, 4, 3, "cpu")
    carry[:, 1], carry[:, 2] = 5, 6
    forget(carry, torch.tensor([1]))
    assert (carry[:, 1] == -1).all() and (carry[:, 2] == 6).all()


def test_a_prefill_seeds_the_carry_with_a_page_the_bound_never_lists():
    """After a (sparse) prefill the needle page may never rank inside the decode shortlist: the prompt's last query
    seeds the carry from every page's label estimate (carry_seed.py), so the first decode step already reads it."""
    from sglang_shplb.carry_seed import plan_seed, seed

    rule = S.get_selector(S.DEFAULT_SELECTOR)
    keys, _, _ = _context()
    channels = torch.arange(D)[: rule.keys].view(1, -1)                        # [Hkv, r]
    labels = keys.reshape(1, N * P, D)[..., channels[0]]                       # [Hkv, slots, r]
    req_to_token = torch.arange(2 * N * P).view(2, N * P).flip(0) % (N * P)    # row 1 holds the prompt
    extend = 5                                                                  # the last chunk's tokens
    q = torch.zeros(3 + extend, 1, 1, D)                                       # another request's 3 tokens first
    q[-1] = 1.0                                                                # the prompt's last query
    plan = plan_seed(req_to_token, torch.tensor([0, 1]), torch.tensor([3 * P, N * P]), torch.tensor([3, extend]),
                     P, SINK, RECENT)
    carry = new_carry(1, 2, 1, "cpu")[0]
    seed(carry, plan, q, labels, channels, rule)
    assert carry[1, 0, 0] == NEEDLE                                            # the best free page of request 1
    assert NEEDLE in _choose(6, carry[1:2])                                   # step 1 reads it, the bound alone not
    assert (carry[0] < 3).all()                                                # request 0: only its own 3 pages


def test_the_backend_seeds_the_carry_at_the_end_of_a_prefill(monkeypatch):
    """Through the real CPU backend (its own __init__, SGLang's pools): a 320-token prefill whose page 10 holds
    keys aligned with the prompt's last query leaves that page carried, on every KV head of every layer with a
    sparse decode budget, for the request's first decode step; without the seed nothing is carried."""
    from conftest import HEAD_DIM, KV_HEADS, PAGE, Q_HEADS, cpu_backend, extend_batch

    n, needle = 320, 10
    g = torch.Generator().manual_seed(0)
    b = cpu_backend(monkeypatch)
    slots = torch.arange(n) + 2 * PAGE                                    # whole pages, from page 2 of the pool
    b.req_to_token_pool.req_to_token[1, :n] = slots
    direction = torch.randn(HEAD_DIM, generator=g)
    k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g) * 0.1
    k[needle * PAGE:(needle + 1) * PAGE] = direction * 2.0                # the needle's page, on every KV head
    v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g)
    q = torch.randn(n, Q_HEADS, HEAD_DIM, generator=g) * 0.1
    q[-1] = direction                                                     # the prompt's last query looks for it
    fb = extend_batch(slots)
    layer = types.SimpleNamespace(layer_id=0, tp_q_head_num=Q_HEADS, tp_k_head_num=KV_HEADS, qk_head_dim=HEAD_DIM,
                                  v_head_dim=HEAD_DIM, scaling=HEAD_DIM ** -0.5, is_cross_attention=False,
                                  attn_type=None, sliding_window_size=None, logit_cap=0.0)
    b.carry.fill_(7)                                                      # a previous prompt's pages in row 1
    b.init_forward_metadata(fb)
    assert (b.carry[:, 1] == -1).all()                                    # forgotten at the prefill's start
    b.forward_extend(q.flatten(1), k, v, layer, fb)
    assert (b.carry[0, 1, :, 0] == needle).all(), b.carry[0, 1]
    assert (b.carry[0, 0] == 7).all()                                     # another request's row untouched
