"""How much does one layer's sparse attention move the model's output, on the profile's own texts?

    OMP_NUM_THREADS=1 python benchmark/layer_sensitivity.py [--context 4096] [--windows 2] [--mean 0.1] \
        [--phase prefill|decode] [--probe prose|copy] [--only-window W | --render]

The profile's windows (Canterbury, cut as `python -m sglang_shplb.profile` cuts them) go through the HF SmolLM2
fp32 model with only layer l sparse, every other layer dense (SDPA), for each l, and with every layer sparse:
  * --phase prefill: the served block-sparse prefill (`sparse_prefill.select_prefill_pages`, the default's
    per-KV-group prefill budgets at --mean, served dense tail) over the whole window;
  * --phase decode: prefill dense, the window's last SPAN positions through the served decode selector at the
    default's decode budgets (quality.py's per-query selection).
Probes (--probe):
  * prose: the window as it is. Scored over its second half and over its last SPAN positions;
  * copy: the window's last SPAN tokens replaced by a copy of SPAN tokens from its middle, so predicting them
    needs what a retrieval answer needs: finding and copying a span thousands of tokens back. Scored over the
    copy (the last SPAN positions).
Score: KL(dense || variant) of the next-token distributions. Only calibration text is used, never a retrieval
prompt, so what this finds may set budgets (layer_weighted.py) without tuning to the prompts it is judged on.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from common import PROFILE, kv_budgets, write_result  # noqa: E402
from hf_harness import decode_as_served, load_hf_model  # noqa: E402
from quality import SparseAttention  # noqa: E402

from sglang_shplb.models import corpus_files  # noqa: E402
from sglang_shplb.profile import Profile, token_windows  # noqa: E402

RESULTS = ROOT / "benchmark" / "results"
SPAN = 512


class OneLayerSparse(SparseAttention):
    """quality.py's served paths for the layers in `sparse`; SDPA (dense) for every other layer. With a KV cache
    (decode phase: the dense prompt cached once, the last SPAN tokens run on it) the sparse layers select pages
    per query as the decode selector does."""

    sparse: set = set()

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        T, n = query.shape[2], key.shape[2]
        if T == n:
            if module.layer_idx not in self.sparse:
                return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
            return super().__call__(module, query, key, value, attention_mask, scaling=scaling, **kw)
        if module.layer_idx not in self.sparse:   # on a cache: the causal mask offset by the cached length
            mask = torch.arange(n).view(1, n) <= torch.arange(n - T, n).view(T, 1)
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=scaling or module.scaling, enable_gqa=True)
            return out.transpose(1, 2), None
        self.layer = module.layer_idx
        q = torch.nn.functional.pad(query[0], (0, 0, n - T, 0))          # rows before n - T are never read
        out = self.attend(q, key[0], value[0], self.budgets[self.layer], scaling or module.scaling, start=n - T)
        return out[:, n - T:].transpose(0, 1).unsqueeze(0), None


def kl_rows(ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || logits) per position, [T]."""
    lp, lq = ref.log_softmax(-1), logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def probe_ids(ids: torch.Tensor, probe: str) -> torch.Tensor:
    """The window as scored: as it is (prose), or its last SPAN tokens a copy of SPAN tokens from its middle."""
    if probe == "prose":
        return ids
    mid = len(ids) // 2 - SPAN
    return torch.cat([ids[:-SPAN], ids[mid: mid + SPAN]])


def store_path(args, w: int) -> Path:
    return RESULTS / "raw" / f"layer_sensitivity.{args.phase}.{args.probe}.{args.context}.w{w}.json"


def out_path(args) -> Path:
    return RESULTS / f"layer_sensitivity_{args.phase}_{args.probe}.md"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--mean", type=float, default=0.1)
    p.add_argument("--phase", choices=("prefill", "decode"), default="prefill")
    p.add_argument("--probe", choices=("prose", "copy"), default="prose")
    p.add_argument("--only-window", type=int, default=None,
                   help="run this window alone and store its scores (one process per core); --render merges them")
    p.add_argument("--render", action="store_true", help="merge the stored windows into the result; run nothing")
    args = p.parse_args()
    if args.probe == "copy" and args.context < 2 * SPAN:
        p.error(f"--probe copy needs --context >= {2 * SPAN}: the {SPAN}-token copy comes from the window's middle")
    if not args.render:
        measure(args)
    if args.render or args.only_window is None:
        render(args, [json.loads(store_path(args, w).read_text()) for w in range(args.windows)])


