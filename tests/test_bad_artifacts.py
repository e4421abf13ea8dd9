"""Bad files and flags the launcher must refuse before SGLang starts: one `error:` line naming the
problem, no traceback, non-zero exit. The matrix runs the launcher's validation in-process (fast);
a few cases also run the real CLI. Plus the artifact layer itself: atomic writes, and
schema/checksum/fingerprint checks on load."""
import json
import os
from pathlib import Path

import pytest

from sglang_shplb import launch_server
from sglang_shplb.artifacts import ArtifactError, _checksum, atomic_write_bytes, read_json, write_json
from test_launcher_errors import assert_one_clear_error, run_launcher
from test_plan_server import PROFILE
from test_reliability import cli


def refused(capsys, *args) -> str:
    """Run the launcher's validation in-process; return its one error line."""
    with pytest.raises(SystemExit) as e:
        launch_server.build(list(map(str, args)))
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory, model_path):
    """Valid budgets and tp=1/tp=3 plans for the default model."""
    d = tmp_path_factory.mktemp("good")
    cli("sglang_shplb.budget", "--profile", PROFILE, "--mean-budget", "0.1", "--out", d / "b.json")
    for tp in (1, 3):
        cli("sglang_shplb.plan", "--budgets", d / "b.json", "--tp", tp, "--model", model_path,
            "--out", d / f"plan{tp}.json")
    return d


def _edit(src: Path, dst: Path, resign: bool, **changes) -> Path:
    """Copy `src` with `changes`; `resign` recomputes the checksum (a well-formed file that says
    something wrong), otherwise the stale checksum stays (a hand-edited file)."""
    body = {**json.loads(src.read_text()), **changes}
    if resign:
        body.pop("checksum")
        body["checksum"] = _checksum(body)
    dst.write_text(json.dumps(body))
    return dst


def bad_file(kind: str, good_dir: Path, tmp: Path) -> Path:
    """Make the bad artifact named by `kind`: '<budgets|plan>-<fault>'."""
    which, fault = kind.split("-", 1)
    src = good_dir / ("b.json" if which == "budgets" else "plan1.json")
    dst = tmp / f"{kind}.json"
    if fault == "garbage":
        dst.write_bytes(os.urandom(64))
    elif fault == "empty":
        dst.write_bytes(b"")
    elif fault == "truncated":
        dst.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2])
    elif fault == "edited":
        _edit(src, dst, False, mean_budget=0.5)
    elif fault == "schema":
        _edit(src, dst, True, schema=f"shplb.{'budget' if which == 'budgets' else 'plan'}/v99")
    elif fault == "other-model":
        _edit(src, dst, True, model_fingerprint="0" * 32)
    elif fault == "zero":
        body = json.loads(src.read_text())
        _edit(src, dst, True, budgets=[[0.0] * len(r) for r in body["budgets"]])
    elif fault == "above-one":
        body = json.loads(src.read_text())
        _edit(src, dst, True, budgets=[[1.5] * len(r) for r in body["budgets"]])
    elif fault == "wrong-heads":
        body = json.loads(src.read_text())
        _edit(src, dst, True, budgets=[r + [0.1] for r in body["budgets"]],        # a model with 4 KV groups
              label_channels=[r + [r[0]] for r in body["label_channels"]])
    elif fault == "labels-repeated":
        body = json.loads(src.read_text())
        _edit(src, dst, True, label_channels=[[[0] * len(h) for h in layer] for layer in body["label_channels"]])
    elif fault == "labels-none":     # well-formed, from before label calibration
        body = {k: v for k, v in json.loads(src.read_text()).items() if k not in ("label_channels", "checksum")}
        dst.write_text(json.dumps({**body, "checksum": _checksum(body)}))
    elif fault == "not-an-artifact":
        dst.write_text("[1, 2, 3]")
    else:
        raise ValueError(kind)
    return dst


