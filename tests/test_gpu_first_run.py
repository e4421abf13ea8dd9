"""What a first GPU run needs to be right or to say why not (issue 36), proven on CPU:

- keys written by the model itself (a fused rope + KV kernel, `save_kv_cache=False`) still fold into the page
  metadata page selection reads;
- configurations the backend cannot serve are refused at start-up with one line;
- a GPU install whose torch cannot use the GPU (driver older than its CUDA) says so instead of serving on CPU;
  FlashInfer without nvcc falls back to SGLang's Triton attention and says so;
- the prepared device script's dry run passes under the Triton interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
from conftest import HEAD_DIM, KV_HEADS, PAGE, Q_HEADS  # noqa: E402  (the CPU backend harness)
from conftest import cpu_backend as _backend, decode_batch as _decode_batch  # noqa: E402


def _state(b, layer_id):
    kmin, kmax = b.engine.metadata(layer_id)
    return [kmin, kmax, b.engine.label_cache(layer_id)[0]]


def test_keys_written_by_a_fused_kv_kernel_are_folded(monkeypatch):
    """Decoding 200 tokens one at a time: a backend that writes K/V itself (save_kv_cache=True) and one whose
    model wrote them already (fused rope + KV write, save_kv_cache=False) hold the same page metadata and
    label cache, select the same pages and attend to the same output; without the fold the second backend's
    pages keep their empty boxes and selection reads +-inf."""
    g = torch.Generator().manual_seed(0)
    own, fused = _backend(monkeypatch), _backend(monkeypatch)
    layer = types.SimpleNamespace(layer_id=0, tp_q_head_num=Q_HEADS, tp_k_head_num=KV_HEADS, qk_head_dim=HEAD_DIM,
                                  v_head_dim=HEAD_DIM, scaling=HEAD_DIM ** -0.5, is_cross_attention=False,
                                  attn_type=None, sliding_window_size=None, logit_cap=0.0)
    for b in (own, fused):
        b.req_to_token_pool.req_to_token[1, :200] = torch.arange(200) + 7   # slots 7..206 for request 1
    for t in range(200):
        q = torch.randn(1, Q_HEADS * HEAD_DIM, generator=g)
        k, v = torch.randn(1, KV_HEADS, HEAD_DIM, generator=g), torch.randn(1, KV_HEADS, HEAD_DIM, generator=g)
        fb = _decode_batch(t + 7, t + 1)
        outs = []
        for b, save in ((own, True), (fused, False)):
            b.init_forward_metadata(fb)
            if not save:      # what the model's fused rope + KV kernel did before calling attention
                b.token_to_kv_pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
            outs.append(b.forward_decode(q, k, v, layer, fb, save_kv_cache=save))
        assert torch.equal(outs[0], outs[1]), f"step {t}: outputs differ"
    for a, c in zip(_state(own, 0), _state(fused, 0)):
        assert torch.equal(a, c)
    kmin = _state(fused, 0)[0]
    assert torch.isfinite(kmin[:(200 + 7) // PAGE]).all()    # every written page has a real box
    assert float(own.engine.kv_read[0]) < float(own.engine.kv_dense[0])   # the budget was sparse on most steps


def test_dense_extend_with_fused_kv_write_folds(monkeypatch):
    """The dense extend path (SGLang's own kernel, here a stand-in for the CUDA engine's) folds the keys it is
    handed even when save_kv_cache=False: the real CPU backend's page metadata gets a finite box."""
    class Owned:
        def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True):
            return q

    b = _backend(monkeypatch)
    b.engine.dense_extend = Owned()
    layer = types.SimpleNamespace(layer_id=0, tp_k_head_num=KV_HEADS, is_cross_attention=False, attn_type=None,
                                  sliding_window_size=None)
    k = torch.randn(PAGE, KV_HEADS * HEAD_DIM)
    b.forward_extend(torch.ones(PAGE, 8), k, k, layer, types.SimpleNamespace(out_cache_loc=torch.arange(PAGE)),
                     save_kv_cache=False)
    kmin, kmax = b.engine.metadata(0)
    assert torch.equal(kmin[0], k.view(PAGE, KV_HEADS, HEAD_DIM).amin(0))
    assert torch.isinf(kmin[1]).all()                  # pages no key reached keep their empty box


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("flags, says", [
    (dict(pp_size=2), "pipeline parallelism (--pp-size 2)"),
    (dict(enable_two_batch_overlap=True), "two-batch overlap"),
    (dict(enable_pdmux=True), "PD multiplexing"),
    (dict(enable_hierarchical_cache=True), "hierarchical cache"),
    (dict(kv_cache_dtype="nvfp4"), "packed KV cache (--kv-cache-dtype nvfp4)"),
    (dict(kv_cache_dtype="fp4_mx_block16"), "packed KV cache"),
])
def test_server_settings_refused(flags, says):
    from sglang_shplb.sglang_adapter.refusals import server_problems

    base = dict(pp_size=1, enable_two_batch_overlap=False, enable_pdmux=False, enable_hierarchical_cache=False,
                kv_cache_dtype="auto")
    assert server_problems(types.SimpleNamespace(**base)) == []
    problems = server_problems(types.SimpleNamespace(**{**base, **flags}))
    assert len(problems) == 1 and says in problems[0] and "not supported by the shplb backend" in problems[0]


