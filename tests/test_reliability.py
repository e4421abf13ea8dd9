"""Bad input against one shared CPU server with a plan applied: every case gets a 400 whose message
names the problem, and the server stays up. Then stop behaviour at tp 1: SIGTERM stops every
process, the port is free for an immediate restart, Ctrl-C (SIGINT to the group) stops it too,
and SIGTERM while the workers still start up leaves no orphans (stock SGLang 0.5.23 did).

Which cases stock SGLang already handled and which our layer fixes: sglang_adapter/api_checks.py,
body_guard.py and request_limits.py."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

import conftest

LONG_TEXT = "hello world " * 6000  # ~12k tokens; SmolLM2's context is 8192
CHAT = "/v1/chat/completions"


def chat_body(**kw) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


# (id, path, body: dict or raw str, a phrase the error message must contain)
BAD_REQUESTS = [
    ("chat-malformed-json", CHAT, '{"model": "default", "messages": [', "JSON decode error"),
    ("chat-not-json", CHAT, "hello", "JSON decode error"),
    ("chat-empty-body", CHAT, "", "Field required"),
    ("chat-body-array", CHAT, "[1, 2]", "must be a JSON object"),              # stock: 500
    ("chat-body-null", CHAT, "null", "must be a JSON object"),                 # stock: 500
    ("chat-response-format-number", CHAT, chat_body(response_format=5),
     "does not fit the ChatCompletionRequest"),                                # stock: 500
    ("completions-body-array", "/v1/completions", "[1]", "must be a JSON object with 'prompt'"),
    ("chat-empty-messages", CHAT, chat_body(messages=[]), "Messages cannot be empty"),
    ("chat-messages-string", CHAT, chat_body(messages="hi"), "valid list"),
    ("chat-content-number", CHAT, chat_body(messages=[{"role": "user", "content": 5}]), "valid string"),
    ("chat-max-tokens-zero", CHAT, chat_body(max_tokens=0), "max_tokens must be at least 1"),  # stock: 200
    ("chat-max-tokens-negative", CHAT, chat_body(max_tokens=-5), "max_tokens must be at least 1"),
    ("chat-max-completion-tokens-zero", CHAT, chat_body(max_completion_tokens=0), "max_completion_tokens"),
    ("chat-max-tokens-string", CHAT, chat_body(max_tokens="ten"), "valid integer"),
    ("chat-n-zero", CHAT, chat_body(n=0), "n must be at least 1"),             # stock: "range() arg 3..."
    ("chat-temperature-string", CHAT, chat_body(temperature="hot"), "valid number"),
    ("chat-stream-max-tokens-zero", CHAT, chat_body(max_tokens=0, stream=True), "max_tokens"),
    ("chat-prompt-too-long", CHAT, chat_body(messages=[{"role": "user", "content": LONG_TEXT}]),
     "longer than the model's context length"),
    ("chat-max-tokens-past-context", CHAT, chat_body(max_tokens=100000), "maximum context length"),
    ("completions-max-tokens-zero", "/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 0},
     "max_tokens must be positive"),
    ("completions-empty-prompt", "/v1/completions", {"model": "default", "prompt": ""}, "Prompt cannot be empty"),
    ("completions-prompt-object", "/v1/completions", {"model": "default", "prompt": {"a": 1}}, "prompt"),
    ("completions-prompt-too-long", "/v1/completions", {"model": "default", "prompt": LONG_TEXT, "max_tokens": 4},
     "longer than the model's context length"),
    ("generate-malformed-json", "/generate", '{"text": ', "JSON decode error"),
    ("generate-max-new-tokens-negative", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -1}},
     "max_new_tokens must be at least 0"),
    ("generate-max-new-tokens-string", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "x"}},
     "invalid type"),
    ("generate-empty-sampling-list", "/generate", {"text": "hi", "sampling_params": []},
     "cannot be batched"),  # stock: 500
    ("generate-logprob-start-list", "/generate", {"text": "hi", "return_logprob": True, "logprob_start_len": [],
                                                  "sampling_params": {"max_new_tokens": 2}},
     "logprob_start_len must be an integer for each prompt"),  # stock: scheduler died (fuzzer)
    ("generate-no-text", "/generate", {"sampling_params": {"max_new_tokens": 3}}, "text, input_ids or input_embeds"),
    ("generate-text-too-long", "/generate", {"text": LONG_TEXT, "sampling_params": {"max_new_tokens": 4}},
     "longer than the model's context length"),
]

# Requests that reach tensors (sglang_adapter/request_limits.py). Stock 0.5.23 let each of these kill
# the scheduler (out-of-range ids index the embedding or a vocab-sized tensor; a huge top-k) or hang
# the server (n fans out into that many requests). Every endpoint and form: single, batched, streamed.
CMPL = "/v1/completions"
OOV = 999999999


def cmpl(**kw) -> dict:
    return {"model": "default", "prompt": "hi", "max_tokens": 4, **kw}


def gen(**kw) -> dict:
    return {"text": "hi", "sampling_params": {"max_new_tokens": 4}, **kw}


LIMIT_REQUESTS = [
    ("completions-oov-id", CMPL, cmpl(prompt=[OOV, 5]), "prompt contains token id 999999999"),
    ("completions-negative-id", CMPL, cmpl(prompt=[5, -3]), "prompt contains token id -3"),
    ("completions-batched-oov-id", CMPL, cmpl(prompt=[[1, 2], [3, 99999999]]), "token id 99999999"),
    ("completions-batched-empty-prompt", CMPL, cmpl(prompt=[[1001, 206], []]), "prompt[1] is empty"),  # killed it
    ("generate-batched-empty-ids", "/generate", {"input_ids": [[1, 2], []], "sampling_params": {"max_new_tokens": 4}},
     "input_ids[1] is empty"),
    ("completions-batched-empty-text", CMPL, cmpl(prompt=["hi", ""]), "a prompt is empty"),
    ("completions-stream-oov-id", CMPL, cmpl(prompt=[OOV], stream=True), "token id 999999999"),
    ("completions-vocab-size-id", CMPL, cmpl(prompt=[49152]), "outside the model's vocabulary [0, 49152)"),
    ("generate-oov-id", "/generate", {"input_ids": [OOV], "sampling_params": {"max_new_tokens": 4}},
     "input_ids contains token id 999999999"),
    ("generate-negative-id", "/generate", {"input_ids": [1, -1], "sampling_params": {"max_new_tokens": 4}},
     "token id -1"),
    ("generate-batched-oov-id", "/generate", {"input_ids": [[1, 2], [3, 99999999]],
                                              "sampling_params": {"max_new_tokens": 4}}, "token id 99999999"),
    ("generate-stream-oov-id", "/generate", {"input_ids": [OOV], "stream": True,
                                             "sampling_params": {"max_new_tokens": 4}}, "token id 999999999"),
    ("chat-stop-token-oov", CHAT, chat_body(stop_token_ids=[OOV], min_tokens=2), "stop_token_ids contains"),
    ("completions-stop-token-negative", CMPL, cmpl(stop_token_ids=[-5], min_tokens=2), "stop_token_ids contains"),
    ("generate-stop-token-oov", "/generate", gen(sampling_params={"max_new_tokens": 4, "min_new_tokens": 2,
                                                                  "stop_token_ids": [OOV]}),
     "sampling_params.stop_token_ids contains token id 999999999"),
    ("chat-regex-min-tokens", CHAT, chat_body(regex="(yes|no)", min_tokens=4, min_p=1.0, ignore_eos=True,
                                              temperature=1.0), "cannot be combined with sampling_params.regex"),
    ("generate-regex-ignore-eos", "/generate", gen(sampling_params={"max_new_tokens": 4, "regex": "(yes|no)",
                                                                    "ignore_eos": True, "temperature": 1.0}),
     "sampling_params.ignore_eos cannot be combined with sampling_params.regex"),
    # a regex no token of the vocabulary can spell: stock aborts it mid-answer as a 500 (fuzzer)
    ("chat-regex-unspellable", CHAT, chat_body(regex="\U0006cd7d"), "the regex cannot be continued by any token"),
    ("completions-regex-dead-end", CMPL, cmpl(regex="ab\U0006cd7d"), "the regex cannot be continued"),
    ("generate-regex-unspellable", "/generate", gen(sampling_params={"max_new_tokens": 4, "regex": "\U0006cd7d"}),
     "send a regex that this model's tokens can spell"),
    ("completions-logprobs-huge", CMPL, cmpl(logprobs=100000), "logprobs=100000 is above this server's limit of 5"),
    ("completions-logprobs-6", CMPL, cmpl(logprobs=6), "--shplb-max-logprobs"),
    ("completions-logprobs-negative", CMPL, cmpl(logprobs=-1), "logprobs must be at least 0"),
    ("chat-top-logprobs-huge", CHAT, chat_body(logprobs=True, top_logprobs=100000),
     "top_logprobs=100000 is above this server's limit of 20"),
    ("chat-stream-top-logprobs-huge", CHAT, chat_body(logprobs=True, top_logprobs=21, stream=True), "limit of 20"),
    ("generate-top-logprobs-huge", "/generate", gen(return_logprob=True, top_logprobs_num=100000),
     "top_logprobs_num=100000 is above this server's limit of 20"),
    ("generate-stream-top-logprobs-huge", "/generate", gen(return_logprob=True, top_logprobs_num=100000,
                                                          stream=True), "--shplb-max-top-logprobs"),
    ("completions-n-huge", CMPL, cmpl(n=100000), "n=100000 is above this server's limit of 128"),
    ("chat-n-times-tokens", CHAT, chat_body(n=64, max_tokens=4096), "n=64 x max_tokens=4096 = 262144 tokens"),
    ("chat-n-no-max-tokens", CHAT, {"model": "default", "messages": [{"role": "user", "content": "hi"}], "n": 100},
     "max_tokens unset"),
    ("generate-n-huge", "/generate", gen(sampling_params={"n": 100000, "max_new_tokens": 4}),
     "sampling_params.n=100000 is above this server's limit of 128"),
    # a batched prompt with n=0 fans out to zero request ids; stock 0.5.23 indexes them: a 500 (fuzzer)
    ("completions-batched-n-zero", CMPL, cmpl(prompt=["hi", "yo"], n=0, echo=True, logprobs=1),
     "n must be at least 1, got 0"),
    ("completions-batched-ids-n-zero", CMPL, cmpl(prompt=[[1, 2], [3]], n=0), "n must be at least 1"),
    ("generate-batched-n-zero", "/generate", gen(text=["hi", "yo"], sampling_params={"n": 0, "max_new_tokens": 4}),
     "sampling_params.n must be at least 1, got 0"),
]


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def plan1(tmp_path_factory):
    from test_plan_server import PROFILE

    d = tmp_path_factory.mktemp("plan1")
    cli("sglang_shplb.budget", "--profile", PROFILE, "--mean-budget", "0.1", "--out", d / "b.json")
    cli("sglang_shplb.plan", "--budgets", d / "b.json", "--tp", "1", "--out", d / "plan.json")
    return d / "plan.json"


@pytest.fixture(scope="module")
def server(start_server, plan1):
    return start_server(["--shplb-plan", str(plan1)], name="reliability")


def error_message(r: requests.Response) -> str:
    """SGLang's three error shapes: OpenAI {"message"}, native {"error": {"message"}} or {"error": str}."""
    body = r.json()
    err = body.get("error", body)
    return err.get("message", "") if isinstance(err, dict) else str(err)


