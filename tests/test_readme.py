"""README's pipeline section runs as written: its budget/plan commands make artifacts the launcher accepts,
and every launch_server line passes the launcher's whole validation (SGLang's own start is what the server
tests start: the default recipe, TP 3, dense). The profile command (minutes) runs under `make test-slow`."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pipeline_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The S-HPLB pipeline"):]
    section = section[: section.find("\n## ", 5) if "\n## " in section[5:] else len(section)]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def _argv(line: str) -> list[str]:
    """A README line as `python -m` arguments: comment dropped, $P the committed profile."""
    line = line.split("  #")[0].replace("$P", str(ROOT / "python/sglang_shplb/data/smollm2-135m.profile.safetensors"))
    argv = shlex.split(line)
    assert argv[0] == ".venv/bin/python" and argv[1] == "-m", line
    return argv[2:]


def test_the_section_fits_on_one_screen():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The S-HPLB pipeline"):]
    assert len(section.splitlines()) <= 40


def test_pipeline_commands_run_as_written(tmp_path, model_path, capsys):
    from sglang_shplb.launch_server import build

    lines = pipeline_commands()
    assert any("sglang_shplb.budget" in l for l in lines) and any("sglang_shplb.plan" in l for l in lines)
    ran = 0
    for line in lines:
        if line.startswith("P="):
            continue
        argv = _argv(line)
        if argv[0] == "sglang_shplb.launch_server":
            args = [str(model_path) if a == "M" else a for a in argv[1:]]
            if "--model-path" not in args:
                args = ["--model-path", str(model_path), *args]
            cwd = os.getcwd()
            os.chdir(tmp_path)            # the artifacts the lines above wrote
            try:
                build([*args, "--port", "30996"])
            finally:
                os.chdir(cwd)
            ran += 1
        elif argv[0] != "sglang_shplb.profile":
            p = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, capture_output=True, text=True,
                               timeout=300)
            assert p.returncode == 0, (line, p.stderr[-2000:])
            ran += 1
    assert ran == len(lines) - 2      # all but P= and the profile line (test-slow)
    assert (tmp_path / "budgets.json").is_file() and (tmp_path / "plan.json").is_file()


@pytest.mark.slow
def test_readme_profile_command(tmp_path):
    (line,) = [l for l in pipeline_commands() if "sglang_shplb.profile" in l]
    argv = shlex.split(line.split("  #")[0])
    p = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "my.profile.safetensors").is_file()
