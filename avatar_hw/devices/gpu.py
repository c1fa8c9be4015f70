"""virtio-gpu 2D (device ID 16, VirtIO 1.2 section 5.7): one scanout, resources in host memory.

Two queues: controlq (0, 256 entries) and cursorq (1, 16 entries, as QEMU). A
control request is a chain: the 24-byte ``virtio_gpu_ctrl_hdr`` and the
command's fields in the device-readable part (gathered from however many
descriptors hold them), the response in the device-writable part. Requests are
answered in order, each when it is done (a transfer or an attach may take several turns,
below), so a request with VIRTIO_GPU_FLAG_FENCE gets its response, an error too, with
the same flag and its own ``fence_id`` and ``ctx_id``: the fence is signalled.

Commands served (the error codes follow QEMU's hw/display/virtio-gpu.c):

* GET_DISPLAY_INFO: one enabled mode, ``width`` x ``height``;
* GET_EDID (VIRTIO_GPU_F_EDID): a 128-byte EDID 1.4 whose preferred timing is that mode;
  a scanout other than 0: ERR_INVALID_PARAMETER;
* RESOURCE_CREATE_2D: the eight 32-bit UNORM formats; id 0 or in use:
  ERR_INVALID_RESOURCE_ID; unknown format: ERR_INVALID_PARAMETER (a zero width or height
  makes an empty resource, as QEMU); a side over ``MAX_RESOURCE_DIMENSION`` (8192, Linux's largest
  framebuffer; QEMU has no such cap), more than ``max_memory`` bytes for all resources of the
  device, or more than ``max_resources`` resources: ERR_OUT_OF_MEMORY (nothing is
  allocated before the budget is checked);
* RESOURCE_UNREF, RESOURCE_DETACH_BACKING (no backing: ERR_UNSPEC, as QEMU's
  ``virtio_gpu_find_check_resource``);
* RESOURCE_ATTACH_BACKING: at most 16384 entries, all in the request, each non-empty and
  inside the VM's RAM (else ERR_UNSPEC, as QEMU); a resource already backed: ERR_UNSPEC;
  no entries: OK, and the resource stays without backing (QEMU's). The entries are
  kept as guest-physical ranges and turned into views of guest RAM, checked
  again, at each transfer;
* SET_SCANOUT (resource 0 disables the scanout; a resource without backing:
  ERR_UNSPEC, as QEMU; a rectangle not inside the
  resource or smaller than 16x16: ERR_INVALID_PARAMETER; scanout other than 0:
  ERR_INVALID_SCANOUT_ID), RESOURCE_FLUSH;
* TRANSFER_TO_HOST_2D: no resource: ERR_INVALID_RESOURCE_ID, no backing: ERR_UNSPEC; the
  rectangle not inside the resource, or its last byte
  (``offset + stride * (h - 1) + w * 4``) past the backing: ERR_INVALID_PARAMETER.
  Row ``i`` of the rectangle comes from backing offset ``offset + stride * i``
  (QEMU's rule; the resources and their copies are ``gpu_resources``');
* cursorq: UPDATE_CURSOR (a 64x64 resource's pixels are copied as the cursor
  image; resource 0 hides it) and MOVE_CURSOR; no response is written (used
  length 0), as QEMU.

A transfer's copy counts against the queue's turn budget (``Virtqueue.charge``),
each row copied on its own as ``ROW_COST`` bytes more (a 1-pixel-wide transfer of
8192 rows costs the time of megabytes), each backing entry it crosses, and each an
attach reads, as ``ENTRY_COST`` more. The work is bounded before it is done: a transfer
copies, an attach reads and checks the entries, that the turn's budget
(``Virtqueue.budget``) pays for, and the request is held (``_held``, how far it got in
``_done``), the rest of it done first in the event loop's next turns, behind every other
device and VM, its response written when it is complete. So a turn's work is about 8 MiB's
worth (an attach of 16384 entries takes four turns).

RESOURCE_CREATE_BLOB and SET_SCANOUT_BLOB (VIRTIO_GPU_F_RESOURCE_BLOB is not offered):
ERR_INVALID_PARAMETER, as QEMU. Any other type: ERR_UNSPEC. A request shorter than its
command's fields:
ERR_INVALID_PARAMETER, nothing done (QEMU logs it and answers nothing, or
OK_NODATA); shorter than a header: ERR_UNSPEC. A response longer than the writable part:
ERR_UNSPEC if 24 bytes fit (the command is not run), else used length 0. Every
such request is a rate-limited, counted guest error; none raises.

Configuration: ``events_read``, ``events_clear`` (a write clears those bits of
``events_read``), ``num_scanouts`` = 1, ``num_capsets`` = 0. The mode never
changes, so no display event is ever raised.

``screenshot()`` copies the scanout's rectangle of its resource (the resource as
last transferred; the cursor is not drawn); ``avatar-hw screenshot`` asks the
daemon for it as a PNG through the control socket, which encodes it off the
event loop.
"""

