"""The report's rows cannot go stale (issue 35): each row is keyed by its configuration and stamped with the code
that made it; a one-line edit to the selection code re-runs the sparse rows and keeps the dense ones; a second
report with nothing changed reuses every row."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from rows import Rows, code_hash  # noqa: E402


def _tree(tmp: Path) -> Path:
    for base in ("python/sglang_shplb", "kernels"):
        shutil.copytree(ROOT / base, tmp / base, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp


def test_a_selection_edit_changes_the_sparse_code_hash_only(tmp_path):
    root = _tree(tmp_path)
    sparse, dense = code_hash("sparse", root), code_hash("dense", root)
    assert (sparse, dense) == (code_hash("sparse"), code_hash("dense"))
    with open(root / "python/sglang_shplb/selection.py", "a") as f:
        f.write("# one more line\n")
    assert code_hash("sparse", root) != sparse and code_hash("dense", root) == dense
    with open(root / "python/sglang_shplb/launch_server.py", "a") as f:
        f.write("# one more line\n")
    assert code_hash("dense", root) != dense          # the launcher serves dense too


def test_an_api_edge_edit_changes_only_the_rows_that_measure_it(tmp_path):
    root = _tree(tmp_path)
    before = {scope: code_hash(scope, root) for scope in ("sparse", "dense", "all")}
    with open(root / "python/sglang_shplb/sglang_adapter/request_limits.py", "a") as f:
        f.write("# one more line\n")
    after = {scope: code_hash(scope, root) for scope in before}
    assert [s for s in before if before[s] != after[s]] == ["all"]   # fuzz and load re-run; answers and speed kept


def test_a_row_is_reused_only_for_the_code_that_made_it(tmp_path):
    cfg = {"bench": "x", "flags": [], "seed": 1}
    Rows(tmp_path / "r.json").put(cfg, "code-a", {"score": 3})
    rows = Rows(tmp_path / "r.json")                       # as a later run reads it
    assert rows.get(cfg, "code-a") == {"score": 3}
    assert rows.get(cfg, "code-b") is None                 # other code: stale, re-run
    assert rows.get({**cfg, "seed": 2}, "code-a") is None  # other configuration: never reused
    assert rows.latest(cfg)["code"] == "code-a" and rows.latest(cfg)["commit"]


def test_a_newer_row_from_another_process_is_kept(tmp_path):
    cfg, other = {"bench": "x", "seed": 1}, {"bench": "y", "seed": 1}
    Rows(tmp_path / "r.json").put(cfg, "code-a", {"score": 1})
    a, b = Rows(tmp_path / "r.json"), Rows(tmp_path / "r.json")   # two runs that started together
    a.put(cfg, "code-b", {"score": 2})
    b.put(other, "code-b", {"score": 7})                           # b still holds cfg's older row in memory
    rows = Rows(tmp_path / "r.json")
    assert rows.get(cfg, "code-b") == {"score": 2} and rows.get(other, "code-b") == {"score": 7}


def _report(tmp: Path, only: str = "recipe") -> str:
    p = subprocess.run([sys.executable, str(ROOT / "benchmark/report.py"), "--only", only, "--results", str(tmp),
                        "--rows", str(tmp / "rows.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return (tmp / "SUMMARY.md").read_text()


def test_the_report_runs_what_is_missing_then_reuses_it(tmp_path):
    first = _report(tmp_path)
    recipe = [ln for ln in first.splitlines() if "served_recipe.py" in ln]
    assert recipe and "ran now" in recipe[0], recipe
    assert "| 1 | budgets | 0.1 |" in first                      # the table itself, from the script's run
    for section in ("## recipe", "## quality", "## speed", "## balance", "## reliability"):
        assert section in first
    second = _report(tmp_path, "served_recipe.py")                 # a step by its script: nothing changed, reused
    assert "ran now" not in second and "reused" in [ln for ln in second.splitlines() if "served_recipe.py" in ln][0]


def test_bytes_bound_is_the_step_model_of_the_served_budgets(tmp_path):
    """The summary's decode-attention bound is the bytes-per-step model over the default recipe's budgets: dense
    K/V over the default's K/V plus its metadata. It lies above 1 and below 1/mean (the metadata costs something),
    and grows with the context (the 128-token floor weighs less), the same model e2e_serving's ITL bound uses."""
    from attention_cpu import bytes_bound, recipe_budgets
    from e2e_serving import step_bytes

    from sglang_shplb.artifacts import write_json
    from sglang_shplb.recipe import DEFAULT_MEAN_BUDGET

    path = tmp_path / "budgets.json"
    write_json(path, "budget", recipe_budgets())
    dense, sparse = step_bytes(None, 1, 8192, 0), step_bytes(path, 1, 8192, 0)
    assert dense == 30 * 3 * 2 * 64 * 4 * 8192
    assert bytes_bound(8192) == dense / sparse
    assert 1 < bytes_bound(2048) < bytes_bound(8192) < 1 / DEFAULT_MEAN_BUDGET


def test_ttft_bound_replaces_only_the_attention_time():
    """prefill_cpu's TTFT bound: dense TTFT less 30 layers' saving of the served attention row at the next timed
    context; no row at or above the prompt's length gives no bound rather than an extrapolated one."""
    from prefill_cpu import attention_bound

    served = {4096: (0.4, 0.2), 8192: (1.0, 0.25)}
    assert attention_bound(60.0, 8000, served) == "1.60x"          # 60 / (60 - 30 * 0.75)
    assert attention_bound(60.0, 4000, served) == f"{60 / 54:.2f}x"   # the 4096 row
    assert attention_bound(60.0, 9000, served) == "—"


def test_a_study_links_its_plot(tmp_path, monkeypatch):
    """A study whose script drew a picture beside it links that picture too: the summary links every result file."""
    import report

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert report.study_line("s.md", "what") == "- [s.md](s.md): what"
    (tmp_path / "s.png").write_bytes(b"")
    assert report.study_line("s.md", "what") == "- [s.md](s.md): what ([plot](s.png))"
