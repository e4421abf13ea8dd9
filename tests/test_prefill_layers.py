"""prefill_layers.py, the per-layer attribution of sparse-prefill losses: its budgets files are the default's with
exactly the named layers' prefill at 1.0, which the backend serves with SGLang's dense extend."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))


def test_layer_groups_and_their_complements():
    from prefill_layers import layer_set

    assert layer_set("5-9", 30) == [5, 6, 7, 8, 9]
    assert layer_set("7", 30) == [7]
    assert layer_set("^0-24", 30) == [25, 26, 27, 28, 29]
    with pytest.raises(SystemExit, match="outside the model's layers 0-29"):
        layer_set("25-30", 30)


def test_only_the_named_layers_prefill_densely():
    from common import committed_profile
    from prefill_layers import variant_body

    from sglang_shplb.budget import make_budgets
    from sglang_shplb.schema import Budgets

    served = make_budgets(committed_profile(), 0.1, "optimal", "kv", prefill_mean=0.1)
    body = variant_body([5, 6])
    assert body["budgets"] == served["budgets"]                  # decode exactly as served
    for layer, (row, base) in enumerate(zip(body["prefill_budgets"], served["prefill_budgets"])):
        assert row == ([1.0] * len(base) if layer in (5, 6) else base)
    prefill = Budgets.from_json(body).table("prefill")
    # the layers the backend runs with the dense extend (every head at 1.0): those two, no other
    assert [layer for layer, row in enumerate(prefill) if not bool((row < 1.0).any())] == [5, 6]


def test_oracle_top_p_reads_the_fewest_pages_holding_the_mass():
    """needle_attribution.py's otopP (the bound of a mass-adaptive decode budget): a page read per step only while
    the mass read so far is under P, so P = 1 is dense and a smaller P reads fewer tokens."""
    import torch
    from needle_attribution import Attr

    from sglang_shplb import selection as sel

    torch.manual_seed(0)
    Hkv, G, L, D, P = 3, 3, 200, 16, 16
    q, k, v = torch.randn(Hkv * G, 1, D), torch.randn(Hkv, L, D) * 2, torch.randn(Hkv, L, D)
    budgets = torch.full((1, Hkv), 0.1, dtype=torch.float64)
    attn = Attr(P, 1, 2, budgets, sel.BudgetRef.of(budgets, 13), {}, 0)
    dense, probs = attn.decode_dense(q, k, v, 0.25)
    reads = {}
    for p in ("otop0.5", "otop0.9", "otop1.0"):
        attn.variant, attn.reads = p, []
        out = attn.decode_sparse(0, q, k, v, 0.25)
        reads[p] = sum(attn.reads[0][1])
    assert torch.allclose(out, dense, atol=1e-6)
    assert reads["otop0.5"] < reads["otop0.9"] < reads["otop1.0"] == Hkv * 13 * P
    mass = torch.nn.functional.pad(probs, (0, 13 * P - L)).unflatten(-1, (13, P)).sum(-1).mean(1)
    attn.variant, attn.reads = "otop0.5", []
    attn.decode_sparse(0, q, k, v, 0.25)
    per_head = [n // P for n in attn.reads[0][1]]
    for h in range(Hkv):   # the top pages by mass, after the forced ones, just reach 0.5
        forced = sel.is_forced(torch.arange(13), torch.tensor([13]), 1, 2)
        held = mass[h].masked_fill(forced, float("inf")).sort(descending=True).indices
        cum = mass[h][held].cumsum(0)
        assert cum[per_head[h] - 1] >= 0.5 and (per_head[h] <= forced.sum() or cum[per_head[h] - 2] < 0.5)


def test_attribution_runs_of_one_prompt_accumulate(tmp_path):
    """needle_attribution.py stores each prompt's variants in one file: a later run with other variants adds to it
    (the --table render shows them side by side), unless dense's answer differs (then it is another experiment)."""
    import json

    from needle_attribution import save

    path = tmp_path / "doc1.json"
    res = lambda gold, v: {"gold": gold, "greedy": {v: "x"}, "teacher": {}, "reads": {v: 1.0}}   # noqa: E731
    save(path, res([1, 2], "sparse"))
    save(path, res([1, 2], "otop0.9"))
    assert set(json.loads(path.read_text())["greedy"]) == {"sparse", "otop0.9"}
    save(path, res([1, 3], "oracle"))
    assert set(json.loads(path.read_text())["greedy"]) == {"oracle"}


