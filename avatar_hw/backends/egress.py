"""Flow control of the switch's ports (``avatar_hw.backends.switch``): a port that can be
full, the ingresses waiting for its room, and the stall rule.

Flow control (nothing lost to a peer that is merely slow): ``send`` returns True
(taken), False (dropped and counted) or ``BUSY``: the frame was not taken and
the port calls ``device.transmit_ready()`` once it can take frames again; the
device keeps the transmit chain unused meanwhile. Frames a remote port's socket
does not take (EAGAIN: its receive queue is full) are copied into that port's
bounded queue (``QUEUE_FRAMES``, ``QUEUE_BYTES``) and sent, in order, when the
socket is writable again (``add_writer`` on a socket connected to the peer, whose
writability is the peer's room; a peer connected elsewhere refuses that, and
is retried on a timer backing off to ``RETRY_MAX``). A frame from a local port
(a VM) for a port whose queue is full is not taken: the sending VM's transmit
queue waits, like a link's pause, and only the VMs sending to that port wait. A
frame from a remote port never waits: the switch's one socket is every remote
sender's, so waiting for one destination would hold them all; it goes to the
ports with room and is dropped and counted for the full ones. A port that takes
nothing for ``stall_seconds``, or keeps a sender waiting that long (a guest that
posts a receive buffer now and then makes progress, but its senders wait for room
for ever), is *stalled*, like a switch's tail drop: frames to it are then dropped
and counted (``switch_dropped``), so a peer that never reads, or barely, holds its
senders for at most that long, never the daemon, and its memory is its queue; it
is unstalled once it has taken its whole queue. A port full again within
``sticky_seconds`` of being unstalled is stalled at once (hysteresis: a guest that
lets its queue fill, empties it and lets it fill again holds its senders once,
not every time). A local port is a destination like a remote one (``Egress``): its
queue is its device's pending frames, full while the guest posts no receive
buffers (``device.can_receive()``), and the device calls ``receive_ready`` when its
guest's buffers took some. A TAP is not read meanwhile.
"""

import collections
import socket
import time

from ..virtio.buffers import gather
from .net import BUSY

QUEUE_FRAMES = 128               # frames a remote port's socket did not take yet, at most
QUEUE_BYTES = 256 << 10          # and their bytes
STALL_SECONDS = 1.0              # a full port taking nothing this long is stalled (drops)
STICKY_SECONDS = 10.0            # a port full again this soon after its stall: stalled at once
RETRY_MIN, RETRY_MAX = 0.001, 0.1   # polling a full peer with no writability signal


class Egress:
    """What a switch port that can be full shares (module docstring, "Flow control"): the
    ingresses waiting for its room and the stall rule. A subclass says ``blocked()``
    (frames wait in its queue) and keeps ``_progress`` when it takes a frame."""

    def __init__(self):
        self.waiters = []                     # ingresses waiting for room (their resume())
        self.stalled = False
        self._stall_timer = None
        self._progress = 0.0                  # monotonic time the port last took a frame
        self._waited_since = None             # when its first waiter (of now) began to wait
        self._unstalled = -float("inf")       # monotonic time it was last unstalled

    def wait(self, ingress):
        """Local port ``ingress`` waits for room here (True), or need not (False): the
        port, full again soon after it was unstalled, is stalled at once."""
        now = time.monotonic()
        if now - self._unstalled < self.switch.sticky_seconds:
            self._stall("was full again %.1f s after it took its queue", now - self._unstalled)
            return False
        if ingress not in self.waiters:
            self.waiters.append(ingress)
        if self._waited_since is None:
            self._waited_since = now
        if self._stall_timer is None:         # full from now on: the stall rule runs
            self._progress = now
            self._stall_timer = self.switch.loop.call_later(self.switch.stall_seconds,
                                                            self._check_stall)
        return True

    def _check_stall(self):
        self._stall_timer = None
        if not self.blocked():
            return
        now, limit = time.monotonic(), self.switch.stall_seconds
        idle = now - self._progress
        waited = 0.0 if self._waited_since is None else now - self._waited_since
        if idle < limit and waited < limit:
            self._stall_timer = self.switch.loop.call_later(limit - max(idle, waited),
                                                            self._check_stall)
            return
        if not self.stalled:
            self._stall("took no frame for %.1f s" if idle >= limit else
                        "kept its senders waiting for %.1f s", max(idle, waited))
        self._wake()

    def _stall(self, why, seconds):
        """Frames to the port are dropped (``has_room``) until it takes its queue."""
        self.stalled = True
        self.switch.stall_log("%s: port %s " + why + ": frames to it are dropped until it "
                              "takes its queue", self.switch.url, self.name, seconds)

    def _unstall(self):
        """The port took its whole queue: frames to it are taken again."""
        if self.stalled:
            self.stalled = False
            self._unstalled = time.monotonic()

    def _wake(self):
        self._waited_since = None
        waiters, self.waiters = self.waiters, []
        for ingress in waiters:
            ingress.resume()

    def _cancel_stall_timer(self):
        if self._stall_timer is not None:
            self.switch.loop.cancel(self._stall_timer)
            self._stall_timer = None


