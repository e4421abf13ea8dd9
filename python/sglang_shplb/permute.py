"""Apply a plan to checkpoint tensors: permute (and for `q` granularity expand) attention heads.

    python -m sglang_shplb.permute --model M --plan P --out DIR [--force]

SGLang shards heads contiguously: rank r holds query heads [r*Hq/tp, (r+1)*Hq/tp) and the KV heads
of those groups. Reordering heads in the checkpoint therefore decides which rank gets which head.
New head position j holds original head order[j], where order = concat(plan rank_units):
  kv granularity  units are KV heads: kv_order = units, q_order = each unit's whole query group;
  q  granularity  units are query heads: q_order = units, kv_order = the group KV head of each
                  (GQA expanded to MHA: every query head gets its own copy of its group's K/V).
Rows of q/k/v_proj (and biases) move by head blocks, columns of o_proj with the query heads. RoPE
and softmax act per head, so the model computes exactly the same function.

The same math runs at load time in every SGLang TP worker (sglang_adapter/weights.py) and
offline here, which writes a new HF checkpoint (atomically: temp dir, then rename).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .artifacts import ArtifactError, model_shape

ATTN_RE = re.compile(r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj|qkv_proj)\.(\w+)$")
SKIP_FILES = {"shplb_manifest.json"}   # cache bookkeeping of the source, stale in a new checkpoint


def layer_orders(plan: dict, layer: int) -> tuple[list[int], list[int]]:
    """(q_order, kv_order) of one layer: new head j holds original head order[j]."""
    units = [u for r in plan["layers"][layer]["rank_units"] for u in r]
    g = plan["num_q_heads"] // plan["num_kv_heads"]
    if plan["granularity"] == "kv":
        return [u * g + i for u in units for i in range(g)], units
    return units, [q // g for q in units]


def rank_heads(plan: dict, layer: int, tp_rank: int) -> tuple[list[int], list[int]]:
    """Original (q heads, kv heads) that `tp_rank` holds in `layer` (for logs)."""
    q_order, kv_order = layer_orders(plan, layer)
    tp = plan["tp_size"]
    nq, nkv = len(q_order) // tp, len(kv_order) // tp
    return q_order[tp_rank * nq:(tp_rank + 1) * nq], kv_order[tp_rank * nkv:(tp_rank + 1) * nkv]


def model_overrides(plan: dict) -> dict:
    """HF config overrides the permuted weights need (SGLang: --json-model-override-args)."""
    return {"num_key_value_heads": plan["num_q_heads"]} if plan["granularity"] == "q" else {}


def _take_heads(t: torch.Tensor, order: list[int], n_heads: int, dim: int, name: str) -> torch.Tensor:
    """Reorder (and possibly repeat) `n_heads` equal blocks of `t` along `dim`."""
    size = t.shape[dim]
    if size % n_heads:
        raise ArtifactError(f"tensor {name} has {size} entries along dim {dim}, not a multiple of {n_heads} "
                            "heads; the plan was made for another model")
    blocks = t.unflatten(dim, (n_heads, size // n_heads))
    return blocks.index_select(dim, torch.tensor(order)).flatten(dim, dim + 1).contiguous()


class HeadPermuter:
    """Rewrites full (unsharded) checkpoint tensors by name; all other tensors pass through."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.orders = [layer_orders(plan, l) for l in range(plan["num_layers"])]
        self.identity = [q == list(range(len(q))) and kv == list(range(plan["num_kv_heads"])) for q, kv in self.orders]

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        m = ATTN_RE.search(name)
        if m is None:
            return t
        layer, proj, kind = int(m.group(1)), m.group(2), m.group(3)
        if proj == "qkv_proj":
            raise ArtifactError(f"checkpoint tensor {name} is a fused qkv_proj; head permutation supports "
                                "separate q/k/v_proj checkpoints only")
        if kind not in ("weight", "bias"):
            raise ArtifactError(f"checkpoint tensor {name} ({kind}) cannot be head-permuted; use an "
                                "unquantized checkpoint or serve without a plan")
        if layer >= len(self.orders):
            raise ArtifactError(f"checkpoint tensor {name} is beyond the plan's {len(self.orders)} layers; "
                                "the plan was made for another model")
        if self.identity[layer]:
            return t
        q_order, kv_order = self.orders[layer]
        if proj == "o_proj":   # columns follow the query heads; the bias is per output feature
            return t if kind == "bias" else _take_heads(t, q_order, self.plan["num_q_heads"], 1, name)
        if proj == "q_proj":
            return _take_heads(t, q_order, self.plan["num_q_heads"], 0, name)
        return _take_heads(t, kv_order, self.plan["num_kv_heads"], 0, name)

    def iterate(self, weights):
        """Wrap an iterator of (name, tensor) pairs, as SGLang's load_weights receives it."""
        for name, t in weights:
            yield name, self(name, t)


# ---------------------------------------------------------------- offline checkpoint
def permute_checkpoint(model_dir, plan: dict, out_dir, force: bool = False) -> Path:
    """Write the permuted checkpoint of `model_dir` under `plan` to `out_dir`; returns out_dir."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .plan import check_plan, permuted_marker, plan_id

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if permuted_marker(model_dir) is not None:
        raise ArtifactError(f"{model_dir} is already a permuted checkpoint; permute the original one")
    check_plan(plan, model_dir, plan["tp_size"])
    if out_dir.exists() and not force:
        raise ArtifactError(f"--out {out_dir} already exists; remove it, choose another path or pass --force")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        perm = HeadPermuter(plan)
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(f, framework="pt") as st:
                meta = st.metadata() or {"format": "pt"}
                tensors = {k: perm(k, st.get_tensor(k)) for k in st.keys()}
            save_file(tensors, tmp / f.name, metadata=meta)
            del tensors
        for f in model_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in SKIP_FILES and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg.update(model_overrides(plan))
        cfg["shplb_permuted"] = {"plan_id": plan_id(plan), "source_fingerprint": plan["model_fingerprint"],
                                 "source_shape": model_shape(model_dir), "granularity": plan["granularity"],
                                 "tp_size": plan["tp_size"]}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tmp.chmod(0o755)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; an existing out_dir (--force) is moved aside first, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from .plan import load_plan

    p = argparse.ArgumentParser(prog="python -m sglang_shplb.permute", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="original HF checkpoint (default: the prepared default model)")
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        if args.model is None:
            from .models import prepare_model
            args.model = str(prepare_model())
        if not (Path(args.model) / "config.json").is_file():
            raise ArtifactError(f"--model {args.model} is not an HF checkpoint directory (no config.json)")
        plan = load_plan(args.plan)
        out = permute_checkpoint(args.model, plan, args.out, args.force)
    except (ArtifactError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra = f"; its config.json has {model_overrides(plan)} (GQA expanded)" if model_overrides(plan) else ""
    print(f"wrote {out}: heads permuted for {plan['granularity']} plan at tp={plan['tp_size']}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
