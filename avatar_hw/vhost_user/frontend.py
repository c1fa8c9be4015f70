"""The vhost-user protocol, front-end side, over a Unix stream socket.

Written against QEMU's docs/interop/vhost-user.rst. A message is a 12-byte
header (``request``, ``flags``: version 1, bit 2 reply, bit 3 need-reply;
``size`` of the payload) and the payload, little-endian; file descriptors
travel as SCM_RIGHTS ancillary data of the same ``sendmsg``.

Every reply is checked (request code, reply flag, version, payload size at
most ``MAX_PAYLOAD`` and exactly what the request expects); a reply carrying
file descriptors breaks the protocol (none of ours expects one): they are
closed, never kept. Each request and its reply share one deadline of
``timeout`` seconds, and so does every request of a sequence made under
``with frontend.deadline():`` (a device's activation, its reset), so a dead,
stalled or trickling back-end costs at most that, then ``VhostUserError``.
After one error the connection is closed and every later call raises at once,
naming the socket (the device sets DEVICE_NEEDS_RESET; it never retries behind
the guest's back).

Addresses: ``SET_MEM_TABLE`` gives each region's guest-physical address,
size, our mapping's virtual address (``userspace_addr``) and its offset in
the file passed; ``SET_VRING_ADDR`` then takes the rings' addresses in OUR
virtual address space (the spec's rule when no logging is negotiated), which
the back-end translates through the table.
"""

import array
import os
import socket
import struct
import time
from contextlib import contextmanager

from ..errors import os_reason
from ..unixsock import connect_unix

# Front-end requests (vhost-user.rst, "Front-end message types").
GET_FEATURES, SET_FEATURES, SET_OWNER = 1, 2, 3
SET_MEM_TABLE = 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG = 24, 25

F_PROTOCOL_FEATURES = 30            # VHOST_USER_F_PROTOCOL_FEATURES, a virtio feature bit
PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK, PROTOCOL_F_CONFIG = 0, 3, 9
# What this front end implements; anything else the back-end offers is declined.
SUPPORTED_PROTOCOL_FEATURES = (1 << PROTOCOL_F_MQ | 1 << PROTOCOL_F_REPLY_ACK
                               | 1 << PROTOCOL_F_CONFIG)

VERSION, FLAG_REPLY, FLAG_NEED_REPLY = 0x1, 0x4, 0x8
_HEADER = struct.Struct("<III")
VRING_NOFD = 1 << 8                 # SET_VRING_KICK/CALL/ERR: no fd passed
MAX_REGIONS = 8                     # VHOST_MEMORY_BASELINE_NREGIONS
MAX_PAYLOAD = 4096                  # far above any reply this front end asks for
MAX_CONFIG = 256                    # VHOST_USER_MAX_CONFIG_SIZE (GET/SET_CONFIG payloads)
_FD_SPACE = socket.CMSG_SPACE(MAX_REGIONS * 4)   # room to receive (and close) stray fds
DEFAULT_TIMEOUT = 2.0


class VhostUserError(Exception):
    """The back-end is gone, too slow, or broke the protocol."""


