"""Compile jobs that tests wait for, started in the background as soon as the run's tests are known.

Why: the suite runs in one process, so on CI's 2 cores one core idles for most of the run, while a
few tests each wait minutes for compilers (nvcc over csrc/, the Triton AOT sets).  Measured on the
2-core CI machine: pytest 1611 s -> 1227 s with the compilers in the background.  (The benchmark
scripts' CPU dry runs as well: 1260 s, no gain -- their tests come first, so the test process waits
on them anyway -- and gpu_check's plumbing run overshot its stage caps on a shared core.)  A test module
may define ``background_start(names)`` (``names``: its selected test functions); tests/conftest.py
calls it right after collection, and it submits the compile commands those tests will need.  They
run at a lower CPU priority (``nice``), so they take the idle core, not the test process's; the
test then collects the finished (or still running) job with :meth:`Job.wait`.  Output goes to a
file, never a pipe (a full pipe would stall a job that nobody reads yet).  Jobs still running when
the session ends are killed (``kill_all``, from conftest's ``pytest_sessionfinish``).

A test run alone (or under xdist, where conftest starts nothing) submits its jobs itself when it
needs them: same commands, same checks.  ``COMETQ_TEST_BACKGROUND=0`` turns the early start off.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

ENV = "COMETQ_TEST_BACKGROUND"
_JOBS: dict = {}


class Job:
    def __init__(self, cmd, env=None, nice=0):
        fd, self.log_path = tempfile.mkstemp(prefix="cometq_bg_", suffix=".log")
        self.cmd = list(cmd)
        self.t0 = time.time()
        with os.fdopen(fd, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self._result = None

    def wait(self, timeout: float):
        """(returncode, output, seconds since submission); a job past ``timeout`` is killed
        (returncode then negative) and its output so far returned."""
        if self._result is None:
            try:
                rc = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                out = fh.read()
            os.unlink(self.log_path)
            self._result = (rc, out, time.time() - self.t0)
        return self._result


def submit(key, cmd, env=None, nice=0) -> Job:
    """The job under ``key``: started now unless it already was."""
    job = _JOBS.get(key)
    if job is None:
        job = _JOBS[key] = Job(cmd, env=env, nice=nice)
    return job


def enabled() -> bool:
    """Early starts are on (not under an xdist worker, not turned off)."""
    return os.environ.get(ENV, "1") != "0" and not os.environ.get("PYTEST_XDIST_WORKER")


_TEMP_DIRS: list = []


def temp_dir(prefix: str) -> str:
    """A directory for a background job's outputs, removed at the session's end (``kill_all``)."""
    d = tempfile.mkdtemp(prefix=prefix)
    _TEMP_DIRS.append(d)
    return d


def kill_all():
    """(conftest, session end) kill the jobs still running, remove their temporary directories."""
    for job in _JOBS.values():
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()
    while _TEMP_DIRS:
        shutil.rmtree(_TEMP_DIRS.pop(), ignore_errors=True)
