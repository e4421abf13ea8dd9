"""Profile -> budget on the real model and on the committed profile of the default model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglang_shplb import recovery
from sglang_shplb import selection as sel
from sglang_shplb.artifacts import ArtifactError, model_fingerprint, write_json
from sglang_shplb.budget import METHODS, allocate, default_floor_pages, eval_curves, load_budgets, make_budgets
from sglang_shplb.joint import make_joint_plan
from sglang_shplb.profile import Profile, run_profile

COMMITTED = Path(__file__).resolve().parents[1] / "python/sglang_shplb/data/smollm2-135m.profile.safetensors"


@pytest.fixture(scope="module")
def two_text_profiles(model_path):
    kw = dict(context_len=1024, windows=1, queries=16, progress=False)
    return run_profile(model_path, "alice29", **kw), run_profile(model_path, "lcet10", **kw)


@pytest.fixture(scope="module")
def committed():
    return Profile.load(COMMITTED)


@pytest.mark.slow   # profiles two texts (~5 min): make test-slow
def test_head_ranking_is_stable_across_texts(two_text_profiles):
    from scipy.stats import spearmanr
    a, b = (p.tensors["budget90_kv"].flatten() for p in two_text_profiles)
    rho = spearmanr(a.numpy(), b.numpy()).statistic
    assert rho >= 0.8, rho


@pytest.mark.slow   # profiles two texts (~5 min): make test-slow
def test_curves_are_sane(two_text_profiles):
    for prof in two_text_profiles:
        for gran in ("q", "kv"):
            oracle, runtime = prof.curves("oracle", gran), prof.curves("runtime", gran)
            assert (runtime <= oracle + 1e-5).all()
            for c in (oracle, runtime):
                assert (c.diff(dim=-1) >= -1e-5).all()               # monotone in budget
                assert torch.allclose(c[..., -1], torch.ones(()), atol=1e-4)  # full budget keeps all mass


@pytest.mark.slow   # profiles two texts (~5 min): make test-slow
def test_sinkless_metric_is_a_recovery(two_text_profiles):
    """Share of the non-sink mass: in [0, 1], monotone, 1 at full budget, never above total."""
    for prof in two_text_profiles:
        c, total = prof.curves("runtime", "kv", "sinkless"), prof.curves("runtime", "kv", "total")
        assert (c >= 0).all() and (c <= total + 1e-6).all() and (c.diff(dim=-1) >= -1e-5).all()
        assert torch.allclose(c[..., -1], torch.ones(()), atol=1e-3)
    with pytest.raises(ValueError, match="unknown recovery metric"):
        prof.curves("runtime", "kv", "bogus")


def test_recovery_matches_brute_force():
    torch.manual_seed(0)
    L, D, P, sink, recent = 77, 8, 4, 1, 2
    q, k = torch.randn(3, D), torch.randn(L, D) * 2
    probs = (q @ k.T).softmax(-1)                                     # 3 query heads of one group
    n = -(-L // P)
    mass = torch.stack([probs[:, j * P:(j + 1) * P].sum(-1) for j in range(n)], -1)
    kmin, kmax = sel.page_minmax(k, P)
    ub = sel.quest_upper_bound(q, kmin, kmax).sum(0)
    for j in range(n):                                                # the bound really bounds
        assert (q @ k[j * P:(j + 1) * P].T).max(-1).values.sum() <= ub[j] + 1e-4
    for budget in (0.05, 0.2, 0.5, 1.0):
        kp = sel.pages_for_budget(torch.tensor(budget), torch.tensor(n), sink + recent)
        forced = [0] + [n - 2, n - 1]
        rest = sorted((j for j in range(n) if j not in forced), key=lambda j: -float(ub[j]))
        chosen = set((forced + rest)[: int(kp)])
        want = mass[:, sorted(chosen)].sum(-1).mean()
        mask = sel.select_pages(ub, torch.tensor(n), kp, sink, recent)
        assert set(mask.nonzero().flatten().tolist()) == chosen
        got = recovery.recovery_curve(mass.mean(0), sel.rank_pages(ub, torch.tensor(n), sink, recent), kp.view(1))
        assert torch.allclose(got, want.view(1), atol=1e-5)


def test_budget_page_counts_keep_the_share_below_and_the_mean_beyond_the_reference(committed):
    """Per-head budgets are fractions of the reference context. Below it a head keeps its share of the
    selectable pages (a head just above the floor at 4k keeps a free page at 2k: dropping it to sink +
    recent lost every needle at 2k); beyond it the model reads its mean budget (to within one page per head
    of rounding; the share alone read 9.6% at 8k). A head at 1.0 stays dense."""
    floor, ref = 3, 256
    b = torch.tensor([3 / 256, 4 / 256, 5 / 256, 0.05, 0.1, 0.5, 1.0], dtype=torch.float64)
    r = sel.BudgetRef.of(b, ref)
    assert r.mean == pytest.approx(float(b[:-1].mean()))                      # of the sparse heads
    at_ref = sel.pages_for_budget(b, torch.tensor(float(ref)), floor, r)
    assert torch.equal(at_ref, sel.pages_for_budget(b, torch.tensor(float(ref)), floor))   # same at the reference
    prev = None
    for n in range(floor, 2049, 7):
        k = sel.pages_for_budget(b, torch.tensor(float(n)), floor, r)
        assert (k >= floor).all() and (k <= n).all() and k[-1] == n
        assert (k.diff() >= 0).all()                                  # more budget never means fewer pages
        free_at_ref = at_ref > floor
        if n > floor:
            assert (k[free_at_ref] > floor).all(), n                  # a head with free pages keeps some
        assert (k[~free_at_ref] == floor).all()
        if prev is not None:
            assert (k >= prev).all()                                  # longer context never means fewer pages
        prev = k
        if n <= ref:                                                  # the share of selectable pages
            share = (b * ref - floor).clamp(min=0) / (ref - floor)
            assert ((k - floor) - share * (n - floor))[:-1].abs().max() < 1 + 1e-9
    # the committed profile's optimal budgets (made at 4k) read their mean beyond 4k, and more below it
    for mean in (0.05, 0.1, 0.2):
        body = make_budgets(committed, mean, "optimal", "kv")
        table = torch.tensor(body["budgets"], dtype=torch.float64)
        ref_pages = body["context_len"] // body["page_size"]
        r = sel.BudgetRef.of(table, ref_pages)
        for n in (64, 128, 256, 500, 1000, 2000):
            k = sel.pages_for_budget(table, torch.tensor(float(n)), body["floor_pages"], r).double()
            if n >= ref_pages:
                assert 0 <= float(k.mean()) - mean * n < 1, (mean, n, float(k.mean()) / n)
            else:
                assert float(k.mean()) >= mean * n, (mean, n)
    uniform = torch.full((4,), 0.1, dtype=torch.float64)      # a uniform table beyond ref: plain ceil
    for n in (256, 500, 2000):
        assert torch.equal(sel.pages_for_budget(uniform, torch.tensor(float(n)), floor, sel.BudgetRef.of(uniform, ref)),
                           sel.pages_for_budget(uniform, torch.tensor(float(n)), floor))


def test_committed_profile_matches_default_model(committed, model_path):
    assert committed.meta["model_fingerprint"] == model_fingerprint(model_path)


@pytest.mark.parametrize("gran", ["kv", "q"])
@pytest.mark.parametrize("mean", [0.02, 0.05, 0.10, 0.20])
def test_optimal_beats_shift_beats_uniform(committed, gran, mean):
    worst = {}
    for m in METHODS:
        body = make_budgets(committed, mean, m, gran)
        b = torch.tensor(body["budgets"], dtype=torch.float64)
        assert abs(float(b.mean()) - mean) < 1e-9                     # equal totals, exactly
        assert float(b.max()) <= 1.0 and float(b.min()) > 0
        worst[m] = body["summary"]["worst_recovery"]
    assert worst["optimal"] >= worst["shift"] - 1e-9 >= worst["uniform"] - 2e-9, worst


def test_optimal_is_max_min():
    """On synthetic concave curves, no feasible allocation beats optimal's worst case."""
    grid = torch.tensor([0.01, 0.05, 0.1, 0.2, 0.5, 1.0])
    curves = torch.stack([1 - (1 - grid) ** a for a in (1.0, 3.0, 10.0, 30.0)])
    b = allocate(curves, grid, 0.1, "optimal", 0.01, 0.001)
    worst = float(eval_curves(curves, grid, b).min())
    for _ in range(200):
        alt = torch.rand(4).double() + 0.01
        alt = alt / alt.sum() * 0.4
        if float(alt.max()) <= 1:
            assert float(eval_curves(curves, grid, alt).min()) <= worst + 1e-6


