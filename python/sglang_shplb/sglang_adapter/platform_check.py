"""Which accelerator this install can really use, decided before SGLang starts.

SGLang 0.5.23's GPU dependency set is CUDA 13 (torch cu130). On a host whose NVIDIA driver predates it,
torch sees no GPU and SGLang would take its CPU path inside an install that lacks the CPU patches
(`patches/apply.py`): a confusing crash, or worse a server on the wrong device. FlashInfer 0.7.2 ships no
precompiled kernels and JIT-compiles them with the system `nvcc` at first use, i.e. at the server's
warm-up request, after start-up looked fine. Both are found here and named in one line.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import warnings
from pathlib import Path

COMPAT_MARKER = "SGLANG_SHPLB_COMPAT = True"   # patches/apply.py's pure-PyTorch sgl_kernel for the CPU profile
# Packages that carry FlashInfer's kernels prebuilt, so that no nvcc is needed at first use.
FLASHINFER_PREBUILT = ("flashinfer_jit_cache", "flashinfer_cubin")


def nvidia_gpus() -> list[str]:
    """Names of the NVIDIA GPUs the driver lists (nvidia-smi), else [] (no driver, no GPU, no nvidia-smi)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        p = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split(":", 1)[1].split("(")[0].strip() for line in p.stdout.splitlines()
            if line.startswith("GPU ")] if p.returncode == 0 else []


def driver_version() -> str:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return p.stdout.split()[0] if p.returncode == 0 and p.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def cpu_patches_applied() -> bool:
    """True when this environment has the CPU profile's sgl_kernel (patches/apply.py)."""
    spec = importlib.machinery.PathFinder.find_spec("sgl_kernel")
    if spec is None or not spec.origin:
        return False
    return COMPAT_MARKER in Path(spec.origin).read_text(errors="ignore")


def cuda_usable() -> tuple[bool, str]:
    """(torch.cuda.is_available(), torch's own warning when it says no) without printing that warning."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    said = " ".join(" ".join(str(w.message).split()) for w in caught if "cuda" in str(w.message).lower()
                    or "driver" in str(w.message).lower())
    return ok, said[:300]


def cuda_problem() -> str | None:
    """Why serving on CPU here would be wrong, when torch cannot use CUDA; None when the CPU path is right.

    A CUDA build of torch that sees no GPU is a GPU install on the wrong host or driver: refuse, naming the
    driver and the fix, unless the CPU patches are present (the CPU profile, deliberately)."""
    import torch

    ok, said = cuda_usable()
    if ok or torch.version.cuda is None or cpu_patches_applied():
        return None
    gpus = nvidia_gpus()
    build = f"torch {torch.__version__} (built for CUDA {torch.version.cuda})"
    if not gpus:
        return (f"{build} finds no GPU on this host, and this install lacks the CPU patches; to serve on CPU "
                f"install the CPU profile (make install PROFILE=cpu)")
    why = f" ({said})" if said else ""
    return (f"{build} cannot use the GPU {gpus[0]}: NVIDIA driver {driver_version()} is too old for CUDA "
            f"{torch.version.cuda}{why}; update the driver to one that supports CUDA {torch.version.cuda}, or "
            f"install a torch build for the CUDA your driver supports; to serve on CPU instead, install the CPU "
            f"profile (make install PROFILE=cpu)")


def nvcc_path() -> str | None:
    for cand in (shutil.which("nvcc"), *(os.path.join(os.environ.get(v, ""), "bin", "nvcc")
                                          for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def flashinfer_unbuildable() -> str | None:
    """Why FlashInfer cannot build its kernels on this host (installed, nothing prebuilt, no nvcc), else None."""
    if importlib.util.find_spec("flashinfer") is None:
        return None
    if any(importlib.util.find_spec(p) is not None for p in FLASHINFER_PREBUILT) or nvcc_path():
        return None
    return ("FlashInfer has no prebuilt kernels here and JIT-compiles them at first use with nvcc, which this host "
            "lacks (install the CUDA toolkit, set CUDA_HOME, or pip install flashinfer-jit-cache)")
