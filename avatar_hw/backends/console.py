"""Host endpoints of a console port, chosen by URL (in the spirit of pyserial's URL handlers).

    open_console_backend("pty:/run/avatar/vm0-console")   a pseudo-terminal; the path is
                                                          a stable symlink to /dev/pts/N
    open_console_backend("unix:/run/avatar/vm0.sock")     a Unix socket server (one client)
    open_console_backend("tcp:127.0.0.1:4555")            a TCP server; "tcp:4555" listens
                                                          on loopback only
    open_console_backend("file:/var/log/avatar/vm0.log")  append-only log (output only)
    open_console_backend("stdio")                          this process's stdin/stdout
    open_console_backend(["pty:/run/vm0", "file:/tmp/vm0.log"])   several at once

A ``ConsoleBackend`` is what a console port talks to: output goes to every
endpoint, input comes from the interactive ones (all but ``file:``).

Nothing is lost, in either direction:

* input: an endpoint's fd is read only when the device has a guest receive
  buffer to put the bytes in (``pause_input`` / ``resume_input`` remove and
  re-add the reader); unread input waits in the kernel (pty, socket buffer)
  and back-pressures the host writer.
* output: ``write`` accepts at most ``room()`` bytes: each endpoint writes
  what its fd takes now and copies the rest into its own buffer of at most
  ``limit`` bytes (drained when the fd is writable). The port keeps the
  guest's transmit buffer until all its bytes are accepted, so when an
  endpoint is slow the guest is flow-controlled, not dropped.
* a socket endpoint with no client (never connected, or the client went
  away) buffers output up to ``limit`` and then flow-controls the guest; a
  client that connects gets the buffered bytes first. Bytes the kernel had
  already accepted for a client that then disconnects go with that client.
  ``connected`` tells whether a socket endpoint has a client (the console
  reports it to the guest as the port's host side opening and closing).
* a pty is kept open on both sides by the backend, so output written while
  nobody has the terminal open waits in the pty and our buffer (then flow
  control), and a user who opens it later reads it.
"""

import importlib
import logging
import os
import socket
import sys
import tty

from ..errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 256 * 1024
IOV_MAX = 1024
_AGAIN = (BlockingIOError, InterruptedError)
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def truncate_views(views, n):
    """The first ``n`` bytes of a list of memoryviews, as a list of memoryviews."""
    out = []
    for view in views:
        if n <= 0:
            break
        out.append(view if len(view) <= n else view[:n])
        n -= len(view)
    return out[:IOV_MAX]


def skip_views(views, n):
    """``views`` without their first ``n`` bytes."""
    for i, view in enumerate(views):
        if n < len(view):
            return [view[n:]] + list(views[i + 1:])
        n -= len(view)
    return []


