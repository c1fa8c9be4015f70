"""The ``switch:PATH`` net backend: an L2 switch on a Unix datagram socket, in process
(see ``avatar_hw.backends.net`` for what a backend does).

The switch (``switch:PATH``): the first device of this process that names
PATH binds a ``SOCK_DGRAM`` Unix socket there and hosts the switch; every
net device naming PATH is a *local port*. Any other process joins as a
*remote port* by sending datagrams to PATH from its own bound address (one
datagram = one Ethernet frame without FCS; an empty datagram joins without
sending a frame). Each local port is locked to its device's configured MAC:
the switch knows that address from the start, and a frame from the guest
with any other source address is dropped and counted (``tx_wrong_source``
in the device's ``info``), so a guest cannot take another VM's traffic by
sending with its MAC (and two local ports with one MAC are refused). A frame
from a remote port with a local port's MAC or a multicast address as its source
is dropped and counted (``switch_dropped``); other remote source MACs are learned (at
most ``MAX_MACS``, the oldest forgotten first).
The switch forwards a frame for a known unicast MAC to its port and floods
broadcast, multicast and unknown destinations to every other port. A
remote port that goes away (its socket closed) is forgotten at the next
send to it; at most ``MAX_REMOTES`` remote ports. Frames from one port
keep their order.

A remote port is *pinned* when it joins: the socket file at its address (never a
symlink, never a socket of this daemon's switches) is opened ``O_PATH`` and frames
go to that very socket through ``/proc/self/fd`` (``RemotePort.target``), so a peer
that puts something else at its path later cannot make the switch send to another
socket, itself included. Datagrams from a sender that is not a port (unbound, past
``MAX_REMOTES``, refused when pinned, or a switch of this daemon) are dropped and
counted. Between two local ports a frame is copied once, guest RAM
to guest RAM; from a remote port it is received straight into the guest's
buffers when it goes to one local port that has them.

Flow control (``send`` may answer ``BUSY``; ports that are full, stalled ports) is
``avatar_hw.backends.egress``'s.
"""


import errno
import logging
import os
import socket
import stat
import time

from .. import paths
from ..errors import AGAIN, ConfigError, os_reason
from ..ratelimit import RateLimitedLog
from ..virtio.buffers import copy, gather, skip
from .egress import STALL_SECONDS, STICKY_SECONDS, Egress, RemotePort
from .net import BUSY, RX_BATCH

log = logging.getLogger(__name__)

ETH_ALEN = 6
ETH_HLEN = 14                   # two addresses and the EtherType
MAX_MACS = 1024
MAX_REMOTES = 64
MAX_DATAGRAM = 65536


def recv_socket(sock, views):
    """One datagram from ``sock``."""
    try:
        n, _, flags, _ = sock.recvmsg_into(views)
    except AGAIN:
        return None
    if flags & socket.MSG_TRUNC:
        return sum(len(v) for v in views) + 1
    return n