class Frontend:
    """One connection to a back-end listening on ``path``."""

    def __init__(self, path, *, timeout=DEFAULT_TIMEOUT, wait=0.0):
        """``wait``: seconds to keep retrying while the socket is missing or not yet
        listening (a back-end just started binds before it listens)."""
        self.path = str(path)
        self.timeout = timeout
        self._deadline = None           # of the request in flight (time.monotonic())
        self._in_sequence = False       # inside deadline(): its requests share _deadline
        try:
            self.sock = connect_unix(self.path, wait, poll=0.01, timeout=timeout)
        except BlockingIOError:
            raise VhostUserError(f"cannot connect to {self.path}: its listen backlog is full "
                                 "(the back-end accepts no connection)") from None
        except OSError as err:
            raise VhostUserError(f"cannot connect to {self.path}: {os_reason(err)}") from None
        self.features = self.protocol_features = 0
        self.closed = False
        self.before_close = None        # called before the socket closes, however it does

    def close(self):
        """Close the socket, ``before_close()`` first (an event loop watching it forgets the
        fd before its number can come back for another file)."""
        if not self.closed:
            self.closed = True
            if self.before_close is not None:
                self.before_close()
            self.sock.close()

    def fileno(self):
        return self.sock.fileno()

    @contextmanager
    def deadline(self):
        """Every request made inside shares one deadline of ``timeout`` s (nested: the
        outer one's)."""
        if self._in_sequence:
            yield
            return
        self._deadline, self._in_sequence = time.monotonic() + self.timeout, True
        try:
            yield
        finally:
            self._in_sequence = False

    # -- messages -------------------------------------------------------------------------

    def _remaining(self):
        """The socket's timeout becomes what is left of the request's deadline
        (TimeoutError when nothing is)."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)

    def _send(self, request, payload=b"", fds=(), need_reply=False):
        if self.closed:
            raise VhostUserError(f"vhost-user back-end {self.path}: the connection was lost "
                                 "earlier and is not reopened (restart the daemon)")
        if not self._in_sequence:
            self._deadline = time.monotonic() + self.timeout
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        data = _HEADER.pack(request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._remaining()
            sent = self.sock.sendmsg([data], anc)
            while sent < len(data):
                self._remaining()
                sent += self.sock.send(data[sent:])
        except OSError as err:
            self._broken(f"request {request}: {os_reason(err) or 'timed out'}")

    def _recv_exact(self, n, request):
        """``n`` bytes of the reply to ``request``, by the request's deadline."""
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                self._remaining()
                k, ancdata, _, _ = self.sock.recvmsg_into([view[got:]], _FD_SPACE)
            except OSError as err:
                self._broken(f"reply to request {request}: {os_reason(err) or 'timed out'}")
            if ancdata:
                self._close_fds(ancdata)
                self._broken(f"reply to request {request} carries file descriptors")
            if not k:
                self._broken(f"reply to request {request}: the back-end closed the socket")
            got += k
        return bytes(buf)

    @staticmethod
    def _close_fds(ancdata):
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                for fd in fds:
                    os.close(fd)

    def _reply(self, request, size=None):
        """The reply payload to ``request``; ``size``: the exact size it must have."""
        code, flags, length = _HEADER.unpack(self._recv_exact(_HEADER.size, request))
        if code != request or flags & 0x3 != VERSION or not flags & FLAG_REPLY:
            self._broken(f"reply to request {request} has request {code}, flags 0x{flags:x}")
        if length > MAX_PAYLOAD or (size is not None and length != size):
            self._broken(f"reply to request {request} has a {length}-byte payload"
                         + (f", not {size}" if size is not None else ""))
        return self._recv_exact(length, request)

    def unexpected(self):
        """Why the socket is readable with no request in flight: the back-end closed it or
        sent a message it may not send (nothing back-end-initiated is negotiated). Any
        fds that came with it are closed."""
        try:
            data, ancdata, _, _ = self.sock.recvmsg(1, _FD_SPACE,
                                                    socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as err:
            return f"the connection failed: {os_reason(err)}"
        self._close_fds(ancdata)
        return ("sent a message with no request in flight" if data
                else "closed the connection")

    def _broken(self, reason):
        self.close()
        raise VhostUserError(f"vhost-user back-end {self.path}: {reason}")

    def _call(self, request, payload=b"", fds=()):
        """A request without a reply of its own; with REPLY_ACK, wait for its ack."""
        ack = self.has_protocol_feature(PROTOCOL_F_REPLY_ACK)
        self._send(request, payload, fds, need_reply=ack)
        if ack:
            status, = struct.unpack("<Q", self._reply(request, 8))
            if status:
                self._broken(f"request {request} failed (status {status})")

    def _get_u64(self, request):
        self._send(request)
        return struct.unpack("<Q", self._reply(request, 8))[0]

    # -- the protocol -----------------------------------------------------------------------

    def handshake(self):
        """Features, protocol features and SET_OWNER; returns the virtio features the
        back-end offers (without F_PROTOCOL_FEATURES)."""
        offered = self._get_u64(GET_FEATURES)
        if offered >> F_PROTOCOL_FEATURES & 1:
            theirs = self._get_u64(GET_PROTOCOL_FEATURES)
            mine = theirs & SUPPORTED_PROTOCOL_FEATURES
            self._send(SET_PROTOCOL_FEATURES, struct.pack("<Q", mine))
            self.protocol_features = mine
        self._call(SET_OWNER)
        self.features = offered
        return offered & ~(1 << F_PROTOCOL_FEATURES)

    def has_protocol_feature(self, bit):
        return bool(self.protocol_features >> bit & 1)

    def queue_num(self):
        """GET_QUEUE_NUM (with MQ), else None."""
        return self._get_u64(GET_QUEUE_NUM) if self.has_protocol_feature(PROTOCOL_F_MQ) else None

    def set_features(self, features):
        """The driver's features, plus F_PROTOCOL_FEATURES when the back-end offered it."""
        self._call(SET_FEATURES, struct.pack(
            "<Q", features | (self.features & 1 << F_PROTOCOL_FEATURES)))

    def set_mem_table(self, regions):
        """``regions``: (guest_phys_addr, size, userspace_addr, mmap_offset, fd) each."""
        if not 0 < len(regions) <= MAX_REGIONS:
            raise VhostUserError(f"{len(regions)} memory regions (1..{MAX_REGIONS})")
        payload = struct.pack("<II", len(regions), 0) + b"".join(
            struct.pack("<QQQQ", *r[:4]) for r in regions)
        self._call(SET_MEM_TABLE, payload, [r[4] for r in regions])

    def set_vring(self, index, *, num, desc, avail, used, kick, call, err=None, base=0):
        """Hand ring ``index`` over: size, addresses (our virtual ones), base, eventfds."""
        self._call(SET_VRING_NUM, struct.pack("<II", index, num))
        self._call(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, desc, used, avail, 0))
        self._call(SET_VRING_BASE, struct.pack("<II", index, base))
        for request, fd in ((SET_VRING_CALL, call), (SET_VRING_ERR, err)):
            if fd is None:
                self._call(request, struct.pack("<Q", index | VRING_NOFD))
            else:
                self._call(request, struct.pack("<Q", index), [fd])
        self._call(SET_VRING_KICK, struct.pack("<Q", index), [kick])

    def set_vring_enable(self, index, enable):
        if self.features >> F_PROTOCOL_FEATURES & 1:
            self._call(SET_VRING_ENABLE, struct.pack("<II", index, int(enable)))

    def get_vring_base(self, index):
        """Stop ring ``index``; its next available index (the back-end's ``last_avail``)."""
        self._send(GET_VRING_BASE, struct.pack("<II", index, 0))
        got, num = struct.unpack("<II", self._reply(GET_VRING_BASE, 8))
        if got != index:
            self._broken(f"GET_VRING_BASE for ring {index} answered for ring {got}")
        return num

    def get_config(self, offset, size):
        """GET_CONFIG (with PROTOCOL_F_CONFIG): ``size`` bytes of the device's config."""
        if not 0 < size <= MAX_CONFIG or offset < 0:
            raise VhostUserError(f"GET_CONFIG of {size} bytes (1..{MAX_CONFIG})")
        self._send(GET_CONFIG, struct.pack("<III", offset, size, 0) + bytes(size))
        reply = self._reply(GET_CONFIG, 12 + size)
        got_offset, got_size, _ = struct.unpack_from("<III", reply)
        if (got_offset, got_size) != (offset, size):
            self._broken(f"GET_CONFIG answered {got_size} bytes at {got_offset}")
        return reply[12:]

    def set_config(self, offset, data):
        if not 0 < len(data) <= MAX_CONFIG:
            raise VhostUserError(f"SET_CONFIG of {len(data)} bytes (1..{MAX_CONFIG})")
        self._call(SET_CONFIG, struct.pack("<III", offset, len(data), 0) + bytes(data))
