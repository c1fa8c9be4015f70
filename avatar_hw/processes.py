"""Ending a child process: the one SIGTERM-then-SIGKILL sequence (virtiofsd, QEMU, the
emulated board's daemon process); children that die with this process (``start_tied``);
and what a process killed before it cleaned up left."""

import os
import queue
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import Future


def end_process(proc, term_wait, grace=0.0):
    """End ``proc`` (a ``subprocess.Popen``) and reap it: wait ``grace`` s for it to exit by
    itself, then SIGTERM, then SIGKILL after ``term_wait`` s. Returns its exit status.
    ``PermissionError`` (another user's process) comes out of the SIGTERM, unreaped."""
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        return proc.wait(term_wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def start_tied(argv, **popen):
    """``subprocess.Popen(argv, **popen)`` for a child that is SIGKILLed when this process
    dies, even by a SIGKILL (``setpriv --pdeathsig KILL``: PR_SET_PDEATHSIG, kept across
    exec). That signal comes when the *thread* that forked the child ends, not the process:
    a child started from a worker thread died with it. So every such child is forked by one
    thread that lives as long as this process."""
    setpriv = shutil.which("setpriv")          # util-linux: on every Debian
    prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
    started = Future()
    _starter().put((lambda: subprocess.Popen([*prefix, *argv], **popen), started))
    try:
        return started.result()
    except BaseException:
        started.add_done_callback(_end_unclaimed)    # interrupted: end what it started anyway
        raise


def _end_unclaimed(started):
    if started.exception() is None:
        started.result().kill()
        started.result().wait()


_starter_queue = (None, None)          # (the PID it serves, its queue)
_starter_lock = threading.Lock()


def _starter():
    """The queue of the thread that starts ``start_tied``'s children (this process's: a
    forked child makes its own)."""
    global _starter_queue
    with _starter_lock:
        pid, jobs = _starter_queue
        if pid != os.getpid():
            jobs = queue.SimpleQueue()
            threading.Thread(target=_start_children, args=(jobs,), name="child-starter",
                             daemon=True).start()
            _starter_queue = (os.getpid(), jobs)
        return jobs


def _start_children(jobs):
    while True:
        start, started = jobs.get()
        try:
            started.set_result(start())
        except BaseException as err:       # the caller's to raise (no such program, ...)
            started.set_exception(err)


def make_workdir(prefix, root=None):
    """A new directory ``<prefix><PID>-*`` in ``root`` (the temporary directory), after
    removing those of ``prefix`` whose process is gone (``remove_stale_workdirs``)."""
    remove_stale_workdirs(prefix, root)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root)


def remove_stale_workdirs(prefix, root=None):
    """Remove this user's directories ``<prefix><PID>-*`` in ``root`` (the temporary
    directory) whose process is gone: left by a SIGKILL, which runs no cleanup."""
    root = root or tempfile.gettempdir()
    for name in os.listdir(root):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].partition("-")[0]
        path = os.path.join(root, name)
        try:
            if not pid.isdigit() or os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