class Switch:
    """The L2 switch at ``path``, hosted by this process (one per path: ``Switch.join``)."""

    _hosted = {}                  # path -> Switch
    stall_seconds = STALL_SECONDS
    sticky_seconds = STICKY_SECONDS

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
            st = os.stat(path)
        except BaseException:
            self.sock.close()
            raise
        self.inode = (st.st_dev, st.st_ino)   # its socket file: no remote port may be it
        self.members = 0              # local ports joined (attached or not)
        self.local = []               # attached local ports (SwitchBackend)
        self.remotes = {}             # address -> RemotePort
        self.locked = {}              # MAC bytes -> local port (its device's MAC)
        self.macs = {}                # MAC bytes -> remote port (learned)
        self.loop = None              # the loop the socket is registered with
        self._macs_buf = bytearray(2 * ETH_ALEN)
        self._scratch = memoryview(bytearray(MAX_DATAGRAM))
        self.frames_dropped = 0       # every frame or datagram the switch dropped (docs)
        self.stall_log = RateLimitedLog(log)   # ports stalled (a guest can repeat it): counted
        self.refusal_log = RateLimitedLog(log)   # remote datagrams dropped (a peer repeats)

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
                                  f"{os_reason(err)}") from None
        problem = paths.clear_for_socket(path, socket.SOCK_DGRAM)
        if problem:
            raise ConfigError(self.url, None, f"{path} {problem}; choose another path")
        self.sock.bind(path)

    # -- ports ------------------------------------------------------------------------------------

    def attach(self, port):
        """Local ``port`` is attached to its device and loop: it takes part, locked to
        its device's MAC (one port per MAC: a second would take the first's traffic)."""
        try:
            self.lock(port, port.mac)
        except ValueError as err:
            raise ConfigError(self.url, None, f"{err}; give each its own mac") from None
        self.local.append(port)
        self._register(port.loop)

    def lock(self, port, mac):
        """Lock local ``port`` to ``mac`` in place of the MAC it has (at its attach, the
        same; after a restart, the one its guest read); ValueError if another port has it."""
        other = self.locked.get(mac)
        if other is not None and other is not port:
            raise ValueError(f"MAC {mac.hex(':')} is already another net device's on this "
                             "switch")
        if self.locked.get(port.mac) is port:
            del self.locked[port.mac]
        self.locked[mac] = port
        self.macs.pop(mac, None)

    def _register(self, loop):
        if self.loop is None:
            self.loop = loop
            loop.add_reader(self.sock, self._readable)

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
            if self.local:
                self._register(self.local[0].loop)
        if not self.members:
            for remote in list(self.remotes.values()):
                self._drop_remote(remote)
            self.sock.close()
            paths.remove(self.path)
            Switch._hosted.pop(self.path, None)

    def _forget(self, port):
        for table in (self.locked, self.macs):
            for mac in [m for m, p in table.items() if p is port]:
                del table[mac]

    def _learn(self, mac, port):
        """A remote port sent from ``mac`` (a unicast address no local port has)."""
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
            ingress.refuse_source(macs[ETH_ALEN:])
            return False
        ports = self._destinations(macs[:ETH_ALEN], ingress)
        if self._full(ports, ingress, length):
            return BUSY
        # The addresses checked, not the guest's RAM read again: its vCPU runs meanwhile
        # and could put another source there after the check.
        frame = [memoryview(macs), *skip(views, 2 * ETH_ALEN)]
        for port in ports:
            port.deliver(frame, length)
        return True

    @staticmethod
    def _full(ports, ingress, length):
        """True when one of ``ports`` cannot take a frame now; local port ``ingress`` then
        waits for it (every port delivers or none: a flood is not sent twice to the others)."""
        for port in ports:
            if not port.has_room(length) and port.wait(ingress):
                return True
        return False

    def send_to(self, remote, views):
        """True when ``remote``'s socket took the frame, BUSY when it is full, False when
        the frame is dropped (the remote is gone, and forgotten, or another error)."""
        try:
            self.sock.sendmsg(views, (), 0, remote.target)
            return True
        except AGAIN:
            return BUSY
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("%s: remote port %r went away", self.url, remote.address)
            self._drop_remote(remote)
        except OSError as err:
            self.frames_dropped += 1
            log.debug("%s: frame to %r dropped: %s", self.url, remote.address, err)
        return False

    def _drop_remote(self, remote):
        """Forget ``remote`` (gone, or the switch closes) and unpin its socket."""
        if self.remotes.get(remote.address) is remote:
            del self.remotes[remote.address]
        self._forget(remote)
        remote.close()
        if remote.pin is not None:
            os.close(remote.pin)
            remote.pin = None

    def _remote(self, address):
        """The remote port sending from ``address``, joining it; None when refused."""
        remote = self.remotes.get(address)
        if remote is not None:
            return remote
        if not address:
            problem = "its socket is not bound (no address to answer)"
        elif address in Switch._hosted:
            problem = "it is a switch of this daemon"
        elif len(self.remotes) >= MAX_REMOTES:
            problem = f"the switch has {MAX_REMOTES} remote ports already"
        else:
            pin, problem = self._pin(address)
            if problem is None:
                remote = self.remotes[address] = RemotePort(self, address, pin)
                log.info("%s: remote port %r joined", self.url, address)
                return remote
        self._refuse("datagram from %r dropped: %s", address, problem)
        return None

    @staticmethod
    def _pin(address):
        """(an O_PATH fd of the socket file at ``address``, None), or (None, why it may not
        join); an abstract address (bytes) names no file: (None, None)."""
        if isinstance(address, bytes):
            return None, None
        try:
            fd = os.open(address, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            return None, f"its address cannot be opened: {os_reason(err)}"
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            problem = "its address is no longer a socket (a symlink or another file)"
        elif any((st.st_dev, st.st_ino) == s.inode for s in Switch._hosted.values()):
            problem = "its address is a switch socket of this daemon"
        else:
            return fd, None
        os.close(fd)
        return None, problem

    def _refuse(self, fmt, *args):
        """The datagram at the head of the socket is dropped: consumed, counted, logged."""
        self.sock.recv(1)
        self.frames_dropped += 1
        self.refusal_log("%s: " + fmt, self.url, *args)

    def _readable(self):
        """Remote datagrams: never left waiting for a port (one socket serves every remote
        sender), but delivered to the ports that have room and dropped for the others."""
        for _ in range(RX_BATCH):
            try:
                n, _, _, address = self.sock.recvmsg_into([self._macs_buf], 0,
                                                          socket.MSG_PEEK | socket.MSG_TRUNC)
            except AGAIN:
                return
            ingress = self._remote(address)
            if ingress is None:
                continue
            if not n:                           # a join
                self.sock.recv(1)
                continue
            if not ETH_HLEN <= n <= MAX_DATAGRAM:
                self._refuse("%d-byte datagram from %r dropped: not an Ethernet frame of at "
                             "most %d bytes", n, address, MAX_DATAGRAM)
                continue
            macs = bytes(self._macs_buf)
            source = macs[ETH_ALEN:]
            if source[0] & 1 or source in self.locked:
                self._refuse("frame from %r dropped: its source %s is %s", address,
                             source.hex(":"), "multicast" if source[0] & 1 else "a VM's MAC")
                continue
            self._learn(source, ingress)
            ports = self._destinations(macs[:ETH_ALEN], ingress)
            if len(ports) == 1 and isinstance(ports[0], SwitchBackend):
                ports[0].device.receive(recv_socket, self.sock)   # straight into the guest
                continue
            length = recv_socket(self.sock, [self._scratch])
            if length is None:
                return
            frame = [self._scratch[:length]]
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
        self.url = url
        self.device = self.loop = self.mac = None
        self.wrong_source = 0             # frames dropped: their source was not ``mac``
        self.switch = Switch.join(url, os.path.abspath(path))

    def attach(self, loop, device):
        self.loop, self.device, self.mac = loop, device, bytes(device.mac)
        self.switch.attach(self)

    @property
    def name(self):
        """The port in a log line: its device (VM, interrupt) and MAC."""
        return f"{self.device.context.label} ({self.mac.hex(':')})"

    def change_mac(self, mac):
        """The port is locked to ``mac`` instead (ValueError if another port has it)."""
        self.switch.lock(self, mac)
        self.mac = mac

    def refuse_source(self, source):
        """The guest sent a frame from ``source``, not this port's MAC: dropped, counted,
        and one of its device's guest errors (a guest that keeps spoofing is paced,
        avatar_hw.pace, as the frames cost the daemon work for nothing)."""
        self.wrong_source += 1
        if self.device is None:           # not attached (a device without a loop): no MAC yet
            return
        self.device.guest_error("transmitted a frame from source MAC %s, not the port's %s: "
                                "dropped", source.hex(":"), self.mac.hex(":"))

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
            self._unstall()
            self._cancel_stall_timer()
        if self.stalled or 2 * pending <= capacity:
            self._wake()

    def send(self, views, length):
        return self.switch.forward(self, views, length)

    def resume(self):
        """A port this one waited for has room again."""
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
                "switch_stalls": 0 if self.switch is None else self.switch.stall_log.count,
                "switch_stalled": 0 if self.switch is None else
                sum(p.stalled for p in (*self.switch.local, *self.switch.remotes.values()))}


def open_url(url, rest):
    return SwitchBackend(url, rest)
