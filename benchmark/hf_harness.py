"""The HF SmolLM2 fp32 model behind quality.py's SparseAttention, set up as the server serves: the in-process
studies (prefill_needle.py, layer_sensitivity.py) and their tests load it here."""
import torch

from quality import SparseAttention  # noqa: F401  (the harness these helpers set up)

from sglang_shplb import selection as sel
from sglang_shplb.models import prepare_model


def load_hf_model(attn, name: str):
    """(tokenizer, HF SmolLM2 fp32 model) whose every attention call goes through `attn`, registered as `name`."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    AttentionInterface.register(name, attn)
    md = prepare_model()
    model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32, attn_implementation=name).eval()
    return AutoTokenizer.from_pretrained(md), model


def decode_as_served(attn: "SparseAttention", prof, budgets: torch.Tensor) -> None:
    """The default decode selector as the server runs it: the profile's label channels (the label cache's) and
    the page counts of `budgets` [L, Hkv] at the profile's context."""
    ch = prof.label_channels("kv")
    r = sel.get_selector(sel.DEFAULT_SELECTOR).keys
    attn.channels = {layer: ch[layer, :, :r] for layer in range(ch.shape[0])}
    attn.budget_ref = sel.BudgetRef.of(budgets, -(-prof.meta["context_lens"][0] // prof.meta["page_size"]))
