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
