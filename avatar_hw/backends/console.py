"""Host endpoints of a console port, chosen by URL (in the spirit of pyserial's URL handlers).

    open_console_backend("pty:/run/avatar/vm0-console")   a pseudo-terminal; the path is
                                                          a stable symlink to /dev/pts/N
    open_console_backend("unix:/run/avatar/vm0.sock")     a Unix socket server (one client)
    open_console_backend("tcp:127.0.0.1:4555")            a TCP server; "tcp:4555" listens
                                                          on loopback only
    open_console_backend("rfc2217:127.0.0.1:4560")        an RFC 2217 (Telnet COM port)
                                                          server (see ``.rfc2217``)
    open_console_backend("file:/var/log/avatar/vm0.log")  append-only log (output only)
    open_console_backend("stdio")                          this process's stdin/stdout
    open_console_backend(["pty:/run/vm0", "file:/tmp/vm0.log"])   several at once

``SCHEMES`` maps each scheme to its factory ``(url, rest, limit) -> Endpoint``.

A ``ConsoleBackend`` is what a console port talks to: output goes to every
endpoint, input comes from the interactive ones (all but ``file:``).

Nothing is lost, in either direction:

* input: an endpoint's fd is read only when the device has a guest receive
  buffer to put the bytes in (``pause_input`` / ``resume_input`` remove and
  re-add the reader); unread input waits in the kernel (pty, socket buffer)
  and back-pressures the host writer.
* output: the guest's transmit buffers themselves are the output buffer.
  ``submit`` appends a buffer's memoryviews (guest RAM, not copied) to the
  backend's ``OutputStream``; every endpoint writes from the stream with
  writev/sendmsg at its own position, and a submitted buffer is *done*
  (``take_done``: the port returns it to the guest) only once every
  *attached* endpoint has handed all its bytes to the kernel. So an
  acknowledged byte is in every attached endpoint's fd (file, pty, socket
  buffer) and survives the daemon's death; what is still in flight was
  never acknowledged. The stream is bounded (``can_take``: ``limit`` bytes,
  ``MAX_HELD`` buffers): while an endpoint is slow the guest waits.
* attached: a socket endpoint while a client is connected; ``file:``,
  ``stdio`` and ``pty:`` always (the backend keeps the pty's slave open, so
  output waits in the pty for a user who opens it later, then the guest
  waits). A socket with no client does not hold the guest; a client that
  connects gets the stream from the oldest byte not yet done (or from where
  it was, if it is a returning endpoint that got further).
* nobody attached (only sockets without a client, or no endpoint yet): the
  guest must not wait for a reader that may never come (Linux's hvc path
  spins until the host returns its buffer). Output then goes into the
  backend's *unattached log*, a ring of the last ``log_size`` bytes (a copy;
  the buffers go back to the guest at once; what the ring overwrites is
  counted in ``log_overwritten``). Output in flight when the last client
  left joins the log too. The next endpoint that attaches receives the log
  first, then the live stream, with flow control again.
  ``connected`` tells whether a socket endpoint has a client (the console
  reports it to the guest as the port's host side opening and closing).
* an endpoint used on its own (no backend: tools and tests) has a private
  stream: ``write`` copies into it, up to ``room()`` bytes.
"""

import collections
import importlib
import logging
import os
import socket
import sys
import tty

