"""A TP=3 CPU server with a non-trivial q-granularity plan (GQA expanded, heads placed by the
planner) is the same model: greedy output equals the plain TP=3 server's."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "python/sglang_shplb/data/smollm2-135m.profile.safetensors"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def q_plan(tmp_path_factory, model_path):
    d = tmp_path_factory.mktemp("plan")
    cli("sglang_shplb.budget", "--profile", str(PROFILE), "--mean-budget", "0.1", "--granularity", "q",
        "--out", str(d / "b.json"))
    cli("sglang_shplb.plan", "--budgets", str(d / "b.json"), "--tp", "3", "--granularity", "q",
        "--placement", "balanced", "--model", str(model_path), "--out", str(d / "plan.json"))
    return d / "plan.json"


@pytest.mark.slow   # two TP-3 servers; test_serve's TP-3 default (the joint plan) is in make test
def test_q_plan_tp3_same_greedy_as_plain_tp3(start_server, q_plan):
    from sglang_shplb.plan import load_plan

    plan = load_plan(q_plan)
    rank0 = plan["layers"][0]["rank_units"][0]
    assert rank0 != list(range(len(rank0))), "plan should be non-trivial"
    plain = start_server(["--dtype", "float32", "--tp", "3", "--shplb-dense"], name="plain-tp3")
    placed = start_server(["--dtype", "float32", "--tp", "3", "--attention-backend", "torch_native",
                           "--shplb-plan", str(q_plan)], name="plan-tp3")
    for p in PROMPTS:
        assert placed.generate_ids(p, 16) == plain.generate_ids(p, 16), p
    log = placed.log()
    for rank in range(3):
        assert f"tp_rank={rank} layer-0 heads" in log


@pytest.mark.slow
def test_q_plan_tp3_sparse_serves(start_server, q_plan):
    srv = start_server(["--dtype", "float32", "--tp", "3", "--shplb-plan", str(q_plan)], name="plan-tp3-sparse")
    assert "Paris" in srv.chat("What is the capital of France?")["choices"][0]["message"]["content"]


def test_plan_for_wrong_tp_refused(q_plan, model_path):
    proc = subprocess.run([sys.executable, "-m", "sglang_shplb.launch_server", "--model-path", str(model_path),
                           "--shplb-plan", str(q_plan), "--tp", "1"], capture_output=True, text=True, timeout=300)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "tp" in errors[0].lower()
