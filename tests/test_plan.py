"""Placement algorithms, the plan artifact and its CLI, on real budgets from the committed profile."""
from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_shplb import placement as pl
from sglang_shplb.artifacts import ArtifactError, write_json
from sglang_shplb.budget import make_budgets
from sglang_shplb.plan import check_plan, load_plan, make_plan, rank_budget_table
from sglang_shplb.plan_cli import main as plan_main
from sglang_shplb.profile import Profile

PROFILE = Path(__file__).parents[1] / "python/sglang_shplb/data/smollm2-135m.profile.safetensors"


@pytest.fixture(scope="module")
def profile():
    return Profile.load(PROFILE)


@pytest.fixture(scope="module")
def budgets(profile, tmp_path_factory):
    """{'kv': (body, path), 'q': (body, path)}: real optimal budgets at mean 0.1."""
    out = {}
    for g in ("kv", "q"):
        body = make_budgets(profile, 0.1, granularity=g)
        path = tmp_path_factory.mktemp("budgets") / f"{g}.json"
        write_json(path, "budget", body)
        out[g] = (body, path)
    return out


def max_load(loads, ranks):
    return max(pl.rank_loads(loads, ranks))


def brute_force_opt(loads, tp):
    """Best max load over all equal-count partitions, enumerated directly (independent of exact())."""
    k = len(loads) // tp

    def rec(rest):
        if not rest:
            yield []
            return
        first, others = rest[0], rest[1:]
        for mates in itertools.combinations(others, k - 1):
            left = [u for u in others if u not in mates]
            for tail in rec(left):
                yield [[first, *mates], *tail]

    return min(max_load(loads, p) for p in rec(list(range(len(loads)))))


def instances(seed=0):
    """Random instances, some with ties and dominating units, plus every real layer row."""
    rng = random.Random(seed)
    for _ in range(40):
        n = rng.choice([4, 6, 8, 9, 10, 12])
        kind = rng.random()
        if kind < 0.3:
            loads = [rng.choice([0.05, 0.1, 0.2]) for _ in range(n)]
        elif kind < 0.5:
            loads = [rng.uniform(0.01, 0.1) for _ in range(n - 1)] + [1.0]
        else:
            loads = [rng.lognormvariate(-2.5, 1.0) for _ in range(n)]
        yield loads


def divisors(n):
    return [t for t in range(2, n + 1) if n % t == 0]


# ---------------------------------------------------------------- algorithms
def test_equal_count_and_balanced_never_worse(budgets):
    rows = [r for b, _ in budgets.values() for r in b["budgets"]]
    rng = random.Random(1)
    big = [[rng.lognormvariate(-2.5, 1.0) for _ in range(n)] for n in (16, 24, 64) for _ in range(3)]
    for loads in [*instances(), *rows, *big]:
        for tp in divisors(len(loads)):
            res = {m: pl.place(loads, tp, m) for m in pl.METHODS}
            for m in ("contiguous", "lpt-card", "balanced"):
                assert pl.is_equal_count(res[m]), (m, loads, tp)
                assert sorted(u for r in res[m] for u in r) == list(range(len(loads)))
            best = max_load(loads, res["balanced"])
            assert best <= max_load(loads, res["lpt-card"]) + 1e-12
            assert best <= max_load(loads, res["contiguous"]) + 1e-12
            assert best >= pl.lower_bound(loads, tp) - 1e-12
            assert max_load(loads, res["lpt"]) >= pl.lower_bound(loads, tp, equal_count=False) - 1e-12


def test_balanced_is_optimal_on_small_instances():
    checked = 0
    for loads in instances(seed=7):
        for tp in divisors(len(loads)):
            opt = brute_force_opt(loads, tp)
            assert max_load(loads, pl.balanced(loads, tp)) == pytest.approx(opt, rel=1e-12, abs=1e-15)
            assert pl.lower_bound(loads, tp) <= opt * (1 + 1e-12)
            checked += 1
    assert checked > 50


