"""Device state kept outside the daemon's process: a restart under a running guest.

``serve --state FILE`` (``Daemon(state=)``) keeps every device's state in FILE, a
memory-mapped file of fixed layout, so that a daemon killed with SIGKILL (or stopped
and started again, ``systemctl restart``) is followed by one that carries on where it
stopped, under the same running guests, without their drivers resetting anything:

- per device (``DeviceRecord``): the transport's registers (Status, the driver's
  features, the selectors, InterruptStatus, ConfigGeneration, the legacy page size),
  32-bit ``words`` a device keeps hot progress in (a console port's output already
  delivered) and a JSON ``blob`` of its rarely changing state (the console's ports),
  written twice-buffered: the blob being written is never the current one;
- per queue (``QueueRecord``): size, ready, ring addresses, the legacy alignment and
  QueueReset flag, ``last_avail_idx`` and the used word (``used_idx``; inside
  ``add_used`` with the head it completes); then each queue's in-flight table
  (``Virtqueue.keep_progress``: the position each head was popped from).

Why a mapping and not a file rewritten on each change: the queue's progress changes
at every request, and one aligned store in a shared mapping is what a restart needs
and costs nothing on the I/O path. A process that dies (SIGKILL, a crash) loses
nothing it stored: the page cache holds it. Each value is one aligned store, and the
stores are ordered so that any prefix of them can be restored
(``avatar_hw.virtio.queue``, "Progress kept outside the process"); a register write
cut short is done again, since the stub keeps the guest's access POSTED until a
model answers it. A power cut loses this file's last changes, but the guests too.

Restoring (``restore``, before the new daemon attaches to the trap page): the file is
read as untrusted input. Not ours (magic), another version, another size or another
VMs config (the ``fingerprint`` of every device's VM, slot, device ID, features and
queue sizes) is a one-line ``StateError`` naming the file and what to do: the devices
are not guessed at. A file written before the board Linux booted (another
``boot_id``) is stale: the devices start fresh. Within a matching file, each device's
values are checked like guest writes (status bits and their order, features
offered, queue sizes, rings inside the VM's RAM, used index the guest sees one of
the two possible): a device that fails is restored with DEVICE_NEEDS_RESET (logged),
the others carry on. A device that does not know how to be restored (``restartable``
False: its host side holds state this file cannot) and was in use gets
DEVICE_NEEDS_RESET too. Either way the driver is told as 2.1.2 says: the status it set,
DEVICE_NEEDS_RESET added, and a configuration change interrupt.

Then (``resume``, once attached): each active device is activated again, every chain
that was in flight is handed back to it through ``pop`` (it does each request again:
a block write done but not acknowledged is written again, the same bytes; a console
receive buffer held is held again) and every ready queue is served as if notified;
every active device's guest gets one used-buffer interrupt (spurious when nothing
was pending: drivers look at their used rings and find nothing).
"""

import ctypes
import hashlib
import json
import logging
import mmap
import os

from .errors import AvatarError
from .virtio import constants as c
from .virtio.context import WORDS
from .virtio.queue import QueueError

log = logging.getLogger(__name__)

MAGIC = b"AVHWSTAT"
VERSION = 2                     # 2: a console port's delivered bytes in a word of their own
BLOB_SIZE = 8192                # bytes per copy of a device's JSON blob
BOOT_ID = "/proc/sys/kernel/random/boot_id"

u32, u64 = ctypes.c_uint32, ctypes.c_uint64


class Header(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_char * 8), ("version", u32), ("header_size", u32),
                ("file_size", u64), ("device_count", u32), ("reserved", u32),
                ("boot_id", ctypes.c_char * 40), ("fingerprint", ctypes.c_char * 64)]


class DeviceRecord(ctypes.Structure):
    _fields_ = [("vm", u32), ("slot", u32), ("device_id", u32), ("queue_count", u32),
                ("status", u32), ("interrupt_status", u32), ("config_generation", u32),
                ("device_features_sel", u32), ("driver_features_sel", u32), ("queue_sel", u32),
                ("shm_sel", u32), ("page_size", u32), ("driver_features", u64),
                ("blob_current", u32), ("blob_length", u32 * 2), ("reserved", u32),
                ("words", u32 * WORDS)]


class QueueRecord(ctypes.Structure):
    _fields_ = [("size", u32), ("ready", u32), ("desc", u64), ("driver", u64), ("device", u64),
                ("align", u32), ("was_reset", u32), ("last_avail_idx", u32), ("used_idx", u32)]


_INDICES = QueueRecord.last_avail_idx.offset


class StateError(AvatarError):
    """The state file cannot be used for this VMs config (one line: file, problem, what
    to do)."""


