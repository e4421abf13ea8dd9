"""Shared bits of the benchmark scripts: machine/commit stamp and result files."""
import os
import platform
import subprocess
import time
from pathlib import Path


def machine_line() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    return (f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.processor() or platform.machine()} · "
            f"{os.cpu_count()} CPUs · commit {commit}")


def write_result(path, title: str, note: str, rows: list[str], command: str) -> None:
    text = "\n".join([f"# {title}", "", note, "", f"Reproduce: `{command}`", "", machine_line(), "", *rows, ""])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(text)