def test_planning_80_layers_64_heads_stays_out_of_the_exact_search(monkeypatch):
    """Big layers never enter the exponential exact search (it is for <= EXACT_MAX_UNITS units) and still get a
    valid equal-count placement, no worse than lpt-card's. The time goal (< 1 s) is benchmark/placement.py's."""
    rng = random.Random(3)
    rows = [[rng.lognormvariate(-2.5, 1.0) for _ in range(64)] for _ in range(80)]
    monkeypatch.setattr(pl, "exact", lambda *a, **k: pytest.fail("exact search ran on 64 units"))
    for row in rows:
        ranks = pl.balanced(row, 8)
        assert sorted(u for r in ranks for u in r) == list(range(64)) and pl.is_equal_count(ranks)
        got = max(pl.rank_loads(row, ranks))
        assert pl.lower_bound(row, 8) * (1 - 1e-12) <= got <= max(pl.rank_loads(row, pl.lpt_card(row, 8))) + 1e-12


# ---------------------------------------------------------------- plan body
def test_plan_fields_and_rank_budgets(budgets):
    body = make_plan(budgets["q"][0], 3, "balanced", head_dim=64)
    assert body["granularity"] == "q" and body["kv_memory_factor"] == 3 and body["served_num_kv_heads"] == 9
    for x in body["layers"]:
        assert [len(r) for r in x["rank_units"]] == [3, 3, 3]
        assert x["rank_budgets"] == [[x["unit_budgets"][u] for u in r] for r in x["rank_units"]]
        assert max(x["rank_load"]) <= max(x["contiguous_rank_load"]) + 1e-9
        assert x["imbalance"] >= 1.0 and max(x["rank_load"]) >= x["lower_bound"] * (1 - 1e-12)
        assert set(x["rank_cost"]) == {"decode", "prefill"}
        assert x["optimal"] and x["lower_bound"] == max(x["rank_load"])   # 9 units: exact search ran
    s = body["summary"]
    assert s["max_imbalance"] <= s["contiguous_max_imbalance"]
    assert rank_budget_table(body, 1)[0] == body["layers"][0]["rank_budgets"][1]