class Endpoint:
    """One host endpoint. Subclasses provide ``_read_fd``/``_write_fd`` handling."""

    interactive = True

    def __init__(self, url, limit):
        self.url = url
        self.limit = limit
        self._pending = bytearray()
        self._loop = self._on_input = self._on_drained = self._on_connection = None
        self._reading = False
        self._reader_fd = self._writer_fd = None
        self._want_input = True
        self._data_waiting = False
        self._writer_registered = False

    def __repr__(self):
        return f"<{type(self).__name__} {self.url}>"

    # -- wiring ----------------------------------------------------------------------------------

    def attach(self, loop, on_input, on_drained, on_connection=None):
        """Call ``on_input()`` when readable, ``on_drained()`` when output room frees up,
        ``on_connection()`` when ``connected`` changes."""
        self._loop, self._on_input, self._on_drained = loop, on_input, on_drained
        self._on_connection = on_connection
        self._update_reader()

    @property
    def connected(self):
        """Is someone at the host end? (Always, except for a socket without a client.)"""
        return True

    def detach(self):
        self._set_reader(False)
        self._set_writer(False)
        self._loop = None

    def close(self):
        self.detach()

    # -- input -------------------------------------------------------------------------------------

    def input_fd(self):
        """The fd to read from now (None: nothing to read from, e.g. no client)."""
        return None

    def pause_input(self):
        self._want_input = False
        self._update_reader()

    def resume_input(self):
        self._want_input = True
        self._data_waiting = False
        self._update_reader()

    def _update_reader(self):
        self._set_reader(self._want_input and self.interactive and self.input_fd() is not None)

    def _set_reader(self, on):
        if self._loop is None or on == self._reading:
            return
        fd = self.input_fd() if on else self._reader_fd
        if on:
            self._reader_fd = fd
            self._loop.add_reader(fd, self._readable)
        else:
            self._loop.remove_reader(fd)
        self._reading = on

    def _readable(self):
        if not self._want_input:
            self._readable_while_paused()
        elif self._on_input is not None:
            self._on_input()

    def _readable_while_paused(self):
        self._set_reader(False)

    def readinto(self, views):
        """Read into ``views``: the byte count, or 0 when nothing is available now."""
        fd = self.input_fd()
        if fd is None:
            return 0
        try:
            n = self._readv(fd, views[:IOV_MAX])
        except _AGAIN:
            return 0
        except OSError as err:
            self._input_gone(err)
            return 0
        if n == 0:
            self._input_gone(None)
        return n

    def _readv(self, fd, views):
        return os.readv(fd, views)

    def _input_gone(self, err):
        """EOF or error on input: stop reading (subclasses reconnect)."""
        log.info("%s: input closed (%s)", self, err or "EOF")
        self._set_reader(False)
        self.interactive = False

    # -- output ------------------------------------------------------------------------------------

    def output_fd(self):
        return None

    def room(self):
        """Bytes ``write`` can accept now."""
        return max(0, self.limit - len(self._pending))

    @property
    def buffered(self):
        return len(self._pending)

    def write(self, views, n):
        """Take the first ``n`` bytes of ``views`` (``n <= room()``): written or buffered."""
        written = 0
        fd = self.output_fd()
        if not self._pending and fd is not None:
            written = self._write_now(fd, truncate_views(views, n))
        if written < n:
            for view in truncate_views(skip_views(views, written), n - written):
                self._pending += view
            self._set_writer(True)

    def _write_now(self, fd, views):
        try:
            return self._writev(fd, views)
        except _AGAIN:
            return 0
        except OSError as err:
            self._output_gone(err)
            return 0

    def _writev(self, fd, views):
        return os.writev(fd, views)

    def _output_gone(self, err):
        log.warning("%s: output failed (%s); buffering", self, err)

    def _set_writer(self, on):
        fd = self.output_fd()
        if self._loop is None or on == self._writer_registered or (on and fd is None):
            return
        if on:
            self._writer_fd = fd
            self._loop.add_writer(fd, self._drain)
        else:
            self._loop.remove_writer(self._writer_fd)
        self._writer_registered = on

    def _drain(self):
        fd = self.output_fd()
        if fd is not None and self._pending:
            n = self._write_now(fd, [memoryview(self._pending)])
            del self._pending[:n]
        if not self._pending:
            self._set_writer(False)
        if self._on_drained is not None and self.room():
            self._on_drained()


class PtyEndpoint(Endpoint):
    """A pseudo-terminal in raw mode; ``path`` becomes a symlink to its /dev/pts/N."""

    def __init__(self, url, path, limit):
        super().__init__(url, limit)
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self.master, False)
        self.tty_name = os.ttyname(self._slave)
        self.path = path
        if path:
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                os.symlink(self.tty_name, tmp)
                os.replace(tmp, path)
            except OSError as err:
                self._close_fds()
                raise ConfigError(url, "path", f"cannot create the pty symlink: {err}") from None

    def input_fd(self):
        return self.master

    def output_fd(self):
        return self.master

    def _close_fds(self):
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self):
        super().close()
        self._close_fds()
        if self.path and os.path.islink(self.path) and os.readlink(self.path) == self.tty_name:
            os.unlink(self.path)


