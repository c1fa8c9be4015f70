"""The daemon's one event loop: readiness callbacks on file descriptors, and timers.

Devices and backends register what they wait for (``add_reader``,
``add_writer``, ``add_hangup``, ``call_later``); the loop calls back. Everything runs on one
thread, so the device model needs no locks. Callbacks must not block.

The loop is on the trap path (the doorbell is one of its descriptors), so it
is ``select.epoll`` itself, not ``selectors``: a wake-up costs one
``epoll_wait`` and a dictionary lookup per ready descriptor, and allocates
nothing but epoll's list of ready pairs. A callback is looked up when its
descriptor's turn comes: one removed by an earlier callback of the same turn
is not called. A descriptor must leave the loop before it is closed; one that
did not, and whose number comes back for a new file, loses its old callbacks
when the new one is added (epoll has forgotten it: ``_forget_closed``).
"""

import heapq
import itertools
import logging
import select
import time

log = logging.getLogger(__name__)

READER, WRITER, HANGUP = 0, 1, 2
# An error or hang-up wakes both sides, as selectors does (each finds it reading or writing).
_READ_EVENTS, _WRITE_EVENTS = ~select.EPOLLOUT, ~select.EPOLLIN
_HANGUP_EVENTS = select.EPOLLHUP | select.EPOLLERR


class EventLoop:
    def __init__(self):
        self._epoll = select.epoll()
        self._fds = {}                  # fd -> [reader, writer], None where nothing waits
        self._timers = []
        self._timer_ids = itertools.count()
        self._running = False

    # -- file descriptors -------------------------------------------------------

    def add_reader(self, fd, callback):
        self._update(fd, READER, callback)

    def add_writer(self, fd, callback):
        self._update(fd, WRITER, callback)

    def add_hangup(self, fd, callback):
        """``callback()`` once ``fd`` hangs up (EPOLLHUP or EPOLLERR; a Unix socket: its peer
        closed, or shut its side both ways), for a descriptor nobody reads: one whose
        reading side is shut is always readable."""
        self._update(fd, HANGUP, callback)

    def remove_reader(self, fd):
        self._update(fd, READER, None)

    def remove_writer(self, fd):
        self._update(fd, WRITER, None)

    def remove_hangup(self, fd):
        self._update(fd, HANGUP, None)

    def watches(self, fd):
        """True while a reader or a writer waits on ``fd``."""
        return _fileno(fd) in self._fds

    def _update(self, fd, side, callback):
        fd = _fileno(fd)
        entry = self._fds.get(fd)
        if entry is None:
            if callback is not None:
                entry = [None, None, None]
                entry[side] = callback
                self._epoll.register(fd, _mask(entry))
                self._fds[fd] = entry
            return
        before = _mask(entry)
        entry[side] = callback
        after = _mask(entry)
        if entry == [None, None, None]:
            del self._fds[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:             # closed already: the kernel dropped it
                pass
        elif after != before or callback is not None:
            try:
                self._epoll.modify(fd, after)
            except FileNotFoundError:
                self._forget_closed(fd, side, callback)

    def _forget_closed(self, fd, side, callback):
        """``fd`` was closed while registered (epoll dropped it) and its number is open again,
        maybe for another file: the old callbacks go, a new one is registered afresh."""
        log.warning("fd %d was closed without leaving the event loop; its old callbacks "
                    "are dropped", fd)
        del self._fds[fd]
        if callback is not None:
            self._update(fd, side, callback)

    # -- timers -----------------------------------------------------------------

    def call_later(self, delay, callback):
        """Run ``callback()`` after ``delay`` seconds (0: in the next turn, after what is
        ready then); returns a handle for ``cancel``."""
        handle = [time.monotonic() + delay, next(self._timer_ids), callback]
        heapq.heappush(self._timers, handle)
        return handle

    @staticmethod
    def cancel(handle):
        handle[2] = None

    # -- running ----------------------------------------------------------------

    def run_once(self, timeout=None):
        """Wait up to ``timeout`` seconds (None: until something happens) and dispatch."""
        timers = self._timers
        while timers and timers[0][2] is None:
            heapq.heappop(timers)
        if timers:
            due = max(0.0, timers[0][0] - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        fds = self._fds
        ready = self._epoll.poll(-1 if timeout is None else max(0.0, timeout))
        now = time.monotonic()          # a timer made by a callback below runs next turn
        for fd, events in ready:
            entry = fds.get(fd)
            if entry is not None and events & _READ_EVENTS and entry[READER] is not None:
                entry[READER]()
                entry = fds.get(fd)
            if entry is not None and events & _WRITE_EVENTS and entry[WRITER] is not None:
                entry[WRITER]()
                entry = fds.get(fd)
            if entry is not None and events & _HANGUP_EVENTS and entry[HANGUP] is not None:
                entry[HANGUP]()
        if timers:
            while timers and timers[0][0] <= now:
                _, _, callback = heapq.heappop(timers)
                if callback is not None:
                    callback()

    def run(self):
        self._running = True
        while self._running:
            self.run_once()

    def stop(self):
        self._running = False

    def close(self):
        self._epoll.close()


def _fileno(fd):
    return fd if isinstance(fd, int) else fd.fileno()


def _mask(entry):
    """The events asked for (a hang-up and an error are reported whatever the mask)."""
    return ((select.EPOLLIN if entry[READER] is not None else 0)
            | (select.EPOLLOUT if entry[WRITER] is not None else 0))
