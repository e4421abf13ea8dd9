"""Apply the CPU-profile patches to the current Python environment. Idempotent.

    python patches/apply.py [--check]

1. torchvision guard: PyPI's torchvision wheel registers fake kernels for torchvision::nms/qnms
   unconditionally; with a CPU-only torch its C ops are absent and the import crashes. We guard
   those two decorators behind `torchvision.extension._has_ops()`, as the file already does for
   every other op.
2. sgl_kernel compat: SGLang's CPU platform imports a few symbols from `sgl_kernel` at module
   scope; PyPI has no CPU build. We install `sgl_kernel_compat/sgl_kernel` (pure PyTorch) into
   site-packages, but never over a real sgl_kernel.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import shutil
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPAT_SRC = HERE / "sgl_kernel_compat" / "sgl_kernel"
COMPAT_MARKER = "SGLANG_SHPLB_COMPAT = True"
GUARD = "if torchvision.extension._has_ops():  # sglang-shplb guard\n"


def patch_torchvision(check: bool) -> str:
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return "torchvision: not installed, nothing to do"
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if GUARD in text:
        return "torchvision: guard already applied"
    lines = text.splitlines(keepends=True)
    out, changed, i = [], 0, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(('@torch.library.register_fake("torchvision::nms")',
                            '@torch.library.register_fake("torchvision::qnms")')):
            # Indent the decorated function under the guard, up to the next blank line.
            block = [line]
            i += 1
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out.append(GUARD)
            out.extend("    " + b for b in block)
            changed += 1
            continue
        out.append(line)
        i += 1
    if changed != 2:
        raise SystemExit(f"torchvision: expected 2 nms/qnms registrations in {path}, found {changed}; "
                         "this torchvision version is not supported by the patch")
    if check:
        return "torchvision: guard NOT applied (run without --check)"
    path.write_text("".join(out))
    return f"torchvision: guard applied to {path}"


def install_sgl_kernel_compat(check: bool) -> str:
    # PathFinder searches sys.path only; importlib.util.find_spec would answer from sys.modules, i.e.
    # whatever this process imported first, not what is installed.
    spec = importlib.machinery.PathFinder.find_spec("sgl_kernel")
    if spec is not None and spec.origin:
        if COMPAT_MARKER not in Path(spec.origin).read_text(errors="ignore"):
            return f"sgl_kernel: a real sgl_kernel is installed at {spec.origin}; left alone"
    dest = Path(sysconfig.get_paths()["purelib"]) / "sgl_kernel"
    if check:
        return f"sgl_kernel: compat {'present' if spec else 'MISSING'} at {dest}"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(COMPAT_SRC, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return f"sgl_kernel: compat module installed at {dest}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="report only; change nothing")
    args = p.parse_args()
    print(install_sgl_kernel_compat(args.check))
    print(patch_torchvision(args.check))
    return 0


if __name__ == "__main__":
    sys.exit(main())
