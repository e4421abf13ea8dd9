"""Shared fixtures: the real default model, the corpus, and a real server started through our
launcher in its own process group (always torn down, even when a test fails)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sglang_shplb.models import prepare_corpus, prepare_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
from harness import STARTUP_TIMEOUT_S, Server, free_port  # noqa: E402,F401  (re-exported to the tests)


def pytest_sessionstart(session):
    """Prepare the model and corpus once, before `make test`'s xdist workers start (each would otherwise
    convert the checkpoint on a fresh machine, racing to move it into place)."""
    if not hasattr(session.config, "workerinput"):
        prepare_model()
        prepare_corpus()


# `make test` runs whole files on two workers (--dist loadfile --no-loadscope-reorder) in this order: the longest
# first (their --durations), so that no long server file starts last while the other worker sits idle. xdist's own
# reorder (most tests first) started the few-test server files last. Other files keep their collection order.
LONGEST_FIRST = ("test_backend_server.py", "test_gpu_offline.py", "test_serve.py", "test_reliability.py",
                 "test_sparse_prefill.py", "test_gpu_first_run.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def model_path() -> Path:
    return prepare_model()


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    return prepare_corpus()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Factory: start_server(args, env=None, port=None) -> ready Server; all are stopped when the module ends."""
    servers = []
    logs = tmp_path_factory.mktemp("servers")

    def _start(args: list[str], env: dict | None = None, name: str = "server", port: int | None = None) -> Server:
        s = Server(args, logs / f"{name}-{len(servers)}.log", env, port)
        servers.append(s)
        return s.wait_ready()

    yield _start
    for s in servers:
        s.stop()


def hf_greedy_ids(model_path: Path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 min_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
            out.append(gen[0, ids.shape[1]:].tolist())
    return out


# ---------------------------------------------------------------- a real CPU backend, no server
PROFILE = Path(__file__).resolve().parents[1] / "python/sglang_shplb/data/smollm2-135m.profile.safetensors"
LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, PAGE = 30, 3, 9, 64, 16    # SmolLM2-135M's shape: the profile's channels fit


def cpu_backend(monkeypatch, **config):
    """A real CPU shplb backend (its own __init__) over SGLang's real pools, at a 25% uniform budget with the
    committed profile's label channels: the default label selector, page and label metadata kept. `config`
    replaces ShplbConfig fields (e.g. uniform_budget=None: dense decode)."""
    import types

    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from sglang_shplb.config import ShplbConfig
    from sglang_shplb.sglang_adapter import backend as B

    cfg = ShplbConfig(**{"uniform_budget": 0.25, "profile": str(PROFILE), **config})
    monkeypatch.setenv("SGLANG_SHPLB_CONFIG", cfg.to_env())
    monkeypatch.setattr(B, "_parallel", lambda: (1, 0))
    mc = types.SimpleNamespace(num_hidden_layers=LAYERS, head_dim=HEAD_DIM, context_len=4096,
                               get_total_num_kv_heads=lambda: KV_HEADS)
    runner = types.SimpleNamespace(
        device="cpu", page_size=PAGE, model_config=mc, model=None, server_args=None,
        req_to_token_pool=ReqToTokenPool(size=2, max_context_len=512, device="cpu", enable_memory_saver=False),
        token_to_kv_pool=MHATokenToKVPool(size=1024, page_size=PAGE, dtype=torch.float32, head_num=KV_HEADS,
                                          head_dim=HEAD_DIM, layer_num=LAYERS, device="cpu",
                                          enable_memory_saver=False, enable_alt_stream=False))
    return B.ShplbAttnBackend(runner)


def decode_batch(slot: int, seq_len: int):
    import types

    import torch

    mode = types.SimpleNamespace(is_decode=lambda: True, is_decode_or_idle=lambda: True, is_extend=lambda: False,
                                 is_idle=lambda: False, is_mixed=lambda: False)
    return types.SimpleNamespace(forward_mode=mode, out_cache_loc=torch.tensor([slot]), batch_size=1,
                                 req_pool_indices=torch.tensor([1]), seq_lens=torch.tensor([seq_len]),
                                 seq_lens_cpu=torch.tensor([seq_len]), extend_prefix_lens=None,
                                 extend_prefix_lens_cpu=None, extend_seq_lens=None, extend_seq_lens_cpu=None)


def extend_batch(slots, prefix: int = 0):
    """One request (row 1) prefilling len(slots) tokens (slots: a tensor) after `prefix` cached ones."""
    import types

    import torch

    n = len(slots)
    mode = types.SimpleNamespace(is_decode=lambda: False, is_decode_or_idle=lambda: False, is_extend=lambda: True,
                                 is_idle=lambda: False, is_mixed=lambda: False)
    t = lambda x: torch.tensor([x])  # noqa: E731
    return types.SimpleNamespace(forward_mode=mode, out_cache_loc=slots, batch_size=1, req_pool_indices=t(1),
                                 seq_lens=t(prefix + n), seq_lens_cpu=t(prefix + n), extend_prefix_lens=t(prefix),
                                 extend_prefix_lens_cpu=[prefix], extend_seq_lens=t(n), extend_seq_lens_cpu=[n],
                                 encoder_lens=None)
