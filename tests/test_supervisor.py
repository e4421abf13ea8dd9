"""The launcher's supervisor against a fake SGLang (a main process with two `sglang::` workers):
the failure shapes measured on real SGLang, reproduced in seconds.

Real-server checks live in test_reliability.py (tp 1) and test_failure_tp3.py (slow)."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

FAKE = r'''
import multiprocessing as mp, os, signal, sys, time
import setproctitle

def worker(name, stubborn):
    setproctitle.setproctitle(name)
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)

if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "exit3":
        sys.exit(3)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=worker, args=(f"sglang::fake_{i}", mode == "stubborn")) for i in range(2)]
    for p in procs:
        p.start()
    if mode in ("stubborn", "hang"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a main that never stops by itself
    print("ready", *[p.pid for p in procs], flush=True)
    if mode == "cascade":   # a rank's death takes its sibling down soon after (gloo), then the main exits
        while procs[1].is_alive():
            time.sleep(0.01)
        time.sleep(0.2)
        procs[0].kill()
        procs[0].join()
        sys.exit(1)
    while True:
        time.sleep(1)
'''


STARTED: list[int] = []  # process groups of every fake, cleaned up after each test


class Fake:
    """`python -m sglang_shplb.supervisor -- python fake.py MODE` with short grace periods."""

    def __init__(self, tmp_path, mode: str):
        script = tmp_path / "fake_sglang.py"
        script.write_text(FAKE)
        env = {**os.environ, "SGLANG_SHPLB_STOP_GRACE_S": "2", "SGLANG_SHPLB_WORKER_GRACE_S": "2"}
        self.proc = subprocess.Popen([sys.executable, "-m", "sglang_shplb.supervisor", "--",
                                      sys.executable, str(script), mode],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, start_new_session=True)
        STARTED.append(self.proc.pid)
        if mode == "exit3":
            self.workers = []
            return
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "ready", self.proc.stderr.read()
        self.workers = [psutil.Process(int(p)) for p in line[1:]]
        self.main = psutil.Process(self.proc.pid).children()[0]
        time.sleep(1.5)  # let the supervisor see the workers' names

    def finish(self, timeout: float = 30) -> tuple[int, str, float]:
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return rc, self.proc.stderr.read(), time.monotonic() - t0

    def left(self) -> list[psutil.Process]:
        procs = self.workers + ([self.main] if hasattr(self, "main") else [])
        return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_term_stops_orphaned_workers(tmp_path):
    """Stock SGLang killed by SIGTERM while its workers still import leaves them running."""
    fake = Fake(tmp_path, "plain")
    os.kill(fake.proc.pid, signal.SIGTERM)
    rc, err, _ = fake.finish()
    assert rc == 128 + signal.SIGTERM and "stopped on SIGTERM" in err, err
    assert not error_lines(err) and fake.left() == []


def test_worker_death_bounded_when_main_hangs(tmp_path):
    fake = Fake(tmp_path, "hang")
    fake.workers[0].kill()
    rc, err, took = fake.finish()
    assert rc == 1 and took < 15, (rc, took, err)
    errors = error_lines(err)
    assert len(errors) == 1 and "sglang::fake_0" in errors[0] and "died" in errors[0], err
    assert fake.left() == []


def test_first_worker_to_die_is_named(tmp_path):
    """On real SGLang the other ranks fail their next collective and exit soon after the one that died
    (tests/test_failure_tp3.py): the error names the first, not every worker gone by the next poll."""
    fake = Fake(tmp_path, "cascade")
    fake.workers[1].kill()
    rc, err, _ = fake.finish()
    errors = error_lines(err)
    assert rc == 1 and len(errors) == 1, err
    assert "sglang::fake_1" in errors[0] and "sglang::fake_0" not in errors[0] and "died" in errors[0], err
    assert fake.left() == []


def test_stubborn_tree_killed_after_grace(tmp_path):
    fake = Fake(tmp_path, "stubborn")
    os.kill(fake.proc.pid, signal.SIGINT)
    rc, err, took = fake.finish()
    assert rc == 128 + signal.SIGINT and "killed after" in err and took < 15, err
    assert fake.left() == []


def test_server_failure_exit_code_passed_on(tmp_path):
    rc, err, _ = Fake(tmp_path, "exit3").finish()
    assert rc == 3
    errors = error_lines(err)
    assert len(errors) == 1 and "exit code 3" in errors[0], err


def test_supervisor_killed_terminates_server(tmp_path):
    """SIGKILL to the supervisor cannot be handled; PDEATHSIG still stops SGLang's main."""
    fake = Fake(tmp_path, "plain")
    fake.proc.kill()
    fake.proc.wait(timeout=10)
    fake.main.wait(timeout=10)
    for w in fake.workers:  # real SGLang workers die with their main (their own PDEATHSIG)
        w.kill()
    assert not fake.main.is_running()


def test_usage_error():
    proc = subprocess.run([sys.executable, "-m", "sglang_shplb.supervisor"], capture_output=True, text=True)
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1


@pytest.fixture(autouse=True)
def _no_stray_fakes():
    yield
    while STARTED:  # a failed test must not leave its fake running (orphans keep the group id)
        try:
            os.killpg(STARTED.pop(), signal.SIGKILL)
        except ProcessLookupError:
            pass
