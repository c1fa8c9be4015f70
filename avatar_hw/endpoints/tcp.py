"""Console endpoint ``tcp:[HOST:]PORT``: a TCP server (one client at a time); loopback
unless a host is given (``tcp:4555`` listens on 127.0.0.1); port 0 picks a free port, which
the endpoint's URL then names (``tcp:127.0.0.1:41235`` in ``avatar-hw info``).

A new client gets its first output ``OPENER_HOLD_S`` (0.25 s) after it connected:
pyserial's ``socket://`` open (labgrid's NetworkSerialPort with ``protocol: raw``) empties
its input right after connecting, and sends nothing that would say it is done, so output
sent at once (the unattached log) was lost whenever the daemon was quicker than the
client's Python; so was the line a refused client gets (``SocketServerEndpoint``), now sent
as late.
"""

from .base import OPENER_HOLD_S
from .server import SocketServerEndpoint, bound_url, client_address, tcp_listener


def open_url(url, rest, limit):
    listener = tcp_listener(url, rest)
    endpoint = SocketServerEndpoint(url, listener, limit, hold_s=OPENER_HOLD_S,
                                    refuse_after=OPENER_HOLD_S)
    endpoint.url = bound_url("tcp", listener)
    return endpoint


def pyserial_url(rest):
    return f"socket://{client_address(rest)}"
