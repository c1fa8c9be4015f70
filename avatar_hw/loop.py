"""The daemon's one event loop: readiness callbacks on file descriptors, and timers.

Devices and backends register what they wait for (``add_reader``,
``add_writer``, ``call_later``); the loop calls back. Everything runs on one
thread, so the device model needs no locks. Callbacks must not block.
"""

import heapq
import itertools
import logging
import selectors
import time

log = logging.getLogger(__name__)


class EventLoop:
    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._timers = []
        self._timer_ids = itertools.count()
        self._running = False

    # -- file descriptors -------------------------------------------------------

    def add_reader(self, fd, callback):
        self._update(fd, selectors.EVENT_READ, callback)

    def add_writer(self, fd, callback):
        self._update(fd, selectors.EVENT_WRITE, callback)

    def remove_reader(self, fd):
        self._update(fd, selectors.EVENT_READ, None)

    def remove_writer(self, fd):
        self._update(fd, selectors.EVENT_WRITE, None)

    def _update(self, fd, event, callback):
        if not isinstance(fd, int):
            fd = fd.fileno()
        try:
            key = self._selector.get_key(fd)
            callbacks = dict(key.data)
        except KeyError:
            key, callbacks = None, {}
        if callback is None:
            callbacks.pop(event, None)
        else:
            callbacks[event] = callback
        mask = 0
        for ev in callbacks:
            mask |= ev
        if key is None:
            if mask:
                self._selector.register(fd, mask, callbacks)
        elif mask:
            self._selector.modify(fd, mask, callbacks)
        else:
            self._selector.unregister(fd)

    # -- timers -----------------------------------------------------------------

    def call_later(self, delay, callback):
        """Run ``callback()`` after ``delay`` seconds; returns a handle for ``cancel``."""
        handle = [time.monotonic() + delay, next(self._timer_ids), callback]
        heapq.heappush(self._timers, handle)
        return handle

    @staticmethod
    def cancel(handle):
        handle[2] = None

    # -- running ----------------------------------------------------------------

    def run_once(self, timeout=None):
        """Wait up to ``timeout`` seconds (None: until something happens) and dispatch."""
        now = time.monotonic()
        while self._timers and self._timers[0][2] is None:
            heapq.heappop(self._timers)
        if self._timers:
            due = max(0.0, self._timers[0][0] - now)
            timeout = due if timeout is None else min(timeout, due)
        for key, events in self._selector.select(timeout):
            for event, callback in list(key.data.items()):
                if events & event:
                    callback()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            if callback is not None:
                callback()

    def run(self):
        self._running = True
        while self._running:
            self.run_once()

    def stop(self):
        self._running = False

    def close(self):
        self._selector.close()
