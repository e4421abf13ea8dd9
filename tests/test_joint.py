"""Joint budget + placement solver: equal step time to uniform-B, max-min optimality (brute force on
small instances), the one-unit-per-rank case, tp=1 == optimal, the CLI and its bad inputs."""
from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sglang_shplb.artifacts import write_json
from sglang_shplb.budget import allocate, eval_curves, invert_curves, make_budgets
from sglang_shplb.joint import make_joint_plan, solve, step_time
from sglang_shplb.plan import load_plan, make_plan, uniform_step_time
from sglang_shplb.profile import Profile

PROFILE = Path(__file__).parents[1] / "python/sglang_shplb/data/smollm2-135m.profile.safetensors"
FLOOR, STEP = 48 / 4096, 16 / 4096


@pytest.fixture(scope="module")
def profile():
    return Profile.load(PROFILE)


def synthetic(L, U, grid, seed):
    """Concave recovery curves of varied elasticity; some never reach 1 (dense-ish heads)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(L * U):
        a, top = rng.uniform(1.0, 40.0), rng.choice([1.0, 1.0, 0.95])
        rows.append(top * (1 - (1 - grid.double()) ** a))
    return torch.stack(rows).view(L, U, -1)


def partitions(n, tp):
    """Every equal-count partition of range(n) into tp ranks (direct enumeration)."""
    k = n // tp

    def rec(rest):
        if not rest:
            yield []
            return
        for mates in itertools.combinations(rest[1:], k - 1):
            left = [u for u in rest[1:] if u not in mates]
            for tail in rec(left):
                yield [[rest[0], *mates], *tail]

    return list(rec(list(range(n))))


# ---------------------------------------------------------------- step time and worst case on the real profile
@pytest.mark.parametrize("gran,tps", [("kv", (1, 3)), ("q", (1, 3, 9))])
def test_step_time_never_above_uniform_and_worst_never_below(profile, gran, tps):
    curves = profile.curves("runtime", gran, "sinkless")
    L, U, _ = curves.shape
    for tp in tps:
        for mean in (0.05, 0.1, 0.2):
            s = solve(curves, profile.grid, tp, mean, FLOOR, STEP)
            uniform = uniform_step_time(L, U, tp, mean, (1.0, 0.0))
            assert s.uniform_step_time == pytest.approx(uniform)
            assert step_time(s.budgets, s.ranks, (1.0, 0.0)) <= uniform * (1 + 1e-9)
            assert s.step_time == pytest.approx(uniform, rel=1e-6)           # the slack is spent
            uni_worst = float(eval_curves(curves, profile.grid, torch.full((L, U), mean)).min())
            assert float(s.recovery.min()) >= uni_worst - 1e-9
            assert bool(((s.budgets >= FLOOR - 1e-12) & (s.budgets <= 1 + 1e-12)).all())
            assert all(sorted(u for r in rr for u in r) == list(range(U)) and len({len(r) for r in rr}) == 1
                       for rr in s.ranks)


def test_one_unit_per_rank_moves_budget_only_between_layers(profile):
    """kv at tp 3 (3 KV groups): a layer's units end with equal budgets (each rank's load reaches
    the layer's max), budget differs only from layer to layer, and every layer is balanced."""
    curves = profile.curves("runtime", "kv", "sinkless")
    s = solve(curves, profile.grid, 3, 0.1, FLOOR, STEP)
    for row in s.budgets:
        assert float(row.max() - row.min()) < 1e-9 or bool((row >= 1 - 1e-9).any())
    assert float(s.budgets.mean(1).std()) > 0.01                               # layers do differ
    assert float(s.recovery.min()) > 1.5 * float(
        eval_curves(curves, profile.grid, torch.full(curves.shape[:2], 0.1)).min())


