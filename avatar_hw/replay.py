"""Record a device model's traps and replay them offline (issue 18, "Record and replay").

``Recorder(subsystem, path)`` wraps ``Subsystem.dispatch`` (the one way in of
every trap, from the trap page or ``handle_mmio_trap``) and the interrupt
line of the transports, and writes:

- before each trap, every 4 KiB guest page that changed since the last trap
  (the guest's writes, and the very first time the whole non-zero RAM): the
  guest-memory *content* the model can read, whatever path reads it (the
  queue's cast views and ``load_acquire16``, the chain iterator's slices of
  ``memory.data``, gathers, ``pwritev``);
- the trap (window, offset, size, is_write, value) and its answer;
- after the trap, every page the model changed during it, with its content;
- every interrupt raised during the trap.

Pages are found by comparing each VM's RAM with a shadow copy (``memcmp`` per
256 KiB chunk, then per page), so recording is sound without instrumenting
each read path; the price is a compare of the RAM per trap (see bench).

``replay(path, build)`` rebuilds the model with ``build(layout_meta)`` -> a
``Subsystem`` whose VMs have zeroed bytearray RAM of the recorded sizes (no
board, no QEMU), applies the guest pages, re-dispatches each trap and checks
the answer, the pages written and the interrupts raised; the first
difference is returned as one line naming its trap number.

File format (little-endian)::

    header   b"AVRR" u16 version u32 n  then n bytes of JSON (layout, VMs' RAM); n <= 1 MiB
    record   u8 kind  u32 length  then length bytes; length <= 16 MiB
      GUEST_PAGE / MODEL_PAGE  u8 vm  u64 gpa  zlib(4096 bytes)
      TRAP     u32 window  u32 offset  u8 size  u8 is_write  u64 value
      ANSWER   u8 handled  u64 value
      IRQ      u32 intid          (raised during the trap before it)
      IRQ_OUTSIDE  u32 intid      (raised on an event-loop turn: not checked)
      SOURCE   u32 window  then the bytes a device read from its ``source`` (rng)
      END      u64 traps      (the last record: written when recording stops)

Records are written a trap at a time (the trap's and those before it), so the file ends
on a trap; a file without END was cut (the daemon killed, the disk full) and replays
as an error naming the last whole trap.

Backend inputs: the bytes a device reads from its ``source`` file (the rng's
``/dev/urandom``) are recorded and fed back on replay. Limits: other backend
inputs (block image data, console input, frames) are not in the file: replay
needs backends giving the same bytes (the image as it was). Work the model does
outside a trap (event-loop turns: backend input, deferred queue turns) is seen only as page changes
before the next trap, replayed as input and not checked; its interrupts are
not checked.
"""

import collections
import dataclasses
import json
import logging
import mmap
import os
import re
import stat
import struct
import zlib

from .errors import AvatarError
from .hw.region import Region
from .layout import Layout
from .trap import ACCESS_MASKS
from .virtio.memory import GuestMemory, GuestMemoryError
from .virtio.subsystem import Subsystem

log = logging.getLogger(__name__)

MAGIC = b"AVRR"
VERSION = 2                       # 2: the END record
PAGE = 4096
CHUNK = 64 * PAGE
MAX_HEADER = 1 << 20
MAX_RECORD = 16 << 20
MAX_WINDOWS = 1 << 16                # device windows a header's layout may have
DEFAULT_MAX_SIZE = 4 << 30        # serve --record-max-size

GUEST_PAGE, MODEL_PAGE, TRAP, ANSWER, IRQ, IRQ_OUTSIDE, SOURCE, END = 1, 2, 3, 4, 5, 6, 7, 8
_RECORD = struct.Struct("<BI")
_PAGE = struct.Struct("<BQ")
_TRAP = struct.Struct("<IIBBQ")
_ANSWER = struct.Struct("<BQ")
_IRQ = struct.Struct("<I")
_SOURCE = struct.Struct("<I")
_END = struct.Struct("<Q")


class ReplayFormatError(Exception):
    """A file that is not a recording of this version."""


class _PageJournal:
    """The pages of one VM's RAM that changed since the last ``changes()``."""

    def __init__(self, memory, *, zeroed=True):
        self.memory = memory
        self.data = memory.data
        self.shadow = bytearray(memory.size) if zeroed else bytearray(self.data)

    def apply(self, gpa, content):
        """Put a recorded page in the RAM and the shadow (it is no change of the model's)."""
        offset = self.memory.offset(gpa, PAGE)
        self.data[offset:offset + PAGE] = content
        self.shadow[offset:offset + PAGE] = content

    def changes(self):
        """[(gpa, page bytes)] of the pages that differ from the shadow; updates the shadow."""
        data, shadow, out = self.data, self.shadow, []
        if shadow == data:
            return out
        for start in range(0, len(shadow), CHUNK):
            end = min(start + CHUNK, len(shadow))
            if shadow[start:end] == data[start:end]:
                continue
            for page in range(start, end, PAGE):
                content = bytes(data[page:page + PAGE])
                if shadow[page:page + PAGE] != content:
                    shadow[page:page + PAGE] = content
                    out.append((self.memory.base + page, content))
        return out


