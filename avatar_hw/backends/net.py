"""Host sides of a virtio-net device, chosen by URL: whole Ethernet frames in and out.

    open_net_backend("tap:avtap0")                  a Linux TAP interface (created, or an
                                                    existing one attached by name)
    open_net_backend("switch:/run/avatar/net0.sock")  a port of an L2 switch on a Unix
                                                    datagram socket (no privileges needed)

A backend moves frames; the device owns the guest's buffers. Receiving is
driven by the backend: when a frame is there it calls
``device.receive(reader, source)``, and the device calls
``reader(source, views)`` with the memoryviews the frame goes into (guest
receive buffers, or a slot of its bounded pending frames, ``rx_pending``). A
reader returns the frame's length, more than ``sum(len(views))`` when the frame did not fit (it
is then consumed and dropped), or None when there is nothing to read.
Sending is ``send(views, length) -> bool``: False means the frame was dropped
(network semantics: a full socket, an interface that is down).

The switch (``switch:PATH``): the first device of this process that names
PATH binds a ``SOCK_DGRAM`` Unix socket there and hosts the switch; every
net device naming PATH is a *local port*. Any other process joins as a
*remote port* by sending datagrams to PATH from its own bound address (one
datagram = one Ethernet frame without FCS; an empty datagram joins without
sending a frame). Each local port is locked to its device's configured MAC:
the switch knows that address from the start, and a frame from the guest
with any other source address is dropped and counted (``tx_wrong_source``
in the device's ``info``), so a guest cannot take another VM's traffic by
sending with its MAC. Remote ports' source MACs are learned (at most
``MAX_MACS``, the oldest forgotten first; never a local port's address).
The switch forwards a frame for a known unicast MAC to its port and floods
broadcast, multicast and unknown destinations to every other port. A
remote port that goes away (its socket closed) is forgotten at the next
send to it; at most ``MAX_REMOTES`` remote ports. Frames from one port
keep their order. Between two local ports a frame is copied once, guest RAM
to guest RAM; from a remote port it is received straight into the guest's
buffers when it goes to one local port that has them.

Flow control (nothing lost to a peer that is merely slow): ``send`` returns True
(taken), False (dropped and counted) or ``BUSY``: the frame was not taken and
the port calls ``device.transmit_ready()`` once it can take frames again; the
device keeps the transmit chain unused meanwhile. Frames a remote port's socket
does not take (EAGAIN: its receive queue is full) are copied into that port's
bounded queue (``QUEUE_FRAMES``, ``QUEUE_BYTES``) and sent, in order, when the
socket is writable again (``add_writer`` on a socket connected to the peer, whose
writability is the peer's room; a peer connected elsewhere refuses that, and
is retried on a timer backing off to ``RETRY_MAX``). A frame for a port whose
queue is full is not taken: the sending VM's transmit queue (or, for a frame
from a remote port, the switch's reading) waits, like a link's pause, and only
the ports sending to it wait. A port that takes nothing for ``stall_seconds``
is *stalled*, like a switch's tail drop: frames to it are then dropped and
counted (``switch_dropped``), so a peer that never reads holds its senders
once for at most that long, never the daemon, and its memory is its queue;
it is unstalled once it has taken its whole queue. A local port is a destination like
a remote one (``Egress``): its queue is its device's pending frames, full while the
guest posts no receive buffers (``device.can_receive()``), and the device calls
``receive_ready`` when its guest's buffers took some. A TAP is not read meanwhile.
"""

import collections
import errno
import fcntl
import logging
import os
import socket
import struct
import time

from .. import paths
from ..errors import AGAIN, ConfigError
from ..virtio.buffers import copy, gather

log = logging.getLogger(__name__)

