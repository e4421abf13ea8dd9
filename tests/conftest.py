"""Shared fixtures: the real default model, the corpus, and a real server started through our
launcher in its own process group (always torn down, even when a test fails)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from sglang_shplb.models import prepare_corpus, prepare_model

STARTUP_TIMEOUT_S = 420


@pytest.fixture(scope="session")
def model_path() -> Path:
    return prepare_model()


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    return prepare_corpus()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m sglang_shplb.launch_server ARGS` on a free port, logging to a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.args, self.log_path = args, log_path
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self._start()

    def _start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_shplb.launch_server", "--port", str(self.port), *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S, port_retries: int = 2) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if port_retries and self._lost_port():
                # free_port() races other processes for the port; SGLang then hangs in shutdown: restart
                self.stop()
                port_retries -= 1
                self.log_path.rename(self.log_path.with_name(f"{self.log_path.name}.lost-port-{self.port}"))
                self._start()
                continue
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(2)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log_tail()}")

    def _lost_port(self) -> bool:
        """The HTTP server could not bind our port (uvicorn: "... ('127.0.0.1', PORT): address already in use").
        Only that port: a TP worker's own port retries are not a reason to kill a server that is starting."""
        return any("address already in use" in line and f", {self.port})" in line for line in self.log().splitlines())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._log.close()

    # --- API helpers (greedy) ---
    def chat(self, content: str, max_tokens: int = 24, **kw) -> dict:
        body = {"model": "default", "messages": [{"role": "user", "content": content}],
                "temperature": 0, "max_tokens": max_tokens, **kw}
        r = requests.post(f"{self.url}/v1/chat/completions", json=body, timeout=300)
        r.raise_for_status()
        return r.json()

    def generate_ids(self, text: str, max_new_tokens: int) -> list[int]:
        body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                                   "ignore_eos": True}}
        r = requests.post(f"{self.url}/generate", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["output_ids"]


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Factory: start_server(args, env=None) -> ready Server; all are stopped when the module ends."""
    servers = []
    logs = tmp_path_factory.mktemp("servers")

    def _start(args: list[str], env: dict | None = None, name: str = "server") -> Server:
        s = Server(args, logs / f"{name}-{len(servers)}.log", env)
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


def cpu_backend(monkeypatch):
    """A real CPU shplb backend (its own __init__) over SGLang's real pools, at a 25% uniform budget with the
    committed profile's label channels: the default label selector, page and label metadata kept."""
    import types

    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from sglang_shplb.config import ShplbConfig
    from sglang_shplb.sglang_adapter import backend as B

    monkeypatch.setenv("SGLANG_SHPLB_CONFIG", ShplbConfig(uniform_budget=0.25, profile=str(PROFILE)).to_env())
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