import struct

from ..schema import Field, Schema, positive
from ..virtio.buffers import gather, scatter, skip
from ..virtio.constants import ID_GPU, bit
from ..virtio.device import VirtioDevice
from .gpu_resources import (BPP, ENTRY_COST, FORMATS, MAX_RESOURCE_DIMENSION, Resource, edid,
                            inside, merge)

QUEUE_SIZE, CURSOR_QUEUE_SIZE = 256, 16         # QEMU's
CONTROLQ, CURSORQ = 0, 1
F_EDID = 1

# command and response types (5.7.6.7)
CMD_GET_DISPLAY_INFO, CMD_RESOURCE_CREATE_2D, CMD_RESOURCE_UNREF = 0x0100, 0x0101, 0x0102
CMD_SET_SCANOUT, CMD_RESOURCE_FLUSH, CMD_TRANSFER_TO_HOST_2D = 0x0103, 0x0104, 0x0105
CMD_RESOURCE_ATTACH_BACKING, CMD_RESOURCE_DETACH_BACKING = 0x0106, 0x0107
CMD_GET_EDID = 0x010A
BLOB_COMMANDS = (0x010C, 0x010D)                # RESOURCE_CREATE_BLOB, SET_SCANOUT_BLOB
CMD_UPDATE_CURSOR, CMD_MOVE_CURSOR = 0x0300, 0x0301
RESP_OK_NODATA, RESP_OK_DISPLAY_INFO, RESP_OK_EDID = 0x1100, 0x1101, 0x1104
RESP_ERR_UNSPEC, RESP_ERR_OUT_OF_MEMORY, RESP_ERR_INVALID_SCANOUT_ID = 0x1200, 0x1201, 0x1202
RESP_ERR_INVALID_RESOURCE_ID, RESP_ERR_INVALID_PARAMETER = 0x1203, 0x1205
FLAG_FENCE = 1

MAX_BACKING_ENTRIES = 16384                     # QEMU's limit
PAGE = 4096
MIN_SCANOUT = 16                                # QEMU refuses smaller scanout rectangles
CURSOR_SIZE = 64
MAX_DIMENSION = 4095                            # what an EDID detailed timing can hold
MAX_SCANOUTS = 16                               # pmodes in GET_DISPLAY_INFO's response
HEADER = struct.Struct("<IIQIB3x")              # type, flags, fence_id, ctx_id, ring_idx
# events_read, events_clear, num_scanouts, num_capsets
CONFIG = struct.Struct("<IIII")
MEM_ENTRY = struct.Struct("<QI4x")              # addr, length
# the fields after the header, per command
COMMANDS = {
    CMD_GET_DISPLAY_INFO: struct.Struct(""),
    CMD_RESOURCE_CREATE_2D: struct.Struct("<IIII"),     # resource_id, format, width, height
    CMD_RESOURCE_UNREF: struct.Struct("<I4x"),
    CMD_SET_SCANOUT: struct.Struct("<IIIIII"),          # rect, scanout_id, resource_id
    CMD_RESOURCE_FLUSH: struct.Struct("<IIIII4x"),      # rect, resource_id
    CMD_TRANSFER_TO_HOST_2D: struct.Struct("<IIIIQI4x"),  # rect, offset, resource_id
    CMD_RESOURCE_ATTACH_BACKING: struct.Struct("<II"),  # resource_id, nr_entries
    CMD_RESOURCE_DETACH_BACKING: struct.Struct("<I4x"),
    CMD_GET_EDID: struct.Struct("<I4x"),                # scanout
    CMD_UPDATE_CURSOR: struct.Struct("<III4xIII4x"),   # scanout, x, y, resource_id, hot_x, hot_y
    CMD_MOVE_CURSOR: struct.Struct("<III4xIII4x"),
}
DISPLAY_ONE = struct.Struct("<IIIIII")          # rect, enabled, flags
DISPLAY_INFO_SIZE = HEADER.size + MAX_SCANOUTS * DISPLAY_ONE.size
EDID_RESPONSE = struct.Struct("<II")            # size, padding; then 1024 bytes
EDID_SIZE = HEADER.size + EDID_RESPONSE.size + 1024
RESPONSE_SIZE = {CMD_GET_DISPLAY_INFO: DISPLAY_INFO_SIZE, CMD_GET_EDID: EDID_SIZE}
MAX_REQUEST = HEADER.size + max(s.size for s in COMMANDS.values())