def boot_id():
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


def _devices(subsystem):
    """``(window number, transport)`` of every device, in window order."""
    return [(n, t) for n in range(subsystem.layout.window_count)
            if (t := subsystem.transport_at(n)) is not None]


def fingerprint(subsystem):
    """What a state file must have been written for: each device's VM, slot, ID, legacy
    interface, offered features and queue sizes."""
    per_vm = subsystem.layout.windows_per_vm
    desc = [[n // per_vm, n % per_vm, t.device.device_id, t.legacy, t.device.features,
             [q.max_size for q in t.device.queues]] for n, t in _devices(subsystem)]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()


class _Slot:
    """One device's place in the file."""

    def __init__(self, record, queues, in_flight, blobs):
        self.record, self.queues, self.in_flight, self.blobs = record, queues, in_flight, blobs


class StateFile:
    """The state of ``subsystem``'s devices in ``path`` (see the module docstring).

    ``StateFile(path, subsystem)`` maps an existing file (checked: ``StateError``) or
    makes a new one; ``restored`` tells which. ``restore()`` then puts the kept state
    into the devices, ``keep()`` makes them keep it from now on, ``resume()`` serves
    what they were doing.
    """

    def __init__(self, path, subsystem):
        self.path, self.subsystem = str(path), subsystem
        self.devices = _devices(subsystem)
        self._fingerprint = fingerprint(subsystem)
        self._offsets, size = self._layout()
        self._map = None
        self.restored = self._open_existing(size)
        if not self.restored:
            self._create(size)
        self.header = Header.from_buffer(self._map)
        self.slots = {n: self._slot(n, t) for n, t in self.devices}

    # -- the file -----------------------------------------------------------------------------

    def _layout(self):
        offset, offsets = ctypes.sizeof(Header), {}
        for n, transport in self.devices:
            offsets[n] = offset
            queues = transport.device.queues
            offset += ctypes.sizeof(DeviceRecord) + len(queues) * ctypes.sizeof(QueueRecord)
            offset += 4 * sum(q.max_size for q in queues) + 2 * BLOB_SIZE
            offset = (offset + 7) & ~7
        return offsets, offset

    def _open_existing(self, size):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise StateError(f"{self.path}: cannot open the state file: {err.strerror}") from None
        try:
            actual = os.fstat(fd).st_size
            if actual < ctypes.sizeof(Header):
                raise StateError(f"{self.path}: {actual} bytes is not an avatar-hw state file "
                                 "(remove it to start the devices fresh)")
            header = Header.from_buffer_copy(os.pread(fd, ctypes.sizeof(Header), 0))
            problem = None
            if header.magic != MAGIC:
                problem = "is not an avatar-hw state file"
            elif header.version != VERSION:
                problem = (f"was written by state format version {header.version}, this "
                           f"avatar-hw reads version {VERSION}")
            elif header.boot_id.decode(errors="replace") != boot_id():
                log.info("%s: written before this boot: the devices start fresh", self.path)
                return False
            elif header.fingerprint.decode(errors="replace") != self._fingerprint:
                problem = "was written for another VMs config (devices, features or queues)"
            elif (header.file_size != actual or actual != size
                  or header.header_size != ctypes.sizeof(Header)
                  or header.device_count != len(self.devices)):
                problem = f"has the wrong size ({actual} bytes, {size} expected)"
            if problem:
                raise StateError(f"{self.path}: {problem}: remove it to start the devices "
                                 "fresh (the guests then need a reboot)")
            self._map = mmap.mmap(fd, size)
            return True
        finally:
            os.close(fd)

    def _create(self, size):
        """A new, zeroed file, put in place with a rename (never a half-written header)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        temp = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StateError(f"{self.path}: cannot create the state file: {err.strerror}") \
                from None
        try:
            os.ftruncate(fd, size)
            header = Header(magic=MAGIC, version=VERSION, header_size=ctypes.sizeof(Header),
                            file_size=size, device_count=len(self.devices),
                            boot_id=boot_id().encode(), fingerprint=self._fingerprint.encode())
            os.pwrite(fd, bytes(header), 0)
            self._map = mmap.mmap(fd, size)
            os.rename(temp, self.path)
        except BaseException:
            os.unlink(temp)
            raise
        finally:
            os.close(fd)
        per_vm = self.subsystem.layout.windows_per_vm
        for n, transport in self.devices:
            record = DeviceRecord.from_buffer(self._map, self._offsets[n])
            record.vm, record.slot = n // per_vm, n % per_vm
            record.device_id = transport.device.device_id
            record.queue_count = len(transport.device.queues)

    def _slot(self, number, transport):
        offset = self._offsets[number]
        record = DeviceRecord.from_buffer(self._map, offset)
        offset += ctypes.sizeof(DeviceRecord)
        queues = []
        for _ in transport.device.queues:
            queues.append(QueueRecord.from_buffer(self._map, offset))
            offset += ctypes.sizeof(QueueRecord)
        in_flight = []
        view = memoryview(self._map)
        for queue in transport.device.queues:
            in_flight.append(view[offset:offset + 4 * queue.max_size].cast("I"))
            offset += 4 * queue.max_size
        blobs = (view[offset:offset + BLOB_SIZE], view[offset + BLOB_SIZE:offset + 2 * BLOB_SIZE])
        return _Slot(record, queues, in_flight, blobs)

    def close(self):
        """Let go of the mapping (the file stays for the next daemon)."""
        if self._map is None:
            return
        for number, transport in self.devices:
            for queue in transport.device.queues:
                queue.keep_progress([0, 0], [0] * queue.max_size)
            transport.context.words = [0] * WORDS
            transport.context.keep_state = None
        self.slots.clear()
        self.header = None
        try:
            self._map.close()
        except BufferError:
            log.debug("%s: a view is still held; the mapping goes with it", self.path)
        self._map = None

    # -- keeping ------------------------------------------------------------------------------

    def keep(self):
        """From now on every device keeps its state here (register changes through
        ``save``, queue progress and device words by their own stores)."""
        for number, transport in self.devices:
            slot = self.slots[number]
            for queue, record, in_flight in zip(transport.device.queues, slot.queues,
                                                 slot.in_flight):
                indices = memoryview(record).cast("B")[_INDICES:_INDICES + 8].cast("I")
                queue.keep_progress(indices, in_flight)
            transport.context.words = slot.record.words
            transport.context.keep_state = lambda number=number: self.save_device(number)
            self.save(number)
            self.save_device(number)

    def _kept(self, number):
        """Window ``number``'s transport and its place in the file; ``(None, None)`` when
        the window has no device now or none kept here."""
        transport, slot = self.subsystem.transport_at(number), self.slots.get(number)
        return (None, None) if transport is None or slot is None else (transport, slot)

    def save(self, number, registers_only=False):
        """Store window ``number``'s transport registers (and its queues' programming)."""
        transport, slot = self._kept(number)
        if slot is None:
            return
        record, context = slot.record, transport.context
        record.interrupt_status = context.interrupt_status
        record.config_generation = context.config_generation
        record.status = context.status
        if registers_only:
            return
        record.driver_features = context.driver_features
        record.device_features_sel = transport.device_features_sel & 0xFFFFFFFF
        record.driver_features_sel = transport.driver_features_sel & 0xFFFFFFFF
        record.queue_sel = transport.queue_sel & 0xFFFFFFFF
        record.shm_sel = transport.shm_sel & 0xFFFFFFFF
        record.page_size = transport.page_size
        for index, (queue, qrec) in enumerate(zip(transport.device.queues, slot.queues)):
            qrec.size, qrec.desc = queue.size, queue.desc_addr
            qrec.driver, qrec.device = queue.driver_addr, queue.device_addr
            qrec.align = transport.queue_align[index]
            qrec.was_reset = transport.queue_was_reset[index]
            qrec.ready = queue.ready

    def save_device(self, number):
        """Store the device's JSON blob in the copy that is not current, then flip."""
        transport, slot = self._kept(number)
        if slot is None:
            return
        data = json.dumps(transport.device.saved_state(), separators=(",", ":")).encode()
        if len(data) > BLOB_SIZE:
            transport.context.error("state of %d bytes does not fit the state file's %d; "
                                    "not kept", len(data), BLOB_SIZE)
            return
        record = slot.record
        spare = 1 - (record.blob_current & 1)
        slot.blobs[spare][:len(data)] = data
        record.blob_length[spare] = len(data)
        record.blob_current = spare

    # -- restoring ----------------------------------------------------------------------------

    def restore(self):
        """Put the kept state into every device (before the daemon attaches)."""
        if not self.restored:
            return
        for number, transport in self.devices:
            try:
                self._restore_device(number, transport)
            except (QueueError, ValueError) as err:
                # the driver goes on from the status it set, which the device now marks
                # DEVICE_NEEDS_RESET, with a configuration change interrupt (2.1.2)
                status = self.slots[number].record.status & 0xFF & ~c.STATUS_DEVICE_NEEDS_RESET
                transport.context.status = status if self._status_ok(status, transport) else 0
                transport.fail(f"state file {self.path}: {err}")

    def _restore_device(self, number, transport):
        slot = self.slots[number]
        saved, live = self._device_state(slot), False
        try:
            live = self._restore_transport(slot, transport)
        finally:            # what outlives a reset is taken back even when the rest is not
            try:
                transport.device.restore_state(saved, list(slot.record.words), live)
            except (TypeError, KeyError, IndexError, AttributeError) as err:
                raise ValueError(f"device state does not fit the {transport.device.name} "
                                 f"device ({type(err).__name__}: {err})") from None
        record = slot.record
        if not live:
            return
        if record.status & c.STATUS_DEVICE_NEEDS_RESET:
            transport.fail("it needed a reset before the restart")
        log.info("vm%d slot %d: %s restored (status 0x%02x, %d chain(s) in flight)",
                 record.vm, record.slot, transport.device.name, transport.context.status,
                 sum(len(q.replaying) for q in transport.device.queues))

    @staticmethod
    def _device_state(slot):
        """The device's JSON blob as a dict (ValueError if it is not one)."""
        record = slot.record
        length = record.blob_length[record.blob_current & 1]
        if length > BLOB_SIZE:
            raise ValueError(f"device state of {length} bytes in a {BLOB_SIZE}-byte blob")
        blob = bytes(slot.blobs[record.blob_current & 1][:length]) if length else b"{}"
        try:
            saved = json.loads(blob)
        except (ValueError, RecursionError):
            raise ValueError("device state is not JSON (or nested too deeply)") from None
        if not isinstance(saved, dict):
            raise ValueError("device state is not a JSON object")
        return saved

    @staticmethod
    def _status_ok(status, transport):
        """Could the driver have set ``status``: no reserved bit, each bit after the ones
        it needs (``MmioTransport.status_prerequisites``)?"""
        return not status & 0x30 and all(
            not status & flag or status & needed == needed
            for flag, needed in transport.status_prerequisites.items())

    def _restore_transport(self, slot, transport):
        """Take back the registers and the queues; False when the device was reset (status
        0: nothing to take back), ValueError or QueueError for what makes no sense."""
        record, device = slot.record, transport.device
        status = record.status & 0xFF
        if not status:
            return False
        if not device.restartable:
            raise ValueError(f"{device.name} devices cannot be restored under a running guest")
        if not self._status_ok(status, transport):
            raise ValueError(f"status 0x{status:02x} has reserved bits, or a bit without "
                             "the ones it needs first")
        features = record.driver_features
        if status & (c.STATUS_FEATURES_OK | c.STATUS_DRIVER_OK) and \
                features & ~transport.offered_features:
            raise ValueError(f"driver features 0x{features:x} were never offered")
        page = record.page_size or 4096
        if page & (page - 1):
            raise ValueError(f"legacy page size {page} is not a power of two")
        context = transport.context
        context.status = status & ~c.STATUS_DEVICE_NEEDS_RESET
        context.driver_features = features
        context.interrupt_status = record.interrupt_status & (c.INT_USED_BUFFER
                                                              | c.INT_CONFIG_CHANGE)
        context.config_generation = record.config_generation
        transport.device_features_sel = record.device_features_sel
        transport.driver_features_sel = record.driver_features_sel
        transport.queue_sel = record.queue_sel
        transport.shm_sel = record.shm_sel
        transport.page_size = page
        for index, (queue, qrec) in enumerate(zip(device.queues, slot.queues)):
            align = qrec.align or 4096
            if align & (align - 1):
                raise ValueError(f"queue {index}: alignment {align} is not a power of two")
            transport.queue_align[index] = align
            transport.queue_was_reset[index] = bool(qrec.was_reset)
            queue.size, queue.desc_addr = qrec.size, qrec.desc
            queue.driver_addr, queue.device_addr = qrec.driver, qrec.device
            if not qrec.ready:
                continue
            queue.use_features(features)
            queue.restore(transport.memory, qrec.last_avail_idx, qrec.used_idx,
                          slot.in_flight[index])
        return True

    def resume(self):
        """Serve what the restored devices were doing (once attached to the trap page)."""
        if not self.restored:
            return
        for number, transport in self.devices:
            context = transport.context
            if not context.active:
                continue
            try:
                transport.activate()         # and every ready queue served
                # raised even if the bit was kept set: the previous process may have died
                # between setting it and raising the line
                context.interrupt_status &= ~c.INT_USED_BUFFER
                context.interrupt(c.INT_USED_BUFFER)
            except Exception as err:        # a device bug: that device, not the daemon
                transport.error("resuming after the restart failed", exc_info=True)
                transport.fail(f"resuming after the restart failed: {err!r}")
