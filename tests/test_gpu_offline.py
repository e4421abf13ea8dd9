"""Offline GPU proof (no GPU needed; marker gpu_offline, part of the default suite).

- The GPU serving objects run under TRITON_INTERPRET=1 against the CPU serving path and selection.py
  (tests/gpu_offline_checks.py): 10%/100% budgets, both group aggregations, capture -> replay with
  changing lengths over fixed buffers, no host sync per layer, bf16 page metadata rounded outward.
- Every serving kernel compiles with Triton's own compiler for GPUTarget("cuda", 90/80, 32); the bundled
  ptxas reports registers and spills, and a spill at the main shapes fails the test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu_offline
CHECKS = ["decode_vs_cpu", "scores_agg", "fine_scores", "label_scores", "carry", "graph_replay", "no_host_sync",
          "fold_meta", "backend_engines"]


def _env(interpret: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run_check(name: str, *extra: str):
    pytest.importorskip("triton")
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_offline_checks.py"), name, *extra], env=_env(True),
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0 and f"{name} OK" in p.stdout, f"{name} failed:\n{p.stdout}\n{p.stderr[-4000:]}"


@pytest.mark.parametrize("check", CHECKS)
def test_gpu_objects_interpreted(check):
    _run_check(check)


@pytest.mark.slow
@pytest.mark.parametrize("check", ["decode_vs_cpu", "graph_replay"])
def test_gpu_objects_interpreted_big(check):
    _run_check(check, "--big")


def _compile(shapes: list[dict], triton_dir: Path | None = None) -> list[dict]:
    """compile_report rows; triton_dir: a directory holding another Triton, put first on the path."""
    code = ("import json,sys,triton; from sglang_shplb_kernels.compile_check import compile_report as c; "
            "print(triton.__version__); "
            "print(json.dumps([r for s in json.loads(sys.argv[1]) for r in c(s.pop('arch'), **s)]))")
    env = _env(False)
    if triton_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(triton_dir), env["PYTHONPATH"]])
    p = subprocess.run([sys.executable, "-c", code, json.dumps(shapes)], env=env, capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    version, rows = p.stdout.strip().splitlines()[-2:]
    rows = json.loads(rows)
    for r in rows:
        r["triton"] = version
    for r in rows:
        print(f"{r['kernel']:32s} sm_{r['arch']} {r['dtype']} D={r['head_dim']} G={r['group']} P={r['page']} "
              f"agg={r.get('agg', 'max')}: {r['regs']} regs, {r['spill_bytes']} B spilled, {r['num_warps']} warps")
    return rows


MAIN = [dict(arch=90, dtype="bf16", head_dim=128, group=g, page=16) for g in (1, 4, 8)] + \
       [dict(arch=80, dtype="bf16", head_dim=128, group=4, page=16)]


def test_kernels_compile_for_sm90_sm80_without_spills():
    pytest.importorskip("triton")
    rows = _compile([dict(s) for s in MAIN])
    assert len(rows) == 11 * len(MAIN)  # fold, score, select pages|shortlist, fine, label max|per_head, attend
    #                                     sparse|dense, combine,
    #                                     prefill
    spilled = [r for r in rows if r["spill_bytes"]]
    assert not spilled, spilled


# The Triton that SGLang 0.5.23's GPU dependency set (torch 2.14.1 cu130) resolves to; the CPU profile has 3.9.
GPU_INSTALL_TRITON = "3.8.0"


@pytest.mark.slow
def test_kernels_compile_under_the_gpu_installs_triton():
    """The same offline compiles (sm_90/sm_80, the main shapes, no spills) under the Triton a GPU user gets,
    installed once beside the CPU profile's (pip --target, cached under $SGLANG_SHPLB_HOME)."""
    pytest.importorskip("triton")
    home = Path(os.environ.get("SGLANG_SHPLB_HOME", Path.home() / ".cache" / "sglang_shplb"))
    target = home / f"triton-{GPU_INSTALL_TRITON}"
    if not (target / "triton").is_dir():
        p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                            f"triton=={GPU_INSTALL_TRITON}"], capture_output=True, text=True, timeout=1800)
        assert p.returncode == 0, p.stderr[-3000:]
    rows = _compile([dict(s) for s in MAIN], triton_dir=target)
    assert {r["triton"] for r in rows} == {GPU_INSTALL_TRITON}
    assert len(rows) == 11 * len(MAIN)
    spilled = [r for r in rows if r["spill_bytes"]]
    assert not spilled, spilled


