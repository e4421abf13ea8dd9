"""Stage 1 — profile: per-head sparsity elasticity of a real model on calibration text.

    python -m sglang_shplb.profile --model PATH --out PROFILE.safetensors
        [--context-len 4096] [--windows 2] [--queries 32] [--page-size 16] [--corpus canterbury]

Runs the model (HF transformers) over calibration windows. Inside every attention layer, for a
sample of query positions, it computes the exact softmax and records, on a grid of budgets (fraction
of the query's context, at page granularity), the recovery ratio (share of softmax mass kept) for:
  * oracle  — the top pages by true mass;
  * runtime — our backend's selector (`selection.choose_pages`, `--selector`, default the server's);
per (layer, query head) and per (layer, KV group) (a group shares one page selection). Only the
sampled queries' scores are formed ([heads, queries, L]), never L x L, so 8k context stays small.
Plus `prefill_kv`: the block-sparse prefill selector (sparse_prefill.py: sink + diagonal window +
top pages by the served default page estimate, per 64-query block and KV group) on a few sampled query blocks,
against the block's true page mass (`--prefill-blocks`, 0 to skip). Profiles without it stay valid.
Plus the label-channel calibration (Double Sparsity): mean |q| per query head and mean |k| per KV head
and channel over every token (`label_q_abs` [L, Hq, D], `label_k_abs` [L, Hkv, D]), from a first dense
pass; a label runtime selector is profiled with the channels they give (`Profile.label_channels`), and
budgets and plans carry those channels to the server. Profiles without them serve the uncalibrated selector.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import recovery
from . import selection as sel
from .sparse_prefill import DEFAULT_ESTIMATE, QUERY_BLOCK, block_recovery
from .artifacts import (ArtifactError, SCHEMA_VERSION, atomic_write_bytes, check_fingerprint, check_schema,
                        model_fingerprint)

BUDGET_GRID = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
SELECTORS = ("oracle", "runtime")
CURVES = tuple(f"{s}_{g}" for s in SELECTORS for g in ("q", "kv"))  # e.g. runtime_kv [L, Hkv, G]
DENSE_BUDGET90 = 0.25  # a head needing >25% of its context for 90% mass is flagged dense


@dataclass
class Profile:
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def grid(self) -> torch.Tensor:
        return self.tensors["budget_grid"]

    def curves(self, selector: str = "runtime", granularity: str = "kv", metric: str = "total") -> torch.Tensor:
        """Recovery [layers, units, grid] for a selector ('oracle'|'runtime') and unit ('q'|'kv').
        metric 'total' is the paper's share of all softmax mass kept; 'sinkless' is the share of
        the mass outside the always-kept sink pages. A head that parks 85% of its mass on the sink
        scores 0.9 'total' while losing most of what it reads; 'sinkless' sees that."""
        key = f"{selector}_{granularity}"
        if key not in self.tensors:
            raise ArtifactError(f"profile has no {key} curves (prefill curves need a profile made with "
                                "--prefill-blocks > 0 by this version); re-run `python -m sglang_shplb.profile`")
        c = self.tensors[key]
        if metric == "total":
            return c
        if metric != "sinkless":
            raise ValueError(f"unknown recovery metric {metric!r}; use 'total' or 'sinkless'")
        sink = self.tensors[f"sink_mass_{key}" if selector == "prefill" else f"sink_mass_{granularity}"].unsqueeze(-1)
        return ((c - sink) / (1 - sink).clamp(min=1e-6)).clamp(0, 1)

    def label_channels(self, granularity: str = "kv") -> torch.Tensor | None:
        """Calibrated label channels per unit, best first: [layers, units, min(LABEL_RANK, D)] (selection.
        label_channels: a KV group ranks by its query heads' summed mean |q| x mean |k|, a query head by its
        own), or None for a profile made before label calibration."""
        if "label_q_abs" not in self.tensors:
            return None
        qa, ka = self.tensors["label_q_abs"].float(), self.tensors["label_k_abs"].float()
        L, Hkv, D = ka.shape
        r = min(sel.LABEL_RANK, D)
        if granularity == "kv":
            return sel.label_channels(qa.view(L, Hkv, -1, D), ka, r)
        return sel.label_channels(qa.unsqueeze(-2), ka.repeat_interleave(qa.shape[1] // Hkv, 1), r)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save

        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        data = save(tensors, metadata={"shplb": json.dumps(self.meta), "shplb_sha256": tensors_sha256(tensors)})
        atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> "Profile":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"profile file {path} does not exist")
        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                meta = json.loads(header.get("shplb", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, ValueError, OSError) as e:
            raise ArtifactError(f"profile file {path} is corrupt or not safetensors ({e}); regenerate it") from None
        if not isinstance(meta, dict):
            raise ArtifactError(f"{path} is not a shplb profile (no 'shplb' metadata)")
        if header.get("shplb_sha256") != tensors_sha256(tensors):
            raise ArtifactError(f"profile file {path} fails its checksum (edited, damaged or written by an older "
                                "version); regenerate it with `python -m sglang_shplb.profile`")
        check_schema(meta.get("schema"), "profile", path)
        check_fingerprint(meta, fingerprint, "profile", path)
        missing = [k for k in (*CURVES, "budget_grid") if k not in tensors]
        if missing:
            raise ArtifactError(f"profile file {path} lacks tensors {missing}; regenerate it")
        return cls(meta, tensors)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Checksum over names and bytes (safetensors has none of its own): a flipped byte is refused."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class _Collector:
    """Accumulates per-layer statistics from inside the attention call."""
    page_size: int
    sink: int
    recent: int
    n_queries: int
    grid: torch.Tensor
    prefill_blocks: int = 4
    rule: sel.Selector = sel.SELECTORS[sel.DEFAULT_SELECTOR]
    sums: dict = field(default_factory=dict)
    count: int = 0
    calibrating: bool = False       # first pass: only the label statistics
    channels: dict = field(default_factory=dict)     # layer -> [Hkv, r] label channels (second pass)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if self.calibrating:
            self.calibrate(module.layer_idx, query[0], key[0])
        else:
            self.observe(module.layer_idx, query[0], key[0], scaling or module.scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

    @torch.no_grad()
    def calibrate(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Mean |q| [Hq, D] and mean |k| [Hkv, D] over the window's tokens (after RoPE)."""
        for name, x in (("label_q_abs", q), ("label_k_abs", k)):
            acc = self.sums.setdefault(name, {})
            acc[layer] = acc.get(layer, 0) + x.float().abs().mean(1).cpu()

    @torch.no_grad()
    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        """q [Hq, L, D], k [Hkv, L, D] (after RoPE)."""
        Hq, L, D = q.shape
        Hkv, P = k.shape[0], self.page_size
        pos = torch.linspace(L // 2, L - 1, self.n_queries).long().unique().to(q.device)
        qs = q[:, pos].float().view(Hkv, Hq // Hkv, len(pos), D)              # [Hkv, g, S, D]
        logits = torch.einsum("hgsd,hld->hgsl", qs, k.float()) * scale
        logits.masked_fill_(torch.arange(L, device=q.device) > pos[:, None], float("-inf"))
        probs = logits.softmax(-1)
        n = -(-L // P)
        page_mass = torch.nn.functional.pad(probs, (0, n * P - L)).unflatten(-1, (n, P)).sum(-1)
        group_mass = page_mass.mean(1)                                         # [Hkv, S, N]
        n_pages = pos // P + 1                                                 # [S]
        # budgets are fractions of this window's context (ref), as the server applies them to any length; the
        # queries sit at or below ref, where each head keeps its share of the selectable pages whatever the mean
        k_pages = sel.pages_for_budget(self.grid[None, :].double(), n_pages[:, None].double(), self.sink + self.recent,
                                       sel.BudgetRef(-(-L // P), 1.0))

        kmin, kmax = sel.page_minmax(k, P)                                     # [Hkv, N, D]
        ch = self.channels.get(layer)                                          # [Hkv, r] (label selectors)
        fine = recovery.stage2_inputs(self.rule, k, P, ch)                          # each [Hkv, N, X, D or r]
        g, S = qs.shape[1], len(pos)

        def runtime(mass, q, lead):  # the shipping selector; lead = dims before the (S, G, D) query rows
            view = lambda t: t.view(Hkv, *([1] * lead), *t.shape[1:])  # noqa: E731
            rows = (Hkv, *([g] * (lead - 1)), S)
            return recovery.selector_recovery(self.rule, mass, q, view(kmin), view(kmax), tuple(map(view, fine)),
                                         n_pages.expand(rows), k_pages.expand(*rows, -1), self.sink, self.recent,
                                         None if ch is None else view(ch), (pos + 1).expand(rows))
        curves = {  # each [Hkv, (g,) S, G] -> mean over sampled queries
            "oracle_q": recovery.recovery_curve(page_mass, page_mass.argsort(-1, descending=True), k_pages),
            "oracle_kv": recovery.recovery_curve(group_mass, group_mass.argsort(-1, descending=True), k_pages),
            "runtime_q": runtime(page_mass, qs.unsqueeze(-2), 2),              # each q head selects alone
            "runtime_kv": runtime(group_mass, qs.transpose(1, 2), 1),
        }
        stats = {name: v.mean(-2) for name, v in curves.items()}
        stats["sink_mass_q"] = page_mass[..., : self.sink].sum(-1).mean(-1)
        stats["sink_mass_kv"] = group_mass[..., : self.sink].sum(-1).mean(-1)
        if self.prefill_blocks and L >= 2 * QUERY_BLOCK:
            starts = torch.linspace(L // 2, L - QUERY_BLOCK, self.prefill_blocks).long().tolist()
            stats["prefill_kv"], stats["sink_mass_prefill_kv"] = block_recovery(
                q, k, scale, self.grid, P, self.sink, self.recent, starts, estimate=DEFAULT_ESTIMATE)
        for name, v in stats.items():
            v = v.flatten(0, 1) if name.endswith("_q") else v                  # q heads in model order
            acc = self.sums.setdefault(name, {})
            acc[layer] = acc.get(layer, 0) + v.cpu()


def token_windows(tokenizer, files: list[Path], context_len: int, windows: int) -> list[torch.Tensor]:
    ids: list[int] = []
    for f in files:
        ids += tokenizer(f.read_text(errors="replace")).input_ids
    if len(ids) < windows * context_len:
        raise ArtifactError(f"corpus has {len(ids)} tokens, fewer than --windows {windows} x --context-len "
                            f"{context_len}; use fewer/shorter windows or a longer corpus")
    starts = torch.linspace(0, len(ids) - context_len, windows).long().tolist()
    return [torch.tensor(ids[s: s + context_len]) for s in starts]


def budget90(curves: torch.Tensor, grid: torch.Tensor, target: float = 0.9) -> torch.Tensor:
    """Smallest budget (linear interpolation on the grid) reaching `target` recovery. [..., G] -> [...]"""
    from .curves import invert_curves

    return invert_curves(curves, grid, torch.full(curves.shape[:-1], target))


def run_profile(model_path: str | Path, corpus: str = "canterbury", context_len: int = 4096, windows: int = 2,
                queries: int = 32, page_size: int = 16, sink_pages: int = 1, recent_pages: int = 2,
                progress: bool = True, prefill_blocks: int = 4, selector: str = sel.DEFAULT_SELECTOR) -> Profile:
    from tqdm import tqdm
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from .models import corpus_files

    files = corpus_files(corpus)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = token_windows(tokenizer, files, context_len, windows)
    grid = torch.tensor(BUDGET_GRID)
    col = _Collector(page_size, sink_pages, recent_pages, queries, grid, prefill_blocks, sel.get_selector(selector))
    AttentionInterface.register("shplb_profile", col)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="shplb_profile").to(device).eval()
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        col.calibrating = True      # pass 1: label statistics (a label runtime selector needs its channels)
        for ids in tqdm(texts, desc="calibrate label channels", disable=not progress):
            model.model(ids[None].to(device), use_cache=False)  # base model: no lm_head logits
        col.calibrating = False
        label = {name: torch.stack([acc[i] for i in range(layers)]) / len(texts)
                 for name, acc in ((n, col.sums.pop(n)) for n in ("label_q_abs", "label_k_abs"))}
        if col.rule.label:
            chans = Profile({}, label).label_channels("kv")[..., : col.rule.keys]
            col.channels = {i: chans[i].to(device) for i in range(layers)}
        for ids in tqdm(texts, desc="profile windows", disable=not progress):
            model.model(ids[None].to(device), use_cache=False)
    tensors = {name: torch.stack([acc[i] for i in range(layers)]) / len(texts) for name, acc in col.sums.items()}
    tensors.update(label)
    tensors["budget_grid"] = grid
    # A two-stage selection is not nested in k (its shortlist is c*k), so its mean recovery can dip
    # slightly as the budget grows; budgeting inverts the curves and needs them monotone. Record the
    # running max and how much it lifted (meta "runtime_dip").
    dip = 0.0
    for name in ("runtime_q", "runtime_kv"):
        lifted = tensors[name].cummax(-1).values
        dip = max(dip, float((lifted - tensors[name]).max()))
        tensors[name] = lifted
    tensors["budget90_q"] = budget90(tensors["oracle_q"], grid)
    tensors["dense_q"] = (tensors["budget90_q"] >= DENSE_BUDGET90).to(torch.uint8)
    tensors["budget90_kv"] = budget90(tensors["oracle_kv"], grid)
    tensors["dense_kv"] = (tensors["budget90_kv"] >= DENSE_BUDGET90).to(torch.uint8)
    meta = {
        "schema": f"shplb.profile/v{SCHEMA_VERSION}", "model_fingerprint": model_fingerprint(model_path),
        "model": Path(model_path).name, "num_layers": layers, "num_q_heads": model.config.num_attention_heads,
        "num_kv_heads": model.config.num_key_value_heads, "page_size": page_size, "sink_pages": sink_pages,
        "recent_pages": recent_pages, "context_lens": [context_len], "windows": windows, "queries": queries,
        "corpus": [f.name for f in files], "selectors": {"oracle": "top pages by true softmax mass",
                                                         "runtime": f"selection.choose_pages, selector {selector}",
                                                         "prefill": f"per {QUERY_BLOCK}-query block: sink + window "
                                                                    f"pages, then by the {DEFAULT_ESTIMATE} estimate"},
        "runtime_selector": selector, "runtime_dip": dip, "prefill_blocks": prefill_blocks,
        "prefill_estimate": DEFAULT_ESTIMATE,
        "budget_grid": list(BUDGET_GRID),
        "budget_rule": "selection.pages_for_budget: sink+recent + ceil(f*(pages-sink-recent)), "
                       "f = (b*ref - sink - recent)/(ref - sink - recent), ref = the context's pages (queries at or "
                       "below ref; beyond it the mean read is kept at the mean budget)",
    }
    return Profile(meta, tensors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_shplb.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint directory (default: the prepared default model)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--context-len", type=int, default=4096)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--queries", type=int, default=32, help="sampled query positions per window")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--sink-pages", type=int, default=1)
    p.add_argument("--recent-pages", type=int, default=2)
    p.add_argument("--prefill-blocks", type=int, default=4, help="query blocks sampled per window for the "
                   "prefill selector curve (0: none)")
    p.add_argument("--selector", default=sel.DEFAULT_SELECTOR, choices=sorted(sel.SELECTORS),
                   help="runtime decode selector whose curves are recorded (the server's --shplb-selector)")
    p.add_argument("--corpus", default="canterbury", help="'canterbury', one of its texts, or comma-separated files")
    args = p.parse_args(argv)
    for name in ("context_len", "windows", "queries", "page_size", "recent_pages"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.prefill_blocks < 0:
        p.error("--prefill-blocks must be >= 0")
    try:
        if args.model is None:
            from .models import prepare_model
            args.model = str(prepare_model())
        prof = run_profile(args.model, args.corpus, args.context_len, args.windows, args.queries,
                           args.page_size, args.sink_pages, args.recent_pages, prefill_blocks=args.prefill_blocks,
                           selector=args.selector)
        prof.save(args.out)
    except (ArtifactError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    b90 = prof.tensors["budget90_kv"]
    print(f"wrote {args.out}: {prof.meta['num_layers']} layers; KV-group budget for 90% mass "
          f"median {b90.median():.3f}, max {b90.max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