BAD_ARTIFACTS = [  # (kind, phrases the one error line must contain)
    ("budgets-garbage", ["not valid JSON", "regenerate"]),
    ("budgets-truncated", ["not valid JSON"]),
    ("budgets-not-an-artifact", ["not a shplb"]),
    ("budgets-edited", ["checksum"]),
    ("budgets-schema", ["schema", "v99"]),
    ("budgets-other-model", ["another model"]),
    ("budgets-zero", ["outside (0, 1]"]),
    ("budgets-above-one", ["outside (0, 1]"]),
    ("budgets-wrong-heads", ["KV groups"]),
    ("budgets-labels-repeated", ["label_channels", "repeated"]),
    ("plan-truncated", ["not valid JSON"]),
    ("plan-edited", ["checksum"]),
    ("plan-other-model", ["another model"]),
]


@pytest.mark.parametrize("kind,needles", BAD_ARTIFACTS, ids=[k for k, _ in BAD_ARTIFACTS])
def test_bad_artifact_refused(kind, needles, good, model_path, tmp_path, capsys):
    path = bad_file(kind, good, tmp_path)
    flag = "--shplb-budgets" if kind.startswith("budgets") else "--shplb-plan"
    error = refused(capsys, "--model-path", model_path, flag, path)
    for n in [str(path), *needles]:
        assert n in error, error


def test_cli_refuses_before_sglang_starts(good, model_path, tmp_path):
    """The real command: exit code, one line, no traceback, and quickly (no SGLang start-up)."""
    import time

    t0 = time.time()
    proc = run_launcher("--model-path", str(model_path), "--shplb-plan",
                        str(bad_file("plan-other-model", good, tmp_path)))
    assert_one_clear_error(proc, "another model", "--shplb-plan")
    proc = run_launcher("--model-path", str(model_path), "--shplb-uniform-budget", "0.1", "--tp", "2")
    assert_one_clear_error(proc, "--tp 2", "9 query heads")
    assert time.time() - t0 < 60 and "sglang.launch_server" not in proc.stdout + proc.stderr


BAD_FLAGS = [  # (extra args, phrases); {plan3}/{budgets} are filled in
    (["--shplb-uniform-budget", "0"], ["--shplb-uniform-budget", "(0, 1]"]),
    (["--shplb-uniform-budget", "nan"], ["(0, 1]"]),
    (["--shplb-uniform-budget", "0.1", "--tp", "2"], ["--tp 2", "9 query heads", "--tp 1 or 3"]),
    (["--shplb-uniform-budget", "0.1", "--tp", "two"], ["--tp two"]),
    (["--shplb-plan", "{plan3}", "--tp", "1"], ["tp=3", "tp=1"]),
    (["--shplb-plan", "{plan3}"], ["tp=3", "tp=1"]),  # --tp omitted means 1
    (["--shplb-budgets", "/no/such/budgets.json"], ["does not exist"]),
    (["--shplb-budgets", "{budgets}", "--shplb-plan", "{plan3}"], ["either"]),
    # a label selector needs the profile's channels: none with a uniform budget, none in an old budgets file
    (["--shplb-uniform-budget", "0.1", "--shplb-selector", "two_stage_label32_norm"],
     ["two_stage_label32_norm", "label channels", "--shplb-budgets", "two_stage4"]),
    (["--shplb-budgets", "{nolabels}", "--shplb-selector", "two_stage_label32_norm"],
     ["has none", "sglang_shplb.budget"]),
    # --shplb-profile lends its channels to a uniform budget only; an artifact carries its own
    (["--shplb-budgets", "{budgets}", "--shplb-profile", "{profile}"], ["--shplb-budgets carries its own",
                                                                         "drop --shplb-profile"]),
    # the default recipe (no budget flag): its own flags, and the profile it is solved from
    (["--shplb-profile", "/no/such/p.safetensors"], ["profile file /no/such/p.safetensors", "does not exist"]),
    (["--shplb-mean-budget", "0"], ["--shplb-mean-budget", "(0, 1]"]),
    (["--shplb-mean-budget", "0.2", "--shplb-uniform-budget", "0.1"],
     ["--shplb-mean-budget", "--shplb-uniform-budget replaces"]),
    (["--shplb-mean-budget", "0.2", "--shplb-dense"], ["--shplb-dense replaces"]),
    (["--shplb-dense", "--shplb-budgets", "{budgets}"], ["--shplb-dense serves stock attention",
                                                         "drop --shplb-budgets"]),
    (["--tp", "2"], ["--tp 2", "9 query heads"]),
    (["--shplb-uniform-budget", "0.1", "--shplb-profile", "/no/such/p.safetensors"],
     ["--shplb-profile", "does not exist"]),
]


