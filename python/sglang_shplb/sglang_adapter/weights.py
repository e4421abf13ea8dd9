"""Load-time head placement: every SGLang TP worker permutes attention heads as the plan says.

How the launcher uses it (stock SGLang, no source edits):
  1. Check the plan once:  plan = sglang_shplb.plan.load_plan(path);
                           sglang_shplb.plan.check_plan(plan, model_path, tp_size)
  2. Pass the config overrides the permuted weights need (only `q` granularity has any):
         overrides = plan_model_overrides(plan)      # e.g. {"num_key_value_heads": 9}
         if overrides: add `--json-model-override-args json.dumps({**user_overrides, **overrides})`
  3. Put the plan path in ShplbConfig (SGLANG_SHPLB_CONFIG); spawned workers inherit it.
Then `register_weight_hook()` (run by our plugin in every process) wraps
`LlamaForCausalLM.load_weights` / `Qwen2ForCausalLM.load_weights`: the iterator of full, unsharded
checkpoint tensors is rewritten (sglang_shplb.permute.HeadPermuter) before SGLang's weight loaders
cut each rank's contiguous shard, so rank r ends up holding exactly rank_units[r], in order.
A checkpoint already permuted offline (`python -m sglang_shplb.permute`) is recognized by its
config.json marker and passed through unchanged.
"""
from __future__ import annotations

import sys

from ..artifacts import ArtifactError
from ..config import ShplbConfig
from ..permute import HeadPermuter, model_overrides, rank_heads

TARGETS = ("sglang.srt.models.llama.LlamaForCausalLM.load_weights",
           "sglang.srt.models.qwen2.Qwen2ForCausalLM.load_weights")
_registered = False


def plan_model_overrides(plan) -> dict:
    """JSON for SGLang's --json-model-override-args that serving `plan` needs ({} if none).
    `plan` is a plan body or a plan file path."""
    if not isinstance(plan, dict):
        from ..plan import load_plan
        plan = load_plan(plan)
    return model_overrides(plan)


def _plan(path: str) -> dict:
    """The plan body, from the per-process artifact cache the backend's budget resolution uses."""
    from ..serving import artifact

    return artifact("plan", path).to_json()


def _log(msg: str) -> None:
    print(f"[sglang-shplb] {msg}", file=sys.stderr, flush=True)


def check_model_config(hf_config, plan: dict, tp_size: int) -> None:
    """Cheap per-worker check of the served config against the plan (the launcher has already
    matched the fingerprint); one sentence naming the fix."""
    want_kv = plan.get("served_num_kv_heads", plan["num_kv_heads"])
    have = (hf_config.num_hidden_layers, hf_config.num_attention_heads, hf_config.num_key_value_heads)
    if have[:2] != (plan["num_layers"], plan["num_q_heads"]):
        raise ArtifactError(f"plan is for {plan['num_layers']} layers x {plan['num_q_heads']} query heads but the "
                            f"model has {have[0]} x {have[1]}; re-run plan for this model")
    if have[2] != want_kv:
        raise ArtifactError(f"plan ({plan['granularity']} granularity) needs num_key_value_heads={want_kv} but the "
                            f"model config has {have[2]}; pass --json-model-override-args "
                            f"'{{\"num_key_value_heads\": {want_kv}}}' (see plan_model_overrides)")
    if plan["tp_size"] != tp_size:
        raise ArtifactError(f"plan was made for tp={plan['tp_size']} but this server runs tp={tp_size}; "
                            f"re-run `python -m sglang_shplb.plan --tp {tp_size}`")


def permuted_weights(hf_config, weights, plan: dict, tp_rank: int, tp_size: int):
    """The worker-side rewrite, testable without SGLang: returns the (name, tensor) iterator that
    SGLang's own load_weights should consume."""
    from ..plan import plan_id

    pid = plan_id(plan)
    marker = getattr(hf_config, "shplb_permuted", None)
    if marker is not None:
        if marker.get("plan_id") != pid:
            raise ArtifactError(f"checkpoint was permuted for plan {marker.get('plan_id')}, not plan {pid}; "
                                "serve the original checkpoint with this plan")
        q, kv = rank_heads(plan, 0, tp_rank)
        _log(f"tp_rank={tp_rank} layer-0 heads q={q} kv={kv} (plan {pid}, checkpoint already permuted)")
        return weights
    # for the check, the config's kv heads are what the (overridden) server allocates
    check_model_config(hf_config, plan, tp_size)
    q, kv = rank_heads(plan, 0, tp_rank)
    _log(f"tp_rank={tp_rank} layer-0 heads q={q} kv={kv} (plan {pid})")
    return HeadPermuter(plan).iterate(weights)


def tp_rank_size() -> tuple[int, int]:
    """This worker's (tp_rank, tp_size), as the model's own sharding sees them."""
    try:
        from sglang.srt.runtime_context import get_parallel   # 0.5.23: what LlamaAttention reads
        return get_parallel().tp_rank, get_parallel().tp_size
    except ImportError:
        from sglang.srt.distributed.parallel_state import (get_tensor_model_parallel_rank,
                                                           get_tensor_model_parallel_world_size)
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def load_weights_around(original, model, weights, *args, **kwargs):
    """AROUND hook for `<Model>ForCausalLM.load_weights(self, weights)`."""
    path = ShplbConfig.from_env().plan
    if not path:
        return original(model, weights, *args, **kwargs)
    rank, size = tp_rank_size()
    return original(model, permuted_weights(model.config, weights, _plan(path), rank, size), *args, **kwargs)


def _wrap_plain(target: str) -> None:
    """Fallback when SGLang has no HookRegistry: patch the class attribute ourselves."""
    import functools
    import importlib

    module, cls_name, attr = target.rsplit(".", 2)
    cls = getattr(importlib.import_module(module), cls_name)
    original = getattr(cls, attr)
    if getattr(original, "_shplb_wrapped", False):
        return

    @functools.wraps(original)
    def wrapper(self, weights, *args, **kwargs):
        return load_weights_around(original, self, weights, *args, **kwargs)

    wrapper._shplb_wrapped = True
    setattr(cls, attr, wrapper)


def register_weight_hook() -> None:
    """Idempotent; does nothing unless a plan is configured (then SGLang applies the hooks right
    after loading plugins, in every process, before any model is built)."""
    global _registered
    if _registered or not ShplbConfig.from_env().plan:
        return
    _registered = True
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError:
        for target in TARGETS:
            try:
                _wrap_plain(target)
            except (ImportError, AttributeError) as e:
                _log(f"cannot hook {target}: {e}")
        return
    for target in TARGETS:
        HookRegistry.register(target, load_weights_around, HookType.AROUND)
