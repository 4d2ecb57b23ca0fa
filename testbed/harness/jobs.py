"""Worker jobs: one ``python -m testbed.harness.worker`` action on one GPU-client host, as the harness sees it.

The harness (``testbed.harness.runner``) runs every worker through this small interface, so it does not care where
the host is: ``Topology.start_worker(host, action, plan, timeout_s)`` returns a ``WorkerJob``.

* ``ProcessJob`` (``local``, ``netns``): the harness spawns the worker itself (in the host's namespace).
* ``testbed.harness.coordinator.AgentJob`` (``cluster``): the host's agent (``python -m testbed.harness.agent``) spawns the
  same command on its machine.

A ``run`` job is started, waits at the start barrier (``ready()`` turns true once the worker has built its
client and plan), is released with ``go(start_s)`` -- the common start on the *coordinator's* wall clock
(seconds), which the job converts to its host's clock -- and is collected with ``wait``.  ``warmup`` and
``probe`` jobs start at once.  ``cancel`` ends a job that is still running (a no-op once it finished).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.objectstore.launch import stop_process

LOG_TAIL_CHARS = 3000


class WorkerFailed(RuntimeError):
    """A worker exited before it was ready, or without the output the harness needs (message: log tail)."""


@dataclass
class WorkerResult:
    """What a finished worker left: exit status, its output JSON (None if it wrote none), its log's tail."""

    rc: int
    result: dict | None
    log_tail: str
    wall_s: float = float("nan")


class WorkerJob:
    """One worker action on host ``host`` (see the module docstring)."""

    host: int
    action: str

    def ready(self) -> bool:
        """True once a ``run`` worker waits at the start barrier; raises ``WorkerFailed`` if it ended first."""
        raise NotImplementedError

    def go(self, start_s: float) -> float:
        """Release a ready ``run`` worker at ``start_s`` (coordinator wall clock, s); return how late the
        release reached the host (s; negative: in time)."""
        raise NotImplementedError

    def wait(self, timeout_s: float) -> WorkerResult:
        """Block until the worker ends (killed after ``timeout_s``: rc -9)."""
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError


class ProcessJob(WorkerJob):
    """A worker process started by this harness on host ``host``.

    The topology passes what it knows: ``work_dir`` (where the plan, the output and the log go),
    ``worker_argv`` (the worker command for some arguments) and ``popen`` (starts an argv on the host with
    its output going to a log file)."""

    def __init__(
        self,
        host: int,
        action: str,
        plan: dict,
        work_dir: Path,
        worker_argv: Callable[..., list[str]],
        popen: Callable[[list[str], Path], subprocess.Popen],
    ) -> None:
        self.host, self.action = host, action
        self.dir = work_dir / f"{action}-h{host}-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        (self.dir / "plan.json").write_text(json.dumps(plan))
        self.out, self.log = self.dir / "out.json", self.dir / "log.txt"
        self.go_file, self.ready_file = self.dir / "go", self.dir / "ready"
        argv = worker_argv(action, "--plan", str(self.dir / "plan.json"), "--out", str(self.out))
        if action == "run":
            argv += ["--go-file", str(self.go_file), "--ready-file", str(self.ready_file)]
        self.t0 = time.monotonic()
        self.proc = popen(argv, self.log)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def ready(self) -> bool:
        if self.ready_file.exists():
            return True
        if self.proc.poll() is not None:
            raise WorkerFailed(
                f"worker on host {self.host} exited early ({self.proc.returncode}):\n{self.log_tail()}"
            )
        return False

    def go(self, start_s: float) -> float:
        tmp = self.dir / "go.tmp"
        tmp.write_text(f"{start_s:.6f}")
        tmp.replace(self.go_file)
        return time.time() - start_s

    def wait(self, timeout_s: float) -> WorkerResult:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            rc = -9
        try:
            result = json.loads(self.out.read_text()) if self.out.exists() else None
        except ValueError:
            result = None
        return WorkerResult(rc, result, self.log_tail(), time.monotonic() - self.t0)

    def cancel(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc, grace_s=2.0)