@pytest.mark.parametrize("args,needles", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_refused(args, needles, good, model_path, capsys):
    nolabels = bad_file("budgets-labels-none", good, good)
    args = [a.format(plan3=good / "plan3.json", budgets=good / "b.json", nolabels=nolabels, profile=PROFILE)
            for a in args]
    error = refused(capsys, "--model-path", model_path, *args)
    for n in needles:
        assert n in error, error


# ------------------------------------------------------------------ profiles (budget CLI input)
def budget_cli_error(profile: Path, out: Path):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "sglang_shplb.budget", "--profile", str(profile),
                           "--mean-budget", "0.1", "--out", str(out)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fault", ["truncated", "garbage", "missing"])
def test_bad_profile_refused(fault, tmp_path):
    path = tmp_path / "p.safetensors"
    if fault == "truncated":
        path.write_bytes(Path(PROFILE).read_bytes()[:20000])
    elif fault == "garbage":
        path.write_bytes(os.urandom(4096))
    proc = budget_cli_error(path, tmp_path / "b.json")
    assert_one_clear_error(proc, str(path))
    assert not (tmp_path / "b.json").exists()


def test_profile_of_other_model_refused_at_serve(tmp_path, model_path, capsys):
    """Budgets inherit the profile's fingerprint, so the launcher names the mismatch."""
    from sglang_shplb.profile import Profile

    prof = Profile.load(PROFILE)
    prof.meta["model_fingerprint"] = "e" * 32
    prof.save(tmp_path / "other.safetensors")
    cli("sglang_shplb.budget", "--profile", tmp_path / "other.safetensors", "--mean-budget", "0.1",
        "--out", tmp_path / "b.json")
    assert "another model" in refused(capsys, "--model-path", model_path, "--shplb-budgets", tmp_path / "b.json")
    # the same profile lending its label channels to a uniform budget
    error = refused(capsys, "--model-path", model_path, "--shplb-uniform-budget", "0.1", "--shplb-profile",
                    tmp_path / "other.safetensors")
    assert "another model" in error and "other.safetensors" in error, error


def test_profile_bit_flip_detected(tmp_path):
    from sglang_shplb.profile import Profile

    data = bytearray(Path(PROFILE).read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's bytes; the header stays valid
    (tmp_path / "p.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="fails its checksum"):
        Profile.load(tmp_path / "p.safetensors")


# ------------------------------------------------------------------ artifact layer
def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "b.json"
    write_json(path, "budget", {"x": 1})
    before = path.read_bytes()

    def crash(_fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, "budget", {"x": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"], "temp file left behind"


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a" / "f.bin"
    atomic_write_bytes(path, b"x" * 1000)
    atomic_write_bytes(path, b"short")
    assert path.read_bytes() == b"short"


def test_read_json_checks_kind_checksum_fingerprint(tmp_path):
    write_json(tmp_path / "b.json", "budget", {"model_fingerprint": "abc", "v": 1})
    assert read_json(tmp_path / "b.json", "budget", "abc")["v"] == 1
    with pytest.raises(ArtifactError, match="schema"):
        read_json(tmp_path / "b.json", "plan")  # a budgets file given as a plan
    with pytest.raises(ArtifactError, match="another model"):
        read_json(tmp_path / "b.json", "budget", "def")
    with pytest.raises(ArtifactError, match="does not exist"):
        read_json(tmp_path / "nope.json", "budget")
    raw = json.loads((tmp_path / "b.json").read_text())
    (tmp_path / "b.json").write_text(json.dumps({**raw, "v": 2}))
    with pytest.raises(ArtifactError, match="checksum"):
        read_json(tmp_path / "b.json", "budget")