def test_tp1_is_optimal_at_the_same_total(profile):
    curves = profile.curves("runtime", "kv", "sinkless")
    s = solve(curves, profile.grid, 1, 0.1, FLOOR, STEP)
    flat = curves.reshape(-1, curves.shape[-1])
    opt = eval_curves(flat, profile.grid, allocate(flat, profile.grid, 0.1, "optimal", FLOOR, STEP))
    assert float(s.recovery.min()) == pytest.approx(float(opt.min()), abs=1e-6)
    assert float(s.recovery.mean()) == pytest.approx(float(opt.mean()), abs=1e-4)
    assert float(s.budgets.sum()) == pytest.approx(0.1 * s.budgets.numel(), rel=1e-9)


# ---------------------------------------------------------------- brute force on small instances
def brute_tau(curves, grid, tp, mean):
    """The exact max-min optimum: bisection on tau, each layer's cap the min over EVERY equal-count
    partition of the units' minimal budgets (a unit with recovery >= tau costs at least that)."""
    L, U, _ = curves.shape
    parts = partitions(U, tp)
    T = L * (U // tp) * mean

    def time_at(tau):
        need = torch.maximum(invert_curves(curves, grid, torch.full((L, U), tau)), torch.full((L, U), FLOOR))
        return sum(min(max(float(need[l, r].sum()) for r in p) for p in parts) for l in range(L))

    lo = float(eval_curves(curves, grid, torch.full((L, U), mean)).min())
    hi = 1.0
    for _ in range(45):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if time_at(mid) <= T * (1 + 1e-12) else (lo, mid)
    return lo


def brute_grid(curves, grid, tp, mean, levels):
    """Best worst recovery over budgets on a grid of `levels` values per unit and every partition,
    at step time <= uniform's: per layer, the least cap reaching each worst value; then combine."""
    L, U, _ = curves.shape
    parts = partitions(U, tp)
    vals = np.linspace(FLOOR, 1.0, levels)
    combos = np.array(list(itertools.product(vals, repeat=U)))                   # [C, U]
    per_layer = []
    for l in range(L):
        rec = eval_curves(curves[l].unsqueeze(0).expand(len(combos), -1, -1), grid,
                          torch.tensor(combos)).numpy()                          # [C, U]
        cap = np.min([np.max([combos[:, r].sum(1) for r in p], 0) for p in parts], 0)
        per_layer.append((rec.min(1), cap))
    T = L * (U // tp) * mean
    best = -1.0
    for w in sorted({float(x) for worst, _ in per_layer for x in worst}, reverse=True):
        if sum(cap[worst >= w].min() if (worst >= w).any() else np.inf for worst, cap in per_layer) <= T + 1e-12:
            best = w
            break
    return best


@pytest.mark.parametrize("L,U,tp,mean,seed", [(2, 4, 2, 0.1, 0), (3, 4, 4, 0.2, 1), (2, 6, 3, 0.1, 2),
                                              (4, 3, 3, 0.05, 3), (1, 12, 3, 0.1, 4), (2, 6, 2, 0.3, 5)])
def test_brute_force_agrees(profile, L, U, tp, mean, seed):
    grid = profile.grid
    curves = synthetic(L, U, grid, seed)
    s = solve(curves, grid, tp, mean, FLOOR, STEP)
    assert s.step_time <= L * (U // tp) * mean * (1 + 1e-9)
    worst = float(s.recovery.min())
    assert worst == pytest.approx(brute_tau(curves, grid, tp, mean), abs=1e-6)
    if len(partitions(U, tp)) * 6 ** U <= 200_000:
        assert worst >= brute_grid(curves, grid, tp, mean, 6) - 1e-9        # no grid point does better


# ---------------------------------------------------------------- the plan artifact and CLI
def test_joint_plan_schema_and_goals(profile, tmp_path):
    body = make_joint_plan(profile, 0.1, 3, "kv", head_dim=64)
    write_json(tmp_path / "p.json", "plan", body)
    plan = load_plan(tmp_path / "p.json", profile.meta["model_fingerprint"])
    s = plan["summary"]
    assert plan["placement"] == "joint" and plan["budget_method"] == "joint"
    assert s["predicted_step_time"] <= s["uniform_step_time"] * (1 + 1e-9)
    assert max(x["imbalance"] for x in plan["layers"]) <= 1.02
    for x in plan["layers"]:
        assert x["rank_budgets"] == [[x["unit_budgets"][u] for u in r] for r in x["rank_units"]]
    uni = make_budgets(profile, 0.1, "uniform", "kv")
    assert s["worst_recovery"] > uni["summary"]["worst_recovery"]


def test_budgets_plan_reports_its_step_time_ratio(profile):
    opt = make_budgets(profile, 0.1, "optimal", "kv")
    plan = make_plan(opt, 3, "balanced", head_dim=64)
    s = plan["summary"]
    by_hand = sum(max(x["rank_load"]) for x in plan["layers"]) / (30 * 1 * 0.1 * 4096 * 2 * 64 * 2)
    assert s["step_time_ratio"] == pytest.approx(by_hand) and s["step_time_ratio"] > 1.3


def test_joint_prefill_budgets_on_the_decode_placement(profile):
    if "prefill_kv" not in profile.tensors:
        pytest.skip("profile without prefill curves")
    body = make_joint_plan(profile, 0.1, 3, "kv", prefill_mean=0.2)
    assert body["summary"]["prefill_step_time_ratio"] <= 1 + 1e-9
    assert all("rank_prefill_budgets" in x for x in body["layers"])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sglang_shplb.plan", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_joint_writes_plan(tmp_path):
    out = tmp_path / "plan.json"
    r = cli("--profile", PROFILE, "--mean-budget", 0.1, "--tp", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "1.000x uniform" in r.stdout
    assert json.loads(out.read_text())["summary"]["step_time_ratio"] <= 1 + 1e-9


@pytest.mark.parametrize("args,needle", [
    (("--tp", 2), "cannot be split evenly"),
    (("--tp", 3, "--mean-budget", 0), "(0, 1]"),
    (("--tp", 3, "--mean-budget", 1.5), "(0, 1]"),
    (("--tp", 3, "--kv-memory-limit", 0.5), "no granularity"),
])
def test_cli_bad_inputs_write_nothing(tmp_path, args, needle):
    out = tmp_path / "plan.json"
    base = {"--mean-budget": 0.1}
    extra = list(args) + ([] if "--mean-budget" in args else ["--mean-budget", base["--mean-budget"]])
    r = cli("--profile", PROFILE, "--out", out, *extra)
    assert r.returncode == 2 and needle in r.stderr and r.stderr.count("error:") == 1, r.stderr
    assert not out.exists()


def test_cli_profile_of_another_model(profile, model_path, tmp_path):
    other = Profile({**profile.meta, "model_fingerprint": "0" * 32}, profile.tensors)
    other.save(tmp_path / "other.safetensors")
    out = tmp_path / "plan.json"
    r = cli("--profile", tmp_path / "other.safetensors", "--model", model_path, "--mean-budget", 0.1, "--tp", 3,
            "--out", out)
    assert r.returncode == 2 and "another model" in r.stderr and r.stderr.count("error:") == 1, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("layers,means", [(32, (0.05, 0.1, 0.2)), (80, (0.1,))])
def test_resampled_shapes_hold_the_step_time(profile, layers, means):
    """Llama-3.1-8B / Qwen2.5-72B shapes (8 KV groups; curves drawn from SmolLM2's, as in
    benchmark/balance.py) at tp 2/4/8: never above uniform's step time, worst never below."""
    real = profile.curves("runtime", "kv", "sinkless").reshape(-1, len(profile.grid))
    curves = real[torch.randint(len(real), (layers, 8), generator=torch.Generator().manual_seed(layers))]
    for tp in (2, 4, 8):
        for mean in means:
            s = solve(curves, profile.grid, tp, mean, FLOOR, STEP)
            assert s.step_time <= layers * (8 // tp) * mean * (1 + 1e-9)
            uni = eval_curves(curves, profile.grid, torch.full((layers, 8), mean))
            assert float(s.recovery.min()) >= float(uni.min()) - 1e-9
