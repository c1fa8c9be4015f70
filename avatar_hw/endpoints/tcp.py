"""Console endpoint ``tcp:[HOST:]PORT``: a TCP server (one client at a time); loopback
unless a host is given (``tcp:4555`` listens on 127.0.0.1)."""

from .server import SocketServerEndpoint, client_address, tcp_listener


def open_url(url, rest, limit):
    return SocketServerEndpoint(url, tcp_listener(url, rest), limit)


def pyserial_url(rest):
    return f"socket://{client_address(rest)}"
