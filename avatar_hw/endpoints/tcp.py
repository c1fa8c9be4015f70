"""Console endpoint ``tcp:[HOST:]PORT``: a TCP server (one client at a time); loopback
unless a host is given (``tcp:4555`` listens on 127.0.0.1); port 0 picks a free port, which
the endpoint's URL then names (``tcp:127.0.0.1:41235`` in ``avatar-hw info``)."""

from .server import SocketServerEndpoint, bound_url, client_address, tcp_listener


def open_url(url, rest, limit):
    listener = tcp_listener(url, rest)
    endpoint = SocketServerEndpoint(url, listener, limit)
    endpoint.url = bound_url("tcp", listener)
    return endpoint


def pyserial_url(rest):
    return f"socket://{client_address(rest)}"