class RemotePort(Egress):
    """A process that joined the switch from its own socket address, and the frames its
    socket did not take yet (module docstring, "Flow control")."""

    def __init__(self, switch, address, pin):
        super().__init__()
        self.switch, self.address, self.pin = switch, address, pin
        # Where its frames go: the very socket that joined (``Switch._pin``), not its path.
        self.target = address if pin is None else f"/proc/self/fd/{pin}"
        self.name = repr(address)
        self.queue = collections.deque()      # bytearray copies, oldest first
        self.queued_bytes = 0
        self._probe = None                    # connected to the peer: writable = its room
        self._watching = False                # the probe is registered as a writer
        self._retry = None                    # the retry timer (no probe, or no progress)
        self._retry_delay = RETRY_MIN

    def has_room(self, length):
        """True when a frame of ``length`` bytes is taken now (sent, queued, or dropped
        because the port is stalled)."""
        return (self.stalled or not self.queue
                or (len(self.queue) < QUEUE_FRAMES and self.queued_bytes + length <= QUEUE_BYTES))

    def deliver(self, views, length):
        if not self.queue:
            sent = self.switch.send_to(self, views)
            if sent is not BUSY:
                return
            self._progress = time.monotonic()
            self._watch()
        if self.stalled or not self.has_room(length):
            self.switch.frames_dropped += 1
            return
        frame = bytearray(length)
        gather(views, frame)
        self.queue.append(frame)
        self.queued_bytes += length

    def blocked(self):
        return bool(self.queue)

    def _watch(self):
        """Wait for the peer's room: its probe's writability, else a timer."""
        loop = self.switch.loop
        if self._probe is None:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(self.target)    # EPERM: the peer is connected to another socket
                self._probe = probe
            except OSError:
                probe.close()
                self._probe = False
        if self._probe and not self._watching and self._retry is None:
            loop.add_writer(self._probe, self._flush)
            self._watching = True
        elif not self._probe and self._retry is None:
            self._retry = loop.call_later(self._retry_delay, self._retried)
        if self._stall_timer is None:
            self._stall_timer = loop.call_later(self.switch.stall_seconds, self._check_stall)

    def _retried(self):
        self._retry = None
        self._flush()

    def _flush(self):
        """Send queued frames while the peer's socket takes them."""
        progressed = False
        while self.queue:
            frame = self.queue[0]
            sent = self.switch.send_to(self, [frame])
            if sent is BUSY:
                break
            if self.switch.remotes.get(self.address) is not self:
                return                        # it went away (close() has run)
            self.queue.popleft()
            self.queued_bytes -= len(frame)
            progressed = True
        if progressed:
            self._progress = time.monotonic()
            self._retry_delay = RETRY_MIN
        if not self.queue:
            self._unstall()
            self._unwatch()
        elif not progressed:
            # Full again at once: a probe that said writable for nothing (the switch
            # socket's own send buffer is full: many full peers) or no probe. Poll, backing
            # off, instead of spinning on writability.
            self._unwatch(keep_stall_timer=True)
            self._retry_delay = min(2 * self._retry_delay, RETRY_MAX)
            self._retry = self.switch.loop.call_later(self._retry_delay, self._retried)
        else:
            self._watch()                     # the probe again, or the next retry
        if self.stalled or (2 * len(self.queue) <= QUEUE_FRAMES
                             and 2 * self.queued_bytes <= QUEUE_BYTES):
            self._wake()                      # room again (half of it: no ping-pong)

    def _unwatch(self, keep_stall_timer=False):
        loop = self.switch.loop
        if self._watching:
            loop.remove_writer(self._probe)
            self._watching = False
        if self._retry is not None:
            loop.cancel(self._retry)
            self._retry = None
        if not keep_stall_timer:
            self._cancel_stall_timer()

    def close(self):
        """Forget the queue (the peer is gone or the switch closes); waiters carry on."""
        self.switch.frames_dropped += len(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        self.stalled = False
        if self.switch.loop is not None:
            self._unwatch()
        if self._probe:
            self._probe.close()
        self._probe = None
        self._wake()