def test_estimated_top_p_extends_the_served_selection():
    """needle_attribution.py's etopP (a mass-adaptive decode budget on the served selector's own estimate): its
    pages are the served order's first k, k never below the served count; P = 0 reads exactly what `sparse` reads,
    a larger P reads more, at most the listed shortlist; `free` may read fewer than the served count."""
    import torch
    from needle_attribution import Attr

    from sglang_shplb import selection as sel

    torch.manual_seed(0)
    Hkv, G, L, D, P = 3, 3, 400, 16, 16
    q, k, v = torch.randn(Hkv * G, 1, D), torch.randn(Hkv, L, D) * 2, torch.randn(Hkv, L, D)
    budgets = torch.full((1, Hkv), 0.2, dtype=torch.float64)
    channels = {0: torch.stack([torch.randperm(D) for _ in range(Hkv)])}
    attn = Attr(P, 1, 2, budgets, sel.BudgetRef.of(budgets, 25), channels, 0)
    attn.selector = sel.DEFAULT_SELECTOR
    outs, reads = {}, {}
    for name in ("sparse", "etop0.0", "etop0.5", "etop0.99", "etop1.0", "etop0.5free", "etop1.0keys", "etop0.5keys"):
        attn.variant, attn.reads, attn.kept = name, [], []
        outs[name] = attn.decode_sparse(0, q, k, v, 0.25)
        reads[name] = attn.reads[0][1]
    assert reads["etop0.0"] == reads["sparse"] and torch.equal(outs["etop0.0"], outs["sparse"])
    for h in range(Hkv):
        assert reads["sparse"][h] <= reads["etop0.5"][h] <= reads["etop0.99"][h] <= reads["etop1.0"][h]
        assert reads["etop0.5free"][h] <= reads["etop0.5"][h]
    kp = torch.tensor([reads["sparse"][0] // P])
    listed = sel.shortlist_len(sel.get_selector(sel.DEFAULT_SELECTOR), kp, torch.tensor([25]))
    assert reads["etop1.0"] == [int(listed) * P] * Hkv and sum(reads["etop0.99"]) > sum(reads["sparse"])
    # keys: the exact estimate, its own order over the same shortlist: all of it at P = 1, the floor still holds
    assert reads["etop1.0keys"] == reads["etop1.0"] and all(a >= b for a, b in zip(reads["etop0.5keys"],
                                                                                    reads["sparse"]))


def test_variant_at_mean_reads_the_default_allocation_at_that_mean():
    """needle_attribution.py's VARIANT@M: the default allocation (optimal, committed profile) at mean M, in place of
    the --budgets file: at the file's own mean it reads what the file reads; at a larger mean, more."""
    import torch
    from common import committed_profile
    from needle_attribution import Attr

    from sglang_shplb import selection as sel
    from sglang_shplb.budget import make_budgets

    torch.manual_seed(0)
    body = make_budgets(committed_profile(), 0.1, "optimal", "kv")
    budgets = torch.tensor(body["budgets"], dtype=torch.float64)
    Hkv, G, L, D, P = 3, 3, 4000, 64, 16
    q, k, v = torch.randn(Hkv * G, 1, D), torch.randn(Hkv, L, D), torch.randn(Hkv, L, D)
    attn = Attr(P, 1, 2, budgets, sel.BudgetRef.of(budgets, body["context_len"] // P),
                {0: torch.stack([torch.randperm(D) for _ in range(Hkv)])}, 0)
    attn.selector = sel.DEFAULT_SELECTOR
    reads = {}
    for name in ("sparse", "sparse@0.1", "sparse@0.2"):
        attn.variant, attn.reads, attn.kept = name, [], []
        attn.decode_sparse(0, q, k, v, D ** -0.5)
        reads[name] = sum(attn.reads[0][1])
    assert reads["sparse@0.1"] == reads["sparse"] < reads["sparse@0.2"]


def test_margin_gate_decodes_unsure_steps_densely():
    """needle_attribution.py's gateM: `sparse`, but a step whose logit margin is under M runs again densely on the
    cache cropped back. M = 0 never falls back (the answer is sparse's); an unbounded M always does (dense's)."""
    import torch
    from needle_attribution import Attr, run
    from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM

    from sglang_shplb import selection as sel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="shplb_gate_test")
    budgets = torch.full((2, 2), 0.1, dtype=torch.float64)
    attn = Attr(16, 1, 2, budgets, sel.BudgetRef.of(budgets, 32), {l: torch.stack([torch.randperm(16)] * 2)
                                                                   for l in range(2)}, 0)
    attn.selector = sel.DEFAULT_SELECTOR
    AttentionInterface.register("shplb_gate_test", attn)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (500,)).tolist()
    attn.n_prompt, attn.variant = len(ids), "dense"
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1].argmax())
    out, falls = {}, {}
    for v in ("dense", "sparse", "gate0", "gate1e9"):
        attn.variant = v
        out[v] = run(model, attn, ids, cache, first, 12)
        falls[v] = attn.fallbacks
    assert out["dense"] != out["sparse"]            # the random model's sparse answer differs: the gate has a job
    assert out["gate0"] == out["sparse"] and falls["gate0"] == 0
    assert out["gate1e9"] == out["dense"] and falls["gate1e9"] == 12


