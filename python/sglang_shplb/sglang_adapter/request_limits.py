"""What a request may ask of the model, checked at the API edge (pure Python; hooks in api_checks.py).

Stock SGLang 0.5.23 runs every request of a batch in one scheduler loop, and any exception there
kills the scheduler (`run_scheduler_process` catches it and SIGQUITs the server): there is no
per-request failure path once a request is batched. So every request field that indexes a tensor
is checked before the request reaches the scheduler:
- prompt token ids (`prompt` as ids, `input_ids`) index the embedding table (and an empty prompt
  inside a batch reaches prefill with no tokens);
- `stop_token_ids` index a vocab-sized tensor when `min_new_tokens` > 0 (min-tokens penalizer);
- `logprobs` / `top_logprobs` / `top_logprobs_num` are the k of a top-k over the vocabulary;
- `input_embeds` rows replace the embedding lookup, so they must be hidden-size vectors;
- per-prompt fields of a native request (`logprob_start_len`, ...) must be scalars per prompt;
- a grammar (`regex`, `json_schema`, ...) with `min_new_tokens` > 0 or `ignore_eos` can mask every
  token once the grammar is complete (NaN probabilities in the sampler);
- a grammar this model's tokens cannot spell (e.g. a regex of one character no token holds) masks every
  token mid-answer: stock aborts it as a 500; `grammar_dead_end` makes that abort the client's 400;
- `n` fans one request out into n scheduler requests, each up to `max_tokens` long.
Already checked by stock (kept): `logit_bias` keys, `token_ids_logprob`, sampling ranges
(temperature, top_p, top_k, min_p, penalties, min/max_new_tokens), the context length.

Each check returns None or one message naming the field, the value, the limit and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from ..config import ShplbConfig


@dataclass(frozen=True)
class RequestLimits:
    max_n: int
    max_n_tokens: int
    max_logprobs: int
    max_top_logprobs: int

    @classmethod
    def from_config(cls, cfg: ShplbConfig) -> "RequestLimits":
        return cls(cfg.max_n, cfg.max_n_tokens, cfg.max_logprobs, cfg.max_top_logprobs)


def first(*problems: Optional[str]) -> Optional[str]:
    return next((p for p in problems if p), None)


def _flat_ids(ids) -> Iterable:
    """Token ids of one prompt ([int]) or a batch ([[int]])."""
    if ids and isinstance(ids[0], (list, tuple)):
        return (t for row in ids for t in row)
    return ids


def token_ids_problem(field: str, ids, vocab_size: int) -> Optional[str]:
    """Ids outside [0, vocab_size) would index past the embedding (or a vocab-sized tensor)."""
    if not ids or isinstance(ids, str) or isinstance(ids[0], str):
        return None  # text (one prompt or a batch): tokenized by the server itself
    if isinstance(ids[0], (list, tuple)):  # a batch: an empty prompt reaches prefill with no tokens
        empty = next((i for i, row in enumerate(ids) if not row), None)
        if empty is not None:
            return f"{field}[{empty}] is empty; every prompt of a batch needs at least one token"
    bad = next((t for t in _flat_ids(ids) if not isinstance(t, int) or isinstance(t, bool)
                or not 0 <= t < vocab_size), None)
    if bad is None:
        return None
    return (f"{field} contains token id {bad!r}, outside the model's vocabulary [0, {vocab_size}); "
            f"send token ids from 0 to {vocab_size - 1}, or text")


def embeds_problem(embeds, hidden_size: int) -> Optional[str]:
    """`input_embeds` (only served with --disable-radix-cache) replace the embedding lookup: every
    row must be one hidden-size vector, or the first layer's matmul fails inside the batch."""
    if not embeds:
        return None
    batched = isinstance(embeds[0], (list, tuple)) and embeds[0] and isinstance(embeds[0][0], (list, tuple))
    rows = embeds if batched else [embeds]
    bad = next((len(v) if isinstance(v, (list, tuple)) else 1 for prompt in rows for v in prompt
                if not isinstance(v, (list, tuple)) or len(v) != hidden_size), None)
    if bad is None:
        return None
    return (f"input_embeds holds a vector of {bad} numbers; this model's embeddings have {hidden_size} "
            "(one vector per prompt position)")


PER_PROMPT_SCALARS = (("return_logprob", bool, "true or false"), ("logprob_start_len", int, "an integer"),
                      ("top_logprobs_num", int, "an integer"))


def per_prompt_problem(obj) -> Optional[str]:
    """A native request's per-prompt fields may be lists (one entry per prompt of a batch); for one
    prompt they must be scalars, or the scheduler compares a list with an int and dies."""
    for name, kind, words in PER_PROMPT_SCALARS:
        v = getattr(obj, name, None)
        if v is not None and not isinstance(v, kind):
            return f"{name} must be {words} for each prompt, got {v!r}; a list needs one entry per prompt of a batch"
    return None