def _meta(subsystem):
    return {"layout": dataclasses.asdict(subsystem.layout),
            "vms": {str(vm): {"base": m.base, "size": m.size}
                    for vm, m in sorted(subsystem.vms.items())}}


class _Writer:
    """The recording file: records gathered a trap at a time, then written whole.

    On ``commit()`` the gathered records go out unless they would take the file past
    ``max_size``: then an END record goes out instead and recording stops (one log
    line). A write that fails (disk full, file size limit) stops recording too (one log
    line): the file is then cut and ``replay`` says so. Stopped, it takes records and
    drops them, so serving goes on as without ``--record``."""

    def __init__(self, path, meta, max_size):
        self.path, self.max_size, self.pending, self.stopped = path, max_size, [], False
        try:
            self.file = open(path, "wb", buffering=0)
        except OSError as err:
            raise AvatarError(f"--record {path}: cannot write the recording: "
                              f"{err.strerror}") from None
        blob = json.dumps(meta, sort_keys=True).encode()
        self.size = 0
        self._write(MAGIC + struct.pack("<HI", VERSION, len(blob)) + blob)

    def record(self, kind, payload):
        if not self.stopped:
            self.pending.append(_RECORD.pack(kind, len(payload)) + payload)

    def page(self, kind, vm, gpa, content):
        self.record(kind, _PAGE.pack(vm, gpa) + zlib.compress(content, 1))

    def commit(self, traps):
        """Write the records gathered since the last commit (``traps``: the traps whose
        records the file has)."""
        data, self.pending = b"".join(self.pending), []
        if self.stopped:
            return
        if self.size + len(data) + _RECORD.size + _END.size > self.max_size:
            log.warning("--record %s: stopped at %d bytes, the --record-max-size, after "
                        "%d traps (the file is a whole recording of them)",
                        self.path, self.size, traps)
            self.end(traps)
        else:
            self._write(data)

    def end(self, traps):
        """Write the END record (``traps`` recorded) and stop."""
        if not self.stopped:
            self._write(_RECORD.pack(END, _END.size) + _END.pack(traps))
            self.stopped = True

    def _write(self, data):
        if self.stopped:
            return
        view = memoryview(data)
        try:
            while view:                        # a write can be short (the disk just full)
                written = self.file.write(view)
                self.size += written
                view = view[written:]
        except OSError as err:
            self.stopped = True
            log.error("--record %s: cannot write (%s) at %d bytes; recording stopped, "
                      "serving goes on (the file is cut there)", self.path,
                      err.strerror or err, self.size)

    def close(self, traps):
        self.pending.clear()
        self.end(traps)
        try:
            self.file.close()
        except OSError as err:
            log.error("--record %s: cannot close (%s)", self.path, err.strerror or err)


class _IrqTap:
    """An interrupt line that notes each INTID and passes it on."""

    def __init__(self, line, sink):
        self.line, self.sink = line, sink

    def raise_intid(self, intid):
        self.sink(intid)
        if self.line is not None:
            self.line.raise_intid(intid)


def _tap_interrupts(subsystem, sink):
    """Route every transport's interrupts (and future devices') through ``sink``."""
    subsystem.interrupt_line = _IrqTap(subsystem.interrupt_line, sink)
    for transport in subsystem.transports():
        context = transport.context
        context.interrupt_line = _IrqTap(context.interrupt_line, sink)


class _SourceTap:
    """A device's ``source`` file whose ``readinto`` also hands each chunk read to ``sink``."""

    def __init__(self, source, sink):
        self.source, self.sink = source, sink

    def readinto(self, buffer):
        """At most a record's worth (replay refuses longer records): a short read, which
        every reader of a source loops on."""
        n = self.source.readinto(memoryview(buffer)[:MAX_RECORD - _SOURCE.size])
        if n:
            self.sink(bytes(memoryview(buffer)[:n]))
        return n

    def close(self):
        self.source.close()


