"""Request checks stock SGLang 0.5.23 lacks: hooks on its API edge (HTTP process only).

Request limits and vocabulary checks (request_limits.py) run at three places, all before a
request is tokenized or batched, so a refusal is a 400 even for a streamed request:
- the OpenAI validators of `/v1/chat/completions` and `/v1/completions` (fields as the client sent them);
- the `/generate` contract check (the raw native body, single or batched);
- `TokenizerManager._validate_one_request`, which every generating or embedding endpoint passes
  (`/v1/responses`, `/v1/embeddings`, Ollama routes...): the catch-all, native field names.
One check runs after: a grammar that dead-ends mid-answer (no token of the vocabulary continues it) is
aborted by the scheduler as a 500; `abort_before` relabels that abort as the client's 400 (an OpenAI stream
has already sent its 200: it ends with finish_reason "abort", as stock ends every aborted stream).

Measured on stock 0.5.23 (`/v1/completions` and `/generate` already refuse all of these with 400):
- `max_tokens: 0` (or `max_completion_tokens: 0`) returns 200 with an empty answer; a negative value
  is refused as "max_new_tokens must be at least 0", naming a field the client never sent.
- `n: 0` is refused as "range() arg 3 must not be zero".
- A JSON body that is not an object (`[]`, `1`, `null`), or a field of the wrong JSON type that a
  pydantic before-validator reads (`"response_format": 5`), is a 500 with a traceback: body_guard.py.
Native `/generate` keeps `max_new_tokens: 0` (a prefill-only request is legitimate there).
"""
from __future__ import annotations

from ..config import ShplbConfig
from .body_guard import BodyGuard, generate_body_problem
from .request_limits import (RequestLimits, embeds_problem, fan_out_problem, first, generate_problem,
                             grammar_dead_end, per_prompt_problem, range_problem, sampling_problem,
                             token_ids_problem)

VALIDATE = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._validate_request"
VALIDATE_COMPLETION = "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion._validate_request"
GENERATE_CONTRACT = "sglang.srt.entrypoints.api_contract.generate_contract_error"
VALIDATE_ONE = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
ABORT = "sglang.srt.managers.tokenizer_manager.TokenizerManager._handle_abort_finish_reason"
HTTP_SETUP = "sglang.srt.entrypoints.http_server._setup_and_run_http_server"
_registered = False
LIMITS = RequestLimits.from_config(ShplbConfig())  # resolved from the environment at registration


def check_sampling(request) -> str | None:
    for field in ("max_completion_tokens", "max_tokens", "n"):
        value = getattr(request, field, None)
        if value is not None and value <= 0:
            return f"{field} must be at least 1, got {value}"
    return None


def _model(serving_or_manager) -> tuple[int, int]:
    """(vocab size, context length) of the served model, from a serving object or the tokenizer manager."""
    tm = getattr(serving_or_manager, "tokenizer_manager", serving_or_manager)
    return tm.model_config.vocab_size, tm.context_len


def validate_after(result, serving, request, *args, **kwargs):
    """AFTER hook on the chat validator: keep SGLang's own error; otherwise add ours (None keeps it)."""
    if result:
        return None
    vocab, context = _model(serving)
    tokens_field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(request, tokens_field)
    return first(
        check_sampling(request),
        range_problem("top_logprobs", request.top_logprobs, LIMITS.max_top_logprobs, "--shplb-max-top-logprobs"),
        fan_out_problem(request.n, max_tokens, "n", tokens_field, context, LIMITS),
        token_ids_problem("stop_token_ids", request.stop_token_ids, vocab))


def validate_completion_after(result, serving, request, *args, **kwargs):
    """AFTER hook on the completions validator (stock already refuses max_tokens <= 0 there)."""
    if result:
        return None
    vocab, context = _model(serving)
    return first(
        token_ids_problem("prompt", request.prompt, vocab),
        range_problem("logprobs", request.logprobs, LIMITS.max_logprobs, "--shplb-max-logprobs"),
        fan_out_problem(request.n, request.max_tokens, "n", "max_tokens", context, LIMITS),
        token_ids_problem("stop_token_ids", request.stop_token_ids, vocab))


def generate_contract_after(result, body, *args, **kwargs):
    """AFTER hook on /generate's contract check: stock's schema error first, then ours."""
    if result:
        return None
    from sglang.srt.entrypoints.http_server import _global_state

    return generate_problem(body, *_model(_global_state.tokenizer_manager), LIMITS) or generate_body_problem(body)


def validate_one_before(manager, obj, input_ids, *args, **kwargs):
    """BEFORE hook on the tokenizer manager's per-request check (every endpoint, after tokenizing,
    before parallel-sampling fan-out): raising ValueError is how SGLang refuses a request there."""
    vocab, context = _model(manager)
    top = getattr(obj, "top_logprobs_num", None) if getattr(obj, "return_logprob", False) else None
    empty = input_ids is not None and len(input_ids) == 0  # e.g. "" inside a batch of texts
    problem = first(
        "a prompt is empty (no tokens); every prompt needs at least one token" if empty else None,
        token_ids_problem("input_ids", input_ids, vocab),
        per_prompt_problem(obj),
        embeds_problem(getattr(obj, "input_embeds", None), manager.model_config.hidden_size),
        range_problem("top_logprobs_num", top, LIMITS.max_top_logprobs, "--shplb-max-top-logprobs"),
        sampling_problem(getattr(obj, "sampling_params", None), vocab, context, LIMITS))
    if problem:
        raise ValueError(problem)
    return None


def abort_before(manager, out, state, *args, **kwargs):
    """BEFORE hook on the tokenizer manager's abort handling: a grammar dead end is the client's 400, not an
    internal error. A non-streamed request gets it as its status; a stream has already sent 200, so a native
    stream carries the message in its finish_reason and an OpenAI stream ends with "abort" (as stock's do)."""
    finish_reason = out.get("meta_info", {}).get("finish_reason") or {}
    message = grammar_dead_end(finish_reason, getattr(state.obj, "sampling_params", None))
    if message:
        finish_reason.update(message=message, status_code=400, err_type="BadRequestError")
    return None


def add_middleware_before(*args, **kwargs):
    """BEFORE hook on the HTTP set-up: the app has not started, so middleware may still be added."""
    from sglang.srt.entrypoints.http_server import app

    if not getattr(app.state, "shplb_chat_checks", False):
        app.state.shplb_chat_checks = True
        app.add_middleware(BodyGuard)
    return None


def register_api_checks() -> None:
    """Idempotent. Only the process that serves HTTP needs it: spawned workers skip the imports."""
    global _registered, LIMITS
    import multiprocessing

    if _registered or multiprocessing.parent_process() is not None:
        return
    _registered = True
    LIMITS = RequestLimits.from_config(ShplbConfig.from_env())
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError:  # an SGLang without hooks: stock behaviour, nothing else breaks
        return
    HookRegistry.register(VALIDATE, validate_after, HookType.AFTER)
    HookRegistry.register(VALIDATE_COMPLETION, validate_completion_after, HookType.AFTER)
    HookRegistry.register(GENERATE_CONTRACT, generate_contract_after, HookType.AFTER)
    HookRegistry.register(VALIDATE_ONE, validate_one_before, HookType.BEFORE)
    HookRegistry.register(ABORT, abort_before, HookType.BEFORE)
    HookRegistry.register(HTTP_SETUP, add_middleware_before, HookType.BEFORE)
