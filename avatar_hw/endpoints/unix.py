"""Console endpoint ``unix:PATH``: a Unix stream socket server (one client at a time)."""

import socket

from .. import paths
from ..errors import ConfigError, os_reason
from .server import SocketServerEndpoint


def open_url(url, path, limit):
    if not path:
        raise ConfigError(url, None, "unix: needs a path, e.g. unix:/run/avatar/vm0.sock")
    problem = paths.clear_for_socket(path)
    if problem:
        raise ConfigError(url, None, f"{path} {problem}; choose another path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise ConfigError(url, None, f"cannot listen on {path}: {os_reason(err)}") from None
    return SocketServerEndpoint(url, sock, limit, unlink=path)


def pyserial_url(rest):
    return f"unix://{rest}"       # avatar_hw.hil.protocol_unix's unix:///path
