"""A software stand-in for Avatar's EL2 stub: the stub's side of docs/trap-abi.md.

``StubPage`` does, over a real shared mapping, what the hypervisor stub does:
initialise the trap page, post a trap into a vCPU's slot (fields, then
POSTED with store-release, fence, ring the doorbell if the model sleeps),
wait for DONE, apply its policy to UNHANDLED and to a detached model
(read-as-zero / write-ignored), and take the virtual-interrupt requests the
model makes (``virq_pending``).

``FakeBoard`` (further down) lays out everything the daemon finds on a board
in a directory: a fake UIO tree and a board file, so ``avatar-hw serve`` runs
against it exactly as on a board except for how regions and the doorbell are
opened.
"""

import os
import select
import sys
import time
from pathlib import Path

from .. import abi
from ..hw import ordering
from ..hw.region import Region
from ..layout import Layout
from ..shadow import StubShadowReader
from ..virtio.constants import REG_INTERRUPT_ACK, REG_QUEUE_NOTIFY

_LAYOUT = Layout()      # the stand-in's windows: the seed's layout (FakeBoard's board file)


# The writes the emulated board's stub posts (boards/emulated/trap.c; docs/trap-abi.md section 7).
POSTED_REGISTERS = (REG_QUEUE_NOTIFY, REG_INTERRUPT_ACK)


class TrapTimeout(Exception):
    """The model did not answer a posted trap in time (the real stub would keep waiting)."""


