"""virtio-rng (device ID 4, VirtIO 1.2 section 5.4): entropy from the kernel's random source.

One request queue; each request is a chain of device-writable buffers that
the device fills from ``/dev/urandom`` (an unbuffered file object's
``readinto`` straight into the memoryviews of guest RAM, looped until the
request is full), at most ``max_bytes`` per request (the used length says
how many). Readable descriptors are ignored. A request with no writable byte
is returned with length 0. A read of the source that fails (an OSError) ends the
request: it is returned with the bytes read before (maybe 0), the error logged
(rate-limited) and counted, and the device goes on serving.

``rate`` (bytes per second) adds a token bucket holding one second's worth:
a request that finds it empty waits (``EventLoop.call_later``) until enough
tokens for it (or a full bucket) are back, then gets what is there; requests
are served in order and never fail. The waiting request is dropped on reset.
"""

import time

from ..errors import os_reason
from ..schema import Field, Schema, positive
from ..virtio.buffers import fill_from
from ..virtio.constants import ID_RNG
from ..virtio.device import VirtioDevice

QUEUE_SIZE = 64
DEFAULT_MAX_BYTES = 4096


class TokenBucket:
    """``rate`` tokens per second, at most ``rate`` held (starts full)."""

    def __init__(self, rate, clock=time.monotonic):
        self.rate, self.capacity, self.clock = rate, rate, clock
        self.tokens, self._stamp = float(rate), clock()

    def _refill(self):
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self, wanted):
        """Up to ``wanted`` tokens (0 when fewer than ``min(wanted, capacity)`` are held)."""
        self._refill()
        if self.tokens < min(wanted, self.capacity):
            return 0
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted

    def delay(self, wanted):
        """Seconds until ``take(wanted)`` can succeed."""
        self._refill()
        return max(0.0, (min(wanted, self.capacity) - self.tokens) / self.rate)


class RngDevice(VirtioDevice):
    """A virtio entropy device; ``max_bytes`` per request, ``rate`` bytes/s (None: no limit)."""

    device_id = ID_RNG
    name = "rng"
    restartable = True

    def __init__(self, *, max_bytes=DEFAULT_MAX_BYTES, rate=None, source="/dev/urandom"):
        for name, value in (("max_bytes", max_bytes), ("rate", rate)):
            if value is not None or name == "max_bytes":
                try:
                    positive(value)
                except ValueError as err:
                    raise ValueError(f"{name} {err}") from None
        super().__init__(queue_sizes=[QUEUE_SIZE])
        self.max_bytes = max_bytes
        self.bucket = TokenBucket(rate) if rate else None
        self.source = open(source, "rb", buffering=0)
        self._waiting = None           # the request that waits for tokens
        self._timer = None
        self._source_error = None      # what the last read of the source raised

    def detach(self):
        self._drop_waiting()
        self.source.close()
        super().detach()

    def reset(self):
        self._drop_waiting()

    def queue_reset(self, index):
        self._drop_waiting()

    def _drop_waiting(self):
        self._waiting = None
        if self._timer is not None and self.loop is not None:
            self.loop.cancel(self._timer)
        self._timer = None

    def queue_notify(self, index):
        if self._timer is None:        # else the waiting request goes first, on the timer
            self._serve()

    def _on_timer(self):
        self._timer = None
        if self.active:
            self._serve()

    def _serve(self):
        queue = self.queues[0]
        completed = False
        while True:
            chain, self._waiting = self._waiting or queue.pop(), None
            if chain is None:
                break
            wanted = min(chain.writable_len, self.max_bytes)
            if self.bucket is not None and wanted:
                granted = self.bucket.take(wanted)
                if not granted:
                    self._waiting = chain       # without a loop: until the next notify
                    if self.loop is not None:
                        self._timer = self.loop.call_later(self.bucket.delay(wanted),
                                                           self._on_timer)
                    break
                wanted = granted
            if not chain.writable_len:
                self.guest_error("entropy request with no device-writable buffer; returned "
                                 "with length 0")
            n = fill_from(self._read_source, chain.writable, wanted)
            if self._source_error is not None:
                self.error("entropy source %s: %s; request returned with %d of %d bytes",
                           self.source.name, os_reason(self._source_error), n, wanted)
                self.counters["errors"] += 1
                self._source_error = None
            queue.add_used(chain, n)
            self.count(bytes_to_guest=n)
            completed = True
        if completed:
            self.signal_used(queue)

    def _read_source(self, view):
        """``readinto`` of the source; 0 (the request ends) when it raises an OSError."""
        try:
            return self.source.readinto(view)
        except OSError as err:
            self._source_error = err
            return 0

    def info(self):
        out = super().info()
        out.update(max_bytes=self.max_bytes, rate=self.bucket.rate if self.bucket else None)
        return out


SCHEMA = Schema("rng", (
    Field("max_bytes", int, None, "bytes per request", positive),
    Field("rate", int, None, "bytes per second", positive),
))


def from_config(options):
    """The VMs config's ``rng = { max_bytes, rate }``."""
    return RngDevice(max_bytes=options.get("max_bytes", DEFAULT_MAX_BYTES),
                     rate=options.get("rate"))