def test_default_floor_is_128_tokens_where_the_mean_holds_it(committed):
    """Without --floor-pages every unit keeps 128 tokens (8 pages) at 5% and 10% of 4k; at 2% (5 pages) that
    cannot fit, so the floor is sink + recent; prefill budgets get their own mean's floor; a given floor wins."""
    forced = committed.meta["sink_pages"] + committed.meta["recent_pages"]
    assert [default_floor_pages(committed.meta, m) for m in (0.02, 0.05, 0.1, 0.2)] == [forced, 8, 8, 8]
    body = make_budgets(committed, 0.1, "optimal", "kv", prefill_mean=0.02)
    pages = torch.tensor(body["budgets"]) * body["context_len"] / body["page_size"]
    assert body["floor_pages"] == 8 and float(pages.min()) >= 8 - 1e-6
    assert body["prefill_floor_pages"] == forced
    assert make_budgets(committed, 0.1, "optimal", "kv", floor_pages=4)["floor_pages"] == 4
    assert make_joint_plan(committed, 0.1, 3, "kv")["floor_pages"] == 8   # the joint solver's default too


def test_greedy_is_max_sum():
    """On synthetic concave curves, greedy's total recovery is the best any feasible allocation above the
    floor reaches (up to one step's gain), and no unit is left below the floor."""
    grid = torch.tensor([0.01, 0.05, 0.1, 0.2, 0.5, 1.0])
    curves = torch.stack([1 - (1 - grid) ** a for a in (1.0, 3.0, 10.0, 30.0)])
    b = allocate(curves, grid, 0.1, "greedy", 0.01, 0.001)
    assert float(b.min()) >= 0.01 - 1e-12 and abs(float(b.sum()) - 0.4) < 1e-9
    total = float(eval_curves(curves, grid, b).sum())
    assert total > float(eval_curves(curves, grid, allocate(curves, grid, 0.1, "uniform", 0.01, 0.001)).sum())
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        alt = 0.01 + torch.rand(4, generator=gen).double()
        alt = 0.01 + (alt - 0.01) / (alt - 0.01).sum() * (0.4 - 0.04)
        if float(alt.max()) <= 1:
            assert float(eval_curves(curves, grid, alt).sum()) <= total + 1e-3