class StubPage:
    """The stub's view of the trap page in ``region``; ``ring()`` raises the doorbell."""

    def __init__(self, region, ring=lambda: None):
        self.region = region
        self.ring = ring
        self.header = abi.Header.from_buffer(region.view(0, abi.SLOTS_OFFSET))
        self.slots = ()
        self.shadow = None
        self.shadow_hits = 0
        self.acks_taken = 0          # InterruptACKs taken here (AVT_F_STUB_ACK)
        self._seq = 0
        self.rings = 0
        # A test's look at the model's process (``lambda: process.poll() is None``): once it
        # says gone, a wait raises TrapTimeout at once instead of after its timeout.
        self.model_alive = None

    def initialise(self, slot_count, *, features=None, shadow_count=0,
                   counter_hz=1_000_000_000, major=abi.ABI_MAJOR, minor=abi.ABI_MINOR,
                   magic=abi.MAGIC):
        """Zero the page, fill the header and slots, then publish READY (store-release).

        ``shadow_count``: register shadow pages for windows 0..n-1, right after the
        page (the region must hold them); ``features`` (None: every feature the
        stub can offer: the register shadow only with shadow pages).
        """
        if features is None:
            features = abi.SUPPORTED_FEATURES
            if not shadow_count:
                features &= ~(abi.F_REGISTER_SHADOW | abi.F_STUB_ACK)
        size = abi.PAGE_SIZE + shadow_count * abi.SHADOW_PAGE_SIZE
        self.region.view(0, size)[:] = bytes(size)
        h = self.header
        h.shadow_offset = abi.PAGE_SIZE if shadow_count else 0
        h.shadow_count = shadow_count
        h.magic, h.abi_major, h.abi_minor = magic, major, minor
        h.slot_count, h.slot_size, h.slots_offset = slot_count, abi.SLOT_SIZE, abi.SLOTS_OFFSET
        h.stub_features, h.counter_hz = features, counter_hz
        self.attach_views(slot_count)
        self.region.store_release32(abi.STUB_STATE_OFFSET, abi.STUB_READY)

    def attach_views(self, slot_count=None):
        """Make the slot views (a second stub process over an initialised page)."""
        count = self.header.slot_count if slot_count is None else slot_count
        h = self.header
        self.shadow = (StubShadowReader(self.region, h.shadow_offset, h.shadow_count)
                       if h.shadow_count else None)
        self.slots = tuple(
            abi.Slot.from_buffer(self.region.view(abi.SLOTS_OFFSET + i * abi.SLOT_SIZE,
                                                  abi.SLOT_SIZE))
            for i in range(count))

    def recover(self, timeout=10.0):
        """After a stub restart: wait out slots still POSTED, free the DONE ones (the stub's).

        The dead stub may have died between its store of POSTED and its ring, and
        the model, asleep, would never see that slot: a slot found POSTED is rung
        for as ``begin`` does (fence, then ring if ``model_sleeping``). A ring the
        dead stub did make too only costs the model an empty scan.
        """
        offsets = [self._state_offset(vcpu) for vcpu in range(len(self.slots))]
        posted = [vcpu for vcpu, offset in enumerate(offsets)
                  if self.region.load_acquire32(offset) == abi.SLOT_POSTED]
        if posted:
            ordering.fence()
            if self.header.model_sleeping:
                self.rings += 1
                self.ring()
        for vcpu, offset in enumerate(offsets):
            if vcpu in posted:
                self._wait_state(vcpu, (abi.SLOT_DONE, abi.SLOT_FREE), timeout)
            self.region.store_release32(offset, abi.SLOT_FREE)

    # -- model state -----------------------------------------------------------------

    def model_attached(self):
        return self.region.load_acquire32(abi.MODEL_STATE_OFFSET) == abi.MODEL_ATTACHED

    def model_detached(self):
        return not self.model_attached()

    def wait_attached(self, timeout=60.0):
        """Wait for a model (a daemon just started: slow on a loaded machine) to attach."""
        deadline = time.monotonic() + timeout
        while not self.model_attached():
            if time.monotonic() > deadline:
                raise TrapTimeout(f"no model attached within {timeout} s")
            time.sleep(0.005)

    # -- posting -----------------------------------------------------------------------

    def _state_offset(self, vcpu):
        return abi.SLOTS_OFFSET + vcpu * abi.SLOT_SIZE + abi.STATE_OFFSET

    def begin(self, vcpu, vm_id, gpa, size, is_write, value=0, *, posted=False,
              timeout=10.0, raw=None):
        """Post a trap into slot ``vcpu`` (waiting for it to be FREE) and ring if needed.

        ``raw`` (field name -> value) overrides slot fields, to post garbage.
        """
        self._wait_state(vcpu, (abi.SLOT_FREE,), timeout)
        slot = self.slots[vcpu]
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        slot.seq, slot.gpa, slot.size = self._seq, gpa, size
        slot.direction = abi.DIR_WRITE if is_write else abi.DIR_READ
        slot.data = value if is_write else 0
        slot.status = abi.STATUS_OK
        slot.flags = abi.SLOT_F_POSTED_WRITE if posted else 0
        slot.vm_id, slot.vcpu_id = vm_id, vcpu
        slot.t_post, slot.t_done = time.monotonic_ns(), 0
        for name, field_value in (raw or {}).items():
            setattr(slot, name, field_value)
        self.region.store_release32(self._state_offset(vcpu), abi.SLOT_POSTED)
        ordering.fence()
        if self.header.model_sleeping:
            self.rings += 1
            self.ring()

    def finish(self, vcpu, timeout=10.0):
        """Wait for the answer of slot ``vcpu``; returns ``(status, read data)`` and frees it.

        A model that detaches meanwhile answers what it saw posted before it stores
        DETACHED: the stub, seeing DETACHED, loads ``state`` again and takes that answer
        if it is DONE; only a trap still POSTED is withdrawn (POSTED -> FREE), with the
        UNHANDLED policy (docs/trap-abi.md section 9).
        """
        slot = self.slots[vcpu]
        if slot.flags & abi.SLOT_F_POSTED_WRITE:
            return abi.STATUS_OK, 0
        offset = self._state_offset(vcpu)
        if not self._wait_state(vcpu, (abi.SLOT_DONE,), timeout, give_up=self.model_detached):
            self.region.store_release32(offset, abi.SLOT_FREE)
            return abi.STATUS_UNHANDLED, 0
        status = slot.status
        data = slot.data if slot.direction == abi.DIR_READ else 0
        slot.t_done = time.monotonic_ns()
        self.region.store_release32(offset, abi.SLOT_FREE)
        return status, data

    def post(self, vcpu, vm_id, gpa, size, is_write, value=0, *, posted=False, timeout=10.0,
             raw=None):
        """One guest access, as the stub handles it: ``(status, data)``.

        With no model attached the stub does not post: read-as-zero, write-ignored.
        """
        if not self.model_attached():
            return abi.STATUS_UNHANDLED, 0
        features = self.header.model_features
        if self.shadow is not None and raw is None and features & abi.F_REGISTER_SHADOW:
            window, offset = divmod(gpa - _LAYOUT.base, _LAYOUT.device_size)
            stub_ack = bool(features & abi.F_STUB_ACK)
            if window >= 0 and not is_write:
                self._wait_state(vcpu, (abi.SLOT_FREE,), timeout)   # its posted write first
                value = self.shadow.read(window, offset, size, stub_ack=stub_ack)
                if value is not None:
                    self.shadow_hits += 1
                    return abi.STATUS_OK, value
            elif window >= 0 and stub_ack and offset == REG_INTERRUPT_ACK and size == 4:
                self._wait_state(vcpu, (abi.SLOT_FREE,), timeout)
                if self.shadow.take_ack(window, value):
                    self.acks_taken += 1
                    return abi.STATUS_OK, 0
        self.begin(vcpu, vm_id, gpa, size, is_write, value, posted=posted, timeout=timeout,
                   raw=raw)
        return self.finish(vcpu, timeout)

    def _wait_state(self, vcpu, states, timeout, give_up=None):
        """Spin, then sleep briefly, until slot ``vcpu`` is in ``states`` (True), or
        ``give_up()`` (False); ``TrapTimeout`` after ``timeout`` s, or at once when
        ``model_alive()`` says the model's process is gone.

        Once ``give_up()`` (the model detached, a load-acquire of ``model_state``) the
        state is loaded once more: the model may have answered between the last load
        and its DETACHED, and that answer, ordered before DETACHED, is seen now (and so
        for an answer the model gave just before it died)."""
        offset = self._state_offset(vcpu)
        load = self.region.load_acquire32
        alive = self.model_alive
        deadline = None
        spins = 0
        while (state := load(offset)) not in states:
            spins += 1
            if spins < 200:
                continue
            if give_up is not None and give_up():
                return load(offset) in states
            if alive is not None and not alive():
                if load(offset) in states:
                    return True
                raise TrapTimeout(f"slot {vcpu}: state {state}, the model's process is gone")
            if deadline is None:
                deadline = time.monotonic() + timeout
            elif time.monotonic() > deadline:
                raise TrapTimeout(f"slot {vcpu}: state {state} after {timeout} s, "
                                  f"waiting for {states}")
            time.sleep(0.0001)
        return True

    def mmio(self, vm_id, vcpu=0, *, posted_writes=False, timeout=10.0):
        """A ``handle_mmio_trap``-compatible callable that traps through this page.

        The stub's policy for UNHANDLED (and for a detached model) is
        read-as-zero / write-ignored, so the callable returns ``(False, 0)``.
        With ``posted_writes`` and the model's consent, writes of
        ``POSTED_REGISTERS`` are posted, as the emulated board's stub does; the
        vCPU's next access waits until the model freed the slot (``begin``).
        """
        def handle_mmio_trap(addr, value, is_write, size):
            posted = (posted_writes and is_write
                      and self.header.model_features & abi.F_POSTED_WRITES
                      and addr % 0x1000 in POSTED_REGISTERS)
            status, data = self.post(vcpu, vm_id, addr, size, is_write, value,
                                     posted=bool(posted), timeout=timeout)
            return status == abi.STATUS_OK, data
        return handle_mmio_trap

    # -- virtual interrupts (AVT_F_VIRQ_REQUEST) -------------------------------------------

    def count_rings_taken(self):
        """The ring source was just emptied: count it (``AVT_F_RINGS_TAKEN``, store-release),
        then a full fence before the next look at ``virq_pending`` (docs/trap-abi.md
        section 8)."""
        if self.header.model_features & abi.F_RINGS_TAKEN:
            self.region.store_release32(abi.RINGS_TAKEN_OFFSET, self.header.rings_taken + 1)
            ordering.fence()

    def take_virqs(self):
        """INTIDs the model requested since the last call (atomic take of each word)."""
        intids = []
        for word in range(len(self.header.virq_pending)):
            address = self.region.address + abi.VIRQ_PENDING_OFFSET + 4 * word
            bits = ordering.fetch_and32(address, 0)
            while bits:
                low = bits & -bits
                intids.append(32 * word + low.bit_length() - 1)
                bits ^= low
        return intids