from .. import paths
from ..errors import ConfigError
from ..virtio.buffers import IOV_MAX, first_batch, truncate

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 256 * 1024
DEFAULT_LOG_SIZE = 64 * 1024    # the unattached log
MAX_HELD = 256              # buffers in a backend's output stream
MAX_HELD_VIEWS = 4096       # their descriptors (each a memoryview the daemon keeps)
LOGGED = object()           # the token of the unattached log's bytes in the stream
COALESCE_LIMIT = 4096       # backend-owned bytes (emergency writes) joined into one segment
_AGAIN = (BlockingIOError, InterruptedError)
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class OutputStream:
    """Output waiting for endpoints: segments (lists of memoryviews, not copied) on one
    byte axis. ``head`` is the first byte of the oldest segment not yet done, ``tail``
    the end; each endpoint keeps its own ``position`` on the axis."""

    def __init__(self):
        self.segments = collections.deque()         # [start, length, views, token]
        self.head = self.tail = 0
        self.views = 0                              # memoryviews the segments hold

    @property
    def buffered(self):
        return self.tail - self.head

    def submit(self, views, length, token=None):
        self.segments.append([self.tail, length, views, token])
        self.tail += length
        self.views += len(views)

    def views_from(self, position, limit=None):
        """Memoryviews of the bytes from ``position`` (at most IOV_MAX views, ``limit`` bytes)."""
        out = []
        left = self.tail - position if limit is None else min(limit, self.tail - position)
        for start, length, views, _ in self.segments:
            if left <= 0 or len(out) >= IOV_MAX:
                break
            skip = position - start
            if skip >= length:
                continue
            for view in views:
                if skip >= len(view) or not len(view):
                    skip -= len(view)
                    continue
                if skip > 0:
                    view, skip = view[skip:], 0
                if len(view) > left:
                    view = view[:left]
                out.append(view)
                left -= len(view)
                if not left or len(out) >= IOV_MAX:
                    break
        return out

    def take_done(self, upto):
        """Remove the segments ending at or before ``upto``: their ``(token, length)``."""
        done = []
        segments = self.segments
        while segments and segments[0][0] + segments[0][1] <= upto:
            _, length, views, token = segments.popleft()
            self.views -= len(views)
            done.append((token, length))
        self.head = segments[0][0] if segments else self.tail
        return done

    def clear(self):
        """Drop everything (a device reset: nothing in flight was acknowledged)."""
        self.segments.clear()
        self.head = self.tail
        self.views = 0


class Endpoint:
    """One host endpoint. Subclasses provide ``_read_fd``/``_write_fd`` handling."""

    interactive = True

    def __init__(self, url, limit):
        self.url = url
        self.limit = limit
        self.stream = OutputStream()        # private until a backend shares its own
        self.position = 0                   # bytes of ``stream`` handed to the kernel
        self._own_stream = True
        self._output_failed = False
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

    @property
    def attached(self):
        """Does this endpoint hold the guest's output until it took it? (Not a socket
        without a client, nor an endpoint whose output failed.)"""
        return not self._output_failed

    def use_stream(self, stream):
        """Write from ``stream`` (the backend's, shared by its endpoints)."""
        self.stream, self.position, self._own_stream = stream, stream.head, False

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
        views = first_batch(views)
        if fd is None or not views:        # a read into nothing would look like EOF
            return 0
        try:
            n = self._readv(fd, views)
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
        """Bytes ``write`` can accept now (an endpoint used on its own)."""
        return max(0, self.limit - (self.stream.tail - self.position))

    @property
    def buffered(self):
        """Bytes of the stream this endpoint has not taken yet."""
        return self.stream.tail - max(self.position, self.stream.head)

    def write(self, views, n):
        """Used on its own (no backend): copy the first ``n`` bytes of ``views``
        (``n <= room()``) into the private stream and write what the fd takes."""
        data = b"".join(truncate(views, n))
        self.stream.submit([memoryview(data)], len(data))
        self.flush()

    def flush(self):
        """Hand the stream's bytes from ``position`` to the fd, as far as it takes them now;
        the writer callback continues when it is writable."""
        stream = self.stream
        self.position = max(self.position, stream.head)
        fd = self.output_fd()
        while fd is not None and self.position < stream.tail:
            n = self._write_now(fd, stream.views_from(self.position))
            if not n:
                break
            self.position += n
            fd = self.output_fd()
        if self._own_stream:
            stream.take_done(self.position)
        self._set_writer(self.attached and self.position < stream.tail)

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
        """Output failed for good: stop holding the guest's output (logged)."""
        log.warning("%s: output failed (%s); this endpoint gets no more output", self, err)
        self._output_failed = True
        self._set_writer(False)
        if self._on_connection is not None:
            self._on_connection()

    def _set_writer(self, on):
        fd = self.output_fd()
        if self._loop is None or on == self._writer_registered or (on and fd is None):
            return
        if on:
            self._writer_fd = fd
            self._loop.add_writer(fd, self._writable)
        else:
            self._loop.remove_writer(self._writer_fd)
        self._writer_registered = on

    def _writable(self):
        self.flush()
        if self._on_drained is not None:
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
            paths.remove(self.path)


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

    def flush(self):
        stream = self.stream
        self.position = max(self.position, stream.head)
        while self.position < stream.tail:
            try:
                self.position += os.writev(self.fd, stream.views_from(self.position))
            except OSError as err:
                log.error("%s: log write failed (%s); %d bytes not logged", self, err,
                          stream.tail - self.position)
                self.position = stream.tail
        if self._own_stream:
            stream.take_done(self.position)

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
        self.flush()
        log.info("%s: client %s connected", self, peer or "(unix)")
        if self._on_connection is not None:
            self._on_connection()

    def _drop_client(self):
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
        if self._unlink:
            paths.remove(self._unlink)


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


