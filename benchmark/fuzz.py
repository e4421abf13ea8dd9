"""Property-based fuzzing of the server's API with hypothesis: no request may take the server down.

    python benchmark/fuzz.py [--cases 2000] [--seed 0] [--url URL] [--out benchmark/results/fuzz.md]

Generates valid-but-extreme and invalid bodies for `/v1/chat/completions`, `/v1/completions` and
`/generate`: legal bodies (every field SGLang reads, drawn from its valid range with its edges),
the same with one or two fields replaced by an edge integer, a far-out number or the wrong JSON
type (unknown fields included; nested native sampling params too), and bodies that are not JSON
objects; streamed and not.
Each request must come back within REQUEST_TIMEOUT_S, never as a 5xx, every non-2xx as a 4xx with
a JSON error; after it `/health` must answer 200 and the server process must still run. Lengths
are kept small (max_tokens is always sent) so a case costs well under a second of CPU.
Starts our launcher with per-head decode + prefill budgets (or uses --url); writes --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import requests
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))

REQUEST_TIMEOUT_S = 120
HEALTH_TRIES = 3  # a 2-core machine shared with other jobs can starve one 20-s health generation
VOCAB = 49152
# every prompt sparse; at most 512 tokens of output per request, so a mutated max_tokens (None: the context length, or
# 10^5) is refused (400) rather than generating for minutes, which the hang check could not tell from a hang
SERVER_ARGS = ["--shplb-uniform-budget", "0.1", "--shplb-uniform-prefill-budget", "0.1",
               "--shplb-prefill-dense-kv-len", "0", "--shplb-max-n-tokens", "512"]

# ---------------------------------------------------------------- field values
# A body is valid with extreme-but-legal values, or that with one or two fields replaced by an edge
# integer or a value of the wrong JSON type, or not a JSON object at all.
EDGE_INTS = st.sampled_from([-2**63, -2**31, -100, -1, 0, 1, 2, 5, 6, 20, 21, 128, 129, VOCAB - 1, VOCAB,
                             10**5, 10**9, 2**31, 2**63 - 1])
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=6), st.floats(allow_nan=False, width=32),
                 st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
BAD = st.one_of(EDGE_INTS, JUNK, st.sampled_from([-1e30, 1e30, -0.5, 2.5]))

TOKEN = st.integers(0, VOCAB - 1)
TOKEN_IDS = st.lists(TOKEN, min_size=1, max_size=12)
TEXT = st.one_of(st.text(min_size=1, max_size=40),
                 st.sampled_from([" ", "hi", "The capital of France is", "\x00", "😀" * 5, "<|im_start|>"]))
MAX_TOKENS = st.integers(1, 8)
LOGIT_BIAS = st.dictionaries(TOKEN.map(str), st.floats(-100, 100), max_size=3)

SAMPLING = {  # OpenAI-style names shared by chat and completions, legal values (edges included)
    "temperature": st.floats(0, 2), "top_p": st.floats(1e-3, 1), "top_k": st.sampled_from([-1, 1, 2, 50, VOCAB]),
    "min_p": st.floats(0, 1), "frequency_penalty": st.floats(-2, 2), "presence_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(1e-3, 2), "n": st.sampled_from([1, 1, 2, 3]),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=4)), "stop_token_ids": st.lists(TOKEN, max_size=4),
    "min_tokens": st.integers(0, 4), "seed": st.integers(0, 2**31), "logit_bias": LOGIT_BIAS,
    "stream": st.booleans(), "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(),
    "regex": st.sampled_from(["[0-9]+", "a{1,3}", "(yes|no)"]), "user": TEXT,
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": TEXT})


def mutate(valid: st.SearchStrategy, fields: list[str]) -> st.SearchStrategy:
    """valid bodies with one field (known or not) replaced by a bad value."""
    keys = st.sampled_from(fields + ["unknown_field"])
    return st.tuples(valid, keys, BAD).map(lambda t: {**t[0], t[1]: t[2]})


def body(required: dict, optional: dict) -> st.SearchStrategy:
    valid = st.fixed_dictionaries(required, optional=optional)
    fields = sorted({*required, *optional})
    once = mutate(valid, fields)
    not_objects = st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.none(), st.text(max_size=5))
    return st.one_of(valid, valid, valid, once, once, mutate(once, fields), not_objects)


CHAT = body({"messages": st.lists(MESSAGE, min_size=1, max_size=3), "max_tokens": MAX_TOKENS},
            {"model": st.just("default"), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20),
             "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}]), **SAMPLING})
COMPLETIONS = body({"prompt": st.one_of(TEXT, TOKEN_IDS, st.lists(TOKEN_IDS, min_size=1, max_size=3),
                                        st.lists(TEXT, min_size=1, max_size=3)), "max_tokens": MAX_TOKENS},
                   {"model": st.just("default"), "logprobs": st.integers(0, 5), "echo": st.booleans(),
                    **SAMPLING})
NATIVE_SAMPLING = body({"max_new_tokens": MAX_TOKENS}, {
    "min_new_tokens": st.integers(0, 4), "stop_token_ids": st.lists(TOKEN, max_size=4),
    "n": st.sampled_from([1, 2, 3]), "temperature": st.floats(0, 2), "top_k": st.sampled_from([-1, 1, 50, VOCAB]),
    "logit_bias": LOGIT_BIAS, "json_schema": st.just('{"type": "object"}'), "ignore_eos": st.booleans(),
    "sampling_seed": st.integers(0, 2**31)})
GENERATE_OPTIONAL = {"return_logprob": st.booleans(), "top_logprobs_num": st.integers(0, 20),
                     "logprob_start_len": st.integers(-1, 2), "token_ids_logprob": st.lists(TOKEN, max_size=4),
                     "stream": st.booleans(), "return_text_in_logprobs": st.booleans()}
GENERATE = st.one_of(  # text or ids: both, or neither, only through a mutation
    body({"sampling_params": NATIVE_SAMPLING, "text": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3))},
         GENERATE_OPTIONAL),
    body({"sampling_params": NATIVE_SAMPLING,
          "input_ids": st.one_of(TOKEN_IDS, st.lists(TOKEN_IDS, min_size=1, max_size=3))}, GENERATE_OPTIONAL))
CASES = st.one_of(st.tuples(st.just("/v1/chat/completions"), CHAT),
                  st.tuples(st.just("/v1/completions"), COMPLETIONS),
                  st.tuples(st.just("/generate"), GENERATE))


# ---------------------------------------------------------------- one case
def send(url: str, path: str, payload) -> str:
    """POST one case; return its outcome class ('2xx', '4xx') or raise AssertionError naming the breach."""
    data = json.dumps(payload)
    try:
        r = requests.post(url + path, data=data, headers={"Content-Type": "application/json"},
                          timeout=REQUEST_TIMEOUT_S, stream=True)
        content = r.raw.read(decode_content=True) if r.status_code < 300 else r.content
    except requests.Timeout:
        raise AssertionError(f"hang: no answer in {REQUEST_TIMEOUT_S}s to {path} {data[:300]}") from None
    except requests.ConnectionError as e:
        raise AssertionError(f"server died on {path} {data[:300]}: {e}") from None
    assert r.status_code < 500, f"{r.status_code} on {path} {data}: {content[:300]!r}"   # whole body: to replay it
    if r.status_code >= 300:
        assert 400 <= r.status_code < 500, f"{r.status_code} on {path}"
        json.loads(content)  # every refusal is a JSON error
    health = None
    for _ in range(HEALTH_TRIES):  # SGLang's /health waits 20 s for one generated token, then 503s
        try:
            health = requests.get(url + "/health", timeout=60).status_code
        except requests.RequestException as e:
            raise AssertionError(f"/health gone after {path} {data[:300]}: {e}") from None
        if health == 200:
            break
    assert health == 200, f"/health {health} {HEALTH_TRIES} times in a row after {path} {data[:300]}"
    return "2xx" if r.status_code < 300 else "4xx"


def run(url: str, cases: int, seed_value: int, server_alive=lambda: True, progress=None, every: int = 50) -> Counter:
    """Run `cases` generated cases (no shrinking: the first breach is reported as found).
    `progress(counts)` is called every `every` clean cases, so a long run stopped early still counts."""
    counts: Counter = Counter()

    @seed(seed_value)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=CASES)
    def one(case):
        path, payload = case
        outcome = send(url, path, payload)
        assert server_alive(), f"server process exited after {path} {json.dumps(payload)[:300]}"
        counts[(path, outcome)] += 1
        if progress and sum(counts.values()) % every == 0:
            progress(counts)

    one()
    return counts


def report(counts: Counter, out: Path, seed_value: int, planned: int) -> str:
    from common import write_result

    paths = sorted({p for p, _ in counts})
    rows = ["| endpoint | cases | 2xx | 4xx | 5xx | hangs | server deaths |", "|---|---|---|---|---|---|---|"]
    for p in paths:
        ok, bad = counts[(p, "2xx")], counts[(p, "4xx")]
        rows.append(f"| `{p}` | {ok + bad} | {ok} | {bad} | 0 | 0 | 0 |")
    total = sum(counts.values())
    status = "" if total >= planned else f" of {planned} planned (the run was still going when this was written)"
    rows += ["", f"**{total} cases{status}: 0 server deaths, 0 5xx, 0 hangs** (a breach stops the run and fails it, "
             "so a written count is a clean one)."]
    write_result(out, "API fuzzing (hypothesis)",
                 "Valid-but-extreme and invalid bodies for the three generation endpoints against the S-HPLB "
                 f"server ({' '.join(SERVER_ARGS)}); after every request `/health` must answer 200. "
                 "Strategies: benchmark/fuzz.py.",
                 rows, f"python benchmark/fuzz.py --cases {planned} --seed {seed_value}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmark/results/fuzz.md")
    args = ap.parse_args()
    srv = None
    if args.url is None:
        import tempfile

        from harness import Server

        srv = Server(SERVER_ARGS, Path(tempfile.mkdtemp()) / "fuzz-server.log").wait_ready()
    try:
        counts = run(args.url or srv.url, args.cases, args.seed,
                     (lambda: srv.proc.poll() is None) if srv else (lambda: True),
                     progress=lambda c: report(c, args.out, args.seed, args.cases))
        report(counts, args.out, args.seed, args.cases)
    finally:
        if srv:
            srv.stop()


if __name__ == "__main__":
    main()
