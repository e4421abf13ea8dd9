"""Head permutation: the index math, the exactness of permuted/expanded checkpoints on the real model
(HF transformers, fp32), and the SGLang load-time hook driven directly on a fake weight iterator."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sglang_shplb.artifacts import ArtifactError, write_json
from sglang_shplb.budget import make_budgets
from sglang_shplb.permute import HeadPermuter, layer_orders, main as permute_main, model_overrides, rank_heads
from sglang_shplb.plan import check_plan, load_plan, make_plan, plan_id
from sglang_shplb.profile import Profile
from sglang_shplb.sglang_adapter import weights as hook

PROFILE = Path(__file__).parents[1] / "python/sglang_shplb/data/smollm2-135m.profile.safetensors"
PROMPT = "The capital of France is Paris, and the capital of Germany is"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """2 shared cores: OpenMP spinning makes small fp32 forwards 30x slower with 2 threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def budgets():
    return make_budgets(Profile.load(PROFILE), 0.1, granularity="kv")


def with_order(plan: dict, rank_units: list[list[int]]) -> dict:
    """The same plan with a hand-made placement in every layer."""
    layers = [dict(x, rank_units=rank_units, rank_budgets=[[x["unit_budgets"][u] for u in r] for r in rank_units])
              for x in plan["layers"]]
    return dict(plan, layers=layers)


def tiny_plan(granularity: str, rank_units, tp: int, layers: int = 2, q: int = 6, kv: int = 2) -> dict:
    return {"granularity": granularity, "tp_size": tp, "num_layers": layers, "num_q_heads": q, "num_kv_heads": kv,
            "served_num_kv_heads": q if granularity == "q" else kv, "model_fingerprint": "x",
            "layers": [{"rank_units": rank_units} for _ in range(layers)]}


# ---------------------------------------------------------------- index math
def test_orders_kv_and_q():
    kv = tiny_plan("kv", [[1], [0]], tp=2)                     # groups of 3 query heads
    assert layer_orders(kv, 0) == ([3, 4, 5, 0, 1, 2], [1, 0])
    assert rank_heads(kv, 0, 0) == ([3, 4, 5], [1])
    q = tiny_plan("q", [[0, 4, 5], [1, 2, 3]], tp=2)
    assert layer_orders(q, 0) == ([0, 4, 5, 1, 2, 3], [0, 1, 1, 0, 0, 1])
    assert rank_heads(q, 0, 1) == ([1, 2, 3], [0, 0, 1])
    assert model_overrides(q) == {"num_key_value_heads": 6} and model_overrides(kv) == {}


def head_tensor(heads: int, d: int, cols: int) -> torch.Tensor:
    """Rows of head h are filled with h (so a permutation is readable off the values)."""
    return torch.arange(heads).repeat_interleave(d)[:, None].float().expand(-1, cols).clone()


def test_tensor_permutation_by_name():
    perm = HeadPermuter(tiny_plan("q", [[0, 4, 5], [1, 2, 3]], tp=2))
    d, hidden = 4, 8
    q = perm("model.layers.1.self_attn.q_proj.weight", head_tensor(6, d, hidden))
    assert q[::d, 0].tolist() == [0, 4, 5, 1, 2, 3]
    k = perm("model.layers.1.self_attn.k_proj.weight", head_tensor(2, d, hidden))
    assert k.shape == (6 * d, hidden) and k[::d, 0].tolist() == [0, 1, 1, 0, 0, 1]
    vb = perm("model.layers.0.self_attn.v_proj.bias", torch.arange(2).repeat_interleave(d).float())
    assert vb[::d].tolist() == [0, 1, 1, 0, 0, 1]
    o = perm("model.layers.0.self_attn.o_proj.weight", head_tensor(6, d, hidden).T.contiguous())
    assert o[0, ::d].tolist() == [0, 4, 5, 1, 2, 3]
    other = torch.ones(3)
    assert perm("model.layers.0.mlp.up_proj.weight", other) is other
    with pytest.raises(ArtifactError, match="cannot be head-permuted"):
        perm("model.layers.0.self_attn.k_proj.weight_scale", other)
    with pytest.raises(ArtifactError, match="multiple of 6 heads"):
        perm("model.layers.0.self_attn.q_proj.weight", torch.ones(7, 2))


# ---------------------------------------------------------------- exactness on the real model
def logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tok(PROMPT, return_tensors="pt").input_ids).logits[0]


@pytest.fixture(scope="module")
def ref_logits(model_path):
    return logits(model_path)


def assert_same_model(path, ref):
    out = logits(path)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_kv_permuted_checkpoint_same_logits(budgets, model_path, ref_logits, tmp_path):
    plan = with_order(make_plan(budgets, 1), [[2, 0, 1]])     # tp=1: any order is a valid placement
    write_json(tmp_path / "plan.json", "plan", plan)
    assert permute_main(["--model", str(model_path), "--plan", str(tmp_path / "plan.json"),
                         "--out", str(tmp_path / "ckpt")]) == 0
    cfg = json.loads((tmp_path / "ckpt/config.json").read_text())
    assert cfg["num_key_value_heads"] == 3 and \
        cfg["shplb_permuted"]["plan_id"] == plan_id(load_plan(tmp_path / "plan.json"))
    assert (tmp_path / "ckpt/tokenizer.json").exists() and not list(tmp_path.glob(".ckpt.*"))
    assert_same_model(tmp_path / "ckpt", ref_logits)
    check_plan(load_plan(tmp_path / "plan.json"), tmp_path / "ckpt", 1)   # recognized via its marker
    with pytest.raises(ArtifactError, match="already exists"):
        from sglang_shplb.permute import permute_checkpoint
        permute_checkpoint(model_path, load_plan(tmp_path / "plan.json"), tmp_path / "ckpt")


