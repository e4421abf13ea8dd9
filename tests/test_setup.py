"""Install-time pieces: patches are idempotent and never shadow a real sgl_kernel; the model and
corpus caches are verified and a second prepare is a no-op."""
import subprocess
import sys
import time
from pathlib import Path

from sglang_shplb import models
from sglang_shplb.launch_server import cpu_core_binding, cpu_defaults
from sglang_shplb.config import ShplbConfig

ROOT = Path(__file__).resolve().parents[1]


def test_patches_idempotent():
    out = subprocess.run([sys.executable, ROOT / "patches" / "apply.py"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    check = subprocess.run([sys.executable, ROOT / "patches" / "apply.py", "--check"], capture_output=True, text=True)
    assert "guard already applied" in check.stdout
    assert "compat present" in check.stdout or "real sgl_kernel" in check.stdout


def test_compat_never_shadows_real_sgl_kernel(tmp_path, monkeypatch):
    import importlib.util
    sys.path.insert(0, str(ROOT / "patches"))
    try:
        import apply
    finally:
        sys.path.pop(0)
    fake_real = tmp_path / "sgl_kernel"
    fake_real.mkdir()
    (fake_real / "__init__.py").write_text("# a real build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert "left alone" in apply.install_sgl_kernel_compat(check=False)
    assert (fake_real / "__init__.py").read_text() == "# a real build\n"


def test_compat_kernels_match_reference():
    import torch
    import sgl_kernel
    req_to_token = torch.zeros(4, 10, dtype=torch.int32)
    idx, start, end = torch.tensor([2, 0]), torch.tensor([1, 3]), torch.tensor([4, 5])
    locs = torch.arange(100, 105)
    sgl_kernel.assign_req_to_token_pool_cpu(idx, req_to_token, start, end, locs, 10)
    assert req_to_token[2, 1:4].tolist() == [100, 101, 102] and req_to_token[0, 3:5].tolist() == [103, 104]
    out = torch.zeros(5, dtype=torch.int64)
    sgl_kernel.assign_extend_cache_locs_cpu(idx, req_to_token, start, end, out, 10)
    assert out.tolist() == locs.tolist()
    assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")


def test_prepare_is_cached(model_path, corpus_dir):
    t = time.time()
    assert models.prepare_model() == model_path and models.prepare_corpus() == corpus_dir
    assert time.time() - t < 10  # no download/conversion the second time
    assert (model_path / "config.json").exists() and (corpus_dir / "alice29.txt").stat().st_size > 100_000


def test_damaged_cache_is_detected(corpus_dir, tmp_path):
    import shutil
    copy = tmp_path / "c"
    shutil.copytree(corpus_dir, copy)
    assert models._is_intact(copy)
    (copy / "alice29.txt").write_text("truncated")
    assert not models._is_intact(copy)


def test_cpu_defaults_never_override_user_flags():
    given = ["--attention-backend", "shplb", "--max-total-tokens=4096"]
    extra = cpu_defaults(given, ShplbConfig())
    assert "--attention-backend" not in extra and "--max-total-tokens" not in extra
    assert extra[extra.index("--device") + 1] == "cpu"
    assert cpu_core_binding(3, [0, 1]) == "0|1|0"


def test_console_script_runs_the_stage_clis(corpus_dir):
    """The `sglang-shplb` entry point in pyproject.toml resolves and dispatches to the stage CLIs."""
    import shutil

    exe = Path(sys.executable).with_name("sglang-shplb")
    exe = str(exe) if exe.exists() else shutil.which("sglang-shplb")
    assert exe, "console script sglang-shplb is not installed"
    out = subprocess.run([exe, "prepare", "corpus"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == str(corpus_dir), out.stderr
    bad = subprocess.run([exe, "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown verb 'nope'" in bad.stderr