def run_cli(module, *args):
    return subprocess.run([sys.executable, "-m", f"sglang_shplb.{module}", *args], capture_output=True, text=True)


def one_error(proc, needle):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_budget_cli_and_bad_input(tmp_path, committed):
    out = tmp_path / "b.json"
    ok = run_cli("budget", "--profile", str(COMMITTED), "--mean-budget", "0.1", "--out", str(out),
                 "--report", str(tmp_path / "b.png"))
    assert ok.returncode == 0, ok.stderr
    body = load_budgets(out, committed.meta["model_fingerprint"])
    assert body["method"] == "optimal" and (tmp_path / "b.png").stat().st_size > 10_000
    for bad in ("0", "1.5", "-0.1"):
        one_error(run_cli("budget", "--profile", str(COMMITTED), "--mean-budget", bad,
                          "--out", str(tmp_path / "x.json")),
                  "(0, 1]")
    assert not (tmp_path / "x.json").exists()                          # nothing half-written
    with pytest.raises(ArtifactError, match="another model"):
        load_budgets(out, "0" * 32)
    with pytest.raises(ArtifactError, match="another model"):
        Profile.load(COMMITTED, fingerprint="0" * 32)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(COMMITTED.read_bytes()[:5000])
    one_error(run_cli("budget", "--profile", str(corrupt), "--mean-budget", "0.1", "--out", str(out)), "corrupt")
    edited = json.loads(out.read_text())
    edited["budgets"][0][0] = 0.9
    out.write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="checksum"):
        load_budgets(out)
    bad_range = dict(edited, budgets=[[1.5] * 3] * 30)
    bad_range.pop("schema"), bad_range.pop("checksum")
    write_json(out, "budget", bad_range)
    with pytest.raises(ArtifactError, match=r"outside \(0, 1\]"):
        load_budgets(out)