class FileEndpoint(Endpoint):
    """Append-only log of the output; never reads. Regular-file writes complete at once."""

    interactive = False

    def __init__(self, url, path, limit):
        super().__init__(url, limit)
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise ConfigError(url, "path", f"cannot open the log file: {err.strerror}") from None

    def output_fd(self):
        return self.fd

    def write(self, views, n):
        views = truncate_views(views, n)
        while views:
            try:
                done = os.writev(self.fd, views)
            except OSError as err:
                log.error("%s: log write failed (%s); %d bytes not logged", self, err, n)
                return
            views = skip_views(views, done)

    def close(self):
        super().close()
        os.close(self.fd)


class StdioEndpoint(Endpoint):
    """This process's stdin (input) and stdout (output), made non-blocking while attached."""

    def __init__(self, url, limit):
        super().__init__(url, limit)
        self._in, self._out = sys.stdin.fileno(), sys.stdout.fileno()
        self._blocking = (os.get_blocking(self._in), os.get_blocking(self._out))
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)

    def input_fd(self):
        return self._in if self.interactive else None

    def output_fd(self):
        return self._out

    def close(self):
        super().close()
        os.set_blocking(self._in, self._blocking[0])
        os.set_blocking(self._out, self._blocking[1])


class SocketServerEndpoint(Endpoint):
    """A listening socket serving one client at a time (a new client replaces the old)."""

    def __init__(self, url, listener, limit, unlink=None):
        super().__init__(url, limit)
        self.listener = listener
        self.listener.setblocking(False)
        self.client = None
        self._unlink = unlink

    def attach(self, loop, on_input, on_drained, on_connection=None):
        super().attach(loop, on_input, on_drained, on_connection)
        loop.add_reader(self.listener.fileno(), self._accept)

    @property
    def connected(self):
        return self.client is not None

    def detach(self):
        if self._loop is not None:
            self._loop.remove_reader(self.listener.fileno())
        super().detach()

    def _accept(self):
        try:
            sock, peer = self.listener.accept()
        except _AGAIN:
            return
        if self.client is not None:
            log.info("%s: new client %s replaces the previous one", self, peer)
            self._drop_client()
        sock.setblocking(False)
        self.client = sock
        self.interactive = True
        self._data_waiting = False
        self._update_reader()
        if self._pending:
            self._set_writer(True)
        log.info("%s: client %s connected", self, peer or "(unix)")
        if self._on_connection is not None:
            self._on_connection()

    def _drop_client(self):
        self._set_reader(False)
        self._set_writer(False)
        self.client.close()
        self.client = None
        # keep the pending output for the next client; writer re-added on connect
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
        except _AGAIN:
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
        if self._unlink and os.path.exists(self._unlink):
            os.unlink(self._unlink)


def _unix_endpoint(url, path, limit):
    if not path:
        raise ConfigError(url, None, "unix: needs a path, e.g. unix:/run/avatar/vm0.sock")
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise ConfigError(url, None, f"cannot listen on {path}: {err.strerror}") from None
    return SocketServerEndpoint(url, sock, limit, unlink=path)


def _tcp_endpoint(url, rest, limit):
    host, _, port = rest.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port)
    except ValueError:
        raise ConfigError(url, None, "tcp: needs a port, e.g. tcp:127.0.0.1:4555") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise ConfigError(url, None, f"cannot listen on {host}:{port}: {err.strerror}") from None
    return SocketServerEndpoint(url, sock, limit)


_SCHEMES = {
    "pty": lambda url, rest, limit: PtyEndpoint(url, rest, limit),
    "unix": _unix_endpoint,
    "tcp": _tcp_endpoint,
    "file": lambda url, rest, limit: FileEndpoint(url, rest, limit),
    "stdio": lambda url, rest, limit: StdioEndpoint(url, limit),
    "rfc2217": lambda *args: importlib.import_module(".rfc2217", __package__).open_rfc2217(*args),
}


