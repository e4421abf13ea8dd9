"""Typed artifacts (schema.py) and once-per-process resolution of a worker's budgets (serving.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sglang_shplb import artifacts
from sglang_shplb.artifacts import ArtifactError, write_json
from sglang_shplb.config import ENV_VAR, ShplbConfig
from sglang_shplb.joint import make_joint_plan
from sglang_shplb.profile import Profile
from sglang_shplb.schema import Budgets, Plan
from sglang_shplb.serving import resolve

PROFILE = Path(__file__).parents[1] / "python/sglang_shplb/data/smollm2-135m.profile.safetensors"


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    prof = Profile.load(PROFILE)
    body = make_joint_plan(prof, 0.1, 3, "kv", prefill_mean=0.2)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    write_json(path, "plan", body)
    return path, body


def test_plan_is_read_once_and_shared_with_the_weight_hook(plan_file, monkeypatch):
    from sglang_shplb.sglang_adapter import weights

    path, body = plan_file
    reads = []
    real = artifacts.read_json
    monkeypatch.setattr(artifacts, "read_json", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    monkeypatch.setenv(ENV_VAR, ShplbConfig(plan=str(path)).to_env())
    cfg = ShplbConfig.from_env()
    assert ShplbConfig.from_env() is cfg                                       # parsed once
    ranks = [resolve(cfg, 30, 3, 3, r) for r in range(3)]
    assert resolve(cfg, 30, 3, 3, 1) is ranks[1]
    assert weights._plan(str(path)) is ranks[0].plan.body                       # the hook's plan: same object
    assert len(reads) == 1
    for r, rb in enumerate(ranks):
        want = torch.tensor([x["rank_budgets"][r] for x in body["layers"]], dtype=torch.float64)
        torch.testing.assert_close(rb.decode, want)
        want = torch.tensor([x["rank_prefill_budgets"][r] for x in body["layers"]], dtype=torch.float64)
        torch.testing.assert_close(rb.table("prefill"), want)
    with pytest.raises(ArtifactError, match="tp=3 but this server runs tp=1"):
        resolve(cfg, 30, 3, 1, 0)
    # pages_for_budget's reference: the context the plan's budgets were made at (the profile's)
    assert ranks[0].ref_context == body["context_len"] == 4096 and ranks[0].budget_ref(16).pages == 256
    assert ranks[0].budget_ref(16).mean == pytest.approx(0.1)    # the whole model's mean, on every rank
    assert resolve(ShplbConfig(uniform_budget=0.1), 30, 3, 1, 0).ref_context is None   # a uniform fraction has none


def test_rewritten_artifact_is_read_again(plan_file, tmp_path):
    path, body = plan_file
    p = tmp_path / "p.json"
    write_json(p, "plan", body)
    a = resolve(ShplbConfig(plan=str(p)), 30, 3, 3, 0)
    layers = [dict(x, rank_budgets=[[0.5] for _ in x["rank_budgets"]]) for x in body["layers"]]
    write_json(p, "plan", {**body, "layers": layers, "note": "rewritten"})
    b = resolve(ShplbConfig(plan=str(p)), 30, 3, 3, 0)
    assert b is not a and bool((b.decode == 0.5).all())


def test_typed_artifacts_refuse_bad_bodies(plan_file):
    _, body = plan_file
    plan = Plan.from_json(body)
    assert plan.decode.shape == (30, 3, 1) and plan.to_json() is body
    with pytest.raises(ArtifactError, match="lacks field 'layers'"):
        Plan.from_json({k: v for k, v in body.items() if k != "layers"})
    bad = json.loads(json.dumps(body))
    bad["layers"][0]["rank_budgets"][0] = [1.5]
    with pytest.raises(ArtifactError, match=r"outside \(0, 1\]"):
        Plan.from_json(bad)
    bad["layers"][0]["rank_units"] = [[0], [0], [2]]
    with pytest.raises(ArtifactError, match="exactly once"):
        Plan.from_json(bad)
    with pytest.raises(ArtifactError, match="lacks field"):
        Budgets.from_json({"num_layers": 1, "budgets": [[0.1]]})


def test_label_channels_follow_each_ranks_heads(plan_file, tmp_path):
    """The default selector's calibrated channels reach each TP rank for the heads the plan placed there
    (the weight hook's order, rank_units), from a kv plan, a q plan and a budgets file; without them the
    uncalibrated selector serves."""
    from sglang_shplb import selection as sel
    from sglang_shplb.budget import make_budgets
    from sglang_shplb.plan import make_plan
    from sglang_shplb.serving import decode_selector

    prof = Profile.load(PROFILE)
    path, body = plan_file
    want = prof.label_channels("kv")[..., : sel.get_selector(sel.DEFAULT_SELECTOR).keys]
    for rank in range(3):
        got = resolve(ShplbConfig(plan=str(path)), 30, 3, 3, rank)
        assert got.selector == sel.DEFAULT_SELECTOR
        for layer, x in enumerate(body["layers"]):
            assert torch.equal(got.labels[layer], want[layer, x["rank_units"][rank]]), (rank, layer)
    qb = make_budgets(prof, 0.1, granularity="q")
    qplan = make_plan(qb, 3, "balanced", "q")
    write_json(tmp_path / "q.json", "plan", qplan)
    want_q = prof.label_channels("q")[..., : want.shape[-1]]                  # each query head its own channels
    for rank in range(3):
        got = resolve(ShplbConfig(plan=str(tmp_path / "q.json")), 30, 9, 3, rank)
        for layer, x in enumerate(qplan["layers"]):
            assert torch.equal(got.labels[layer], want_q[layer, x["rank_units"][rank]]), (rank, layer)
    write_json(tmp_path / "b.json", "budget", make_budgets(prof, 0.1))
    got = resolve(ShplbConfig(budgets=str(tmp_path / "b.json")), 30, 3, 1, 0)
    assert got.selector == sel.DEFAULT_SELECTOR and torch.equal(got.labels, want)
    assert decode_selector(ShplbConfig(uniform_budget=0.1)) == sel.UNCALIBRATED_SELECTOR
    assert resolve(ShplbConfig(uniform_budget=0.1), 30, 3, 1, 0).labels is None
    # a uniform budget with --shplb-profile: the profile's channels, each rank its own KV heads
    assert decode_selector(ShplbConfig(uniform_budget=0.1, profile=str(PROFILE))) == sel.DEFAULT_SELECTOR
    got = resolve(ShplbConfig(uniform_budget=0.1, profile=str(PROFILE)), 30, 3, 1, 0)
    assert got.selector == sel.DEFAULT_SELECTOR and torch.equal(got.labels, want)
    for rank in range(3):
        got = resolve(ShplbConfig(uniform_budget=0.1, profile=str(PROFILE)), 30, 3, 3, rank)
        assert torch.equal(got.labels, want[:, rank: rank + 1]) and torch.equal(got.decode, torch.full((30, 1), 0.1,
                                                                                               dtype=torch.float64))
    with pytest.raises(ArtifactError, match="another model"):
        resolve(ShplbConfig(uniform_budget=0.1, profile=str(PROFILE)), 24, 3, 1, 0)
    # an explicit other selector is served as asked, and needs no channels
    got = resolve(ShplbConfig(budgets=str(tmp_path / "b.json"), selector="two_stage4"), 30, 3, 1, 0)
    assert got.selector == "two_stage4" and got.labels is None
