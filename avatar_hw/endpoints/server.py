"""``SocketServerEndpoint``: a listening socket serving one client at a time (``unix:``,
``tcp:``, ``rfc2217:``), and ``tcp_listener`` for the TCP schemes."""

import logging
import socket

from .. import paths
from ..errors import AGAIN, ConfigError, os_reason
from .base import Endpoint

log = logging.getLogger(__name__)


BUSY = ("avatar-hw: {url} already has a client (one at a time, so that no typing is "
        "mixed and no output is split): close the other one first\r\n")


class SocketServerEndpoint(Endpoint):
    """A listening socket serving one client at a time: while a client is connected, a
    new one gets the one-line ``BUSY`` message and is closed (the client a test or a
    person is using is never taken over); one whose predecessor already hung up is served.

    A new client gets no output for ``hold_s`` seconds (or until ``_release()``): a
    client that empties its input as its open ends (pyserial's ``socket://`` and
    ``rfc2217://``, so labgrid's NetworkSerialPort) would otherwise discard the output
    sent at the connection, the unattached log first.
    """

    def __init__(self, url, listener, limit, unlink=None, hold_s=0.0):
        super().__init__(url, limit)
        self.listener = listener
        self.listener.setblocking(False)
        self.client = None
        self._unlink = unlink
        self.hold_s = hold_s

    def attach(self, loop, on_input, on_drained, on_connection=None):
        super().attach(loop, on_input, on_drained, on_connection)
        loop.add_reader(self.listener.fileno(), self._accept)
        self._accept()          # a client already waiting gets what the device does next

    @property
    def connected(self):
        return self.client is not None

    @property
    def attached(self):
        return self.client is not None

    def detach(self):
        if self._loop is not None:
            self._loop.remove_reader(self.listener.fileno())
        super().detach()

    def _accept(self):
        try:
            sock, peer = self.listener.accept()
        except AGAIN:
            return
        if self.client is not None and self._client_alive():
            log.info("%s: client %s refused: another client is connected", self,
                     peer or "(unix)")
            try:
                sock.send(BUSY.format(url=self.url).encode(), socket.MSG_DONTWAIT)
            except OSError:
                pass
            sock.close()
            return
        if self.client is not None:
            self._input_gone(None)                  # it hung up; we had not noticed yet
        sock.setblocking(False)
        self.client = sock
        self.interactive = True
        self._data_waiting = False
        self._hold(self.hold_s)                    # before a protocol's first send
        self._connected()
        self._update_reader()
        self.flush()
        log.info("%s: client %s connected", self, peer or "(unix)")
        if self._on_connection is not None:
            self._on_connection()

    def _connected(self):
        """A new client is ``self.client``, before anything is sent to it (a protocol's
        session starts here)."""

    def _client_alive(self):
        """False when the connected client has hung up (EOF or an error waiting)."""
        try:
            return self.client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except AGAIN:
            return True
        except OSError:
            return False

    def _drop_client(self):
        self._cancel_hold()
        self._set_reader(False)
        self._set_writer(False)
        self.client.close()
        self.client = None
        # output not yet taken waits for the next client (the guest holds it)
        if self._on_connection is not None:
            self._on_connection()

    def input_fd(self):
        return None if self.client is None else self.client.fileno()

    def _update_reader(self):
        # While input is paused the client is still watched, so that a hang-up is
        # noticed (and reported) even when the guest takes no input; once data is
        # seen waiting, the reader is removed until input resumes.
        self._set_reader(self.client is not None and (self._want_input or not self._data_waiting))

    def _readable_while_paused(self):
        try:
            data = self.client.recv(1, socket.MSG_PEEK)
        except AGAIN:
            return
        except OSError as err:
            self._input_gone(err)
            return
        if not data:
            self._input_gone(None)
        else:
            self._data_waiting = True
            self._update_reader()

    def output_fd(self):
        return None if self.client is None else self.client.fileno()

    def _readv(self, fd, views):
        return self.client.recvmsg_into(views)[0]

    def _writev(self, fd, views):
        return self.client.sendmsg(views)

    def _input_gone(self, err):
        log.info("%s: client disconnected (%s)", self, err or "EOF")
        self._drop_client()

    def _output_gone(self, err):
        self._input_gone(err)

    def close(self):
        super().close()
        if self.client is not None:
            self.client.close()
        self.listener.close()
        if self._unlink:
            paths.remove(self._unlink)


def tcp_listener(url, rest):
    """A listening TCP socket for ``rest`` = ``[HOST:]PORT`` (loopback unless a host is
    given); errors are ``ConfigError``s naming ``url`` and its scheme."""
    scheme = url.partition(":")[0]
    host, port = split_address(rest)
    host = host or "127.0.0.1"
    try:
        port = int(port)
    except ValueError:
        raise ConfigError(url, None, f"{scheme}: needs a port, e.g. "
                                     f"{scheme}:127.0.0.1:4555") from None
    if not 0 <= port <= 0xFFFF:
        raise ConfigError(url, None, f"{scheme}: port {port} is not 0-65535 (0: any free "
                                     "port, which info then shows)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise ConfigError(url, None, f"{scheme}: cannot listen on {host}:{port}: "
                                     f"{os_reason(err)}") from None
    return sock


def bound_url(scheme, listener):
    """``scheme:HOST:PORT`` of a listening socket, with the port it got (port 0 in a URL
    picks a free one: info and the daemon's log then name it)."""
    host, port = listener.getsockname()[:2]
    return f"{scheme}:{f'[{host}]' if ':' in host else host}:{port}"


def split_address(rest):
    """``[HOST:]PORT`` -> (host, port), both strings; host "" when not given, IPv6 brackets
    removed."""
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), port


def client_address(rest):
    """``host:port`` a client connects to for a server listening on ``rest`` (a wildcard
    address becomes loopback)."""
    host, port = split_address(rest)
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
