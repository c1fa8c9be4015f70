"""A device served by a vhost-user back-end process (avatar_hw.vhost_user).

The transport, status machine, feature negotiation and interrupts stay here;
the virtqueues go to the back-end, which reads and writes guest RAM itself:

- offered features are the back-end's (``GET_FEATURES``) less the transport
  features this front end cannot hand over (``UNSUPPORTED``), so the guest
  never accepts one the back-end lacks; at DRIVER_OK the driver's features go
  to the back-end (``SET_FEATURES``), then the guest RAM (``SET_MEM_TABLE``, the
  first time only, with the fd of the shared file the daemon maps: QEMU's RAM
  file in host mode, the UIO device's map 0 in board mode; the fd is opened when
  the device is bound, before a ``--user`` privilege drop) and every ready queue
  (size, addresses in our mapping, base 0, call and kick eventfds, enable);
- QueueNotify is one ``eventfd_write`` to the queue's kick eventfd;
- the call eventfd is watched by the event loop and sets InterruptStatus bit 0
  (the back-end already applied the driver's notification suppression);
- reset, a queue reset or QueueReady = 0 stops the ring (``GET_VRING_BASE``);
- a config write (with PROTOCOL_F_CONFIG) is ``SET_CONFIG``, then ``GET_CONFIG``: the
  guest reads what the back-end keeps, which may not be what it wrote.

Each sequence (the handshake, an activation, a reset, a config write) has one
deadline. A back-end that dies, stalls past it or breaks the protocol costs one
log line and DEVICE_NEEDS_RESET; the connection is not reopened (the guest's
reset then activates nothing and gets NEEDS_RESET again), and the daemon and
the other devices carry on.
"""

import os

from ..errors import os_reason
from ..schema import REQUIRED, Field, Schema, under
from ..vhost_user import Frontend, VhostUserError
from ..vhost_user.frontend import MAX_CONFIG, PROTOCOL_F_CONFIG
from ..virtio import constants as c
from ..virtio.constants import bit
from ..virtio.device import VirtioDevice

# Reserved (transport) feature bits a back-end may offer that this front end cannot
# honour: VHOST_F_LOG_ALL (26, dirty logging), F_PROTOCOL_FEATURES (30, ours), bit 31,
# ACCESS_PLATFORM (IOTLB messages), RING_PACKED (other ring layout and base encoding),
# SR_IOV, NOTIFICATION_DATA and NOTIF_CONFIG_DATA (QueueNotify's data is not passed on),
# RING_RESET (a queue re-enabled after DRIVER_OK is not handed over again), and the
# reserved bits 41..49.
UNSUPPORTED = (bit(26) | bit(30) | bit(31) | bit(c.F_ACCESS_PLATFORM) | bit(c.F_RING_PACKED)
               | bit(c.F_SR_IOV) | bit(c.F_NOTIFICATION_DATA) | bit(c.F_NOTIF_CONFIG_DATA)
               | bit(c.F_RING_RESET) | ((1 << 50) - (1 << 41)))

MAX_QUEUES = 64     # each is two eventfds and seven requests at DRIVER_OK


