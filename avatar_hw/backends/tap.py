"""The ``tap:NAME`` net backend: a Linux TAP interface, one ``read``/``write`` per frame
(see ``avatar_hw.backends.net`` for what a backend does).

``TUNSETIFF`` creates the interface (CAP_NET_ADMIN) or attaches to an existing one by
name. While the device cannot take frames (its pending frames are full) the TAP is not
read: the kernel's queue holds or drops them.
"""

import errno
import fcntl
import logging
import os
import struct

from ..errors import AGAIN, ConfigError
from .net import RX_BATCH

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
IFNAMSIZ = 16


def read_fd(fd, views):
    """One frame from a TAP fd (one ``read`` is one frame); any error but a frame that did
    not fit (EFAULT, EINVAL: dropped) is raised: the interface is gone (EBADFD once it was
    deleted), and every later read fails the same way."""
    try:
        return os.readv(fd, views)
    except AGAIN:
        return None
    except OSError as err:
        if err.errno not in (errno.EFAULT, errno.EINVAL):
            raise
        log.debug("tap read: %s", err)
        return sum(len(v) for v in views) + 1


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
        self._failed = False

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
            try:
                if not self.device.receive(read_fd, self.fd):
                    break
            except OSError as err:
                self._gone(err)
                return

    def _gone(self, err):
        """The interface failed for good (deleted under the daemon): stop reading it (its fd
        stays readable: every turn of the loop would fail again) and say so once."""
        log.warning("%s: the TAP interface failed (%s); the guest receives nothing more from "
                    "it (recreate it and restart the daemon)", self.url, err.strerror)
        self.loop.remove_reader(self.fd)
        self._reading = False
        self._failed = True

    def receive_ready(self, pending, capacity):
        if self.loop is not None and not self._reading and not self._failed:
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

    def change_mac(self, mac):
        """Nothing to do: a TAP takes frames from any source."""

    def info(self):
        return {"backend": self.url}


def open_url(url, rest):
    return TapBackend(url, rest)
