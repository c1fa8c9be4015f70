"""avatar_hw/processes.py: children that die with this process (``start_tied``)."""

import os
import subprocess
import sys
import threading
import time

import pytest

from avatar_hw.processes import start_tied

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def gone(path, timeout=60):
    """Wait until the thread or process at ``path`` (/proc/...) is gone (or a zombie)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if open(f"{path}/stat").read().rpartition(")")[2].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        assert time.monotonic() < deadline, f"{path} still there after {timeout} s"
        time.sleep(0.01)


def past_setpriv(pid, argv, timeout=60):
    """Wait until the child runs ``argv``: setpriv set the parent-death signal before."""
    deadline = time.monotonic() + timeout
    while open(f"/proc/{pid}/cmdline", "rb").read() != "\0".join(argv).encode() + b"\0":
        assert time.monotonic() < deadline, f"PID {pid} still in setpriv after {timeout} s"
        time.sleep(0.01)


def test_a_child_started_from_a_thread_that_ends_outlives_the_thread():
    """PR_SET_PDEATHSIG fires when the thread that forked the child ends: a daemon restarted
    from a worker thread (a test helper, a timer) was SIGKILLed as that thread returned."""
    started = []

    def start():
        started.append(start_tied(SLEEPER))
        past_setpriv(started[0].pid, SLEEPER)     # as start_daemon() waits for READY=1

    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    [child] = started
    try:
        gone(f"/proc/self/task/{worker.native_id}")     # the thread's exit sent the signal
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(3)                                # a SIGKILLed child is reaped at once
    finally:
        child.kill()
        child.wait()


CHILD = """if True:
    import time
    from avatar_hw.processes import start_tied
    from test_processes import past_setpriv
    child = start_tied(["sleep", "600"])
    past_setpriv(child.pid, ["sleep", "600"])
    print(child.pid, flush=True)
    time.sleep(600)
"""


def test_a_child_dies_with_its_parent_process_even_by_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    gone(f"/proc/{pid}")


def test_what_could_not_start_the_child_is_raised_in_the_caller():
    with pytest.raises(FileNotFoundError):
        start_tied(SLEEPER, cwd="/nonexistent/directory")