DEFAULT_WIDTH, DEFAULT_HEIGHT = 1024, 768
DEFAULT_MAX_MEMORY = 64 << 20
DEFAULT_MAX_RESOURCES = 1024


class GpuError(Exception):
    """A request answered with the error response ``code``."""

    def __init__(self, code, fmt, *args):
        super().__init__(fmt % args)
        self.code, self.fmt, self.args_ = code, fmt, args


def check_dimension(value):
    if not MIN_SCANOUT <= value <= MAX_DIMENSION:
        raise ValueError(f"must be {MIN_SCANOUT} to {MAX_DIMENSION} pixels, not {value}")


class GpuDevice(VirtioDevice):
    """A virtio-gpu 2D device with one ``width`` x ``height`` scanout; its resources hold at
    most ``max_memory`` bytes of pixels in all, at most ``max_resources`` of them."""

    device_id = ID_GPU
    name = "gpu"

    def __init__(self, *, width=DEFAULT_WIDTH, height=DEFAULT_HEIGHT,
                 max_memory=DEFAULT_MAX_MEMORY, max_resources=DEFAULT_MAX_RESOURCES):
        for key, value, check in (("width", width, check_dimension),
                                  ("height", height, check_dimension),
                                  ("max_memory", max_memory, positive),
                                  ("max_resources", max_resources, positive)):
            try:
                check(value)
            except ValueError as err:
                raise ValueError(f"{key} {err}") from None
        if max_memory < width * height * BPP:
            raise ValueError(f"max_memory {max_memory} cannot hold one {width}x{height} "
                             f"frame ({width * height * BPP} bytes)")
        super().__init__(queue_sizes=[QUEUE_SIZE, CURSOR_QUEUE_SIZE], features=bit(F_EDID),
                         config=CONFIG.pack(0, 0, 1, 0))
        self.width, self.height = width, height
        self.max_memory, self.max_resources = max_memory, max_resources
        # Linux backs a resource with its own size in pages (merged where they touch): at
        # most a page-sized entry per page of the budget and a partial one per resource
        # (each entry is a tuple kept in host memory: bounded here, not by 16384 each)
        self.max_backing_entries = max_memory // PAGE + max_resources
        self.edid = edid(width, height)
        self.resources = {}
        self.memory_used = 0
        self.scanout = None                     # (resource, x, y, w, h) or None: disabled
        self.cursor = None                      # {resource_id, hot_x, hot_y, x, y, image}
        self.counters.update(transfers=0, flushes=0, bytes_transferred=0)
        self._request = bytearray(MAX_REQUEST)
        self._work = 0                          # bytes-equivalent of this request's copies
        self._budget = 0                        # the work it may do in this turn
        self._held = None                       # (chain, request) cut short by the budget
        self._done = 0                          # how far it got: bytes copied, entries read
        self._ranges = []                       # the entries an attach read, merged
        self._response = bytearray(max(DISPLAY_INFO_SIZE, EDID_SIZE))

    # -- lifecycle -------------------------------------------------------------------------------

    def reset(self):
        self.resources.clear()
        self.memory_used = 0
        self.scanout = self.cursor = None
        self._drop_held()
        self.config[:] = CONFIG.pack(0, 0, 1, 0)

    def queue_reset(self, index):
        if index == CONTROLQ:
            self._drop_held()

    def _drop_held(self):
        """Forget the held request and its progress (the next one starts afresh)."""
        self._held, self._done, self._ranges = None, 0, []

    def write_config(self, offset, data):
        if offset == 4 and len(data) == 4:      # events_clear
            read = int.from_bytes(self.config[0:4], "little")
            events = read & ~int.from_bytes(data, "little")
            if events == read:
                self.idle_trap()                # no event it clears is set
            self.update_config(0, events.to_bytes(4, "little"), notify=False)
        else:
            super().write_config(offset, data)

    # -- queues ----------------------------------------------------------------------------------

    def queue_notify(self, index):
        queue = self.queues[index]
        if index == CURSORQ:
            self.consume(queue, self._cursor)
            return
        served = False
        while True:
            held, self._held = self._held, None
            if held is None:
                self._drop_held()               # a new request: no progress yet
                chain, request = queue.pop(), None
                if chain is None:
                    break
            else:
                chain, request = held
            self._work, self._budget = 0, queue.budget
            used = self._control(chain, request)
            queue.charge(self._work)            # the copies, against the turn's budget
            if used is None:                    # held: the next turn goes on with it
                self._resume_later(queue)
                break
            queue.add_used(chain, used)
            served = True
        if served:
            self.signal_used(queue)

    def _read_request(self, chain):
        """(type, flags, fence_id, ctx_id, fields) of a chain, or a GpuError."""
        n = gather(chain.readable, self._request)
        if n < HEADER.size:
            raise GpuError(RESP_ERR_UNSPEC, "request of %d bytes (a header is 24)", n)
        kind, flags, fence_id, ctx_id, _ = HEADER.unpack_from(self._request)
        if kind in BLOB_COMMANDS:
            raise GpuError(RESP_ERR_INVALID_PARAMETER, "blob command 0x%x (the feature is "
                           "not offered)", kind)
        layout = COMMANDS.get(kind)
        if layout is None:
            raise GpuError(RESP_ERR_UNSPEC, "unknown command 0x%x", kind)
        if n < HEADER.size + layout.size:
            raise GpuError(RESP_ERR_INVALID_PARAMETER, "command 0x%x of %d bytes (%d needed)",
                           kind, n, HEADER.size + layout.size)
        return kind, flags, fence_id, ctx_id, layout.unpack_from(self._request, HEADER.size)

    def _control(self, chain, request=None):
        """Serve one controlq request (``request``: read already, when it was held); the
        used length (the response's bytes), or None when the turn's budget cut it short:
        then it is held (``_held``) and the next turn goes on with it."""
        if request is None:
            self.count(bytes_from_guest=chain.readable_len)
        flags = fence_id = ctx_id = 0
        try:
            request = request or self._read_request(chain)
            kind, flags, fence_id, ctx_id, fields = request
            size = RESPONSE_SIZE.get(kind, HEADER.size)
            if chain.writable_len < size:
                raise GpuError(RESP_ERR_UNSPEC, "response of command 0x%x needs %d "
                               "device-writable bytes, the request has %d", kind, size,
                               chain.writable_len)
            if kind in (CMD_UPDATE_CURSOR, CMD_MOVE_CURSOR):
                raise GpuError(RESP_ERR_UNSPEC, "cursor command on the control queue")
            answer = getattr(self, _HANDLERS[kind])(chain, *fields)
            if answer is None:
                self._held = chain, request
                return None
            code, size = answer
        except GpuError as err:
            self.guest_error(err.fmt, *err.args_)
            self.counters["errors"] += 1
            code, size = err.code, HEADER.size
            if request is None and chain.readable_len >= HEADER.size:
                # an error answers the fence too: a request not read whole has it in its
                # header (``_request``, which the cursorq reuses while one is held)
                _, flags, fence_id, ctx_id, _ = HEADER.unpack_from(self._request)
        if chain.writable_len < HEADER.size:
            self.guest_error("request with %d device-writable bytes (a response needs 24); "
                             "returned with length 0", chain.writable_len)
            return 0
        flags &= FLAG_FENCE                     # ours are synchronous: done when answered
        HEADER.pack_into(self._response, 0, code, flags, fence_id if flags else 0,
                         ctx_id if flags else 0, 0)
        n = scatter(memoryview(self._response)[:size], chain.writable)
        self.count(0, bytes_to_guest=n)
        return n

    def _cursor(self, chain):
        """Serve one cursorq request: no response (``consume`` returns it with length 0)."""
        self.count(bytes_from_guest=chain.readable_len)
        try:
            kind, _flags, _fence, _ctx, fields = self._read_request(chain)
            if kind not in (CMD_UPDATE_CURSOR, CMD_MOVE_CURSOR):
                raise GpuError(RESP_ERR_UNSPEC, "command 0x%x on the cursor queue", kind)
            self._update_cursor(kind, *fields)
        except GpuError as err:
            self.guest_error("cursor queue: " + err.fmt, *err.args_)
            self.counters["errors"] += 1

    # -- commands: each returns (response type, response length), None when the turn's budget
    # -- cut it short (held), or raises GpuError -------------------------------------------------

    def _resource(self, resource_id):
        resource = self.resources.get(resource_id)
        if resource is None:
            raise GpuError(RESP_ERR_INVALID_RESOURCE_ID, "no resource %d", resource_id)
        return resource

    def _backed(self, resource_id, what):
        """The resource of a ``what`` command that needs its backing pages attached."""
        resource = self._resource(resource_id)
        if resource.backing is None:
            raise GpuError(RESP_ERR_UNSPEC, "%s: resource %d has no backing", what, resource_id)
        return resource

    @staticmethod
    def _check_rectangle(what, resource, x, y, w, h):
        if not inside(x, y, w, h, resource.width, resource.height):
            raise GpuError(RESP_ERR_INVALID_PARAMETER, "%s rectangle %dx%d+%d+%d in a %dx%d "
                           "resource", what, w, h, x, y, resource.width, resource.height)

    def _get_display_info(self, chain):
        self._response[HEADER.size:DISPLAY_INFO_SIZE] = bytes(DISPLAY_INFO_SIZE - HEADER.size)
        DISPLAY_ONE.pack_into(self._response, HEADER.size, 0, 0, self.width, self.height, 1, 0)
        return RESP_OK_DISPLAY_INFO, DISPLAY_INFO_SIZE

    def _get_edid(self, chain, scanout):
        if scanout != 0:
            raise GpuError(RESP_ERR_INVALID_PARAMETER, "EDID of scanout %d (there is one)",
                           scanout)
        EDID_RESPONSE.pack_into(self._response, HEADER.size, len(self.edid), 0)
        start = HEADER.size + EDID_RESPONSE.size
        self._response[start:EDID_SIZE] = self.edid.ljust(EDID_SIZE - start, b"\0")
        return RESP_OK_EDID, EDID_SIZE

    def _create_2d(self, chain, resource_id, fmt, width, height):
        if resource_id == 0 or resource_id in self.resources:
            raise GpuError(RESP_ERR_INVALID_RESOURCE_ID, "create: resource id %d is %s",
                           resource_id, "0" if not resource_id else "in use")
        if fmt not in FORMATS:
            raise GpuError(RESP_ERR_INVALID_PARAMETER, "create: format %d", fmt)
        if max(width, height) > MAX_RESOURCE_DIMENSION:
            raise GpuError(RESP_ERR_OUT_OF_MEMORY, "create: %dx%d (at most %d a side)", width,
                           height, MAX_RESOURCE_DIMENSION)
        size = width * height * BPP
        if (self.memory_used + size > self.max_memory
                or len(self.resources) >= self.max_resources):
            raise GpuError(RESP_ERR_OUT_OF_MEMORY, "create: %dx%d (%d bytes) over the budget "
                           "(%d of %d bytes used, %d resources)", width, height, size,
                           self.memory_used, self.max_memory, len(self.resources))
        try:
            resource = Resource(resource_id, fmt, width, height)
        except OSError as err:          # the host's: overcommit refused, vm.max_map_count
            raise GpuError(RESP_ERR_OUT_OF_MEMORY, "create: %dx%d: the host has no memory for "
                           "it (%s)", width, height, err.strerror) from None
        self.resources[resource_id] = resource
        self.memory_used += size
        return RESP_OK_NODATA, HEADER.size

    def _unref(self, chain, resource_id):
        resource = self._resource(resource_id)
        del self.resources[resource_id]
        self.memory_used -= len(resource.pixels)
        if self.scanout is not None and self.scanout[0] is resource:
            self.scanout = None
        return RESP_OK_NODATA, HEADER.size

    def _attach_backing(self, chain, resource_id, count):
        resource = self._resource(resource_id)
        if resource.backing is not None:
            raise GpuError(RESP_ERR_UNSPEC, "attach: resource %d has a backing", resource_id)
        if count > MAX_BACKING_ENTRIES:
            raise GpuError(RESP_ERR_UNSPEC, "attach: %d entries (at most %d)", count,
                           MAX_BACKING_ENTRIES)
        start = HEADER.size + COMMANDS[CMD_RESOURCE_ATTACH_BACKING].size
        if chain.readable_len < start + count * MEM_ENTRY.size:
            raise GpuError(RESP_ERR_UNSPEC, "attach: %d entries in %d bytes", count,
                           chain.readable_len)
        take = min(count - self._done, self._budget // ENTRY_COST)
        if take > 0:
            self._read_entries(chain, start + self._done * MEM_ENTRY.size, take)
        if self._done < count:
            return None                         # the next turn reads on
        if not self._ranges:                    # QEMU's: the resource stays without backing
            return RESP_OK_NODATA, HEADER.size
        resource.attach(self._ranges)
        held = sum(len(r.backing) for r in self.resources.values() if r.backing)
        if held > self.max_backing_entries:
            resource.detach()
            raise GpuError(RESP_ERR_OUT_OF_MEMORY, "attach: %d backing entries held by all "
                           "resources with these (at most %d)", held, self.max_backing_entries)
        return RESP_OK_NODATA, HEADER.size

    def _read_entries(self, chain, at, count):
        """Read ``count`` entries of an attach from byte ``at`` of its request, check them
        and merge them into ``_ranges``; an empty one or one outside the RAM: GpuError."""
        entries = bytearray(count * MEM_ENTRY.size)     # a turn's: 64 KiB at most
        gather(skip(chain.readable, at), entries)
        self._work += count * ENTRY_COST        # each checked and merged: ~1 µs
        self._done += count
        for gpa, length in MEM_ENTRY.iter_unpack(entries):
            if not length or not self.memory.contains(gpa, length):
                raise GpuError(RESP_ERR_UNSPEC, "attach: entry 0x%x+0x%x is empty or outside "
                               "the RAM", gpa, length)
        merge(self._ranges, MEM_ENTRY.iter_unpack(entries))

    def _detach_backing(self, chain, resource_id):
        self._backed(resource_id, "detach").detach()
        return RESP_OK_NODATA, HEADER.size

    def _set_scanout(self, chain, x, y, w, h, scanout_id, resource_id):
        if scanout_id != 0:
            raise GpuError(RESP_ERR_INVALID_SCANOUT_ID, "scanout %d (there is one)", scanout_id)
        if resource_id == 0:
            self.scanout = None
            return RESP_OK_NODATA, HEADER.size
        resource = self._backed(resource_id, "scanout")
        self._check_rectangle("scanout", resource, x, y, w, h)
        if w < MIN_SCANOUT or h < MIN_SCANOUT:
            raise GpuError(RESP_ERR_INVALID_PARAMETER, "scanout of %dx%d: smaller than %dx%d",
                           w, h, MIN_SCANOUT, MIN_SCANOUT)
        self.scanout = (resource, x, y, w, h)
        return RESP_OK_NODATA, HEADER.size

    def _flush(self, chain, x, y, w, h, resource_id):
        self._check_rectangle("flush", self._resource(resource_id), x, y, w, h)
        self.counters["flushes"] += 1
        return RESP_OK_NODATA, HEADER.size

    def _transfer_to_host_2d(self, chain, x, y, w, h, offset, resource_id):
        resource = self._backed(resource_id, "transfer")
        self._check_rectangle("transfer", resource, x, y, w, h)
        if not w or not h:
            return RESP_OK_NODATA, HEADER.size
        stride, row = resource.stride, w * BPP
        if offset + stride * (h - 1) + row > resource.backing_len:
            raise GpuError(RESP_ERR_INVALID_PARAMETER, "transfer of %dx%d at backing offset "
                           "%d: past the %d-byte backing", w, h, offset, resource.backing_len)
        self._done, work = resource.transfer(self.memory, x, y, w, h, offset, self._done,
                                             self._budget)
        self._work += work
        if self._done < row * h:
            return None
        self.counters["transfers"] += 1
        self.counters["bytes_transferred"] += row * h
        return RESP_OK_NODATA, HEADER.size

    def _update_cursor(self, kind, scanout, x, y, resource_id, hot_x, hot_y):
        if scanout != 0:
            raise GpuError(RESP_ERR_INVALID_SCANOUT_ID, "cursor on scanout %d", scanout)
        if kind == CMD_MOVE_CURSOR:
            if self.cursor is not None:
                self.cursor.update(x=x, y=y)
            return
        if resource_id == 0:
            self.cursor = None
            return
        resource = self._resource(resource_id)
        if (resource.width, resource.height) != (CURSOR_SIZE, CURSOR_SIZE):
            raise GpuError(RESP_ERR_INVALID_PARAMETER, "cursor resource %d is %dx%d, not 64x64",
                           resource_id, resource.width, resource.height)
        self.cursor = {"resource_id": resource_id, "hot_x": hot_x, "hot_y": hot_y, "x": x,
                       "y": y, "image": bytes(resource.pixels)}

    # -- the screen --------------------------------------------------------------------------------

    def screenshot(self):
        """A ``Capture`` of the scanout; None while the guest shows nothing."""
        if self.scanout is None:
            return None
        resource, x, y, w, h = self.scanout
        return resource.capture(x, y, w, h)

    def info(self):
        out = super().info()
        out.update(resources=len(self.resources), width=self.width, height=self.height,
                   max_memory=self.max_memory, memory_used=self.memory_used,
                   max_resources=self.max_resources,
                   scanout=None if self.scanout is None else
                   {"resource": self.scanout[0].id, "rect": list(self.scanout[1:])},
                   cursor=None if self.cursor is None else
                   {k: v for k, v in self.cursor.items() if k != "image"})
        return out


_HANDLERS = {
    CMD_GET_DISPLAY_INFO: "_get_display_info", CMD_GET_EDID: "_get_edid",
    CMD_RESOURCE_CREATE_2D: "_create_2d", CMD_RESOURCE_UNREF: "_unref",
    CMD_RESOURCE_ATTACH_BACKING: "_attach_backing",
    CMD_RESOURCE_DETACH_BACKING: "_detach_backing", CMD_SET_SCANOUT: "_set_scanout",
    CMD_RESOURCE_FLUSH: "_flush", CMD_TRANSFER_TO_HOST_2D: "_transfer_to_host_2d",
}


SCHEMA = Schema("gpu", (
    Field("width", int, None, f"pixels ({MIN_SCANOUT} to {MAX_DIMENSION})", check_dimension),
    Field("height", int, None, f"pixels ({MIN_SCANOUT} to {MAX_DIMENSION})", check_dimension),
    Field("max_memory", int, None, "bytes of pixels for all resources", positive),
    Field("max_resources", int, None, "the number of resources", positive),
))


def from_config(options):
    """The VMs config's ``gpu = { width, height, max_memory, max_resources }``."""
    return GpuDevice(width=options.get("width", DEFAULT_WIDTH),
                     height=options.get("height", DEFAULT_HEIGHT),
                     max_memory=options.get("max_memory", DEFAULT_MAX_MEMORY),
                     max_resources=options.get("max_resources", DEFAULT_MAX_RESOURCES))