def open_endpoint(url, *, limit=DEFAULT_LIMIT):
    """One endpoint from a URL (see the module docstring)."""
    scheme, _, rest = url.partition(":")
    factory = _SCHEMES.get(scheme)
    if factory is None:
        raise ConfigError(url, None, f"unknown console endpoint {scheme!r}; use one of "
                          + ", ".join(f"{s}:" for s in _SCHEMES))
    if scheme == "file" and not rest:
        raise ConfigError(url, None, "file: needs a path, e.g. file:/var/log/avatar/vm0.log")
    return factory(url, rest, limit)


class ConsoleBackend:
    """The host side of one console port: output to every endpoint, input from the
    interactive ones. ``endpoints`` may be empty: then the guest's output
    waits in the guest (flow control) until ``add_endpoint`` gives it somewhere
    to go."""

    def __init__(self, endpoints=(), *, limit=DEFAULT_LIMIT):
        self.endpoints = list(endpoints)
        self.limit = limit
        self._next_input = 0
        self._attached = None
        self._input_paused = False

    def attach(self, loop, on_input, on_drained, on_connection=None):
        self._attached = (loop, on_input, on_drained, on_connection)
        for ep in self.endpoints:
            ep.attach(*self._attached)

    def add_endpoint(self, endpoint):
        """Add an endpoint (an ``Endpoint`` or a URL) while running; output resumes."""
        if isinstance(endpoint, str):
            endpoint = open_endpoint(endpoint, limit=self.limit)
        self.endpoints.append(endpoint)
        if self._input_paused:
            endpoint.pause_input()
        if self._attached is not None:
            _, _, on_drained, on_connection = self._attached
            endpoint.attach(*self._attached)
            if on_connection is not None:
                on_connection()
            on_drained()
        return endpoint

    @property
    def connected(self):
        """True if any endpoint has someone at the host end."""
        return any(ep.connected for ep in self.endpoints)

    def detach(self):
        for ep in self.endpoints:
            ep.detach()
        self._attached = None

    def close(self):
        for ep in self.endpoints:
            ep.close()
        self._attached = None

    def pause_input(self):
        self._input_paused = True
        for ep in self.endpoints:
            ep.pause_input()

    def resume_input(self):
        self._input_paused = False
        for ep in self.endpoints:
            ep.resume_input()

    def readinto(self, views):
        """Fill ``views`` from the first interactive endpoint with data (round robin)."""
        count = len(self.endpoints)
        for i in range(count):
            ep = self.endpoints[(self._next_input + i) % count]
            if ep.interactive:
                n = ep.readinto(views)
                if n:
                    self._next_input = (self._next_input + i + 1) % count
                    return n
        return 0

    def room(self):
        if not self.endpoints:
            return 0
        return min(ep.room() for ep in self.endpoints)

    def write(self, views, total):
        """Accept up to ``total`` bytes of ``views`` for every endpoint; returns how many."""
        n = min(total, self.room())
        if n:
            for ep in self.endpoints:
                ep.write(views, n)
        return n

    @property
    def buffered(self):
        return max((ep.buffered for ep in self.endpoints), default=0)


def open_console_backend(spec, *, limit=DEFAULT_LIMIT):
    """A ``ConsoleBackend`` from a URL, a list of URLs, an existing backend, or None."""
    if spec is None:
        return ConsoleBackend(limit=limit)
    if isinstance(spec, ConsoleBackend):
        return spec
    urls = [spec] if isinstance(spec, str) else list(spec)
    endpoints = []
    try:
        for url in urls:
            endpoints.append(open_endpoint(url, limit=limit))
    except BaseException:
        for ep in endpoints:
            ep.close()
        raise
    return ConsoleBackend(endpoints, limit=limit)
