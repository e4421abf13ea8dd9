"""The launcher wrapper benchmarks and tests share: a real server started through our launcher on a free port, in its
own process group, logging to a file, always stoppable. Benchmarks import it from here; tests through conftest.py
(tests may import benchmark modules, never the other way)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

STARTUP_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m sglang_shplb.launch_server ARGS` on a free port, logging to a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, port: int | None = None):
        self.args, self.log_path, self.fixed_port = args, log_path, port
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self._start()

    def _start(self) -> None:
        self.port = self.fixed_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_shplb.launch_server", "--port", str(self.port), *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S, port_retries: int = 2) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if port_retries and not self.fixed_port and self._lost_port():
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
