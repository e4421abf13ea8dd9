"""The API-edge request checks as pure functions (the server tests send the same cases over HTTP):
every refusal names the field, the value and the limit; everything inside the limits passes."""
import pytest

from sglang_shplb.config import ConfigError, ShplbConfig
from sglang_shplb.sglang_adapter.request_limits import (RequestLimits, fan_out_problem, generate_problem,
                                                        range_problem, token_ids_problem)

VOCAB, CONTEXT = 49152, 8192
LIMITS = RequestLimits.from_config(ShplbConfig())


@pytest.mark.parametrize("ids", [[1, 2, 49151], [[1, 2], [3]], [], None, "text", ["a", "b"]])
def test_token_ids_inside_vocabulary_pass(ids):
    assert token_ids_problem("prompt", ids, VOCAB) is None


@pytest.mark.parametrize("ids,bad", [([999999999, 5], "999999999"), ([5, -1], "-1"), ([[1, 2], [3, 49152]], "49152"),
                                     ([1, True], "True"), ([1.5], "1.5")])
def test_token_ids_outside_vocabulary_named(ids, bad):
    msg = token_ids_problem("prompt", ids, VOCAB)
    assert msg.startswith("prompt contains token id " + bad) and "[0, 49152)" in msg


def test_empty_prompt_in_a_batch_named():
    assert token_ids_problem("prompt", [[1001, 206], []], VOCAB) == \
        "prompt[1] is empty; every prompt of a batch needs at least one token"


def test_range_names_field_value_limit_and_flag():
    assert range_problem("logprobs", 5, 5, "--shplb-max-logprobs") is None
    assert range_problem("logprobs", None, 5, "--shplb-max-logprobs") is None
    msg = range_problem("logprobs", 100000, 5, "--shplb-max-logprobs")
    assert "logprobs=100000" in msg and "limit of 5" in msg and "--shplb-max-logprobs" in msg
    assert range_problem("top_logprobs", -1, 20, "x") == "top_logprobs must be at least 0, got -1"


def test_fan_out_bounds_n_and_total_tokens():
    assert fan_out_problem(128, 1024, "n", "max_tokens", CONTEXT, LIMITS) is None      # 131072: at the limit
    assert "n=129" in fan_out_problem(129, 1, "n", "max_tokens", CONTEXT, LIMITS)
    msg = fan_out_problem(100000, 16, "n", "max_tokens", CONTEXT, LIMITS)
    assert "n=100000" in msg and "limit of 128" in msg and "--shplb-max-n" in msg
    msg = fan_out_problem(64, 4096, "n", "max_tokens", CONTEXT, LIMITS)
    assert "262144 tokens" in msg and "131072" in msg and "--shplb-max-n-tokens" in msg
    # no max_tokens: the request may run to the end of the context
    assert fan_out_problem(16, None, "n", "max_tokens", CONTEXT, LIMITS) is None
    assert "unset" in fan_out_problem(17, None, "n", "max_tokens", CONTEXT, LIMITS)
    # n < 1: stock fans a batched prompt out to no request ids and fails with a 500
    assert fan_out_problem(0, 16, "n", "max_tokens", CONTEXT, LIMITS) == "n must be at least 1, got 0"
    assert "sampling_params.n must be at least 1, got -2" in generate_problem(
        {"text": ["a", "b"], "sampling_params": {"n": -2}}, VOCAB, CONTEXT, LIMITS)


def test_generate_body_single_and_batched():
    ok = {"input_ids": [[1, 2], [3, 4]], "return_logprob": True, "top_logprobs_num": [3, 20],
          "sampling_params": [{"n": 2, "max_new_tokens": 8}, {"stop_token_ids": [2]}]}
    assert generate_problem(ok, VOCAB, CONTEXT, LIMITS) is None
    assert "input_ids contains token id 99999999" in generate_problem(
        {"input_ids": [[1, 2], [3, 99999999]]}, VOCAB, CONTEXT, LIMITS)
    assert "top_logprobs_num=100000" in generate_problem({"text": "hi", "top_logprobs_num": 100000},
                                                        VOCAB, CONTEXT, LIMITS)
    assert "sampling_params.stop_token_ids contains token id 999999999" in generate_problem(
        {"text": "hi", "sampling_params": {"stop_token_ids": [999999999], "min_new_tokens": 2}}, VOCAB, CONTEXT, LIMITS)
    assert "sampling_params.n=100000" in generate_problem({"text": "hi", "sampling_params": {"n": 100000}},
                                                         VOCAB, CONTEXT, LIMITS)
    assert generate_problem([1, 2], VOCAB, CONTEXT, LIMITS) is None  # not an object: stock's contract refuses it


@pytest.mark.parametrize("field,value", [("max_n", 0), ("max_n_tokens", -1), ("max_logprobs", -1),
                                         ("max_top_logprobs", 2.5)])
def test_bad_limits_refused_at_start_up(field, value):
    with pytest.raises(ConfigError, match=f"--shplb-{field.replace('_', '-')}"):
        ShplbConfig(**{field: value})


def test_input_embeds_must_be_hidden_size_vectors():
    from sglang_shplb.sglang_adapter.request_limits import embeds_problem

    assert embeds_problem([[0.0] * 4, [1.0] * 4], 4) is None
    assert embeds_problem([[[0.0] * 4], [[1.0] * 4]], 4) is None  # batched
    assert "vector of 2 numbers" in embeds_problem([[0.1, 0.2]], 4)
    assert "has 4" not in embeds_problem([[[0.0] * 4], [[1.0] * 3]], 4)
    assert "vector of 0 numbers" in embeds_problem([[]], 4)
    assert "vector of 1 numbers" in embeds_problem([0.5, 0.5], 4)


def test_per_prompt_fields_must_be_scalars():
    from types import SimpleNamespace

    from sglang_shplb.sglang_adapter.request_limits import per_prompt_problem

    assert per_prompt_problem(SimpleNamespace(return_logprob=True, logprob_start_len=-1, top_logprobs_num=3)) is None
    msg = per_prompt_problem(SimpleNamespace(return_logprob=True, logprob_start_len=[], top_logprobs_num=3))
    assert msg.startswith("logprob_start_len must be an integer for each prompt, got []")


def test_grammar_with_min_tokens_or_ignore_eos_refused():
    from sglang_shplb.sglang_adapter.request_limits import grammar_problem

    assert grammar_problem({"regex": "(yes|no)", "min_new_tokens": 0}) is None
    assert grammar_problem({"min_new_tokens": 4, "ignore_eos": True}) is None  # no grammar: fine
    assert "min_new_tokens=4 cannot be combined with sampling_params.regex" in grammar_problem(
        {"regex": "(yes|no)", "min_new_tokens": 4})
    assert "ignore_eos" in grammar_problem({"json_schema": "{}", "ignore_eos": True})


def test_grammar_dead_end_named_only_for_stocks_grammar_abort():
    from sglang_shplb.sglang_adapter.request_limits import grammar_dead_end

    abort = {"type": "abort", "message": "Grammar accept_token failed: Tokens not accepted: 0", "status_code": 500}
    assert "the json_schema cannot be continued" in grammar_dead_end(abort, {"json_schema": "{}"})
    assert grammar_dead_end({**abort, "message": "Aborted"}, {"regex": "a"}) is None  # another abort: stock's
    assert grammar_dead_end({"type": "length"}, {"regex": "a"}) is None
