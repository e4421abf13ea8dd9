"""benchmark/near_ties.py: which answer tokens it reads, and the lead it reports for them."""
from types import SimpleNamespace


def test_answer_span_ends_at_the_last_expected_value(model_path):
    from near_ties import answer_span
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(":\n\n1. 555186\n2. 169009\n3. and more words", add_special_tokens=False).input_ids
    span = answer_span(tok, ids, ("169009", "555186"))
    assert tok.decode(ids[:span]) == ":\n\n1. 555186\n2. 169009"
    assert answer_span(tok, ids, ("424242",)) == len(ids)      # no value found: the whole answer counts


def test_leads_follow_dense_greedy_from_the_prompts_last_position(model_path):
    """On a tiny random Llama with the real tokenizer: the answer is greedy, the first lead is the top-1 logit over
    the second at the prompt's last position, and no lead is negative."""
    import torch
    from near_ties import leads
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    task = SimpleNamespace(prompt=lambda t: "The special number is", answers=())
    prompt = tok(task.prompt(tok), add_special_tokens=False).input_ids
    got = leads(model, tok, task, max_tokens=6)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):      # greedy without a cache: the answer and the leads must match
            top2 = model(input_ids=torch.tensor([ids])).logits[0, -1].topk(2)
            ids.append(int(top2.indices[0]))
            if len(ids) == len(prompt) + 1:
                first = float(top2.values[0] - top2.values[1])
    assert got["output"] == tok.decode(ids[len(prompt):], skip_special_tokens=True)
    assert len(got["leads"]) == 6 and abs(got["leads"][0] - first) < 1e-4 and got["min"] >= 0