ETH_ALEN = 6
MAX_MACS = 1024
MAX_REMOTES = 64
MAX_DATAGRAM = 65536
RX_BATCH = 64                    # frames read per readiness callback (fairness)
QUEUE_FRAMES = 128               # frames a remote port's socket did not take yet, at most
QUEUE_BYTES = 256 << 10          # and their bytes
STALL_SECONDS = 1.0              # a full port taking nothing this long is stalled (drops)
RETRY_MIN, RETRY_MAX = 0.001, 0.1   # polling a full peer with no writability signal
BUSY = "busy"                    # send(): not taken now; device.transmit_ready() follows

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
IFNAMSIZ = 16


# -- readers: reader(source, views) -> frame length | None ---------------------------------------

def read_fd(fd, views):
    """One frame from a TAP fd (one ``read`` is one frame)."""
    try:
        return os.readv(fd, views)
    except AGAIN:
        return None
    except OSError as err:        # EFAULT/EINVAL: the frame did not fit and was dropped
        log.debug("tap read: %s", err)
        return sum(len(v) for v in views) + 1


def recv_socket(sock, views):
    """One datagram from ``sock``."""
    try:
        n, _, flags, _ = sock.recvmsg_into(views)
    except AGAIN:
        return None
    if flags & socket.MSG_TRUNC:
        return sum(len(v) for v in views) + 1
    return n


# -- TAP ------------------------------------------------------------------------------------------

class TapBackend:
    """A TAP interface: ``TUNSETIFF`` creates it (CAP_NET_ADMIN) or attaches to an
    existing one by name (its owner, or CAP_NET_ADMIN)."""

    def __init__(self, url, name):
        self.url, self.name = url, name
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name.strip() != name:
            raise ConfigError(url, None, f"{name!r} is not an interface name (1 to "
                              f"{IFNAMSIZ - 1} characters, no '/' or spaces)")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(url, None, "no /dev/net/tun: load the tun module (modprobe tun)") \
                from None
        except PermissionError:
            raise ConfigError(url, None, "/dev/net/tun is not accessible: a TAP device needs "
                              "CAP_NET_ADMIN (run as root), or access to /dev/net/tun and a "
                              f"TAP made for this user ('ip tuntap add dev {name} mode tap "
                              "user <daemon user>')") from None
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                                        IFF_TAP | IFF_NO_PI))
        except OSError as err:
            os.close(self.fd)
            if err.errno == errno.EPERM:
                raise ConfigError(url, None, "not permitted: creating a TAP device (or "
                                  "attaching to one owned by another user) needs "
                                  "CAP_NET_ADMIN; run as root, or create it first with "
                                  f"'ip tuntap add dev {name} mode tap user <daemon user>'") \
                    from None
            if err.errno == errno.EBUSY:
                raise ConfigError(url, None, f"{name} is in use by another process, or is "
                                  "not a TAP device (IFF_NO_PI)") from None
            raise ConfigError(url, None, f"cannot open TAP device {name}: {err.strerror}") \
                from None
        self.device = self.loop = None
        self._reading = False

    def attach(self, loop, device):
        self.loop, self.device = loop, device
        loop.add_reader(self.fd, self._readable)
        self._reading = True

    def _readable(self):
        for _ in range(RX_BATCH):
            if not self.device.can_receive():  # the kernel's queue holds (or drops) the rest
                self.loop.remove_reader(self.fd)
                self._reading = False
                return
            if not self.device.receive(read_fd, self.fd):
                break

    def receive_ready(self, pending, capacity):
        if self.loop is not None and not self._reading:
            self.loop.add_reader(self.fd, self._readable)
            self._reading = True

    def send(self, views, length):
        try:
            return os.writev(self.fd, views) == length
        except OSError as err:    # EAGAIN (queue full), EIO (interface down): dropped
            log.debug("%s: frame dropped: %s", self.url, err)
            return False

    def close(self):
        if self.fd is None:
            return
        if self._reading:
            self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = self.loop = self.device = None

    def info(self):
        return {"backend": self.url}


# -- the datagram switch --------------------------------------------------------------------------

