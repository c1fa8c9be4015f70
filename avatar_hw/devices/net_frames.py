"""virtio-net's frames apart from its queues (``net.NetDevice``'s): MAC addresses as a
config file and ``info`` write them, and the bounded pending frames that hold received
frames while the guest gives no receive buffers."""

import collections
import hashlib
import re
import socket
from pathlib import Path

MAC_TEXT = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")    # ASCII only: int() takes more


def parse_mac(text):
    """``'52:54:00:12:34:56'`` -> 6 bytes; a ValueError for anything but a unicast MAC."""
    if not MAC_TEXT.fullmatch(text):
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address; a NIC needs a unicast one (even "
                         "first octet, e.g. 52:54:00:12:34:56)")
    if not any(mac):
        raise ValueError(f"{text} is no address (Linux's driver then makes up a random one, "
                         "which the switch port would refuse); give e.g. 52:54:00:12:34:56")
    return mac


def format_mac(mac):
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(intid):
    """A locally administered MAC for a net device given none: the same for this device
    (its interrupt number: its VM and slot on the board) on this host (``/etc/machine-id``)
    every time, so DHCP leases hold across reboots (a restarted daemon's device takes back
    the one the guest read from its saved state: ``NetDevice.restore_state``)."""
    try:
        host = Path("/etc/machine-id").read_bytes().strip()
    except OSError:
        host = b""
    host = host or socket.gethostname().encode()      # no machine-id, or an empty one
    return bytes([0x02]) + hashlib.sha256(b"avatar-hw net %d " % intid + host).digest()[:5]


class PendingFrames:
    """Frames waiting for receive buffers: ``count`` slots of ``size`` bytes, FIFO."""

    def __init__(self, count, size):
        self.size = size
        self._pool = memoryview(bytearray(count * size))
        self._slots = [self._pool[i * size:(i + 1) * size] for i in range(count)]
        self._lengths = collections.deque()
        self._first = 0

    def __len__(self):
        return len(self._lengths)

    @property
    def capacity(self):
        return len(self._slots)

    def free_slot(self):
        """The slot the next frame goes into, or None when full."""
        n = len(self._lengths)
        return None if n == len(self._slots) else self._slots[(self._first + n) % len(self._slots)]

    def push(self, length):
        self._lengths.append(length)

    def oldest(self):
        """(memoryview of the oldest frame, its length)."""
        length = self._lengths[0]
        return self._slots[self._first][:length], length

    def pop(self):
        self._lengths.popleft()
        self._first = (self._first + 1) % len(self._slots)

    def clear(self):
        self._lengths.clear()
        self._first = 0