def test_model_settings_refused():
    from sglang_shplb.sglang_adapter.refusals import model_problems

    class Attn(torch.nn.Module):
        def __init__(self, sinks):
            super().__init__()
            self.sinks = torch.nn.Parameter(torch.zeros(4)) if sinks else None

    def runner(**kw):
        base = dict(is_hybrid_swa=False, model=torch.nn.Sequential(Attn(False)), kv_cache_dtype=torch.float16,
                    dtype=torch.float16)
        return types.SimpleNamespace(**{**base, **kw})

    assert model_problems(runner()) == []
    assert model_problems(runner(kv_cache_dtype=torch.float32, dtype=torch.float32)) == []
    assert "attention sinks" in model_problems(runner(model=torch.nn.Sequential(Attn(True))))[0]
    assert "hybrid sliding-window" in model_problems(runner(is_hybrid_swa=True))[0]
    bf16 = model_problems(runner(kv_cache_dtype=torch.bfloat16))
    assert len(bf16) == 1 and "bfloat16 KV cache under a float16 model" in bf16[0]


def test_backend_refuses_at_construction(monkeypatch):
    """A worker of stock `sglang.launch_server --attention-backend shplb` (no launcher) refuses too."""
    from sglang_shplb.config import ConfigError
    from sglang_shplb.sglang_adapter import refusals

    monkeypatch.setattr(refusals, "model_problems", lambda runner: [])
    runner = types.SimpleNamespace(server_args=types.SimpleNamespace(pp_size=2))
    with pytest.raises(ConfigError, match=r"^shplb: pipeline parallelism"):
        refusals.refuse_at_startup(runner)


@pytest.mark.parametrize("argv, says", [
    (["--pp-size", "2"], "pipeline parallelism (--pp-size 2)"),
    (["--enable-hierarchical-cache"], "the hierarchical cache"),
    (["--kv-cache-dtype", "nvfp4"], "packed KV cache"),
])
def test_launcher_refuses_before_sglang_starts(argv, says, capsys, tmp_path):
    from sglang_shplb.launch_server import build

    with pytest.raises(SystemExit) as e:
        build(["--shplb-uniform-budget", "0.1", "--model-path", str(tmp_path), "--port", "30999", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0]


def test_explicit_mem_fraction_still_pays_for_the_metadata(caplog):
    from sglang_shplb.config import ShplbConfig
    from sglang_shplb.sglang_adapter.gpu_startup import metadata_fraction, metadata_memory_scale

    cfg = ShplbConfig(uniform_budget=0.1)
    assert metadata_fraction(cfg, 0.8, 64, explicit=True) == round(0.8 * metadata_memory_scale(cfg, 64), 3) < 0.8
    assert "(--mem-fraction-static)" in caplog.text


# ------------------------------------------------------------------------------------ platform detection
def _gpu_install_without_a_usable_gpu(monkeypatch, gpus=("NVIDIA H100 80GB HBM3",), patches=False):
    """torch's CUDA view as a cu130 wheel shows it on a host whose driver predates CUDA 13."""
    from sglang_shplb.sglang_adapter import platform_check as pc

    def is_available():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 12040).")
        return False

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(pc, "nvidia_gpus", lambda: list(gpus))
    monkeypatch.setattr(pc, "driver_version", lambda: "550.54.15")
    monkeypatch.setattr(pc, "cpu_patches_applied", lambda: patches)


