"""Typed, versioned artifacts passed between pipeline stages, and the model fingerprint.

Every artifact carries `schema` (kind + version), the model's fingerprint and a sha256 checksum of
its own content. Writes are atomic (temp file + rename) so a crash never leaves half a file;
loads validate all three and fail with one clear message.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


class ArtifactError(ValueError):
    """An artifact is missing, corrupt, of the wrong kind/version, or for another model."""


# ---------------------------------------------------------------- model fingerprint
ATTN_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
CONFIG_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "hidden_size", "vocab_size", "max_position_embeddings")


def model_shape(model_path: str | Path) -> dict:
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    shape = {k: cfg.get(k) for k in CONFIG_KEYS}
    shape["num_key_value_heads"] = shape["num_key_value_heads"] or shape["num_attention_heads"]
    shape["head_dim"] = shape["head_dim"] or cfg["hidden_size"] // cfg["num_attention_heads"]
    return shape


def model_fingerprint(model_path: str | Path) -> str:
    """sha256 over the attention-relevant config and every attention weight tensor (raw bytes).
    Other weights don't change which heads are sparse, so they are left out (faster)."""
    from safetensors import safe_open

    model_path = Path(model_path)
    h = hashlib.sha256(json.dumps(model_shape(model_path), sort_keys=True).encode())
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise ArtifactError(f"{model_path} has no *.safetensors weights to fingerprint")
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in sorted(k for k in st.keys() if any(a in k for a in ATTN_KEYS)):
                h.update(name.encode())
                h.update(st.get_tensor(name).float().numpy().tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------- atomic I/O
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_json(path: str | Path, kind: str, body: dict) -> None:
    body = {"schema": f"shplb.{kind}/v{SCHEMA_VERSION}", **body}
    body["checksum"] = _checksum(body)
    atomic_write_bytes(path, json.dumps(body, indent=1).encode())


def read_json(path: str | Path, kind: str, fingerprint: str | None = None) -> dict[str, Any]:
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{kind} file {path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{kind} file {path} is not valid JSON ({e}); regenerate it") from None
    if not isinstance(body, dict):
        raise ArtifactError(f"{kind} file {path} is not a shplb {kind} artifact")
    check_schema(body.get("schema"), kind, path)
    claimed = body.pop("checksum", None)
    if claimed != _checksum(body):
        raise ArtifactError(f"{kind} file {path} fails its checksum (edited or truncated); regenerate it")
    check_fingerprint(body, fingerprint, kind, path)
    return body


def check_schema(schema: Any, kind: str, path: Path) -> None:
    want = f"shplb.{kind}/v{SCHEMA_VERSION}"
    if schema != want:
        raise ArtifactError(f"{path} has schema {schema!r}, expected {want!r}; "
                            f"regenerate it with `python -m sglang_shplb.{kind}`")


def check_fingerprint(body: dict, fingerprint: str | None, kind: str, path: Path) -> None:
    if fingerprint is not None and body.get("model_fingerprint") != fingerprint:
        raise ArtifactError(f"{kind} file {path} was made for another model (fingerprint "
                            f"{body.get('model_fingerprint')} != {fingerprint}); regenerate it for this model")
