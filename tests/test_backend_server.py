"""The `shplb` backend inside the real SGLang server on the real model (CPU)."""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from conftest import Server
from sglang_shplb import selection as sel
from sglang_shplb.artifacts import write_json

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmark"))

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def dense(start_server):
    return start_server(["--dtype", "float32", "--attention-backend", "torch_native"], name="dense")


@pytest.fixture(scope="module")
def full_budget(start_server):
    return start_server(["--dtype", "float32", "--shplb-uniform-budget", "1.0"], name="shplb-full")


@pytest.fixture(scope="module")
def sparse(start_server):
    return start_server(["--dtype", "float32", "--shplb-uniform-budget", "0.1", "--enable-metrics"],
                        name="shplb-10pct")


@pytest.fixture
def own_server(tmp_path):
    """Like start_server, but this test's servers stop when it ends: a CPU server holds ~3 GB, so the
    module keeps only its shared servers alive plus one of these (four at most, not six)."""
    servers = []

    def _start(args: list[str], name: str = "server") -> Server:
        servers.append(Server(args, tmp_path / f"{name}.log"))
        return servers[-1].wait_ready()

    yield _start
    for s in servers:
        s.stop()


@pytest.fixture
def sparse_recipe(own_server):
    """The default recipe as the launcher serves it with no budget flag: the default selector (label channels,
    from the committed profile) with optimal decode and prefill budgets at 10%, solved at start-up; here
    prompts over 1024 tokens prefill sparsely (the default, 2048, would make the 1.5k needle dense)."""
    srv = own_server(["--dtype", "float32", "--shplb-prefill-dense-kv-len", "1024", "--enable-metrics"],
                     name="shplb-recipe")
    assert "S-HPLB default recipe: per-head budgets, decode and prefill at mean budget 0.1" in srv.log(), srv.log_tail()
    assert f"selector {sel.DEFAULT_SELECTOR}" in srv.log(), srv.log_tail()
    assert "(dense up to 1024 tokens)" in srv.log(), srv.log_tail()
    return srv