def test_gpu_install_with_too_old_driver_says_why(monkeypatch, capsys, tmp_path):
    from sglang_shplb.launch_server import build

    _gpu_install_without_a_usable_gpu(monkeypatch)
    with pytest.raises(SystemExit) as e:
        build(["--model-path", str(tmp_path), "--port", "30999", "--shplb-dense"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    for part in ("error: torch", "built for CUDA 13.0", "cannot use the GPU NVIDIA H100", "driver 550.54.15",
                 "too old (found version 12040)", "make install PROFILE=cpu"):
        assert part in err[0], err[0]


def test_gpu_install_on_a_host_without_gpu(monkeypatch):
    from sglang_shplb.sglang_adapter.platform_check import cuda_problem

    _gpu_install_without_a_usable_gpu(monkeypatch, gpus=())
    assert "finds no GPU on this host" in cuda_problem()
    _gpu_install_without_a_usable_gpu(monkeypatch, gpus=(), patches=True)   # the CPU profile, on purpose
    assert cuda_problem() is None


def test_cpu_install_serves_on_cpu():
    from sglang_shplb.sglang_adapter.platform_check import cpu_patches_applied, cuda_problem

    assert cuda_problem() is None and cpu_patches_applied()


def test_flashinfer_without_nvcc(monkeypatch, capsys):
    import importlib.util

    from sglang_shplb import launch_server as L
    from sglang_shplb.sglang_adapter import platform_check as pc

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flashinfer" else
                        (None if n in pc.FLASHINFER_PREBUILT else real(n, *a)))
    monkeypatch.setattr(pc, "nvcc_path", lambda: None)
    assert "nvcc" in pc.flashinfer_unbuildable()
    assert L.flashinfer_fallback([]) == ["--attention-backend", "triton", "--sampling-backend", "pytorch"]
    assert "serving with --attention-backend triton --sampling-backend pytorch instead" in capsys.readouterr().out
    assert L.flashinfer_fallback(["--attention-backend", "shplb"]) == ["--sampling-backend", "pytorch"]
    with pytest.raises(SystemExit):
        L.flashinfer_fallback(["--attention-backend", "flashinfer"])
    assert "--attention-backend flashinfer: FlashInfer has no prebuilt kernels" in capsys.readouterr().err
    monkeypatch.setattr(pc, "nvcc_path", lambda: "/usr/local/cuda/bin/nvcc")
    assert pc.flashinfer_unbuildable() is None and L.flashinfer_fallback([]) == []


def test_dense_extend_skips_flashinfer_without_nvcc(monkeypatch):
    import importlib.util

    from sglang.srt.layers.attention import attention_registry as reg

    from sglang_shplb.sglang_adapter import platform_check as pc
    from sglang_shplb.sglang_adapter.gpu_startup import dense_extend_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flashinfer" else
                        (None if n in pc.FLASHINFER_PREBUILT else real(n, *a)))
    monkeypatch.setattr(pc, "nvcc_path", lambda: None)
    monkeypatch.setattr(reg, "ATTENTION_BACKENDS", {"flashinfer": lambda r: "fi", "triton": lambda r: "tr"})
    assert dense_extend_backend("runner") == ("tr", "triton")


# ------------------------------------------------------------------------------------ the device script
def test_gpu_first_run_dry_run(tmp_path):
    """benchmark/gpu_first_run.sh --dry-run: the device script's own steps, under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "g.md")}
    p = subprocess.run(["bash", str(ROOT / "benchmark" / "gpu_first_run.sh"), "--dry-run"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=1500)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert "FAIL" not in p.stdout and "[PASS] first run: all checks" in p.stdout, out[-6000:]
    for selector in ("two_stage_label32_norm", "two_stage4"):   # the default and the uncalibrated fallback
        assert f"[PASS] decode 10% == CPU serving path ({selector}, f32 metadata)" in p.stdout
        assert f"[PASS] CUDA graph replay == eager decode, layer 0 ({selector})" in p.stdout
    assert "| 256 | 2 |" in (tmp_path / "g.md").read_text()      # the timing table was written