@pytest.mark.slow
def test_kernels_compile_full_matrix():
    """bf16/fp16 x head dim 64/128/256 x group 1/4/8 x page 16/32 x sum|max on sm_90 and sm_80; no spills
    up to head dim 128, head dim 256 reported."""
    pytest.importorskip("triton")
    shapes = [dict(arch=a, dtype=dt, head_dim=d, group=g, page=p, agg=agg) for a in (90, 80) for dt in ("bf16", "fp16")
              for d in (64, 128, 256) for g in (1, 4, 8) for p in (16, 32) for agg in ("sum", "max")]
    rows = _compile(shapes)
    spilled = [r for r in rows if r["spill_bytes"] and r["head_dim"] <= 128]
    assert not spilled, spilled


def test_launcher_gpu_defaults(capsys):
    """On CUDA the launcher keeps decode graphs, turns prefill graphs off with 0.5.23's flag (one line),
    respects the user's own graph flags and refuses pages the GPU kernels cannot take."""
    from sglang_shplb.config import ShplbConfig
    from sglang_shplb.launch_server import gpu_defaults

    assert gpu_defaults([], ShplbConfig(uniform_budget=0.1)) == ["--cuda-graph-backend-prefill", "disabled"]
    assert "prefill CUDA graphs off" in capsys.readouterr().out
    assert gpu_defaults(["--cuda-graph-backend-prefill", "breakable"], ShplbConfig(uniform_budget=0.1)) == []
    assert gpu_defaults(["--disable-cuda-graph"], ShplbConfig(uniform_budget=0.1)) == []
    with pytest.raises(SystemExit):
        gpu_defaults([], ShplbConfig(uniform_budget=0.1, page_size=8))
    assert "--shplb-page-size 8 is below 16" in capsys.readouterr().err


def test_dense_extend_prefers_sglangs_flashinfer_then_triton(monkeypatch, caplog):
    """On CUDA the backend owns SGLang's own dense backend for prefill/extend: FlashInfer built by SGLang's
    registry when installed, else SGLang's Triton backend, each refusal one log line; neither: torch_native."""
    import importlib.util

    from sglang.srt.layers.attention import attention_registry as reg

    from sglang_shplb.sglang_adapter.gpu_startup import dense_extend_backend

    built = []

    def ok(name):
        return lambda runner: built.append((name, runner)) or f"{name}-backend"

    def broken(runner):
        raise RuntimeError("no CUDA here")

    real_find = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda n, *a: object() if (n == "flashinfer" and installed) else real_find(n, *a))
        monkeypatch.setattr(reg, "ATTENTION_BACKENDS", {"flashinfer": ok("flashinfer"), "triton": ok("triton")})
        assert dense_extend_backend("runner") == (("flashinfer-backend", "flashinfer") if installed
                                                   else ("triton-backend", "triton"))
    monkeypatch.setattr(reg, "ATTENTION_BACKENDS", {"flashinfer": broken, "triton": broken})
    caplog.clear()
    backend, why = dense_extend_backend("runner")
    assert backend is None and "no CUDA here" in why
    assert [r.getMessage() for r in caplog.records if "dense prefill/extend cannot use" in r.getMessage()] == [
        "[sglang-shplb] dense prefill/extend cannot use flashinfer: not installed",
        "[sglang-shplb] dense prefill/extend cannot use triton: RuntimeError: no CUDA here"]


