"""Bad input to the launcher: one clear error line, non-zero exit, no traceback."""
import socket
import subprocess
import sys


def run_launcher(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sglang_shplb.launch_server", *args],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_clear_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:") or ": error:" in l]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_missing_model_path():
    assert_one_clear_error(run_launcher("--model-path", "/no/such/model"), "/no/such/model", "does not exist")


def test_unknown_shplb_flag():
    assert_one_clear_error(run_launcher("--shplb-bogus", "1"), "--shplb-bogus")


def test_budget_out_of_range():
    assert_one_clear_error(run_launcher("--shplb-uniform-budget", "1.5"), "--shplb-uniform-budget", "(0, 1]")


def test_occupied_port(model_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_launcher("--model-path", str(model_path), "--port", str(port))
    assert_one_clear_error(proc, str(port), "--port")


def test_help_lists_shplb_and_sglang_flags():
    proc = run_launcher("--help")
    assert proc.returncode == 0
    assert "--shplb-uniform-budget" in proc.stdout and "--tp-size" in proc.stdout


def test_bad_selector_refused():
    assert_one_clear_error(run_launcher("--shplb-uniform-budget", "0.1", "--shplb-selector", "bogus"),
                           "--shplb-selector", "two_stage4")
    assert_one_clear_error(run_launcher("--shplb-uniform-budget", "0.1", "--shplb-selector", "two_stage4",
                                        "--shplb-page-size", "2"), "two_stage4", "--shplb-page-size 2")
    assert_one_clear_error(run_launcher("--shplb-uniform-budget", "0.1", "--shplb-selector", "oracle_mass"),
                           "--shplb-selector", "two_stage4")          # the reference ranking is never served