class _SourceFeed:
    """A device's ``source`` on replay: gives back the recorded chunks, in order."""

    def __init__(self):
        self.chunks = collections.deque()

    def readinto(self, buffer):
        if not self.chunks:
            return 0
        chunk = self.chunks.popleft()
        n = min(len(chunk), len(buffer))
        memoryview(buffer)[:n] = chunk[:n]
        return n

    def close(self):
        pass


def _sources(subsystem):
    """(window number, device) of every device reading a ``source`` file."""
    for window in range(subsystem.layout.window_count):
        transport = subsystem.transport_at(window)
        if transport is not None and hasattr(transport.device, "source"):
            yield window, transport.device


class Recorder:
    """Record every trap ``subsystem`` serves into ``path`` until ``close()``.

    Make it once the VMs exist (their RAM sizes go in the header).
    """

    def __init__(self, subsystem, path, max_size=DEFAULT_MAX_SIZE):
        self.subsystem = subsystem
        self.writer = _Writer(path, _meta(subsystem), max_size)
        self.journals = {vm: _PageJournal(m) for vm, m in subsystem.vms.items()}
        self.traps = 0
        self._in_trap = False
        self._inner = subsystem.dispatch
        subsystem.dispatch = self.dispatch
        _tap_interrupts(subsystem, self._interrupt)
        for window, device in _sources(subsystem):
            device.source = _SourceTap(
                device.source, lambda data, w=window: self._outside_or_in_trap(
                    SOURCE, _SOURCE.pack(w) + data))

    def _interrupt(self, intid):
        self._outside_or_in_trap(IRQ if self._in_trap else IRQ_OUTSIDE, _IRQ.pack(intid))

    def _outside_or_in_trap(self, kind, payload):
        """A record made during a trap goes out with it; one made outside, now."""
        self.writer.record(kind, payload)
        if not self._in_trap:
            self.writer.commit(self.traps)

    def dispatch(self, window, offset, value, is_write, size):
        writer = self.writer
        if writer.stopped:
            self.journals.clear()                 # the shadow RAM copies are not needed
            return self._inner(window, offset, value, is_write, size)
        for vm, journal in self.journals.items():
            for gpa, content in journal.changes():
                writer.page(GUEST_PAGE, vm, gpa, content)
        writer.record(TRAP, _TRAP.pack(window, offset, size, bool(is_write), value))
        self._in_trap = True
        try:
            handled, answer = self._inner(window, offset, value, is_write, size)
        finally:
            self._in_trap = False
        writer.record(ANSWER, _ANSWER.pack(bool(handled), answer))
        for vm, journal in self.journals.items():
            for gpa, content in journal.changes():
                writer.page(MODEL_PAGE, vm, gpa, content)
        writer.commit(self.traps)
        self.traps += 1
        return handled, answer

    def close(self):
        self.subsystem.dispatch = self._inner
        self.writer.close(self.traps)


_LAYOUT_FIELDS = {f.name for f in dataclasses.fields(Layout)}


def _uint(value, what, low=0, high=1 << 64):
    if type(value) is not int or not low <= value < high:
        raise ReplayFormatError(f"bad header: {what} {json.dumps(value)[:40]}, not an integer "
                                f"in {low}..{high - 1}")
    return value


def _check_meta(meta):
    """``ReplayFormatError`` unless ``meta`` is a header ``replay`` can build from: a layout
    of positive integers, VMs inside it whose RAM fits this machine twice (the RAM and its
    shadow copy)."""
    if not (isinstance(meta, dict) and isinstance(meta.get("layout"), dict)
            and isinstance(meta.get("vms"), dict)):
        raise ReplayFormatError("bad header: not an object with a layout and vms objects")
    layout = meta["layout"]
    if set(layout) != _LAYOUT_FIELDS:
        raise ReplayFormatError(f"bad header: layout fields {sorted(layout)}, not "
                                f"{sorted(_LAYOUT_FIELDS)}")
    for name, value in layout.items():
        _uint(value, f"layout {name}", 1, 1 << 32 if name != "base" else 1 << 64)
    if layout["vm_size"] // layout["device_size"] * layout["max_vms"] > MAX_WINDOWS:
        raise ReplayFormatError(f"bad header: a layout of more than {MAX_WINDOWS} device "
                                "windows")
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    total = 0
    for vm, ram in meta["vms"].items():
        if not (re.fullmatch("[0-9]+", vm) and int(vm) < layout["max_vms"]
                and isinstance(ram, dict)):
            raise ReplayFormatError(f"bad header: VM {vm[:20]!r} (VMs are 0..."
                                    f"{layout['max_vms'] - 1}, each with base and size)")
        _uint(ram.get("base"), f"VM {vm} RAM base")
        total += _uint(ram.get("size"), f"VM {vm} RAM size", PAGE, 1 << 48)
        if ram["size"] % PAGE:
            raise ReplayFormatError(f"bad header: VM {vm} RAM size {ram['size']} is not a "
                                    f"multiple of {PAGE}")
    if 2 * total > memory:
        raise ReplayFormatError(f"the VMs' RAM ({total >> 20} MiB) needs twice that to replay "
                                f"and this machine has {memory >> 20} MiB")


