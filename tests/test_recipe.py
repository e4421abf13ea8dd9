"""The launcher serves the default recipe with no S-HPLB flag: budgets (and for --tp N the joint plan) solved at
start-up from the model's profile; one flag sets the mean, one serves dense; a model without a profile is
refused with the command that makes one, or profiled once with --shplb-profile auto."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sglang_shplb import launch_server as L
from sglang_shplb import recipe as R


def _served(capsys, *argv):
    args, env, _ = L.build(["--port", "30997", *argv])
    cfg = json.loads(env["SGLANG_SHPLB_CONFIG"])
    return args, cfg, capsys.readouterr().out


def test_no_flag_serves_the_default_recipe(capsys, model_path):
    args, cfg, out = _served(capsys, "--model-path", str(model_path))
    assert args[args.index("--attention-backend") + 1] == "shplb"
    body = json.loads(Path(cfg["budgets"]).read_text())
    assert body["schema"] == "shplb.budget/v1" and body["method"] == "optimal"
    assert body["mean_budget"] == R.DEFAULT_MEAN_BUDGET and body["prefill_mean_budget"] == R.DEFAULT_MEAN_BUDGET
    assert len(body["label_channels"]) == 30                          # the label selector's calibration
    assert sum(map(sum, body["budgets"])) / 90 == pytest.approx(R.DEFAULT_MEAN_BUDGET, abs=0.005)
    lines = [l for l in out.splitlines() if "S-HPLB default recipe" in l]
    assert len(lines) == 1 and "decode and prefill at mean budget 0.1" in lines[0] and "reads 10.0%" in lines[0]


def test_mean_budget_flag(capsys, model_path):
    _, cfg, out = _served(capsys, "--model-path", str(model_path), "--shplb-mean-budget", "0.05")
    body = json.loads(Path(cfg["budgets"]).read_text())
    assert body["mean_budget"] == 0.05 and "mean budget 0.05" in out


def test_tp3_serves_the_balance_aware_plan(capsys, model_path):
    args, cfg, out = _served(capsys, "--model-path", str(model_path), "--tp", "3")
    plan = json.loads(Path(cfg["plan"]).read_text())
    assert plan["schema"] == "shplb.plan/v1" and plan["tp_size"] == 3 and plan["equal_count"]
    assert plan["placement"] == "joint" and "prefill" in json.dumps(plan["layers"][0])
    assert cfg["budgets"] is None and "placed on 3 ranks (joint plan)" in out


@pytest.mark.parametrize("flags", [["--shplb-dense"], ["--attention-backend", "torch_native"]])
def test_dense(capsys, model_path, flags):
    args, cfg, out = _served(capsys, "--model-path", str(model_path), *flags)
    assert args[args.index("--attention-backend") + 1] == "torch_native"
    assert not any(cfg[k] for k in ("uniform_budget", "budgets", "plan", "uniform_prefill_budget"))
    assert "serving stock dense attention" in out


def test_model_without_profile_refused_with_the_command(capsys, model_path, monkeypatch, tmp_path):
    import sglang_shplb.artifacts as A

    monkeypatch.setattr(A, "model_fingerprint", lambda path: "f" * 32)   # a model nobody profiled
    monkeypatch.setattr(R, "_home", lambda: tmp_path)
    with pytest.raises(SystemExit) as e:
        L.build(["--port", "30997", "--model-path", str(model_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    for part in ("no S-HPLB profile for", "--shplb-profile auto", "-m sglang_shplb.profile --model",
                 str(tmp_path / "profiles" / ("f" * 32 + ".profile.safetensors")), "--shplb-dense"):
        assert part in err[0], err[0]


def test_profile_auto_profiles_once_and_caches(capsys, model_path, monkeypatch, tmp_path):
    """--shplb-profile auto runs the profiler once (here a stand-in that writes the committed profile under the
    new fingerprint), caches it by fingerprint, and the next start serves from the cache without profiling."""
    import sglang_shplb.artifacts as A

    monkeypatch.setattr(A, "model_fingerprint", lambda path: "a" * 32)
    monkeypatch.setattr(R, "_home", lambda: tmp_path)
    stand_in = ("import sys; from sglang_shplb.profile import Profile; p = Profile.load(sys.argv[1]); "
                "p.meta['model_fingerprint'] = 'a' * 32; p.save(sys.argv[2]); print('profiled')")
    calls = []
    monkeypatch.setattr(R, "profile_command", lambda model, out: calls.append(out) or
                        [sys.executable, "-c", stand_in, str(R.COMMITTED_PROFILES[0]), str(out)])
    for _ in range(2):
        _, cfg, out = _served(capsys, "--model-path", str(model_path), "--shplb-profile", "auto")
        assert "S-HPLB default recipe" in out
    assert calls == [tmp_path / "profiles" / ("a" * 32 + ".profile.safetensors")]
    assert json.loads(Path(cfg["budgets"]).read_text())["model_fingerprint"] == "a" * 32