def tcp_listener(url, rest):
    """A listening TCP socket for ``rest`` = ``[HOST:]PORT`` (loopback unless a host is
    given); errors are ``ConfigError``s naming ``url`` and its scheme."""
    scheme = url.partition(":")[0]
    host, _, port = rest.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port)
    except ValueError:
        raise ConfigError(url, None, f"{scheme}: needs a port, e.g. "
                                     f"{scheme}:127.0.0.1:4555") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise ConfigError(url, None, f"{scheme}: cannot listen on {host}:{port}: "
                                     f"{err.strerror}") from None
    return sock


SCHEMES = {
    "pty": lambda url, rest, limit: PtyEndpoint(url, rest, limit),
    "unix": _unix_endpoint,
    "tcp": lambda url, rest, limit: SocketServerEndpoint(url, tcp_listener(url, rest), limit),
    "file": lambda url, rest, limit: FileEndpoint(url, rest, limit),
    "stdio": lambda url, rest, limit: StdioEndpoint(url, limit),
    "rfc2217": lambda *args: importlib.import_module(".rfc2217", __package__).open_rfc2217(*args),
}


def open_endpoint(url, *, limit=DEFAULT_LIMIT):
    """One endpoint from a URL (see the module docstring)."""
    scheme, _, rest = url.partition(":")
    factory = SCHEMES.get(scheme)
    if factory is None:
        raise ConfigError(url, None, f"unknown console endpoint {scheme!r}; use one of "
                          + ", ".join(f"{s}:" for s in SCHEMES))
    if scheme == "file" and not rest:
        raise ConfigError(url, None, "file: needs a path, e.g. file:/var/log/avatar/vm0.log")
    return factory(url, rest, limit)