class Egress:
    """What a switch port that can be full shares (module docstring, "Flow control"): the
    ingresses waiting for its room and the stall rule. A subclass says ``blocked()``
    (frames wait in its queue) and keeps ``_progress`` when it takes a frame."""

    def __init__(self):
        self.waiters = []                     # ingresses waiting for room (their resume())
        self.stalled = False
        self._stall_timer = None
        self._progress = 0.0                  # monotonic time the port last took a frame

    def wait(self, ingress):
        """``ingress`` (a local port or the switch's reader) waits for room here."""
        if ingress not in self.waiters:
            self.waiters.append(ingress)
        if self._stall_timer is None:         # full from now on: the stall rule runs
            self._progress = time.monotonic()
            self._stall_timer = self.switch.loop.call_later(self.switch.stall_seconds,
                                                            self._check_stall)

    def _check_stall(self):
        self._stall_timer = None
        if not self.blocked():
            return
        idle = time.monotonic() - self._progress
        if idle < self.switch.stall_seconds:
            self._stall_timer = self.switch.loop.call_later(self.switch.stall_seconds - idle,
                                                            self._check_stall)
            return
        if not self.stalled:
            self.stalled = True
            log.warning("%s: port %s took no frame for %.1f s: frames to it are dropped "
                        "until it takes its queue", self.switch.url, self.name, idle)
        self._wake()

    def _wake(self):
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

    def __init__(self, switch, address):
        super().__init__()
        self.switch, self.address = switch, address
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
                probe.connect(self.address)   # EPERM: the peer is connected to another socket
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
            self.stalled = False
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


