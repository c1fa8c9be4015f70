"""``Endpoint``: one host end of a console port, read and written without blocking.

Input is read only while the device wants it (``pause_input``/``resume_input``);
output is written from an ``OutputStream`` at the endpoint's own ``position``
(see ``avatar_hw.backends.console`` for the flow control around it).
"""

import logging
import os

from ..errors import AGAIN
from ..virtio.buffers import first_batch, truncate
from ..virtio.queue import TURN_BYTES
from .stream import OutputStream

log = logging.getLogger(__name__)

OPENER_HOLD_S = 0.25        # a new reader that says nothing when its open is done (``_hold``)


class Endpoint:
    """One host endpoint. Subclasses provide ``_read_fd``/``_write_fd`` handling."""

    interactive = True
    output_errors = 0                       # failed writes that did not end the output

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
        self._held = None                   # the hold's timer while a new reader opens
        self._next_turn = None              # the timer of a flush that goes on next turn

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
        """Is someone at the host end? (Always, except for a socket without a client and a
        pty nobody holds open.)"""
        return True

    @property
    def attached(self):
        """Does this endpoint hold the guest's output until it took it? (Not a socket
        without a client, a pty nobody holds open, nor an endpoint whose output failed.)"""
        return not self._output_failed

    def use_stream(self, stream):
        """Write from ``stream`` (the backend's, shared by its endpoints)."""
        self.stream, self.position, self._own_stream = stream, stream.head, False

    def detach(self):
        self._cancel_hold()
        if self._next_turn is not None:
            self._loop.cancel(self._next_turn)
            self._next_turn = None
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
        except AGAIN:
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
        """Hand the stream's bytes from ``position`` to the fd, as far as it takes them now
        and at most ``TURN_BYTES`` a loop turn (a file takes any amount at once: one guest
        buffer of 800 MiB held every VM 2.7 s); the writer callback continues when the fd is
        writable again, the next turn when the turn's bytes are written."""
        if self._held is not None:
            return
        stream = self.stream
        self.position = max(self.position, stream.head)
        fd, budget, blocked = self.output_fd(), TURN_BYTES, False
        while fd is not None and self.position < stream.tail:
            if budget <= 0 and self._loop is not None:
                if self._next_turn is None:
                    self._next_turn = self._loop.call_later(0, self._turn)
                break
            n = self._write_now(fd, stream.views_from(self.position, budget))
            if not n:
                blocked = True
                break
            self.position += n
            budget -= n
            fd = self.output_fd()
        if self._own_stream:
            stream.take_done(self.position)
        self._set_writer(self.attached and blocked and self.position < stream.tail)

    def _turn(self):
        self._next_turn = None
        self._writable()

    def _hold(self, seconds):
        """No output for ``seconds`` (or until ``_release()``) to a reader that just came: a
        reader that empties its input as its open ends (pyserial's ``open()`` does, for a
        socket or a terminal) would discard what was sent meanwhile, the log first. The
        guest's output waits in the stream (and no writable fd wakes the loop meanwhile)."""
        self._cancel_hold()
        if seconds:
            self._set_writer(False)
            self._held = self._loop.call_later(seconds, self._release)

    def _release(self):
        """The new reader's open is done (or it took the hold's time): its output flows."""
        if self._held is None:
            return                          # a later call: nothing held
        self._cancel_hold()
        self._writable()                    # the output, then the guest's buffers back

    def _cancel_hold(self):
        if self._held is not None:
            self._loop.cancel(self._held)
            self._held = None

    def _write_now(self, fd, views):
        try:
            return self._writev(fd, views)
        except AGAIN:
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
