"""``SocketServerEndpoint``: a listening socket serving one client at a time (``unix:``,
``tcp:``, ``rfc2217:``), and ``tcp_listener`` for the TCP schemes."""

import collections
import logging
import select
import socket

from .. import paths
from ..errors import AGAIN, ConfigError, os_reason
from .base import Endpoint

log = logging.getLogger(__name__)


BUSY = ("avatar-hw: {url} already has a client (one at a time, so that no typing is "
        "mixed and no output is split): close the other one first\r\n")
WAITING = ("avatar-hw: {url}: what earlier clients typed still waits for the guest to read "
           "it: try again later\r\n")
MAX_DEPARTED = 4            # clients gone whose input the guest has not read yet, at most
MAX_REFUSING = 8            # refused clients waiting for their line (``refuse_after``), at most


class SocketServerEndpoint(Endpoint):
    """A listening socket serving one client at a time: while a client is connected, a
    new one gets the one-line ``BUSY`` message and is closed (the client a test or a
    person is using is never taken over); one whose predecessor already hung up is served.

    A client that hung up (or whose output failed) gets no more output, but what it sent
    still reaches the guest, before what the next client sends: its socket, with the input
    the kernel holds for it, waits in ``_departed`` until the guest has read it all. While
    ``MAX_DEPARTED`` do, a new client gets the one-line ``WAITING`` message and is closed.

    A new client gets no output for ``hold_s`` seconds (or until ``_release()``): a
    client that empties its input as its open ends (pyserial's ``socket://`` and
    ``rfc2217://``, so labgrid's NetworkSerialPort) would otherwise discard the output
    sent at the connection, the unattached log first. For the same reason a refused
    client gets its line ``refuse_after`` seconds after it connected (pyserial's
    ``socket://`` discarded it, and ``avatar-hw console`` saw a peer that closed without a
    word); ``MAX_REFUSING`` wait so at most, more are refused at once.
    """

    def __init__(self, url, listener, limit, unlink=None, hold_s=0.0, refuse_after=0.0):
        super().__init__(url, limit)
        self.listener = listener
        self.listener.setblocking(False)
        self.client = None
        self.protocol = None                # the client's protocol state (rfc2217's)
        self._departed = collections.deque()    # (socket, protocol) of clients gone
        self._unlink = unlink
        self.hold_s = hold_s
        self.refuse_after = refuse_after
        self._refusing = {}                 # refused socket -> the timer that sends its line

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
            for sock, (timer, line) in list(self._refusing.items()):
                self._loop.cancel(timer)
                self._refuse(sock, line)
        super().detach()

    def _accept(self):
        try:
            sock, peer = self.listener.accept()
        except AGAIN:
            return
        refusal = (BUSY if self.client is not None and not hung_up(self.client) else
                   WAITING if len(self._departed) >= MAX_DEPARTED else None)
        if refusal is not None:
            log.info("%s: client %s refused: %s", self, peer or "(unix)",
                     "another client is connected" if refusal is BUSY else
                     "earlier clients' input waits")
            line = refusal.format(url=self.url).encode()
            if self.refuse_after and len(self._refusing) < MAX_REFUSING:
                self._refuse_later(sock, line, self.refuse_after)
                self._refusal_pending(sock, line)
            else:
                self._refuse(sock, line)
            return
        if self.client is not None:
            self._drop_client("a hang-up not seen before", keep_input=True)
        sock.setblocking(False)
        self.client = sock
        self.interactive = True
        self._hold(self.hold_s)                    # before a protocol's first send
        self._connected()
        self._update_reader()
        self.flush()
        log.info("%s: client %s connected", self, peer or "(unix)")
        if self._on_connection is not None:
            self._on_connection()

    def _refuse_later(self, sock, line, delay):
        """``_refuse(sock, line)`` in ``delay`` seconds (instead of when it was due)."""
        timer, _ = self._refusing.get(sock, (None, None))
        if timer is not None:
            self._loop.cancel(timer)
        self._refusing[sock] = self._loop.call_later(delay, lambda: self._refuse(sock, line)), line

    def _refusal_pending(self, sock, line):
        """A refused client waits ``refuse_after`` for its ``line`` (a protocol may answer
        it meanwhile, and refuse it sooner)."""

    def _refuse(self, sock, line):
        """Send a refused client its one line and close it."""
        timer, _ = self._refusing.pop(sock, (None, None))
        if timer is not None:
            self._loop.cancel(timer)
            self._loop.remove_reader(sock)
        try:
            sock.send(line, socket.MSG_DONTWAIT)
        except OSError:
            pass
        sock.close()

    def _connected(self):
        """A new client is ``self.client``, before anything is sent to it (a protocol's
        session starts here)."""

    def _drop_client(self, reason, keep_input=False):
        """The client goes: no more output to it (what it did not take waits for the next
        client). With ``keep_input`` (it hung up, or its output failed) what it sent that
        is not read yet still goes to the guest (``_departed``); else it is closed with it."""
        log.info("%s: client disconnected (%s)", self, reason)
        self._cancel_hold()
        self._set_reader(False)
        self._set_writer(False)
        if keep_input:
            self._departed.append((self.client, self.protocol))
        else:
            self.client.close()
        self.client = self.protocol = None
        self._watch_source()
        if self._on_connection is not None:
            self._on_connection()

    def _watch_source(self):
        """Input comes from another source now (its reader was removed): watch it."""
        self._data_waiting = False
        self._update_reader()

    def _source(self):
        """(socket, protocol) input is read from now: the oldest departed client until
        its input is all read, then the client ((None, None): none)."""
        return self._departed[0] if self._departed else (self.client, self.protocol)

    def input_fd(self):
        sock = self._source()[0]
        return None if sock is None else sock.fileno()

    def _update_reader(self):
        # While input is paused the source is still watched, so that a hang-up is
        # noticed (and reported) even when the guest takes no input; once data is
        # seen waiting, the reader is removed until input resumes.
        self._set_reader(self.input_fd() is not None and (self._want_input or
                                                          not self._data_waiting))

    def _readable_while_paused(self):
        try:
            data = self._source()[0].recv(1, socket.MSG_PEEK)
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
        return self._source()[0].recvmsg_into(views)[0]

    def _writev(self, fd, views):
        return self.client.sendmsg(views)

    def _input_gone(self, err):
        """EOF or an error reading the source: all it sent was read."""
        if not self._departed:
            self._drop_client(err or "EOF")
            return
        self._set_reader(False)
        self._departed.popleft()[0].close()
        self._watch_source()

    def _output_gone(self, err):
        self._drop_client(err, keep_input=True)

    def close(self):
        super().close()
        for sock, _ in self._departed:
            sock.close()
        if self.client is not None:
            self.client.close()
        self.listener.close()
        if self._unlink:
            paths.remove(self._unlink)


def hung_up(sock):
    """Has the peer of ``sock`` closed or shut down its sending side (or failed)? Seen
    even while input from it waits unread (a peek would see the data)."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return bool(poller.poll(0))


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