def test_kv_budgets_expand_to_q(budgets):
    kv = budgets["kv"][0]
    body = make_plan(kv, 3, "balanced", granularity="q")
    u = body["layers"][5]["unit_budgets"]
    assert u == [kv["budgets"][5][h // 3] for h in range(9)]
    with pytest.raises(ArtifactError, match="--granularity kv"):
        make_plan(budgets["q"][0], 3, granularity="kv")
    with pytest.raises(ArtifactError, match="kv-memory-limit"):
        make_plan(kv, 3, granularity="q", kv_memory_limit=2.0)


def test_fill_bubbles_keeps_max_and_raises_recovery(budgets, profile):
    q = budgets["q"][0]
    plain = make_plan(q, 3, "balanced", profile=profile)
    filled = make_plan(q, 3, "balanced", profile=profile, fill=True)
    for a, b in zip(plain["layers"], filled["layers"]):
        assert a["rank_units"] == b["rank_units"]
        assert max(b["rank_load"]) == pytest.approx(max(a["rank_load"]), rel=1e-9)
        assert all(y >= x - 1e-12 for x, y in zip(a["unit_recovery"], b["unit_recovery"]))
        assert all(x - 1e-12 <= y <= 1.0 for x, y in zip(a["unit_budgets"], b["unit_budgets"]))
    s = filled["summary"]
    assert s["recovery_gain"] > 0 and s["total_max_rank_load"] == pytest.approx(
        plain["summary"]["total_max_rank_load"], rel=1e-9)


def test_plan_cli_writes_loadable_plan(budgets, tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = plan_main(["--budgets", str(budgets["q"][1]), "--tp", "3", "--out", str(out), "--fill-bubbles",
                    "--profile", str(PROFILE), "--report", str(png), "--alt-budgets", str(budgets["kv"][1])])
    assert rc == 0
    text = capsys.readouterr().out
    assert "granularity comparison" in text and "predicts the lower max-rank load" in text and "gain" in text
    plan = load_plan(out)
    assert plan["fill_bubbles"] and plan["equal_count"] and png.stat().st_size > 1000


def test_lpt_is_written_only_when_equal_count(budgets, tmp_path, capsys):
    rc = plan_main(["--budgets", str(budgets["q"][1]), "--tp", "3", "--out", str(tmp_path / "a.json"),
                    "--placement", "lpt"])
    err = capsys.readouterr().err
    assert rc == 2 and "lpt-card or balanced" in err and not (tmp_path / "a.json").exists()
    assert plan_main(["--budgets", str(budgets["kv"][1]), "--tp", "1", "--out", str(tmp_path / "b.json"),
                      "--placement", "lpt"]) == 0       # one rank: trivially equal-count
    assert load_plan(tmp_path / "b.json")["placement"] == "lpt"


# ---------------------------------------------------------------- bad input
def run_cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def assert_one_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_cli_tp_not_dividing_units(budgets, tmp_path):
    assert_one_error(run_cli("sglang_shplb.plan", "--budgets", budgets["kv"][1], "--tp", 2, "--out",
                             tmp_path / "p.json"), "tp=2", "divides 3")


def test_cli_budgets_for_another_model(budgets, model_path, tmp_path):
    other = dict(budgets["kv"][0], model_fingerprint="0" * 32)
    write_json(tmp_path / "other.json", "budget", other)
    assert_one_error(run_cli("sglang_shplb.plan", "--budgets", tmp_path / "other.json", "--tp", 1, "--out",
                             tmp_path / "p.json", "--model", model_path), "another model")


def test_cli_corrupt_plan(model_path, tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"schema": "shplb.plan/v1", "layers": [')
    assert_one_error(run_cli("sglang_shplb.permute", "--model", model_path, "--plan", bad, "--out",
                             tmp_path / "out"), "not valid JSON", "regenerate")
    assert not (tmp_path / "out").exists()


def test_in_process_errors(budgets, tmp_path, capsys):
    for args, needle in ((["--fill-bubbles"], "--profile"), (["--tp", "0"], "--tp")):
        base = ["--budgets", str(budgets["kv"][1]), "--tp", "1", "--out", str(tmp_path / "p.json")]
        with pytest.raises(SystemExit) as e:
            plan_main(base + args)
        assert e.value.code == 2 and needle in capsys.readouterr().err
    (tmp_path / "edited.json").write_text(json.dumps({**json.loads(budgets["kv"][1].read_text()), "mean_budget": 0.2}))
    assert plan_main(["--budgets", str(tmp_path / "edited.json"), "--tp", "1", "--out", str(tmp_path / "p.json")]) == 2
    assert "checksum" in capsys.readouterr().err


def test_check_plan_mismatches(budgets, model_path, tmp_path):
    plan = make_plan(budgets["kv"][0], 1)
    check_plan(plan, model_path, 1)
    with pytest.raises(ArtifactError, match="tp=1 but the server uses tp=3"):
        check_plan(plan, model_path, 3)
    with pytest.raises(ArtifactError, match="another model"):
        check_plan(dict(plan, model_fingerprint="f" * 32), model_path, 1)
    with pytest.raises(ArtifactError, match="query heads|q heads"):
        check_plan(dict(plan, num_q_heads=12), model_path, 1)
    write_json(tmp_path / "p.json", "plan", plan)
    assert load_plan(tmp_path / "p.json", plan["model_fingerprint"])["tp_size"] == 1
    broken = dict(plan, layers=[dict(plan["layers"][0], rank_units=[[0, 0, 1]])] + plan["layers"][1:])
    write_json(tmp_path / "broken.json", "plan", broken)
    with pytest.raises(ArtifactError, match="exactly once"):
        load_plan(tmp_path / "broken.json")
