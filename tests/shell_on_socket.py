"""A bench's guest console stand-in: ``python shell_on_socket.py PATH DELAY`` writes its pid
(also its process group's) to PATH.pid, waits DELAY seconds (a guest booting again after a
power cycle), then gives each client of the Unix socket PATH an ``sh -i``.
``kill -s KILL -- -$(cat PATH.pid)`` ends it and its shells, as a power cut (an interactive sh
ignores SIGTERM: plain ``kill`` would leave the shells answering their clients)."""

import os
import socket
import subprocess
import sys
import time

path, delay = sys.argv[1], float(sys.argv[2])
os.setsid()
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
    subprocess.Popen(["/bin/sh", "-i"], stdin=conn, stdout=conn, stderr=conn,
                     env={"PS1": "guest$ ", "PATH": "/bin:/usr/bin"})
    conn.close()
