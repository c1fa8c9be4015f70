"""Ending a child process: the one SIGTERM-then-SIGKILL sequence (virtiofsd, QEMU, the
emulated board's daemon process)."""

import subprocess


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