def test_q_expanded_checkpoint_same_logits(budgets, model_path, ref_logits, tmp_path):
    qb = make_budgets(Profile.load(PROFILE), 0.1, granularity="q")
    plan = make_plan(qb, 3, "balanced")
    assert any(x["rank_units"] != [[0, 1, 2], [3, 4, 5], [6, 7, 8]] for x in plan["layers"])  # non-trivial
    write_json(tmp_path / "plan.json", "plan", plan)
    assert permute_main(["--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "ckpt")]) == 0
    assert json.loads((tmp_path / "ckpt/config.json").read_text())["num_key_value_heads"] == 9
    assert_same_model(tmp_path / "ckpt", ref_logits)
    with pytest.raises(ArtifactError, match="another plan|not this plan"):
        check_plan(dict(plan, placement="other"), tmp_path / "ckpt", 3)


# ---------------------------------------------------------------- SGLang load-time hook
def fake_weights(layers=2, q=6, kv=2, d=4, hidden=8):
    for l in range(layers):
        p = f"model.layers.{l}.self_attn."
        yield p + "q_proj.weight", head_tensor(q, d, hidden)
        yield p + "k_proj.weight", head_tensor(kv, d, hidden)
        yield p + "v_proj.weight", head_tensor(kv, d, hidden)
        yield p + "o_proj.weight", head_tensor(q, d, hidden).T.contiguous()
        yield f"model.layers.{l}.mlp.down_proj.weight", torch.zeros(2, 2)
    yield "model.embed_tokens.weight", torch.zeros(3, hidden)


def config(q=6, kv=2, layers=2, **kw):
    return SimpleNamespace(num_hidden_layers=layers, num_attention_heads=q, num_key_value_heads=kv, **kw)


def test_hook_rewrites_iterator(capsys):
    plan = tiny_plan("q", [[0, 4, 5], [1, 2, 3]], tp=2)
    out = dict(hook.permuted_weights(config(kv=6), fake_weights(), plan, tp_rank=1, tp_size=2))
    assert "tp_rank=1 layer-0 heads q=[1, 2, 3] kv=[0, 0, 1]" in capsys.readouterr().err
    assert out["model.layers.0.self_attn.q_proj.weight"][::4, 0].tolist() == [0, 4, 5, 1, 2, 3]
    assert out["model.layers.1.self_attn.k_proj.weight"][::4, 0].tolist() == [0, 1, 1, 0, 0, 1]
    assert out["model.layers.1.self_attn.o_proj.weight"][0, ::4].tolist() == [0, 4, 5, 1, 2, 3]
    assert len(out) == 11 and torch.equal(out["model.embed_tokens.weight"], torch.zeros(3, 8))
    with pytest.raises(ArtifactError, match="json-model-override-args"):
        hook.permuted_weights(config(kv=2), fake_weights(), plan, 0, 2)   # q plan without the override
    with pytest.raises(ArtifactError, match="tp=2 but this server runs tp=4"):
        hook.permuted_weights(config(kv=6), fake_weights(), plan, 0, 4)
    marked = config(kv=6, shplb_permuted={"plan_id": plan_id(plan)})
    it = fake_weights()
    assert hook.permuted_weights(marked, it, plan, 0, 2) is it           # already permuted offline


def test_hook_around_reads_plan_from_env(budgets, tmp_path, monkeypatch):
    plan = with_order(make_plan(budgets, 1), [[1, 2, 0]])
    write_json(tmp_path / "plan.json", "plan", plan)
    monkeypatch.setenv("SGLANG_SHPLB_CONFIG", json.dumps({"plan": str(tmp_path / "plan.json")}))
    seen = {}

    def original(model, weights):
        seen.update(weights)
        return set(seen)

    from sglang.srt.runtime_context import get_parallel

    model = SimpleNamespace(config=config(q=9, kv=3, layers=30))
    with get_parallel().override(tp_rank=0, tp_size=1):   # what a TP worker has after group setup
        hook.load_weights_around(original, model, fake_weights(layers=30, q=9, kv=3))
    assert seen["model.layers.7.self_attn.k_proj.weight"][::4, 0].tolist() == [1, 2, 0]
    assert seen["model.layers.7.self_attn.q_proj.weight"][::4, 0].tolist() == [3, 4, 5, 6, 7, 8, 0, 1, 2]


def test_register_weight_hook_is_idempotent(tmp_path, monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    (tmp_path / "p.json").write_text("{}")
    monkeypatch.setenv("SGLANG_SHPLB_CONFIG", json.dumps({"plan": str(tmp_path / "p.json")}))
    monkeypatch.setattr(hook, "_registered", False)
    before = {t: list(HookRegistry._hooks.get(t, [])) for t in hook.TARGETS}
    try:
        hook.register_weight_hook()
        hook.register_weight_hook()
        for t in hook.TARGETS:
            assert len(HookRegistry._hooks[t]) == len(before[t]) + 1
    finally:
        for t in hook.TARGETS:
            HookRegistry._hooks[t] = before[t]