class VhostUserDevice(VirtioDevice):
    """Device ``device_id`` behind the back-end listening on ``socket``; ``queue_sizes``:
    the most entries of each queue; ``config``: the configuration space bytes (None: the
    back-end's own, ``GET_CONFIG`` of ``config_size`` bytes, when it offers it)."""

    name = "vhost-user"

    def __init__(self, *, socket, device_id, queue_sizes, config=None, config_size=0,
                 timeout=2.0, connect_wait=0.0):
        if not queue_sizes:
            raise ValueError("queues must list at least one queue size")
        self.device_id = device_id
        self.frontend = Frontend(socket, timeout=timeout, wait=connect_wait)
        try:
            with self.frontend.deadline():
                offered, config = self._handshake(len(queue_sizes), config, config_size)
        except VhostUserError:
            self.frontend.close()
            raise
        super().__init__(queue_sizes=queue_sizes, config=config or b"")
        for queue in self.queues:
            queue.served_elsewhere = True      # the back-end pops them
        self.features = offered & ~UNSUPPORTED
        self._kick, self._call = [], []
        try:
            for _ in queue_sizes:
                self._kick.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
                self._call.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        except OSError:             # out of fds: give back what this device holds
            for fd in self._kick + self._call:
                os.close(fd)
            self.frontend.close()
            raise
        self._started = set()       # rings the back-end runs
        self._ram = None            # (fd, mmap_offset) of the guest RAM, or the reason not
        self._memory_sent = False

    def _handshake(self, queues, config, config_size):
        """The back-end's features and the config space (``config``, or its own)."""
        front = self.frontend
        offered = front.handshake()
        most = front.queue_num()
        if most is not None and queues > most:
            raise VhostUserError(f"vhost-user back-end {front.path} serves at most {most} "
                                 f"queues, not {queues}")
        if config is None and config_size:
            if not front.has_protocol_feature(PROTOCOL_F_CONFIG):
                raise VhostUserError(
                    f"config_size = {config_size}: the back-end {front.path} does not offer "
                    "VHOST_USER_PROTOCOL_F_CONFIG; remove config_size (the config space "
                    "is then empty) or use a back-end that serves its config space")
            config = front.get_config(0, config_size)
        return offered, config

    def bind(self, context):
        super().bind(context)
        self._ram = ram_file(context.memory)
        if isinstance(self._ram, str):
            self.error("%s; the device will answer DRIVER_OK with DEVICE_NEEDS_RESET",
                       self._ram)

    # -- event loop ---------------------------------------------------------------------------

    def attach(self, loop):
        super().attach(loop)
        for index, fd in enumerate(self._call):
            self.loop.add_reader(fd, lambda index=index: self._on_call(index))
        if not self.frontend.closed:
            fd, loop = self.frontend.fileno(), self.loop
            loop.add_reader(fd, self._on_socket)
            self.frontend.before_close = lambda: loop.remove_reader(fd)

    def detach(self):
        self.frontend.close()
        self.frontend.before_close = None
        if self.loop is not None:
            for fd in self._call:
                self.loop.remove_reader(fd)
        for fd in self._kick + self._call:
            os.close(fd)
        self._kick = self._call = []
        if isinstance(self._ram, tuple):
            os.close(self._ram[0])
        self._ram = None
        super().detach()

    def _on_call(self, index):
        try:
            os.eventfd_read(self._call[index])
        except BlockingIOError:
            return
        if self.active:
            self.context.interrupt(c.INT_USED_BUFFER)

    def _on_socket(self):
        """Readable without a request in flight: the back-end closed the connection or
        sent what it may not."""
        reason = self.frontend.unexpected()
        if reason is not None:
            self._lost(f"vhost-user back-end {self.frontend.path} {reason}")

    def _lost(self, err):
        self.frontend.close()
        self._started.clear()
        self.fail(str(err))

    # -- hooks --------------------------------------------------------------------------------

    def activate(self):
        try:
            with self.frontend.deadline():
                self.frontend.set_features(self.context.negotiated_features)
                self._send_memory()
                for queue in self.queues:
                    if queue.ready:
                        self._start(queue)
        except VhostUserError as err:
            self._lost(err)

    def _send_memory(self):
        if self._memory_sent:
            return
        if not isinstance(self._ram, tuple):
            raise VhostUserError(self._ram or "the device is not bound to a VM")
        memory = self.memory
        fd, offset = self._ram
        self.frontend.set_mem_table([(memory.base, memory.size, memory.region.address, offset,
                                      fd)])
        self._memory_sent = True

    def _start(self, queue):
        mem = self.memory
        self.frontend.set_vring(
            queue.index, num=queue.size, desc=mem.address(queue.desc_addr, 16),
            avail=mem.address(queue.driver_addr, 2), used=mem.address(queue.device_addr, 4),
            kick=self._kick[queue.index], call=self._call[queue.index])
        self.frontend.set_vring_enable(queue.index, True)
        self._started.add(queue.index)

    def _stop(self, index):
        if index in self._started:
            self._started.discard(index)
            self.frontend.get_vring_base(index)

    def queue_notify(self, index):
        os.eventfd_write(self._kick[index], 1)

    def reset(self):
        try:
            with self.frontend.deadline():
                for index in sorted(self._started):
                    self._stop(index)
        except VhostUserError as err:
            self._lost(err)

    def queue_reset(self, index):
        try:
            self._stop(index)
        except VhostUserError as err:
            self._lost(err)

    def write_config(self, offset, data):
        if not self.frontend.has_protocol_feature(PROTOCOL_F_CONFIG):
            super().write_config(offset, data)
            return
        try:
            with self.frontend.deadline():
                self.frontend.set_config(offset, data)
                config = self.frontend.get_config(0, len(self.config))
        except VhostUserError as err:
            self._lost(err)
            return
        self.update_config(0, config, notify=False)

    def info(self):
        out = super().info()
        out.update(socket=self.frontend.path, connected=not self.frontend.closed,
                   rings_started=sorted(self._started))
        return out


