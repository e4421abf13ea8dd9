"""A small run of benchmark/load.py (40 requests, 8 at a time, mixed lengths, chat and completions,
streaming and not) against a plan server: no failures, every response well-formed, memory flat."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
import load  # noqa: E402


@pytest.mark.slow
def test_small_load_no_failures(start_server, tmp_path, model_path):
    plan = load.make_plan(1, tmp_path, model_path)
    srv = start_server(["--shplb-plan", str(plan)], name="load")
    args = load.parse_args(["--requests", "40", "--concurrency", "8", "--rounds", "3",
                            "--max-prompt-tokens", "2000", "--max-tokens", "8", "--out", str(tmp_path / "load.md")])
    out = load.run(args, srv.url, srv.proc.pid, "--shplb-plan plan.json")
    results = [r for rd in out["rounds"] for r in rd.results]
    assert len(results) == 40
    assert out["failures"] == 0, sorted({r.error for r in results if not r.ok})
    assert all(r.ok and r.tokens == 8 for r in results)  # shape checked per reply/stream by load.py
    streamed = [r for r in results if r.ttft is not None]
    assert streamed and len(streamed) < len(results), "the mix should hold streaming and plain requests"
    assert abs(out["rss_growth"]) < 0.10, out["rss_growth"]
    assert "Traceback" not in srv.log()
    text = (tmp_path / "load.md").read_text()
    assert "<!-- load:tp1 -->" in text and "**40 requests, 0 failures**" in text


def test_workload_is_seeded_and_mixed(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    a, b = (load.make_jobs(60, 7, 3000, tok) for _ in range(2))
    assert [(j.kind, j.stream, j.text) for j in a] == [(j.kind, j.stream, j.text) for j in b]
    lengths = [j.prompt_tokens for j in load.make_jobs(400, 0, 6000, tok)]
    assert min(lengths) < 256 and max(lengths) > 2048 and max(lengths) <= 6000
    assert {j.kind for j in a} == {"chat", "completions"} and {j.stream for j in a} == {True, False}


def test_results_file_keeps_other_sections(tmp_path):
    path = tmp_path / "load.md"
    load.write_section(path, ["<!-- load:tp1 -->", "one", "<!-- /load:tp1 -->"], "tp1")
    load.write_section(path, ["<!-- load:tp3 -->", "three", "<!-- /load:tp3 -->"], "tp3")
    load.write_section(path, ["<!-- load:tp1 -->", "one again", "<!-- /load:tp1 -->"], "tp1")
    text = path.read_text()
    assert "one again" in text and "three" in text and "\none\n" not in text
    # a head from older runs and a section that was never closed do not survive the next write
    path.write_text("# old head\n\nran under load average 9\n\n" + text + "\n<!-- load:tp8 -->\nhalf")
    load.write_section(path, ["<!-- load:tp3 -->", "three again", "<!-- /load:tp3 -->"], "tp3")
    text = path.read_text()
    assert text.startswith("# Load: S-HPLB CPU server") and "load average" not in text and "tp8" not in text
    assert "one again" in text and "three again" in text
