"""A bench's guest console stand-in: ``python shell_on_socket.py PATH DELAY [pty]`` writes its
pid (also its process group's) to PATH.pid, waits DELAY seconds (a guest booting again after
a power cycle), then gives each client of the Unix socket PATH an ``sh -i``; with ``pty``, on a
terminal of its own, as a guest's hvc0 (Ctrl-C interrupts), relayed to the client.
``kill -s KILL -- -$(cat PATH.pid)`` ends it and its shells, as a power cut (an interactive sh
ignores SIGTERM: plain ``kill`` would leave the shells answering their clients; a pty's shell
is in a session of its own, and ends with its terminal's hangup)."""

import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time

ENV = {"PS1": "guest$ ", "PATH": "/bin:/usr/bin"}


def on_pty(conn):
    """An ``sh -i`` on a new pty, its controlling terminal; ``conn`` relayed to it."""
    master, slave = os.openpty()
    subprocess.Popen(["/bin/sh", "-i"], stdin=slave, stdout=slave, stderr=slave, env=ENV,
                     start_new_session=True,
                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    threading.Thread(target=relay, args=(conn, master), daemon=True).start()


def relay(conn, master):
    """``conn`` to and from ``master`` once the shell prompts (a guest's shell is up before a
    test types: a Ctrl-C while sh starts would end it)."""
    try:
        started = b""
        while not started.endswith(ENV["PS1"].encode()):
            started += os.read(master, 4096)
        conn.sendall(started)
        while True:
            ready = select.select([conn, master], [], [])[0]
            if conn in ready:
                data = conn.recv(4096)
                if not data:
                    break
                os.write(master, data)
            if master in ready:
                data = os.read(master, 4096)
                if not data:
                    break
                conn.sendall(data)
    except OSError:                 # EIO: the shell exited; EPIPE: the client went
        pass
    conn.close()
    os.close(master)                # the shell's hangup


path, delay = sys.argv[1], float(sys.argv[2])
pty = sys.argv[3:] == ["pty"]
os.setsid()
for signum in (signal.SIGINT, signal.SIGQUIT):  # as a guest's shell has them (Ctrl-C ends its
    signal.signal(signum, signal.SIG_DFL)     # command), even if started by ``pytest &``
with open(f"{path}.pid", "w") as f:
    f.write(str(os.getpid()))
time.sleep(delay)
if os.path.exists(path):
    os.unlink(path)
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen(1)
while True:
    conn, _ = listener.accept()
    if pty:
        on_pty(conn)
        continue
    subprocess.Popen(["/bin/sh", "-i"], stdin=conn, stdout=conn, stderr=conn, env=ENV)
    conn.close()