def recipe_reads_per_layer(seq_lens: list[int]) -> torch.Tensor:
    """KV tokens the default recipe's budgets read per layer over decode steps at these lengths (every
    selected page full: an upper bound, within one page per head and step of the truth)."""
    from sglang_shplb.budget import make_budgets
    from sglang_shplb.profile import Profile
    from sglang_shplb.recipe import COMMITTED_PROFILES, DEFAULT_MEAN_BUDGET

    body = make_budgets(Profile.load(COMMITTED_PROFILES[0]), DEFAULT_MEAN_BUDGET, "optimal",
                        prefill_mean=DEFAULT_MEAN_BUDGET)
    b, P = torch.tensor(body["budgets"], dtype=torch.float64), body["page_size"]
    ref = sel.BudgetRef.of(b, -(-body["context_len"] // P))
    total = torch.zeros(b.shape[0], dtype=torch.float64)
    for s in seq_lens:
        n = torch.tensor(-(-s // P))
        k = sel.pages_for_budget(b, n, body["sink_pages"] + body["recent_pages"], ref)
        total += (k * P).clamp(max=s).sum(-1)
    return total


def kv_tokens_read_per_layer(server) -> torch.Tensor:
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    rows = {int(l.split('layer="')[1].split('"')[0]): float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
            if l.startswith("sglang:shplb_kv_tokens_read{")}
    return torch.tensor([rows[i] for i in sorted(rows)], dtype=torch.float64)


@pytest.fixture
def sparse_profile(own_server):
    """A uniform budget with --shplb-profile: the default (label) selector on the profile's channels."""
    profile = __import__("pathlib").Path(__file__).resolve().parents[1] / \
        "python/sglang_shplb/data/smollm2-135m.profile.safetensors"
    srv = own_server(["--dtype", "float32", "--shplb-uniform-budget", "0.1", "--shplb-profile", str(profile),
                        "--enable-metrics"], name="shplb-10pct-profile")
    assert f"selector {sel.DEFAULT_SELECTOR}" in srv.log(), srv.log_tail()
    return srv


@pytest.fixture(scope="module")
def shared_prefix_prompts(corpus_dir):
    prefix = (corpus_dir / "alice29.txt").read_text()[2000:3500]
    return [prefix + tail for tail in (" Alice said", " The Queen", " Then the Cat", " Suddenly")]


def concurrent_ids(server, prompts, n=16):
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: server.generate_ids(p, n), prompts))


def test_full_budget_equals_torch_native(dense, full_budget, shared_prefix_prompts):
    for p in PROMPTS:
        assert full_budget.generate_ids(p, 16) == dense.generate_ids(p, 16), p
    want = concurrent_ids(dense, shared_prefix_prompts)
    assert concurrent_ids(full_budget, shared_prefix_prompts) == want
    # Second round hits the radix cache (shared prefix pages reused with their metadata).
    assert concurrent_ids(full_budget, shared_prefix_prompts) == want


def kv_tokens_read(server) -> float:
    """Sum over layers of the backend's cumulative KV-tokens-read gauge (updated every decode step)."""
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    return sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines() if l.startswith("sglang:shplb_kv_tokens_read{"))


@pytest.mark.parametrize("server_fixture", ["sparse_recipe"] + [  # the fallback and uniform baselines: make test-slow
    pytest.param("sparse", marks=pytest.mark.slow), pytest.param("sparse_profile", marks=pytest.mark.slow)])
def test_sparse_retrieves_where_selection_decides(server_fixture, request, model_path):
    """At 10% a ~1.5k-token needle prompt answers only if the selector finds the needle's page: the
    needle lies outside the always-kept sink/recent pages, and the request reads ~10% of its KV.
    For the uncalibrated selector (uniform budget), the default recipe
    (label cache, optimal budgets) and the label selector under a uniform budget (--shplb-profile)."""
    from transformers import AutoTokenizer

    sparse = request.getfixturevalue(server_fixture)

    from retrieval import corpus_pieces
    from ruler_tasks import make_task

    tok = AutoTokenizer.from_pretrained(model_path)
    task = make_task("single_needle", 0, corpus_pieces(), lambda t: len(tok(t, add_special_tokens=False).input_ids),
                     1536, seed=0)
    prompt = tok.apply_chat_template([{"role": "user", "content": task.user_message},
                                      {"role": "assistant", "content": task.answer_prefix}],
                                     tokenize=False, continue_final_message=True)
    ids = tok(prompt, add_special_tokens=False).input_ids
    needle_at = len(tok(task.user_message[: task.user_message.index(task.needles[0])]).input_ids)
    assert 16 * 4 < needle_at < len(ids) - 16 * 4, "needle inside the always-kept pages: the test would not test"
    before = kv_tokens_read(sparse)
    per_layer_before = kv_tokens_read_per_layer(sparse)
    r = requests.post(f"{sparse.url}/v1/chat/completions", timeout=600, json={
        "model": "default", "temperature": 0, "max_tokens": 12, "continue_final_message": True,
        "messages": [{"role": "user", "content": task.user_message},
                     {"role": "assistant", "content": task.answer_prefix}]}).json()
    read = kv_tokens_read(sparse) - before
    out = r["choices"][0]["message"]["content"]
    assert task.score(out) == 1.0, (out, task.answers)
    n_prompt, n_out = r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"]
    dense = 30 * 3 * sum(n_prompt + i for i in range(1, n_out))   # decode steps: layers x KV heads x context
    assert 0.05 < read / dense < 0.2, (read, dense)
    if server_fixture == "sparse_recipe":   # each layer reads what the recipe's per-head budgets give it
        steps = [n_prompt + i for i in range(1, n_out)]
        got, want = kv_tokens_read_per_layer(sparse) - per_layer_before, recipe_reads_per_layer(steps)
        slack = len(steps) * 3 * 16                                  # a partial last page per head and step
        assert ((want - got >= 0) & (want - got <= slack)).all(), (got.tolist(), want.tolist())
        assert want.max() > 2 * want.min()                           # the layers' budgets do differ


def test_sparse_reads_about_its_budget(sparse, shared_prefix_prompts):
    """On ~400-token prompts 10% budget plus sink/recent floors reads well under half the KV."""
    concurrent_ids(sparse, shared_prefix_prompts, n=70)
    lines = [l for l in sparse.log().splitlines() if "kv tokens read" in l]
    assert lines, sparse.log_tail()
    ratio = float(lines[-1].split("dense (")[1].split(")")[0])
    assert 0.05 < ratio < 0.5, lines[-1]
    metrics = requests.get(f"{sparse.url}/metrics", timeout=30).text
    assert "sglang:shplb_kv_tokens_read" in metrics


def test_stock_sglang_lists_backend():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True,
                         env={**__import__("os").environ, "SGLANG_USE_CPU_ENGINE": "1"}, timeout=300)
    assert "shplb" in out.stdout


def launcher_error(*args):
    proc = subprocess.run([sys.executable, "-m", "sglang_shplb.launch_server", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_budgets_for_another_model_refused(tmp_path, model_path):
    bad = tmp_path / "other.json"
    write_json(bad, "budget", {"model_fingerprint": "f" * 32, "granularity": "kv", "num_layers": 30,
                               "budgets": [[0.1] * 3] * 30})
    assert "another model" in launcher_error("--model-path", str(model_path), "--shplb-budgets", str(bad))


def test_page_size_must_divide(model_path):
    err = launcher_error("--model-path", str(model_path), "--shplb-uniform-budget", "0.1", "--page-size", "24")
    assert "--page-size 24" in err and "multiple" in err
