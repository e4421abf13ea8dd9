"""benchmark/quality.py's recall measure: the share of each KV group's true attention mass outside the sink
page that the decode selector's pages hold, checked against a brute-force sum over the same pages."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
import quality  # noqa: E402
from quality import SparseAttention  # noqa: E402


def brute_recall(q, k, mask, P, sink):
    """[Hkv] mean over query heads and the second half's rows of the kept sinkless mass."""
    Hq, L, D = q.shape
    Hkv = k.shape[0]
    logits = torch.einsum("hgld,hmd->hglm", q.view(Hkv, Hq // Hkv, L, D), k) / D ** 0.5
    probs = logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    tok = mask.repeat_interleave(P, -1)[..., :L].unsqueeze(1)                  # [Hkv, 1, L, L]
    s = probs[..., :sink * P].sum(-1)
    r = ((probs * tok).sum(-1) - s) / (1 - s)
    return r[:, :, L // 2:].mean((1, 2))


def test_recall_is_the_kept_sinkless_mass(monkeypatch):
    monkeypatch.setattr(quality, "Q_CHUNK", 64)    # several chunks, one straddling the window's half
    torch.manual_seed(0)
    Hq, Hkv, L, D, P = 6, 2, 300, 16, 8
    q, k, v = (torch.randn(h, L, D) for h in (Hq, Hkv, Hkv))
    attn = SparseAttention(P, 1, 1, decode_selector="oracle")
    attn.recall, attn.layer = {}, 0
    budgets = torch.tensor([0.2, 0.5])
    attn.attend(q, k, v, budgets, D ** -0.5)
    got = attn.recall_summary()
    want = brute_recall(q, k, attn.page_mask(q, k, budgets, D ** -0.5), P, 1)
    assert abs(got["recall_mean"] - float(want.mean())) < 1e-5
    assert abs(got["recall_worst"] - float(want.min())) < 1e-5
    assert 0 < got["recall_worst"] < got["recall_mean"] < 1      # a real selection: neither none nor all kept
    attn.recall = {}
    attn.attend(q, k, v, torch.ones(2), D ** -0.5)                 # every page kept: all the mass
    assert abs(attn.recall_summary()["recall_worst"] - 1) < 1e-5
