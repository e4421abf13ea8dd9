"""`python -m sglang_shplb.supervisor -- CMD...`: a thin parent that runs the SGLang server CMD.

Why it exists (measured on stock SGLang 0.5.23, CPU, --tp 3):
- SIGTERM to the server while its workers are still importing kills only the main process (exit
  -15); the scheduler/detokenizer workers arm PR_SET_PDEATHSIG only once their imports are done, so
  they stay behind as orphans, still running a minute later (holding memory and cores).
- When a worker is killed, SGLang noticed (gloo "Connection closed by peer" on the other ranks,
  SIGQUIT) and SIGKILLed its own tree in ~5 s, exiting -9 with tracebacks but no line naming the
  dead worker. If it does not notice (a rank blocked outside a collective), nothing bounds the wait.

So this parent: forwards stop signals to SGLang, becomes the child subreaper (orphans of SGLang are
re-parented to it), remembers every descendant, and when SGLang exits it stops whatever is left.
A worker that dies while the server runs gets SGLang `WORKER_GRACE_S` to exit by itself, then the
tree is killed. One `error:` line says what happened, naming the worker that died first: when one
rank dies the others fail their next collective and exit within milliseconds, so the supervisor waits
on each worker's pidfd (Linux >= 5.3) and wakes at the first exit, instead of finding them all gone at
its next poll (without pidfds it polls). It imports no torch (~15 MB resident).
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import psutil

POLL_S = 1.0
FULL_SCAN_EVERY = 5  # ticks between full process-tree walks (it reads all of /proc)
STOP_GRACE_S = float(os.environ.get("SGLANG_SHPLB_STOP_GRACE_S", "30"))  # SGLang stops in 5-10 s on 2 cores
WORKER_GRACE_S = float(os.environ.get("SGLANG_SHPLB_WORKER_GRACE_S", "20"))  # stock reacts in ~5 s
REAP_GRACE_S = 5.0
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _term_on_parent_death() -> None:
    # Runs in the child before exec: if this supervisor is SIGKILLed, SGLang still gets a SIGTERM
    # and shuts its own tree down.
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


class Supervisor:
    def __init__(self, cmd: list[str]):
        self.cmd = cmd
        self.child: subprocess.Popen | None = None
        self.known: dict[int, psutil.Process] = {}  # every descendant seen, to stop even re-parented ones
        self.workers: dict[int, str] = {}           # pid -> name of those SGLang named `sglang::...`
        self.exits: dict[int, int | None] = {}      # worker pid -> its pidfd (readable once it has exited), if any
        self.stop_sig: int | None = None
        self.deadline = float("inf")
        self.dead_worker: str | None = None

    # ------------------------------------------------------------ signals
    def _on_signal(self, signum, _frame) -> None:
        if self.stop_sig is not None:  # a second Ctrl-C / TERM: stop waiting
            self.deadline = 0.0
            return
        self.stop_sig, self.deadline = signum, time.monotonic() + STOP_GRACE_S
        try:
            self.child.send_signal(signum)
        except ProcessLookupError:
            pass

    # ------------------------------------------------------------ watching
    def _discover(self) -> None:
        """Remember every descendant and SGLang's named workers (a full /proc walk: not every tick)."""
        try:
            kids = psutil.Process(self.child.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in kids:
            self.known.setdefault(p.pid, p)
            try:
                name = p.name()  # remembered: a dead process has no name to ask for
                # A child a worker forked carries the worker's title: it is a helper, not the worker, and
                # its exit is not the worker's death (a false "died" killed a serving tp3 server in CI).
                if name.startswith("sglang::") and p.status() != psutil.STATUS_ZOMBIE and \
                        p.pid not in self.workers and p.parent().name() != name:
                    self.workers[p.pid] = name
                    self.exits[p.pid] = _pidfd(p.pid)
            except psutil.NoSuchProcess:
                pass

    def _wait(self, timeout: float) -> set[int]:
        """Sleep up to `timeout`, waking as soon as a worker exits; returns the workers seen exiting."""
        fds = {fd: pid for pid, fd in self.exits.items() if fd is not None}
        if not fds or self.dead_worker is not None or self.stop_sig is not None:   # an exited pidfd stays readable
            time.sleep(timeout)
            return set()
        ready, _, _ = select.select(list(fds), [], [], timeout)
        return {fds[fd] for fd in ready}

    def _check_workers(self, exited: set[int]) -> None:
        """Note the first worker gone: one whose exit woke us (`exited`), else any found dead or a zombie its
        parent has not reaped (no pidfd). Several at once (a tie, or found by polling) are all named."""
        if self.dead_worker is not None or self.stop_sig is not None:
            return
        gone = sorted(exited) or [pid for pid in sorted(self.workers) if _gone(self.known[pid])]
        if not gone:
            return
        self.dead_worker = ", ".join(f"{self.workers[pid]} (pid {pid})" for pid in gone)
        self.deadline = time.monotonic() + WORKER_GRACE_S
        print(f"[sglang-shplb] SGLang worker {self.dead_worker} died; waiting up to "
              f"{WORKER_GRACE_S:.0f} s for the server to stop", file=sys.stderr, flush=True)

    def _leftovers(self) -> list[psutil.Process]:
        mine = psutil.Process().children(recursive=True)  # includes orphans re-parented to us
        procs = {p.pid: p for p in mine}
        for pid, p in self.known.items():
            if pid not in procs and p.is_running():  # is_running() also rules out a reused pid
                procs[pid] = p
        return [p for p in procs.values() if p.pid != os.getpid()]

    def _stop_all(self) -> int:
        """TERM, then KILL, everything still running below us. Returns how many were left."""
        procs = self._leftovers()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            _, procs = psutil.wait_procs(procs, timeout=REAP_GRACE_S if sig == signal.SIGTERM else 2)
            if not procs:
                break
        return len(self._leftovers())

    # ------------------------------------------------------------ main loop
    def run(self) -> int:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        self.child = subprocess.Popen(self.cmd, preexec_fn=_term_on_parent_death)
        forced, tick = False, 0
        while self.child.poll() is None:
            if tick % FULL_SCAN_EVERY == 0 or not self.workers:  # workers appear during start-up
                self._discover()
            tick += 1
            if time.monotonic() >= self.deadline:
                forced = True
                break
            self._check_workers(self._wait(POLL_S))
        for fd in self.exits.values():
            if fd is not None:
                os.close(fd)
        if forced:
            self._stop_all()
        rc = self.child.wait()
        left = self._stop_all()
        return self._report(rc, forced, left)

    def _report(self, rc: int, forced: bool, left: int) -> int:
        tail = f"; {left} process(es) could not be stopped" if left else ""
        if self.stop_sig is not None:
            how = f"killed after {STOP_GRACE_S:.0f} s" if forced else _describe(rc)
            print(f"[sglang-shplb] server stopped on {signal.Signals(self.stop_sig).name} ({how}){tail}",
                  file=sys.stderr, flush=True)
            return 0 if rc == 0 and not forced else 128 + self.stop_sig
        if self.dead_worker:
            how = (f"did not stop within {WORKER_GRACE_S:.0f} s and was killed" if forced
                   else f"exited with {_describe(rc)}")
            _error(f"SGLang worker {self.dead_worker} died, so the server {how}{tail}; "
                   "see the log above for the cause, then restart the server")
            return 1
        if rc != 0:
            _error(f"the SGLang server exited with {_describe(rc)}{tail}; see the log above for the cause")
            return rc if rc > 0 else 128 - rc
        return 0


def _pidfd(pid: int) -> int | None:
    """A pidfd of `pid` (readable once the process exits), or None where the OS has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):   # not Linux >= 5.3, or already gone
        return None


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        _error("usage: python -m sglang_shplb.supervisor -- COMMAND [ARGS...]")
        return 2
    return Supervisor(argv).run()


if __name__ == "__main__":
    sys.exit(main())
