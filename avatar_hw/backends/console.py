"""The host side of a console port: its output fanned out to its endpoints, input from them.

    open_console_backend("pty:/run/avatar/vm0")                      one endpoint
    open_console_backend(["pty:/run/vm0", "file:/tmp/vm0.log"])     several at once

The endpoints themselves, one module per URL scheme, are ``avatar_hw.endpoints``.

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
* attached: a socket endpoint while a client is connected, a ``pty:`` while
  some program has it open (``avatar_hw.endpoints.pty``); ``file:`` and
  ``stdio`` always. A socket with no client does not hold the guest; a client that
  connects gets the stream from the oldest byte not yet done (or from where
  it was, if it is a returning endpoint that got further).
* nobody attached (only sockets without a client and ptys nobody holds, or no
  endpoint yet): the guest must not wait for a reader that may never come
  (Linux's hvc path spins until the host returns its buffer). Output then goes into the
  backend's *unattached log*, a ring of the last ``log_size`` bytes (a copy;
  the buffers go back to the guest at once; what the ring overwrites is
  counted in ``log_overwritten``). Output in flight when the last client
  left joins the log too. The next endpoint that attaches receives the log
  first, then the live stream, with flow control again.
  ``connected`` tells whether a socket has a client, a pty a holder (the console
  reports it to the guest as the port's host side opening and closing).
* an endpoint used on its own (no backend: tools and tests) has a private
  stream: ``write`` copies into it, up to ``room()`` bytes.
"""

from ..endpoints import DEFAULT_LIMIT, open_endpoint
from ..endpoints.stream import OutputStream

DEFAULT_LOG_SIZE = 64 * 1024    # the unattached log
MAX_HELD = 256              # buffers in a backend's output stream
MAX_HELD_VIEWS = 4096       # their descriptors (each a memoryview the daemon keeps)
LOGGED = object()           # the token of the unattached log's bytes in the stream
COALESCE_LIMIT = 4096       # backend-owned bytes (emergency writes) joined into one segment


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
            if len(view) > self.log_size:          # its head would be overwritten at once
                self.log_overwritten += len(view) - self.log_size
                view = view[-self.log_size:]
            log_ += view
            if len(log_) > self.log_size:
                excess = len(log_) - self.log_size
                del log_[:excess]
                self.log_overwritten += excess

    def spill(self):
        """Nobody is attached: move what is in flight into the log; ``(token, length)`` of
        each submission now done. The log starts where the endpoints that left had got to
        (the least far of those that took any: a pty keeps what it was handed for its next
        reader, which got a buffer's first part twice, once from the pty and once from the
        log)."""
        stream = self.stream
        position = min((ep.position for ep in self.endpoints if ep.position > stream.head),
                       default=stream.head)
        while position < stream.tail:
            views = stream.views_from(position)
            self.log_output(views)
            position += sum(map(len, views))
        done = [(token, length) for _, length, _, token in stream.segments
                if token is not LOGGED]
        stream.clear()
        return done

    def _replay_log(self):
        """Someone is attached again: the log goes first into the stream."""
        if self.log and self.attached:
            data, self.log = bytes(self.log), bytearray()
            self.stream.submit([memoryview(data)], len(data), LOGGED)

    def submit_bytes(self, data, token):
        """Queue bytes the caller does not keep (a copy; joined with the previous segment
        when it is also ``token``'s and short: the bytes already there keep their place on
        the axis, so an endpoint that took some of them carries on after them). One segment
        per call would let a guest's emergency writes pile up a segment per byte while one
        endpoint takes them and another does not."""
        self._replay_log()
        segments = self.stream.segments
        if segments:
            start, length, views, last = segments[-1]
            if last is token and length + len(data) <= COALESCE_LIMIT:
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

    def discard_output(self, keep=()):
        """The guest's buffers in flight are given back to nobody (a reset: their queue is
        gone, the guest may reuse them). Their bytes are copied first and still go out,
        after what came before them: the guest printed them, and the log's bytes being
        replayed and the backend's own (tokens in ``keep``: emergency writes, already
        answered) stay where they are. At most twice ``limit`` bytes are kept (``can_take``
        lets one buffer past ``limit``; Linux's are 32 KiB at most; a larger one's rest is
        dropped, as QEMU drops what its chardev did not take at a reset, and so is whatever
        came after it); an endpoint that had written past that goes on from there. Returns
        ``(token, length)`` of the bytes of ``keep``'s tokens dropped there."""
        cut = self.stream.own((LOGGED, *keep), LOGGED, 2 * self.limit)
        for ep in self.endpoints:
            ep.position = min(ep.position, self.stream.tail)
        return [(token, length) for token, length in cut if token is not LOGGED]

    @property
    def buffered(self):
        """Bytes in flight (submitted, not yet taken by every attached endpoint)."""
        return self.stream.buffered

    @property
    def idle(self):
        """Nothing in flight and no log for an attached endpoint: no output to move."""
        return not self.stream.segments and not (self.log and self.attached)


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