class ConsoleBackend:
    """The host side of one console port: output to every endpoint, input from the
    interactive ones. ``endpoints`` may be empty (``add_endpoint`` adds some
    later). While no endpoint is attached, output goes to the unattached log
    (``log_output``, ``spill``; ``log_size`` bytes), replayed first to the next
    endpoint that attaches.

    Output (see the module docstring): ``can_take`` -> ``submit(views, n, token)``
    -> ``flush`` -> ``take_done()`` gives back the tokens of what every attached
    endpoint has taken; the ``on_drained`` callback says when to ask again.
    """

    def __init__(self, endpoints=(), *, limit=DEFAULT_LIMIT, log_size=DEFAULT_LOG_SIZE):
        self.stream = OutputStream()
        self.endpoints = []
        self.limit = limit
        self.log_size = log_size
        self.log = bytearray()                # the unattached log (see the module docstring)
        self.log_overwritten = 0
        self._next_input = 0
        self._attached = None
        self._input_paused = False
        for ep in endpoints:
            self._adopt(ep)

    def _adopt(self, endpoint):
        endpoint.use_stream(self.stream)
        self.endpoints.append(endpoint)

    def attach(self, loop, on_input, on_drained, on_connection=None):
        self._attached = (loop, on_input, on_drained, on_connection)
        for ep in self.endpoints:
            ep.attach(*self._attached)

    def add_endpoint(self, endpoint):
        """Add an endpoint (an ``Endpoint`` or a URL) while running; output resumes."""
        if isinstance(endpoint, str):
            endpoint = open_endpoint(endpoint, limit=self.limit)
        self._adopt(endpoint)
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

    @property
    def attached(self):
        """True if some endpoint takes output now (else the guest's output waits)."""
        return any(ep.attached for ep in self.endpoints)

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

    # -- output ------------------------------------------------------------------------------

    def can_take(self):
        """May more output be submitted? (Some endpoint attached, the stream within bounds
        of bytes, buffers and descriptors.)"""
        stream = self.stream
        return (stream.buffered < self.limit and len(stream.segments) < MAX_HELD
                and stream.views < MAX_HELD_VIEWS and self.attached)

    def submit(self, views, length, token=None):
        """Queue ``length`` bytes of ``views`` (kept, not copied: they must stay valid until
        ``take_done`` gives ``token`` back)."""
        self._replay_log()
        self.stream.submit(views, length, token)

    # -- the unattached log ------------------------------------------------------------------

    def log_output(self, views):
        """Nobody is attached: copy ``views`` into the log (its oldest bytes give way)."""
        log_ = self.log
        for view in views:
            log_ += view[-self.log_size:] if len(view) > self.log_size else view
            if len(log_) > self.log_size:
                excess = len(log_) - self.log_size
                del log_[:excess]
                self.log_overwritten += excess

    def spill(self):
        """Nobody is attached: move what is in flight into the log; ``(token, length)`` of
        each submission now done."""
        done = []
        for _, length, views, token in self.stream.segments:
            self.log_output(views)
            if token is not LOGGED:
                done.append((token, length))
        self.stream.clear()
        return done

    def _replay_log(self):
        """Someone is attached again: the log goes first into the stream."""
        if self.log and self.attached:
            data, self.log = bytes(self.log), bytearray()
            self.stream.submit([memoryview(data)], len(data), LOGGED)

    def submit_bytes(self, data, token):
        """Queue bytes the caller does not keep (a copy; joined with the previous
        ``token`` segment while no endpoint has started on it)."""
        self._replay_log()
        segments = self.stream.segments
        if segments:
            start, length, views, last = segments[-1]
            if (last is token and length + len(data) <= COALESCE_LIMIT
                    and all(ep.position <= start for ep in self.endpoints)):
                data = bytes(views[0]) + data
                self.stream.tail = start
                self.stream.views -= len(views)
                segments.pop()
        self.stream.submit([memoryview(data)], len(data), token)

    def flush(self):
        """Every attached endpoint writes what its fd takes now."""
        self._replay_log()
        for ep in self.endpoints:
            if ep.attached:
                ep.flush()

    def take_done(self):
        """``(token, length)`` of each submission every attached endpoint has taken, in order."""
        positions = [ep.position for ep in self.endpoints if ep.attached]
        if not positions:
            return []
        return [(token, length) for token, length in self.stream.take_done(min(positions))
                if token is not LOGGED]

    def discard_output(self):
        """Forget everything in flight (a device reset): ``(token, length)`` dropped."""
        dropped = [(seg[3], seg[1]) for seg in self.stream.segments if seg[3] is not LOGGED]
        self.stream.clear()
        return dropped

    @property
    def buffered(self):
        """Bytes in flight (submitted, not yet taken by every attached endpoint)."""
        return self.stream.buffered


def open_console_backend(spec, *, limit=DEFAULT_LIMIT, log_size=DEFAULT_LOG_SIZE):
    """A ``ConsoleBackend`` from a URL, a list of URLs, an existing backend, or None."""
    if spec is None:
        return ConsoleBackend(limit=limit, log_size=log_size)
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
    return ConsoleBackend(endpoints, limit=limit, log_size=log_size)