def test_carry_and_shortlist_variants_read_the_served_count():
    """needle_attribution.py's carryM (the served carried pages), shortC (the shortlist at C·k) and labelall: each
    reads exactly the served page counts; short3 is the served selector itself; carryM's seed holds M free pages
    inside the context, chosen from the prompt's last query, and the step updates them."""
    import torch
    from needle_attribution import Attr

    from sglang_shplb import selection as sel

    torch.manual_seed(0)
    Hkv, G, L, D, P = 3, 3, 400, 16, 16
    q, k, v = torch.randn(Hkv * G, 1, D), torch.randn(Hkv, L, D) * 2, torch.randn(Hkv, L, D)
    budgets = torch.full((1, Hkv), 0.2, dtype=torch.float64)
    channels = {0: torch.stack([torch.randperm(D) for _ in range(Hkv)])}
    attn = Attr(P, 1, 2, budgets, sel.BudgetRef.of(budgets, 25), channels, L - 1)
    attn.selector = sel.DEFAULT_SELECTOR
    attn.last_q[0] = torch.randn(Hkv * G, D)
    outs, reads = {}, {}
    for name in ("sparse", "short3", "short8", "labelall", "carry2", "carry4"):
        attn.variant, attn.reads, attn.kept, attn.carry = name, [], [], {}     # run() starts each variant so
        if name == "carry4":
            seed = attn.carried(0, 4, k).clone()
        outs[name] = attn.decode_sparse(0, q, k, v, 0.25)
        reads[name] = attn.reads[0][1]
    assert torch.equal(outs["short3"], outs["sparse"])
    assert all(reads[n] == reads["sparse"] for n in reads)
    n_pages = (L - 2) // P + 1        # the prompt's pages: L - 1 tokens
    assert seed.shape == (Hkv, 1, 4) and bool(((seed >= 1) & (seed < n_pages - 2)).all())
    assert not torch.equal(attn.carry[0], seed)   # the step re-carried its own best shortlisted pages