def assert_healthy(server) -> None:
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    assert server.proc.poll() is None


def assert_answers(server) -> None:
    """The next request is served, and served right (greedy)."""
    body = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 3}}
    r = requests.post(f"{server.url}/generate", json=body, timeout=120)
    assert r.status_code == 200 and "Paris" in r.json()["text"], r.text[:300]


@pytest.mark.parametrize("path,body,needle", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_refused_server_stays_up(server, path, body, needle):
    data = body if isinstance(body, str) else json.dumps(body)
    r = requests.post(server.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == 400, r.text[:500]
    assert needle in error_message(r), error_message(r)[:500]
    assert_healthy(server)


@pytest.mark.parametrize("path,body,needle", [c[1:] for c in LIMIT_REQUESTS], ids=[c[0] for c in LIMIT_REQUESTS])
def test_request_over_limits_refused_next_answered(server, path, body, needle):
    r = requests.post(server.url + path, json=body, timeout=120)
    assert r.status_code == 400, r.text[:500]
    assert needle in error_message(r), error_message(r)[:500]
    assert_healthy(server)
    assert_answers(server)


def test_requests_at_the_limits_served(server):
    """The limits refuse only what is over them: OpenAI's own maxima are served."""
    r = requests.post(server.url + CMPL, json=cmpl(prompt=[504, 3575, 282], logprobs=5, n=2, temperature=1.0),
                      timeout=300)
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert len(body["choices"]) == 2 and len(body["choices"][0]["logprobs"]["top_logprobs"][0]) == 5
    r = requests.post(server.url + CHAT, json=chat_body(logprobs=True, top_logprobs=20), timeout=300)
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20


def test_still_serves_after_bad_input(server):
    answer = server.chat("What is the capital of France?", max_tokens=16)["choices"][0]["message"]["content"]
    assert "Paris" in answer
    assert "Traceback" not in server.log(), "a bad request made SGLang log a traceback"


# ------------------------------------------------------------------ stop signals (tp 1)
def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def wait_gone(procs: list[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while alive(procs) and time.time() < deadline:
        time.sleep(0.5)
    return alive(procs)


def test_sigterm_stops_all_and_port_restarts(server, plan1, start_server):
    kids = descendants(server.proc.pid)
    assert any(p.name().startswith("sglang::scheduler") for p in kids)
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    assert wait_gone(kids, 10) == []
    again = start_server(["--shplb-plan", str(plan1)], name="restart", port=server.port)  # the very same port
    assert again.port == server.port and "Paris" in again.chat("What is the capital of France?")[
        "choices"][0]["message"]["content"]
    kids = descendants(again.proc.pid)
    os.killpg(again.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole group
    assert again.proc.wait(timeout=60) in (0, 128 + signal.SIGINT)
    assert wait_gone(kids, 10) == []


def test_sigterm_during_startup_leaves_no_orphans(tmp_path):
    srv = conftest.Server(["--shplb-uniform-budget", "0.1"], tmp_path / "early.log")
    try:
        deadline = time.time() + 180
        # SGLang main, its resource tracker, 2 workers
        while time.time() < deadline and len(descendants(srv.proc.pid)) < 4:
            time.sleep(0.2)
        kids = descendants(srv.proc.pid)
        assert len(kids) >= 4, srv.log_tail()
        os.kill(srv.proc.pid, signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert wait_gone(kids, 10) == [], srv.log_tail()
        assert "stopped on SIGTERM" in srv.log()
    finally:
        srv.stop()
