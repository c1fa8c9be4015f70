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
"""

import errno
import fcntl
import logging
import os
import socket
import struct

from .. import paths
from ..errors import AGAIN, ConfigError
from ..virtio.buffers import copy, gather

log = logging.getLogger(__name__)

ETH_ALEN = 6
MAX_MACS = 1024
MAX_REMOTES = 64
MAX_DATAGRAM = 65536
RX_BATCH = 64                    # frames read per readiness callback (fairness)

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

    def attach(self, loop, device):
        self.loop, self.device = loop, device
        loop.add_reader(self.fd, self._readable)

    def _readable(self):
        for _ in range(RX_BATCH):
            if not self.device.receive(read_fd, self.fd):
                break

    def send(self, views, length):
        try:
            return os.writev(self.fd, views) == length
        except OSError as err:    # EAGAIN (queue full), EIO (interface down): dropped
            log.debug("%s: frame dropped: %s", self.url, err)
            return False

    def close(self):
        if self.fd is None:
            return
        if self.loop is not None:
            self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = self.loop = self.device = None

    def info(self):
        return {"backend": self.url}


# -- the datagram switch --------------------------------------------------------------------------

class RemotePort:
    """A process that joined the switch from its own socket address."""

    def __init__(self, switch, address):
        self.switch, self.address = switch, address

    def deliver(self, views, length):
        self.switch.send_to(self, views)


class Switch:
    """The L2 switch at ``path``, hosted by this process (one per path: ``Switch.join``)."""

    _hosted = {}                  # path -> Switch

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

    def leave(self, port):
        """Remove local ``port``; the last one closes the switch."""
        self.members -= 1
        if port in self.local:
            self.local.remove(port)
        self._forget(port)
        if self.loop is not None and port.loop is self.loop:
            self.loop.remove_reader(self.sock)
            self.loop = None
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
        """A frame from local port ``ingress`` (``views``: guest RAM, not copied); False
        when it is dropped because its source is not the port's MAC."""
        if gather(views, self._macs_buf) < 2 * ETH_ALEN:
            return False
        macs = bytes(self._macs_buf)
        if macs[ETH_ALEN:] != ingress.mac:
            ingress.wrong_source += 1
            return False
        for port in self._destinations(macs[:ETH_ALEN], ingress):
            port.deliver(views, length)
        return True

    def send_to(self, remote, views):
        try:
            self.sock.sendmsg(views, (), 0, remote.address)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("%s: remote port %r went away", self.url, remote.address)
            self.remotes.pop(remote.address, None)
            self._forget(remote)
        except OSError as err:                # a full peer: dropped, like a busy link
            self.frames_dropped += 1
            log.debug("%s: frame to %r dropped: %s", self.url, remote.address, err)

    def _remote(self, address):
        remote = self.remotes.get(address)
        if remote is None and address and len(self.remotes) < MAX_REMOTES:
            remote = self.remotes[address] = RemotePort(self, address)
            log.info("%s: remote port %r joined", self.url, address)
        return remote

    def _readable(self):
        for _ in range(RX_BATCH):
            try:
                n, _, _, address = self.sock.recvmsg_into([self._macs_buf], 0, socket.MSG_PEEK)
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
            if len(ports) == 1 and isinstance(ports[0], SwitchBackend):
                ports[0].device.receive(recv_socket, self.sock)   # straight into the guest
                continue
            length = recv_socket(self.sock, [self._scratch])
            if not ports or length is None or length > len(self._scratch):
                continue
            frame = [memoryview(self._scratch)[:length]]
            for port in ports:
                port.deliver(frame, length)


class SwitchBackend:
    """A local port of the switch at ``path``."""

    def __init__(self, url, path):
        if not path:
            raise ConfigError(url, None, "switch: needs a socket path, e.g. "
                              "switch:/run/avatar/net0.sock")
        self.url = url
        self.device = self.loop = self.mac = None
        self.wrong_source = 0             # frames dropped: their source was not ``mac``
        self.switch = Switch.join(url, os.path.abspath(path))

    def attach(self, loop, device):
        self.loop, self.device, self.mac = loop, device, bytes(device.mac)
        self.switch.attach(self)

    def deliver(self, views, length):
        self.device.receive(copy, views)

    def send(self, views, length):
        return self.switch.forward(self, views, length)

    def close(self):
        if self.switch is not None:
            self.switch.leave(self)
            self.switch = self.device = self.loop = None

    def info(self):
        return {"backend": self.url, "switch_ports": 0 if self.switch is None else
                len(self.switch.local) + len(self.switch.remotes),
                "tx_wrong_source": self.wrong_source,
                "switch_dropped": 0 if self.switch is None else self.switch.frames_dropped}


SCHEMES = {"tap": TapBackend, "switch": SwitchBackend}


def open_net_backend(url):
    """A backend from its URL (see the module docstring)."""
    scheme, _, rest = url.partition(":")
    factory = SCHEMES.get(scheme)
    if factory is None:
        raise ConfigError(url, None, f"unknown net backend {scheme!r}; use "
                          + " or ".join(f"{s}:" for s in SCHEMES))
    return factory(url, rest)