def measure(args) -> None:
    torch.set_num_threads(1)
    prof = Profile.load(PROFILE)
    attn = OneLayerSparse(prof.meta["page_size"], prof.meta["sink_pages"], prof.meta["recent_pages"], "prefill")
    tok, model = load_hf_model(attn, "shplb_layer_sensitivity")
    served = torch.tensor(kv_budgets("optimal", args.mean, phase=args.phase)["budgets"])   # [L, Hkv]
    L = served.shape[0]
    if args.phase == "decode":
        decode_as_served(attn, prof, served)
    texts = token_windows(tok, corpus_files("canterbury"), args.context, args.windows)
    half = args.context // 2

    attn.budgets = attn.prefill_budgets = served

    def logits(ids, layers, cache=None):
        attn.sparse = set(layers)
        with torch.no_grad():
            if cache is None:
                return model(ids[None]).logits[0, half:]
            out = model(ids[None, -SPAN:], past_key_values=cache, use_cache=True).logits[0]
            cache.crop(-SPAN)   # back to the dense prompt for the next setting
            return out

    for w, ids in enumerate(texts):
        if args.only_window not in (None, w):
            continue
        ids = probe_ids(ids, args.probe)
        cache = None
        if args.phase == "decode":   # the prompt is dense whatever the layer: run it once
            with torch.no_grad():
                cache = model(ids[None, :-SPAN], use_cache=True).past_key_values
        ref = logits(ids, [], cache)
        scores = {}
        for name, layers in [("all", range(L))] + [(f"alone/{layer}", [layer]) for layer in range(L)]:
            t = time.time()
            kl = kl_rows(ref, logits(ids, layers, cache))
            scores[name] = [float(kl.mean()), float(kl[-SPAN:].mean())]
            store_path(args, w).write_text(json.dumps({"budgets": served.tolist(), **scores}))
            print(w, name, *(f"{x:.5f}" for x in scores[name]), f"({time.time() - t:.0f}s)", flush=True)


def render(args, windows: list[dict]) -> None:
    served = torch.tensor(windows[0]["budgets"])
    acc = {k: [sum(w[k][i] for w in windows) / len(windows) for i in (0, 1)] for k in windows[0] if k != "budgets"}
    rows = [f"| layer | {args.phase} budget, layer mean | KL, only this layer sparse: second half / last {SPAN} | "
            "share of the sum over layers (last span) |", "|---|---|---|---|"]
    total = sum(acc[f"alone/{layer}"][1] for layer in range(served.shape[0]))
    for layer in range(served.shape[0]):
        a = acc[f"alone/{layer}"]
        rows.append(f"| {layer} | {float(served[layer].mean()):.3f} | {a[0]:.5f} / {a[1]:.5f} | {a[1] / total:.1%} |")
    rows.append(f"| every layer sparse | {float(served.mean()):.3f} | {acc['all'][0]:.5f} / {acc['all'][1]:.5f} | |")
    probe = ("the window as it is" if args.probe == "prose" else
             f"the window's last {SPAN} tokens a copy of {SPAN} tokens from its middle (scored: the copy)")
    how = (f"prefill dense, the last {SPAN} positions decoded sparse (the only ones that differ)"
           if args.phase == "decode" else "the served block-sparse prefill")
    write_result(out_path(args), f"Per-layer sensitivity of sparse {args.phase} on the profile's texts ({args.probe})",
                 f"SmolLM2 fp32 (HF), the profile's {args.windows} Canterbury windows of {args.context} tokens, "
                 f"{probe}; one layer at a time through {how} at the default's {args.phase} budgets (optimal at "
                 f"{args.mean}), every other layer dense. KL(dense || variant) of next-token distributions, mean "
                 f"over the window's second half and over its last {SPAN} positions. Stores: raw/"
                 f"{store_path(args, 0).name.replace('.w0', '.w*')}.", rows,
                 f"OMP_NUM_THREADS=1 python benchmark/layer_sensitivity.py --context {args.context} "
                 f"--windows {args.windows} --mean {args.mean} --phase {args.phase} --probe {args.probe}")


if __name__ == "__main__":
    main()