class Switch:
    """The L2 switch at ``path``, hosted by this process (one per path: ``Switch.join``)."""

    _hosted = {}                  # path -> Switch
    stall_seconds = STALL_SECONDS

    @classmethod
    def join(cls, url, path):
        """The switch at ``path`` for one more local port, hosting it if nobody does yet."""
        switch = cls._hosted.get(path)
        if switch is None:
            switch = cls._hosted[path] = Switch(url, path)
        switch.members += 1
        return switch

    def __init__(self, url, path):
        self.url, self.path = url, path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        try:
            self._bind(path)
        except BaseException:
            self.sock.close()
            raise
        self.members = 0              # local ports joined (attached or not)
        self.local = []               # attached local ports (SwitchBackend)
        self.remotes = {}             # address -> RemotePort
        self.locked = {}              # MAC bytes -> local port (its device's MAC)
        self.macs = {}                # MAC bytes -> remote port (learned)
        self.loop = None              # the loop the socket is registered with
        self._reading = False         # registered as the socket's reader (not paused)
        self._macs_buf = bytearray(2 * ETH_ALEN)
        self._scratch = bytearray(MAX_DATAGRAM)
        self.frames_dropped = 0       # runt datagrams, and frames to a remote whose socket was full

    def _bind(self, path):
        try:
            self.sock.bind(path)
            return
        except FileNotFoundError:
            raise ConfigError(self.url, None, "the directory for the switch socket does not "
                              "exist; create it or choose another path") from None
        except PermissionError:
            raise ConfigError(self.url, None, "cannot create the switch socket there "
                              "(permission denied); choose another path") from None
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise ConfigError(self.url, None, f"cannot bind the switch socket: "
                                  f"{err.strerror}") from None
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:        # a stale socket file: nobody serves it
            os.unlink(path)
            self.sock.bind(path)
            return
        except OSError:
            pass
        finally:
            probe.close()
        raise ConfigError(self.url, None, "this path is in use (another process serves a "
                          "switch there, or it is not a socket); choose another path")

    # -- ports ------------------------------------------------------------------------------------

    def attach(self, port):
        """Local ``port`` is attached to its device and loop: it takes part, locked to
        its device's MAC."""
        self.local.append(port)
        self.locked[port.mac] = port
        self.macs.pop(port.mac, None)
        self._register(port.loop)

    def _register(self, loop):
        if self.loop is None:
            self.loop = loop
            loop.add_reader(self.sock, self._readable)
            self._reading = True

    def resume(self):
        """A remote port has room again: read the frame that waited for it."""
        if self.loop is not None and not self._reading:
            self.loop.add_reader(self.sock, self._readable)
            self._reading = True

    def leave(self, port):
        """Remove local ``port``; the last one closes the switch."""
        self.members -= 1
        if port in self.local:
            self.local.remove(port)
        self._forget(port)
        if self.loop is not None and port.loop is self.loop:
            self.loop.remove_reader(self.sock)
            for remote in self.remotes.values():
                remote.close()                # their writers and timers are on that loop
            for local in self.local:
                local._cancel_stall_timer()
                local._wake()
            self.loop = None
            self._reading = False
            if self.local:
                self._register(self.local[0].loop)
        if not self.members:
            self.sock.close()
            paths.remove(self.path)
            Switch._hosted.pop(self.path, None)

    def _forget(self, port):
        for table in (self.locked, self.macs):
            for mac in [m for m, p in table.items() if p is port]:
                del table[mac]

    def _learn(self, mac, port):
        """A remote port sent from ``mac`` (a local port's address stays its own)."""
        if mac[0] & 1:                        # a multicast source is not an address
            return
        if mac in self.locked:
            return
        if self.macs.get(mac) is not port:
            self.macs.pop(mac, None)
            if len(self.macs) >= MAX_MACS:
                del self.macs[next(iter(self.macs))]
            self.macs[mac] = port

    def _destinations(self, dst, ingress):
        port = None if dst[0] & 1 else self.locked.get(dst) or self.macs.get(dst)
        if port is not None:
            return () if port is ingress else (port,)
        return [p for p in (*self.local, *self.remotes.values()) if p is not ingress]

    # -- frames -----------------------------------------------------------------------------------

    def forward(self, ingress, views, length):
        """A frame from local port ``ingress`` (``views``: guest RAM, not copied): True
        when taken, False when dropped because its source is not the port's MAC, BUSY
        when a destination has no room (``ingress.resume()`` follows)."""
        if gather(views, self._macs_buf) < 2 * ETH_ALEN:
            return False
        macs = bytes(self._macs_buf)
        if macs[ETH_ALEN:] != ingress.mac:
            ingress.wrong_source += 1
            return False
        ports = self._destinations(macs[:ETH_ALEN], ingress)
        if self._full(ports, ingress, length):
            return BUSY
        for port in ports:
            port.deliver(views, length)
        return True

    @staticmethod
    def _full(ports, ingress, length):
        """True when one of ``ports`` cannot take a frame now; ``ingress`` then waits for it
        (every port delivers or none: a flood is not sent twice to the others)."""
        for port in ports:
            if not port.has_room(length):
                port.wait(ingress)
                return True
        return False

    def send_to(self, remote, views):
        """True when ``remote``'s socket took the frame, BUSY when it is full, False when
        the frame is dropped (the remote is gone, and forgotten, or another error)."""
        try:
            self.sock.sendmsg(views, (), 0, remote.address)
            return True
        except AGAIN:
            return BUSY
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("%s: remote port %r went away", self.url, remote.address)
            self.remotes.pop(remote.address, None)
            self._forget(remote)
            remote.close()
        except OSError as err:
            self.frames_dropped += 1
            log.debug("%s: frame to %r dropped: %s", self.url, remote.address, err)
        return False

    def _remote(self, address):
        remote = self.remotes.get(address)
        if remote is None and address and len(self.remotes) < MAX_REMOTES:
            remote = self.remotes[address] = RemotePort(self, address)
            log.info("%s: remote port %r joined", self.url, address)
        return remote

    def _readable(self):
        for _ in range(RX_BATCH):
            try:
                n, _, _, address = self.sock.recvmsg_into([self._macs_buf], 0,
                                                          socket.MSG_PEEK | socket.MSG_TRUNC)
            except AGAIN:
                return
            ingress = self._remote(address)
            if n < 2 * ETH_ALEN:                # a join (empty) or a runt: consumed
                self.sock.recv(1)
                if n:
                    self.frames_dropped += 1
                continue
            macs = bytes(self._macs_buf)
            if ingress is not None:
                self._learn(macs[ETH_ALEN:], ingress)
            ports = self._destinations(macs[:ETH_ALEN], ingress)
            if self._full(ports, self, n):    # the frame stays in the socket meanwhile
                self.loop.remove_reader(self.sock)
                self._reading = False
                return
            if len(ports) == 1 and isinstance(ports[0], SwitchBackend):
                ports[0].device.receive(recv_socket, self.sock)   # straight into the guest
                continue
            length = recv_socket(self.sock, [self._scratch])
            if not ports or length is None or length > len(self._scratch):
                continue
            frame = [memoryview(self._scratch)[:length]]
            for port in ports:
                port.deliver(frame, length)