def test_profile_rejects_short_corpus(tmp_path, model_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here. " * 20)
    proc = run_cli("profile", "--model", str(model_path), "--corpus", str(short), "--context-len", "1024",
                   "--windows", "2", "--out", str(tmp_path / "p.safetensors"))
    one_error(proc, "fewer than --windows")
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.slow   # profiles two texts (~5 min): make test-slow
def test_label_statistics_are_the_attention_inputs(two_text_profiles, model_path):
    """The profile's label calibration is mean |q| per query head and mean |k| per KV head over the
    window's post-RoPE attention inputs (what the server's label cache holds channels of)."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sglang_shplb.models import corpus_files
    from sglang_shplb.profile import token_windows

    seen = {}

    def capture(module, query, key, value, attention_mask, **kw):
        seen[module.layer_idx] = (query[0].abs().mean(1), key[0].abs().mean(1))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("label_capture", capture)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="label_capture").eval()
    ids = token_windows(AutoTokenizer.from_pretrained(model_path), corpus_files("alice29"), 1024, 1)[0]
    with torch.no_grad():
        model.model(ids[None], use_cache=False)
    prof = two_text_profiles[0]
    for layer, (qa, ka) in seen.items():
        torch.testing.assert_close(prof.tensors["label_q_abs"][layer], qa, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(prof.tensors["label_k_abs"][layer], ka, rtol=1e-4, atol=1e-5)
    ch = prof.label_channels("kv")
    assert ch.shape == (len(seen), 3, sel.LABEL_RANK) and prof.meta["runtime_selector"] == sel.DEFAULT_SELECTOR


@pytest.mark.slow   # profiles two texts (~5 min): make test-slow
def test_default_selector_recovers_at_least_the_uncalibrated_one(two_text_profiles, model_path):
    """On both texts the default (label) selector's runtime recovery at 5-20% is at least the uncalibrated
    two_stage4's, on average over KV groups; and neither beats the oracle."""
    grid = two_text_profiles[0].grid
    cols = [int((grid - b).abs().argmin()) for b in (0.05, 0.1, 0.2)]
    for text, prof in zip(("alice29", "lcet10"), two_text_profiles):
        old = run_profile(model_path, text, context_len=1024, windows=1, queries=16, progress=False,
                          prefill_blocks=0, selector=sel.UNCALIBRATED_SELECTOR)
        new_c, old_c = (p.curves("runtime", "kv", "sinkless")[..., cols].mean((0, 1)) for p in (prof, old))
        oracle = prof.curves("oracle", "kv", "sinkless")[..., cols].mean((0, 1))
        assert (new_c >= old_c - 1e-4).all() and (new_c <= oracle + 1e-4).all(), (text, new_c, old_c, oracle)
