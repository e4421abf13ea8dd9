"""The retrieval task generators: needles really in the prompt, answers unambiguous, seeds fixed,
lengths on target, scoring exact."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
from ruler_tasks import FAMILIES, Task, make_task, sentences  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def pieces(corpus_dir):
    out = []
    for f in sorted(corpus_dir.glob("*.txt")):
        out += sentences(f.read_text(errors="replace"))
    return out


def count(tok):
    return lambda s: len(tok(s, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("level", [0, 1])
def test_needles_in_prompt_and_answers_unambiguous(family, level, pieces, tokenizer):
    for seed in range(3):
        t = make_task(family, level, pieces, count(tokenizer), 2048, seed)
        t.check()  # each needle exactly once; no answer/distractor outside its needle
        for a in t.answers:
            assert sum(a in n for n in t.needles) >= 1, f"answer {a} is in no needle"
        assert not set(t.answers) & set(t.decoys)
        n = count(tokenizer)(t.user_message)
        assert 0.9 * 2048 <= n <= 2048 + 64, n  # on target length


def test_family_shapes(pieces, tokenizer):
    c = count(tokenizer)
    assert len(make_task("single_needle", 0, pieces, c, 1024, 0).needles) == 1
    mk = make_task("multi_key", 1, pieces, c, 1024, 0)
    assert len(mk.needles) == 3 and len(mk.decoys) == 2
    assert len(make_task("multi_value", 1, pieces, c, 1024, 0).answers) == 2
    vt = make_task("variable_track", 1, pieces, c, 1024, 0)
    # chains keep their order in the text: VAR B = VAR A comes after VAR A = value
    a, b = vt.answers
    assert vt.context.index(f"VAR {a} =") < vt.context.index(f"VAR {b} = VAR {a}")


def test_seeded(pieces, tokenizer):
    c = count(tokenizer)
    assert make_task("multi_key", 1, pieces, c, 1024, 3) == make_task("multi_key", 1, pieces, c, 1024, 3)
    assert make_task("multi_key", 1, pieces, c, 1024, 3) != make_task("multi_key", 1, pieces, c, 1024, 4)


def test_scoring_exact():
    t = Task("multi_value", 1, 0, "ctx", "q?", "prefix", ("123456", "654321"), decoys=("111111",))
    assert t.score("123456 and 654321") == 1.0
    assert t.score("1234567 and 654321") == 0.5        # a longer number is not the answer
    assert t.score("123456, 654321, 111111") == 0.0    # naming a distractor is not retrieval
    assert t.score("nothing") == 0.0


def test_malformed_task_is_refused():
    t = Task("single_needle", 0, 0, "The number is: 5. Also 5.", "q?", "p", ("5",), needles=("The number is: 5.",))
    with pytest.raises(ValueError, match="outside the needles"):
        t.check()
    with pytest.raises(ValueError, match="unknown task family"):
        make_task("needle", 0, ["A sentence."], len, 100, 0)


def test_paired_comparison_counts_flips_and_brackets_the_gap():
    """retrieval.py's per-form paired report: prompts lost / gained vs dense, and a bootstrap interval that holds
    the observed mean gap (and is a point when every prompt moves the same way)."""
    from retrieval import paired

    tasks = {f"multi_value/L1/2048/{s}": None for s in range(6)}
    dense = [1.0, 1.0, 0.5, 0.0, 1.0, 0.5]
    sparse = [1.0, 0.5, 0.5, 0.5, 0.0, 0.5]        # lost 2 (seeds 1, 4), gained 1 (seed 3): mean -16.7 pt
    raw = {"dense": {k: {"score": d} for k, d in zip(tasks, dense)},
           "v": {k: {"score": x} for k, x in zip(tasks, sparse)},
           "same": {k: {"score": d - 0.5 if d else 0.5} for k, d in zip(tasks, dense)}}
    lost, gained, lo, hi = paired(raw, "v", "multi_value/L1/2048", tasks)
    assert (lost, gained) == (2, 1)
    assert lo < -100 / 6 < hi and lo >= -100 and hi <= 100
    lost, gained, lo, hi = paired(raw, "same", "multi_value/L1/2048", tasks)
    assert (lost, gained) == (5, 1) and lo < hi
    raw["all_lost"] = {k: {"score": 0.0} for k in tasks}
    raw["dense"] = {k: {"score": 1.0} for k in tasks}
    assert paired(raw, "all_lost", "multi_value/L1/2048", tasks) == (6, 0, -100.0, -100.0)
    # pooled over forms: every prompt either side holds, counted once; prompts one side lacks are left out
    from retrieval import paired_keys

    raw["all_lost"]["single_needle/L0/4096/0"] = {"score": 1.0}
    raw["dense"]["single_needle/L0/4096/0"] = {"score": 0.0}
    assert paired_keys(raw, "all_lost", [*tasks, "single_needle/L0/4096/0", "x/L0/8000/0"])[:2] == (6, 1)


def test_floor_variant_budgets_hold_the_floor(tmp_path):
    """retrieval.py's METHOD:floorK@MEAN serves budgets where every KV group holds >= K pages at the profile's
    context, at the same mean; floor3 keeps some groups at sink + recent only; the plain variant has the default."""
    import json

    from retrieval import variant_flags

    def budgets(name):
        flags, decode_mean, _ = variant_flags(name, tmp_path)
        body = json.loads(Path(flags[flags.index("--shplb-budgets") + 1]).read_text())
        pages = [b * body["context_len"] / body["page_size"] for row in body["budgets"] for b in row]
        return body, pages, decode_mean

    body, pages, mean = budgets("optimal:floor8@0.1")
    assert body["floor_pages"] == 8 and min(pages) >= 8 - 1e-6 and abs(mean - 0.1) < 1e-6
    low, pages, _ = budgets("optimal:floor3@0.1")
    assert min(pages) < 8 and low["floor_pages"] == low["sink_pages"] + low["recent_pages"] == 3
    plain, pages, _ = budgets("optimal@0.1")          # the default floor at 10%: 128 tokens
    assert plain["floor_pages"] == 8 and min(pages) >= 8 - 1e-6


def test_recipe_variant_takes_its_own_prefill_mean(tmp_path):
    """`recipeP+METHOD@MEAN`: decode budgets at MEAN, per-head prefill budgets at mean P, one budgets file;
    `recipe+` keeps both at MEAN."""
    from retrieval import variant_flags

    _, decode, prefill = variant_flags("recipe0.2+optimal@0.1", tmp_path)
    assert abs(decode - 0.1) < 0.01 and abs(prefill - 0.2) < 0.01
    _, decode, prefill = variant_flags("recipe+optimal@0.1", tmp_path)
    assert abs(decode - 0.1) < 0.01 and abs(prefill - 0.1) < 0.01


def test_variant_names_carry_their_floor():
    """A budgets-file variant is named (and its raw rows keyed) with the floor it was made with, so rows made under
    an older default floor are never reused; uniform, prefill-only and explicit-floor names are unchanged."""
    from retrieval import canonical

    assert canonical("optimal@0.1") == "optimal:floor8@0.1"
    assert canonical("recipe+optimal@0.1/oracle_mass") == "recipe+optimal:floor8@0.1/oracle_mass"
    assert canonical("recipe0.2+optimal@0.1") == "recipe0.2+optimal:floor8@0.1"
    assert canonical("optimal@0.02") == "optimal:floor3@0.02"          # 128 tokens do not fit under 2% of 4k
    for name in ("dense", "uniform@0.1", "prefill@0.1", "optimal:floor3@0.1", "prefill+uniform@0.1"):
        assert canonical(name) == name


def test_retrieval_rows_resume_and_name_their_code(tmp_path):
    """retrieval.py keeps each prompt's answer as a code-stamped row: a prompt answered at the current code is not
    asked again, one made by other code is (and a column says how many of its rows are stale or missing)."""
    from retrieval import row_config, run_variant, stored
    from rows import Rows, code_hash

    tasks = {f"single_needle/L0/2048/{s}": None for s in range(3)}
    rows = Rows(tmp_path / "rows.json")
    flags = ["--shplb-dense"]
    rows.put(row_config("dense", "single_needle/L0/2048/0", flags), code_hash("dense"), {"output": "1", "score": 1.0})
    rows.put(row_config("dense", "single_needle/L0/2048/1", flags), "older", {"output": "2", "score": 0.0})
    raw, origin = stored(rows, ["dense"], tasks, tmp_path)
    assert sorted(raw["dense"]) == ["single_needle/L0/2048/0", "single_needle/L0/2048/1"]
    assert origin["dense"].endswith("1 of 3 not run; 1 from older code") and "(stale: older code)" in origin["dense"]
    rows.put(row_config("dense", "single_needle/L0/2048/1", flags), code_hash("dense"), {"output": "2", "score": 1.0})
    rows.put(row_config("dense", "single_needle/L0/2048/2", flags), code_hash("dense"), {"output": "3", "score": 1.0})
    run_variant("dense", tasks, Rows(tmp_path / "rows.json"), tmp_path)   # all current: no server is started
    assert "not run" not in stored(rows, ["dense"], tasks, tmp_path)[1]["dense"]


def test_retrieval_column_owes_only_kept_prompts(tmp_path):
    """A sparse column is not reported as incomplete for a form dense cannot do (dropped by --keep, never run
    sparse); a kept prompt it lacks still is."""
    from retrieval import row_config, stored, variant_flags
    from rows import Rows, code_hash

    tasks = {f"single_needle/L0/{ctx}/0": None for ctx in (2048, 8000)}
    kept = {"single_needle/L0/2048/0": None}
    rows = Rows(tmp_path / "rows.json")
    flags = variant_flags("uniform@0.1", tmp_path)[0]
    rows.put(row_config("uniform@0.1", "single_needle/L0/2048/0", flags), code_hash("sparse"),
             {"output": "1", "score": 1.0})
    assert "not run" not in stored(rows, ["uniform@0.1"], tasks, tmp_path, kept)[1]["uniform@0.1"]
    assert stored(rows, ["uniform@0.1"], tasks, tmp_path)[1]["uniform@0.1"].endswith("1 of 2 not run")
    assert stored(rows, ["uniform@0.1"], tasks, tmp_path, tasks)[1]["uniform@0.1"].endswith("1 of 2 not run")


def test_ruler_gate_records_a_refused_cell_and_goes_on(tmp_path):
    """A cell whose prompt the server refuses (HTTP 400: e.g. prompt + answer over the model's context) is stored as
    refused, is no gate, and the table and the pooled gates still come out for every other cell; a variant row left
    on a cell that is no gate (from an older gate set) is not shown, as the report would not re-run it."""
    from argparse import Namespace

    from ruler_gate import config, is_gate, report
    from rows import Rows, code_hash

    rows, limit = Rows(tmp_path / "rows.json"), 2
    answers = [{"doc_id": i, "target": "7", "answer": "7", "score": 1.0} for i in range(limit)]
    rows.put(config("dense", "niah_single_1", 4096, limit), code_hash("dense"), answers)
    rows.put(config("default", "niah_single_1", 4096, limit), code_hash("sparse"), answers[:1] + [
        {**answers[1], "answer": "8", "score": 0.0}])
    rows.put(config("dense", "ruler_fwe", 8192, limit), code_hash("dense"), {"refused": "HTTP 400"})
    rows.put(config("default", "ruler_fwe", 8192, limit), "older code", answers)   # left from an older gate set
    args = Namespace(tasks=["niah_single_1", "ruler_fwe"], lengths=[4096, 8192], limit=limit, exclude=[],
                     variants=["default"], all=False)
    assert is_gate(rows, "niah_single_1", 4096, limit) and not is_gate(rows, "ruler_fwe", 8192, limit)
    table = "\n".join(report(args, rows))
    assert "| ruler_fwe | 8192 | refused (HTTP 400) | — | no (the server refused a prompt: HTTP 400) |" in table
    assert "| **all gates, default** | | 2/2 | 1/2 (−1 +0;" in table
