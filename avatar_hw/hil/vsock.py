"""Host ends of vsock streams to a guest (the device's Unix socket, Firecracker's convention).

``connect(path, port)`` connects to the vsock device's socket ``path``, asks for guest
``port`` (``CONNECT <port>\\n``) and returns the connected stream once the guest accepted
(``OK <host_port>\\n``): a plain blocking ``socket.socket``. A guest that does not listen
yet refuses (the device closes the socket without ``OK``): ``connect`` tries again until
``timeout``, then raises ``AvatarError``.
"""

import socket
import time

from ..errors import AvatarError

RETRY_SECONDS = 0.1


def _greeting(sock, deadline):
    """The ``OK <host_port>`` line's port, or None when the device closed the socket."""
    line = b""
    while not line.endswith(b"\n"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            byte = sock.recv(1)
        except (ConnectionResetError, TimeoutError):
            return None
        if not byte:
            return None
        line += byte
    parts = line.split()
    if len(parts) != 2 or parts[0] != b"OK" or not parts[1].isdigit():
        raise AvatarError(f"vsock: unexpected answer {line!r} to CONNECT")
    return int(parts[1])


def connect(path, port, timeout=30):
    """A stream to guest ``port`` through the vsock device's socket ``path``."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            sock.sendall(f"CONNECT {port}\n".encode())
            if _greeting(sock, deadline) is not None:
                sock.settimeout(None)
                return sock
        except (FileNotFoundError, ConnectionRefusedError, BrokenPipeError,
                ConnectionResetError):
            pass
        sock.close()
        if time.monotonic() >= deadline:
            raise AvatarError(f"vsock: the guest did not accept a connection to port {port} "
                              f"within {timeout} s (through {path}); is a program "
                              "listening there?")
        time.sleep(RETRY_SECONDS)