def ram_file(memory):
    """``(fd, mmap_offset)`` for SET_MEM_TABLE: a new fd of the file behind the VM's RAM
    mapping (QEMU's shared RAM file; in board mode the UIO device), or why there is none.

    A back-end maps the fd itself: libvhost-user (C virtiofsd) maps ``mmap_offset + size``
    bytes from offset 0 and skips ``mmap_offset``; rust-vmm's vhost-user-backend maps
    ``size`` bytes at ``mmap_offset``. Both work for a regular file. A UIO device's mmap
    offset selects the map (map N at N pages) and a mapping may not outgrow the map, so
    only map 0 starting on its first byte (``mmap_offset`` 0), mapped whole, works with
    both: the board's RAM node must have the VM's RAM as its map 0.
    """
    region = memory.region
    if region.file is None:
        return (f"guest RAM of vm{memory.vm_id} is not a shared file mapping; a vhost-user "
                "back-end needs its fd")
    path, offset = region.file
    if region.uio_map is not None and offset:
        return (f"guest RAM of vm{memory.vm_id} is map {region.uio_map} of {path} (starting "
                f"0x{offset:x} bytes into its mmap offsets); a vhost-user back-end maps the "
                "fd from mmap offset 0: make the VM's RAM map 0 of its UIO node, page-aligned")
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC), offset
    except OSError as err:
        return (f"guest RAM of vm{memory.vm_id}: cannot open {path} for a vhost-user back-end: "
                f"{os_reason(err)}")


def check_config_size(value):
    if not 0 < value <= MAX_CONFIG:
        raise ValueError(f"must be 1 to {MAX_CONFIG} (vhost-user's largest config space)")


def check_device_id(value):
    if not 0 < value <= 0xFFFF:
        raise ValueError(f"must be a virtio device ID in 1..65535, not {value}")


def check_queues(sizes):
    if not 0 < len(sizes) <= MAX_QUEUES or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 and not s & (s - 1)
            and s <= 32768 for s in sizes):
        raise ValueError(f"must list 1 to {MAX_QUEUES} queue sizes, powers of two up to 32768")


SCHEMA = Schema("vhost_user", (
    Field("socket", str, REQUIRED, "the back-end's vhost-user socket path", path=under),
    Field("device_id", int, REQUIRED, "the virtio device ID the back-end serves",
          check_device_id),
    Field("queues", list, REQUIRED, "the most entries of each queue, e.g. [256, 256]",
          check_queues),
    Field("config_size", int, None, "bytes of configuration space read from the back-end",
          check_config_size),
))


def from_config(options):
    """The VMs config's ``vhost_user = { socket, device_id, queues, config_size }``."""
    try:
        return VhostUserDevice(socket=options["socket"], device_id=options["device_id"],
                               queue_sizes=options["queues"],
                               config_size=options.get("config_size", 0))
    except VhostUserError as err:
        raise ValueError(str(err)) from None