def range_problem(field: str, value, limit: int, flag: str) -> Optional[str]:
    """0 <= value <= limit for an integer field (None: not asked for)."""
    if value is None or isinstance(value, bool) or not isinstance(value, int):
        return None  # absent, or a type SGLang's own parsing refuses
    if value < 0:
        return f"{field} must be at least 0, got {value}"
    if value > limit:
        return (f"{field}={value} is above this server's limit of {limit}; ask for at most {limit} "
                f"(the operator can raise it with {flag})")
    return None


def fan_out_problem(n, max_tokens, n_field: str, tokens_field: str, context_len: int,
                    limits: RequestLimits) -> Optional[str]:
    """`n` completions of up to `max_tokens` each: n <= max_n and n x max_tokens <= max_n_tokens.
    A request without max_tokens may run to the end of the context, so it counts as context_len."""
    if n is None or isinstance(n, bool) or not isinstance(n, int):
        return None  # wrong types get SGLang's own parsing error
    if n < 1:  # stock 0.5.23: a batched prompt with n=0 fans out to no request ids -> IndexError, a 500
        return f"{n_field} must be at least 1, got {n}"
    if n > limits.max_n:
        return (f"{n_field}={n} is above this server's limit of {limits.max_n} completions per request; "
                f"send at most {limits.max_n} (the operator can raise it with --shplb-max-n)")
    per = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0 \
        else context_len
    if n * per > limits.max_n_tokens:
        shown = f"{tokens_field}={max_tokens}" if per == max_tokens else f"{tokens_field} unset (the context, {per})"
        return (f"{n_field}={n} x {shown} = {n * per} tokens is above this server's limit of "
                f"{limits.max_n_tokens} tokens per request; lower {n_field} or set a smaller {tokens_field} "
                f"(the operator can raise it with --shplb-max-n-tokens)")
    return None


GRAMMARS = ("regex", "json_schema", "ebnf", "structural_tag")


def grammar_problem(params: dict, prefix: str = "sampling_params.") -> Optional[str]:
    """Once a grammar is complete only end-of-sequence is allowed; min_new_tokens > 0 or ignore_eos
    forbids it, leaving no token to sample (stock 0.5.23: a 500, or NaN probabilities that kill
    the scheduler under min_p)."""
    grammar = next((g for g in GRAMMARS if params.get(g) is not None), None)
    if grammar is None:
        return None
    min_new = params.get("min_new_tokens")
    if isinstance(min_new, int) and not isinstance(min_new, bool) and min_new > 0:
        return (f"{prefix}min_new_tokens={min_new} cannot be combined with {prefix}{grammar}: a completed "
                "grammar allows only end-of-sequence; drop one of them")
    if params.get("ignore_eos") is True:
        return (f"{prefix}ignore_eos cannot be combined with {prefix}{grammar}: a completed grammar "
                "allows only end-of-sequence; drop one of them")
    return None


DEAD_END = "Grammar accept_token failed"  # stock's abort message when the grammar allowed no token


def grammar_dead_end(finish_reason: dict, sampling_params) -> Optional[str]:
    """The client's message for stock's grammar abort, or None. The sampler only picks a token the grammar
    refuses when the grammar's mask allowed none: the grammar cannot be continued in this model's vocabulary."""
    if finish_reason.get("type") != "abort" or not str(finish_reason.get("message", "")).startswith(DEAD_END):
        return None
    params = sampling_params if isinstance(sampling_params, dict) else {}
    grammar = next((g for g in GRAMMARS if params.get(g) is not None), "grammar")
    return (f"the {grammar} cannot be continued by any token of this model's vocabulary (it allows no next "
            f"token), so no answer can follow it; send a {grammar} that this model's tokens can spell")


def sampling_problem(params: dict, vocab_size: int, context_len: int, limits: RequestLimits,
                     prefix: str = "sampling_params.") -> Optional[str]:
    """Native sampling parameters (a dict, as /generate takes them)."""
    if not isinstance(params, dict):
        return None
    return first(
        grammar_problem(params, prefix),
        fan_out_problem(params.get("n", 1), params.get("max_new_tokens", 128), f"{prefix}n",
                        f"{prefix}max_new_tokens", context_len, limits),
        token_ids_problem(f"{prefix}stop_token_ids", params.get("stop_token_ids"), vocab_size))


def generate_problem(body: dict, vocab_size: int, context_len: int, limits: RequestLimits) -> Optional[str]:
    """A native /generate body (raw JSON: single or batched)."""
    if not isinstance(body, dict):
        return None
    params = body.get("sampling_params")
    top = body.get("top_logprobs_num")
    return first(
        token_ids_problem("input_ids", body.get("input_ids"), vocab_size),
        *(range_problem("top_logprobs_num", t, limits.max_top_logprobs, "--shplb-max-top-logprobs")
          for t in (top if isinstance(top, list) else [top])),
        *(sampling_problem(p, vocab_size, context_len, limits)
          for p in (params if isinstance(params, list) else [params])))
