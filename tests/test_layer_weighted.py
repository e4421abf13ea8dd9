"""layer_weighted.py's allocation: weighted max-min over KV groups, which is budget.optimal at equal weights and
moves budget toward a layer whose weight (measured error amplification) rises, at the same total."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))


def _prefill_curves():
    from common import committed_profile

    prof = committed_profile()
    curves = prof.curves("prefill", "kv", "sinkless")
    return prof, curves, curves.shape[0], curves.shape[1]


def test_equal_weights_are_the_default_allocation():
    from layer_weighted import weighted_optimal

    from sglang_shplb.budget import allocate

    prof, curves, L, U = _prefill_curves()
    step = prof.meta["page_size"] / prof.meta["context_lens"][0]
    flat = curves.reshape(L * U, -1)
    served = allocate(flat, prof.grid, 0.1, "optimal", 8 * step, step)
    got = weighted_optimal(flat, prof.grid, 0.1, 8 * step, step, torch.ones(L * U, dtype=torch.float64))
    assert abs(float(got.sum()) - float(served.sum())) < 1e-6
    assert float((got - served).abs().max()) < 1e-4


def test_a_heavier_layer_gets_more_budget_at_the_same_total():
    from layer_weighted import weighted_optimal

    prof, curves, L, U = _prefill_curves()
    step = prof.meta["page_size"] / prof.meta["context_lens"][0]
    flat = curves.reshape(L * U, -1)
    ones = torch.ones(L, U, dtype=torch.float64)
    heavy = ones.clone()
    heavy[13] = 4.0                       # a layer the default leaves at the floor
    base = weighted_optimal(flat, prof.grid, 0.1, 8 * step, step, ones.reshape(-1)).view(L, U)
    got = weighted_optimal(flat, prof.grid, 0.1, 8 * step, step, heavy.reshape(-1)).view(L, U)
    assert abs(float(got.mean()) - 0.1) < 1e-6
    assert float(got[13].mean()) > float(base[13].mean()) + step
    assert bool((got >= 8 * step - 1e-9).all())    # nobody below the floor


def test_the_decode_probe_on_a_cache_is_the_served_decode_path():
    """layer_sensitivity.py --phase decode runs the prompt once and the last SPAN tokens on its cache; that must
    give the logits quality.py's full-sequence path gives (prefill dense, the answer rows decoded sparse)."""
    from common import PROFILE, kv_budgets
    from layer_sensitivity import SPAN, OneLayerSparse
    from hf_harness import decode_as_served, load_hf_model

    from sglang_shplb.models import corpus_files
    from sglang_shplb.profile import Profile, token_windows

    prof = Profile.load(PROFILE)
    attn = OneLayerSparse(prof.meta["page_size"], prof.meta["sink_pages"], prof.meta["recent_pages"], "prefill")
    tok, model = load_hf_model(attn, "test_layer_sensitivity")
    served = torch.tensor(kv_budgets("optimal", 0.1)["budgets"])
    decode_as_served(attn, prof, served)
    ids = token_windows(tok, corpus_files("canterbury"), 1024, 1)[0]
    attn.budgets, attn.prefill_budgets = served, torch.ones_like(served)
    with torch.no_grad():
        attn.sparse, attn.answer_from = set(), None
        dense = model(ids[None]).logits[0, -SPAN:]
        cache = model(ids[None, :-SPAN], use_cache=True).past_key_values
        attn.sparse, attn.answer_from = {5, 13}, len(ids) - SPAN
        full = model(ids[None]).logits[0, -SPAN:]
        attn.answer_from = None
        cached = model(ids[None, -SPAN:], past_key_values=cache, use_cache=True).logits[0]
    assert float((full - dense).abs().max()) > 1e-3        # the two sparse layers change the answer rows
    assert float((cached - full).abs().max()) < 1e-3