# -- the fake board: UIO tree, doorbell FIFOs and a board file in one directory --------------------

RAM_BASE = 0x40000000
TRAP_PHYS = 0x1FF00000
SHADOW_PAGES = _LAYOUT.window_count                    # one per window of the seed's layout
TRAP_SIZE = abi.PAGE_SIZE + SHADOW_PAGES * abi.SHADOW_PAGE_SIZE   # the page, then the shadows
_BOARD_TOML = """\
# Written by avatar_hw.testing.standin_stub.FakeBoard: the seed's layout, UIO regions as
# on a board, interrupts requested from the (stand-in) stub through virq_pending.
[board]
name = "standin"
description = "stand-in stub over a fake UIO tree"

[layout]
base = 0x0a000000
vm_size = 0x10000
device_size = 0x1000
irq_base = 48
irqs_per_vm = 8
max_vms = {max_vms}

[interrupts]
kind = "stub"

[trap]
region = {{ uio = "avatar-trap" }}

[ram]
region = {{ uio = "avatar-vm{{vm}}-ram" }}
guest_base = 0x{ram_base:x}
"""


class FakeBoard:
    """Everything ``avatar-hw serve`` finds on a board, in ``root``:

    - ``sys/`` and ``dev/``: a UIO tree (``avatar_hw.testing.fake_uio``) with
      ``avatar-trap`` and ``avatar-vmN-ram``; each ``dev/uioN`` is a regular
      file holding that device's single map at offset 0, so the daemon's
      ``find_uio(...).map(0)`` is a real shared mmap of it. (Real UIO selects
      map M by the mmap offset M * page size; every Avatar device has only
      map 0, where the two agree.) The stand-in maps the same files as the
      hypervisor's memory.
    - ``doorbell`` and ``doorbell.stub``: FIFOs for the two directions of the
      doorbell (``avatar_hw.doorbell.FifoDoorbell``), since a regular file
      cannot also be the UIO interrupt node.
    - ``board.toml``: the seed's layout, ``interrupts.kind = "stub"``.
    """

    def __init__(self, root, *, vms=2, ram_size=16 << 20, max_vms=8, create=True):
        """Lay out the board in ``root``; ``create=False`` uses one laid out earlier
        (by another process)."""
        from .fake_uio import make_tree
        self.root = Path(root)
        self.vms, self.ram_size = vms, ram_size
        self.doorbell = self.root / "doorbell"
        self.doorbell_stub = self.root / "doorbell.stub"
        self.board_file = self.root / "board.toml"
        self.control = self.root / "control.sock"
        if not create:
            self.roots = {"sysfs_root": str(self.root / "sys"), "dev_root": str(self.root / "dev")}
            return
        devices = {0: ("avatar-trap", [(TRAP_PHYS, TRAP_SIZE, 0, "trap")])}
        for vm in range(vms):
            devices[1 + vm] = (f"avatar-vm{vm}-ram",
                               [(0x20000000 + vm * ram_size, ram_size, 0, "ram")])
        self.roots = make_tree(self.root, devices)
        os.mkfifo(self.doorbell)
        os.mkfifo(self.doorbell_stub)
        self.board_file.write_text(_BOARD_TOML.format(max_vms=max_vms, ram_base=RAM_BASE))

    def node(self, name):
        """The /dev/uioN file of UIO device ``name``."""
        from ..hw.uio import find_uio
        return find_uio(name, **self.roots).dev_path

    def serve_argv(self, config, *extra):
        """The ``avatar-hw serve`` command line for this board."""
        return [sys.executable, "-m", "avatar_hw", "serve", "--board", str(self.board_file),
                "--config", str(config), "--sysfs-root", self.roots["sysfs_root"],
                "--dev-root", self.roots["dev_root"], "--control", str(self.control),
                "--doorbell", f"fifo:{self.doorbell},{self.doorbell_stub}", *extra]


