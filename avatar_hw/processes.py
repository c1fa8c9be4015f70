"""Ending a child process: the one SIGTERM-then-SIGKILL sequence (virtiofsd, QEMU, the
emulated board's daemon process); and what a process killed before it cleaned up left."""

import os
import shutil
import subprocess
import tempfile


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