def _open_regular(path):
    """``path`` opened for reading, without blocking on a FIFO or device; a regular file only."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ReplayFormatError("not a regular file")
    return os.fdopen(fd, "rb")


def read_records(path):
    """(meta, iterator of (kind, payload)) of a recording; ``ReplayFormatError`` (one line
    naming ``path``) if it is not one. The iterator raises ``ReplayFormatError`` without the
    path (``replay`` adds it)."""
    try:
        file = _open_regular(path)
    except OSError as err:
        raise ReplayFormatError(f"{path}: cannot read: {err.strerror}") from None
    except ReplayFormatError as err:
        raise ReplayFormatError(f"{path}: {err}") from None
    try:
        meta = _read_header(file)
    except (ReplayFormatError, OSError, MemoryError, RecursionError) as err:
        file.close()
        raise ReplayFormatError(f"{path}: {_reason(err)}") from None

    def records():
        with file:
            while True:
                head = file.read(_RECORD.size)
                if len(head) < _RECORD.size:
                    return                      # the end, or a cut: _group tells which
                kind, length = _RECORD.unpack(head)
                if length > MAX_RECORD:
                    raise ReplayFormatError(f"a record of {length} bytes (at most "
                                            f"{MAX_RECORD})")
                payload = file.read(length)
                if len(payload) < length:
                    return
                yield kind, payload
    return meta, records()


def _read_header(file):
    head = file.read(10)
    if len(head) < 10 or head[:4] != MAGIC:
        raise ReplayFormatError(f"not an avatar-hw recording (no {MAGIC!r} header)")
    version, n = struct.unpack("<HI", head[4:])
    if version != VERSION:
        raise ReplayFormatError(f"recording version {version}, this avatar-hw reads only "
                                f"{VERSION}: record the session again")
    if n > MAX_HEADER:
        raise ReplayFormatError(f"a header of {n} bytes (at most {MAX_HEADER})")
    try:
        meta = json.loads(file.read(n))
    except ValueError as err:
        raise ReplayFormatError(f"bad header ({err})") from None
    _check_meta(meta)
    return meta


def _reason(err):
    """One line for an error met reading a recording."""
    if isinstance(err, OSError):
        return f"cannot read: {err.strerror or err}"
    if isinstance(err, RecursionError):
        return "bad header (nested too deeply)"
    if isinstance(err, MemoryError):
        return "out of memory"
    return str(err)


def _page(payload):
    """(vm, gpa, 4096 bytes) of a page record, decompressing no more than a page."""
    vm, gpa = _PAGE.unpack_from(payload)
    inflate = zlib.decompressobj()
    content = inflate.decompress(payload[_PAGE.size:], PAGE + 1)
    if len(content) != PAGE or not inflate.eof or inflate.unused_data:
        raise ValueError("a page that is not 4096 bytes compressed")
    return vm, gpa, content


def _steps(records):
    """Group the records by trap: (guest pages, trap, answer, model pages, IRQs, inputs);
    ``ReplayFormatError`` at the end if the file has no END record."""
    try:
        yield from _group(records)
    except (struct.error, zlib.error, ValueError) as err:
        raise ReplayFormatError(f"bad record ({err})") from None


def _group(records):
    guest, step, count = {}, None, 0
    for kind, payload in records:
        if kind in (GUEST_PAGE, TRAP, END) and step is not None:
            if step[2] is None:
                raise ReplayFormatError(f"trap {count} has no answer recorded")
            yield step
            step, count = None, count + 1
        if kind == GUEST_PAGE:
            vm, gpa, content = _page(payload)
            guest[vm, gpa] = content
        elif kind == TRAP:
            step = [guest, _TRAP.unpack(payload), None, {}, [], []]
            guest = {}
        elif kind == ANSWER and step is not None and step[2] is None:
            step[2] = _ANSWER.unpack(payload)
        elif kind == MODEL_PAGE and step is not None:
            vm, gpa, content = _page(payload)
            step[3][vm, gpa] = content
        elif kind == IRQ and step is not None:
            step[4].append(_IRQ.unpack(payload)[0])
        elif kind == IRQ_OUTSIDE:
            continue
        elif kind == SOURCE and step is not None:
            step[5].append((_SOURCE.unpack_from(payload)[0], payload[_SOURCE.size:]))
        elif kind == END:
            (ended,) = _END.unpack(payload)
            if ended != count or next(records, None) is not None:
                raise ReplayFormatError(f"an end record after {count} traps saying {ended}, "
                                        "or records after it")
            return
        else:
            raise ReplayFormatError(f"record kind {kind} out of place")
    raise ReplayFormatError(f"no end record: cut after trap {count - 1}, the {count} traps "
                            "before the cut replayed the same (the daemon was killed or "
                            "could not write)" if count else
                            "no end record: cut before the first trap")


def replay(path, build):
    """Replay ``path`` on ``build(meta)`` (a fresh ``Subsystem``); (traps replayed, first
    difference as one line or None). A file that is not a whole recording raises
    ``ReplayFormatError`` (one line naming ``path``) once the traps before the damage are
    replayed."""
    meta, records = read_records(path)
    try:
        return _replay(meta, records, build)
    except (ReplayFormatError, MemoryError, OSError) as err:
        raise ReplayFormatError(f"{path}: {_reason(err)}") from None


def _replay(meta, records, build):
    try:
        subsystem = build(meta)
    except (MemoryError, OSError) as err:
        raise ReplayFormatError(f"cannot make the VMs' RAM of the header: "
                                f"{getattr(err, 'strerror', None) or 'out of memory'}") from None
    except (ValueError, OverflowError) as err:      # a layout the subsystem refuses
        raise ReplayFormatError(f"bad header: {err}") from None
    raised = []
    _tap_interrupts(subsystem, raised.append)
    journals = {vm: _PageJournal(m) for vm, m in subsystem.vms.items()}
    feeds = {}
    for window, device in _sources(subsystem):
        device.source.close()
        device.source = feeds[window] = _SourceFeed()
    count = 0
    try:
        for number, (guest, trap, answer, pages, irqs, inputs) in enumerate(_steps(records)):
            for window, data in inputs:
                if window in feeds:
                    feeds[window].chunks.append(data)
            for (vm, gpa), content in guest.items():
                if vm not in journals:
                    raise ReplayFormatError(f"trap {number}: a page of VM {vm}, which the "
                                            f"header does not have")
                try:
                    journals[vm].apply(gpa, content)
                except GuestMemoryError as err:
                    raise ReplayFormatError(f"trap {number}: {err}") from None
            window, offset, size, is_write, value = trap
            what = (f"trap {number} ({'write' if is_write else 'read'} window {window} "
                    f"offset 0x{offset:x} size {size})")
            layout = subsystem.layout
            if not (window < layout.window_count and offset < layout.device_size
                    and size in ACCESS_MASKS and offset % size == 0
                    and value <= ACCESS_MASKS[size]):
                raise ReplayFormatError(f"{what}: not an access the trap page passes on "
                                        "(outside the layout, or a bad size or value)")
            raised.clear()
            count = number + 1
            got = subsystem.dispatch(window, offset, value, bool(is_write), size)
            got = (int(bool(got[0])), got[1])
            if got != answer:
                return count, (f"{what}: answered (handled={got[0]}, 0x{got[1]:x}), "
                                    f"recorded (handled={answer[0]}, 0x{answer[1]:x})")
            written = {(vm, gpa): content for vm, j in journals.items()
                       for gpa, content in j.changes()}
            if written != pages:
                gpa = min(k for k in written.keys() | pages.keys()
                          if written.get(k) != pages.get(k))
                return count, (f"{what}: guest page vm{gpa[0]} 0x{gpa[1]:x} written "
                                    f"differently from the recording")
            if raised != irqs:
                return count, f"{what}: raised INTIDs {raised}, recorded {irqs}"
        return count, None
    finally:
        subsystem.close()


def build_from_config(config):
    """A ``build`` for ``replay``: the devices of ``config`` (an ``avatar_hw.config.Config``,
    its backends as they were when recording started) on zeroed RAM of the recorded sizes."""
    def build(meta):
        subsystem = Subsystem(Layout(**meta["layout"]))
        for vm_id, vm in config.vms.items():
            ram = meta["vms"].get(str(vm_id))
            if ram is None:
                raise AvatarError(f"{config.path}: VM {vm_id} is not in the recording "
                                  f"(it has VMs {', '.join(meta['vms']) or 'none'})")
            region = Region(mmap.mmap(-1, ram["size"]), name=f"vm{vm_id} replay RAM")
            subsystem.vm_init(vm_id, GuestMemory(region, ram["base"], vm_id=vm_id))
            for device in vm.devices:
                subsystem.create_device(vm_id, config.build_device(device))
        return subsystem
    return build