class SwitchBackend(Egress):
    """A local port of the switch at ``path``; as a destination it is full while its
    device's pending frames are (the guest posts no receive buffers)."""

    def __init__(self, url, path):
        if not path:
            raise ConfigError(url, None, "switch: needs a socket path, e.g. "
                              "switch:/run/avatar/net0.sock")
        super().__init__()
        self.url = self.name = url
        self.device = self.loop = self.mac = None
        self.wrong_source = 0             # frames dropped: their source was not ``mac``
        self.switch = Switch.join(url, os.path.abspath(path))

    def attach(self, loop, device):
        self.loop, self.device, self.mac = loop, device, bytes(device.mac)
        self.switch.attach(self)

    def has_room(self, length):
        """True when a frame is taken now (received, pending, or dropped: stalled)."""
        return self.stalled or self.device.can_receive()

    def blocked(self):
        return self.device.pending_frames > 0

    def deliver(self, views, length):
        self.device.receive(copy, views)

    def receive_ready(self, pending, capacity):
        """The device moved pending frames into receive buffers (``pending`` of
        ``capacity`` left): progress, and room for the ports waiting (half of it)."""
        self._progress = time.monotonic()
        if not pending:
            self.stalled = False
            self._cancel_stall_timer()
        if self.stalled or 2 * pending <= capacity:
            self._wake()

    def send(self, views, length):
        return self.switch.forward(self, views, length)

    def resume(self):
        """A remote port this one waited for has room again."""
        if self.device is not None:
            self.loop.call_later(0, self._resumed)

    def _resumed(self):
        if self.device is not None:
            self.device.transmit_ready()

    def close(self):
        if self.switch is not None:
            if self.switch.loop is not None:
                self._cancel_stall_timer()
            self.switch.leave(self)
            self.switch = self.device = self.loop = None
            self._wake()                      # the ports waiting here carry on

    def info(self):
        return {"backend": self.url, "switch_ports": 0 if self.switch is None else
                len(self.switch.local) + len(self.switch.remotes),
                "tx_wrong_source": self.wrong_source,
                "switch_dropped": 0 if self.switch is None else self.switch.frames_dropped,
                "switch_queued": 0 if self.switch is None else
                sum(len(r.queue) for r in self.switch.remotes.values()),
                "switch_stalled": 0 if self.switch is None else
                sum(p.stalled for p in (*self.switch.local, *self.switch.remotes.values()))}


SCHEMES = {"tap": TapBackend, "switch": SwitchBackend}


def open_net_backend(url):
    """A backend from its URL (see the module docstring)."""
    scheme, _, rest = url.partition(":")
    factory = SCHEMES.get(scheme)
    if factory is None:
        raise ConfigError(url, None, f"unknown net backend {scheme!r}; use "
                          + " or ".join(f"{s}:" for s in SCHEMES))
    return factory(url, rest)