class StandinStub:
    """The stand-in hypervisor over a ``FakeBoard``: the trap page, guest RAM, doorbells.

    ``initialise=False`` joins a page another stand-in initialised (after that
    one died): slots it left are recovered as the stub would.
    """

    def __init__(self, board, *, slots=4, initialise=True, features=abi.SUPPORTED_FEATURES,
                 shadow=True):
        from ..doorbell import open_fifo
        self.board = board
        self.trap_region = Region.map_file(board.node("avatar-trap"), TRAP_SIZE,
                                           name="stand-in trap page")
        self._to_model = open_fifo(board.doorbell)
        self._from_model = open_fifo(board.doorbell_stub)
        self.page = StubPage(self.trap_region, ring=self._ring)
        self._rings = 0                 # before recover(), which may ring
        if initialise:
            if not shadow:
                features &= ~(abi.F_REGISTER_SHADOW | abi.F_STUB_ACK)
            self.page.initialise(slots, features=features,
                                 shadow_count=SHADOW_PAGES if shadow else 0)
        else:
            self.page.attach_views()
            self.page.recover()
        self.rams = {vm: Region.map_file(board.node(f"avatar-vm{vm}-ram"), board.ram_size,
                                         name=f"stand-in vm{vm} RAM", phys_addr=RAM_BASE)
                     for vm in range(board.vms)}

    def _ring(self):
        from ..doorbell import ring
        self._rings += 1
        ring(self._to_model, self._rings)

    def guest_ram(self, vm, alloc_start=0x100000):
        from .driver import GuestRam
        return GuestRam(self.rams[vm].view(0, self.board.ram_size), RAM_BASE,
                        alloc_start=alloc_start)

    def driver(self, vm, slot=0, *, vcpu=None, **mmio_options):
        """A ``VirtioDriver`` for device ``slot`` of VM ``vm``, trapping through the page."""
        from ..layout import Layout
        from .driver import VirtioDriver
        mmio = self.page.mmio(vm, vm if vcpu is None else vcpu, **mmio_options)
        return VirtioDriver(mmio, Layout().window(vm, slot), self.guest_ram(vm))

    def wait_irqs(self, timeout=5.0):
        """INTIDs the model requested, waiting up to ``timeout`` s for the first."""
        deadline = time.monotonic() + timeout
        while True:
            intids = self.page.take_virqs()
            left = deadline - time.monotonic()
            if intids or left <= 0:
                return intids
            if select.select([self._from_model], [], [], left)[0]:
                try:
                    os.read(self._from_model, 4096)
                except BlockingIOError:
                    pass
                self.page.count_rings_taken()

    def close(self):
        os.close(self._to_model)
        os.close(self._from_model)
        self.page = None
        for region in [self.trap_region, *self.rams.values()]:
            try:
                region.close()
            except BufferError:
                pass         # a driver's view still refers to it: unmapped with the process