def test_dense_extend_layers_go_to_the_owned_backend_and_still_fold_metadata(monkeypatch):
    """forward_extend of a dense layer runs the engine's SGLang backend (and its per-step plan runs once per
    extend step, never for decode); the keys it wrote still fold into the page metadata decode selects on.
    A sparse-prefill layer does not reach it, unless every request of the step is within
    --shplb-prefill-dense-kv-len (decided once per step in init_forward_metadata)."""
    import types

    import torch
    from conftest import cpu_backend

    calls = []

    class Owned:
        def init_forward_metadata(self, fb):
            calls.append(("plan", fb.forward_mode.name))

        def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True):
            calls.append(("extend", layer.layer_id, save_kv_cache))
            return q * 2

    # the real backend, prefill sparse and decode dense (decode plans nothing); layer 0 made dense-prefill, and a
    # CUDA engine's SGLang backend stands in for the dense extend
    b = cpu_backend(monkeypatch, uniform_budget=None, profile=None, uniform_prefill_budget=0.5,
                    prefill_dense_kv_len=2048)
    b.engine.dense_extend, b.prefill_sparse = Owned(), [False, True]
    folded = []
    b.engine.fold = lambda layer_id, locs, k: folded.append((layer_id, locs, k))
    cls = type(b)

    def mode(name):
        return types.SimpleNamespace(name=name, is_decode=lambda: name == "DECODE",
                                     is_decode_or_idle=lambda: name in ("DECODE", "IDLE"),
                                     is_extend=lambda: name in ("EXTEND", "MIXED"))

    def batch(name, prefix=(3000,), extend=(100,)):   # host lengths, as ForwardBatch carries them
        return types.SimpleNamespace(forward_mode=mode(name), out_cache_loc=None, extend_prefix_lens=prefix,
                                     extend_prefix_lens_cpu=prefix, extend_seq_lens=extend, extend_seq_lens_cpu=extend)

    for name in ("EXTEND", "DECODE", "IDLE", "MIXED"):
        cls.init_forward_metadata(b, batch(name))
    assert [c for c in calls if c[0] == "plan"] == [("plan", "EXTEND"), ("plan", "MIXED")]
    assert not b.extend_dense                     # a 3.1k-token request: sparse layers stay sparse
    layer = types.SimpleNamespace(layer_id=0, tp_k_head_num=1, is_cross_attention=False, attn_type=None,
                                  sliding_window_size=None)
    q, k, locs = torch.ones(3, 8), torch.randn(3, 8), torch.arange(3)
    out = b.forward_extend(q, k, k, layer, types.SimpleNamespace(out_cache_loc=locs))
    assert torch.equal(out, q * 2) and ("extend", 0, True) in calls
    assert len(folded) == 1 and folded[0][0] == 0 and torch.equal(folded[0][2].flatten(1), k)
    assert b._sparse_prefill_layer(types.SimpleNamespace(layer_id=1, is_cross_attention=False, attn_type=None,
                                                         sliding_window_size=None))
    cls.init_forward_metadata(b, batch("EXTEND", (0, 1500), (2000, 548)))   # every request <= 2048 tokens
    assert b.extend_dense
    sparse_layer = types.SimpleNamespace(layer_id=1, tp_k_head_num=1, is_cross_attention=False, attn_type=None,
                                         sliding_window_size=None)
    assert torch.equal(b.forward_extend(q, k, k, sparse_layer, types.SimpleNamespace(out_cache_loc=locs)), q * 2)
    assert ("extend", 1, True) in calls and folded[-1][0] == 1
    cls.init_forward_metadata(b, batch("EXTEND", (0, 1500), (2000, 549)))   # one request of 2049: sparse_prefill
    assert not b.extend_dense
    cls.init_forward_metadata(b, batch("EXTEND", (0,), (100,)))
    cls.init_forward_metadata(b, batch("EXTEND", None, None))   # a step without extend lengths: not left dense
    assert not b.extend_dense
