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

import time

from .. import abi
from ..hw import ordering
from ..virtio.constants import REG_QUEUE_NOTIFY


class TrapTimeout(Exception):
    """The model did not answer a posted trap in time (the real stub would keep waiting)."""


class StubPage:
    """The stub's view of the trap page in ``region``; ``ring()`` raises the doorbell."""

    def __init__(self, region, ring=lambda: None):
        self.region = region
        self.ring = ring
        self.header = abi.Header.from_buffer(region.view(0, abi.SLOTS_OFFSET))
        self.slots = ()
        self._seq = 0
        self.rings = 0

    def initialise(self, slot_count, *, features=abi.SUPPORTED_FEATURES,
                   counter_hz=1_000_000_000, major=abi.ABI_MAJOR, minor=abi.ABI_MINOR,
                   magic=abi.MAGIC):
        """Zero the page, fill the header and slots, then publish READY (store-release)."""
        self.region.view(0, abi.PAGE_SIZE)[:] = bytes(abi.PAGE_SIZE)
        h = self.header
        h.magic, h.abi_major, h.abi_minor = magic, major, minor
        h.slot_count, h.slot_size, h.slots_offset = slot_count, abi.SLOT_SIZE, abi.SLOTS_OFFSET
        h.stub_features, h.counter_hz = features, counter_hz
        self.attach_views(slot_count)
        self.region.store_release32(abi.STUB_STATE_OFFSET, abi.STUB_READY)

    def attach_views(self, slot_count=None):
        """Make the slot views (a second stub process over an initialised page)."""
        count = self.header.slot_count if slot_count is None else slot_count
        self.slots = tuple(
            abi.Slot.from_buffer(self.region.view(abi.SLOTS_OFFSET + i * abi.SLOT_SIZE,
                                                  abi.SLOT_SIZE))
            for i in range(count))

    # -- model state -----------------------------------------------------------------

    def model_attached(self):
        return self.region.load_acquire32(abi.MODEL_STATE_OFFSET) == abi.MODEL_ATTACHED

    def wait_attached(self, timeout=10.0):
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
        """Wait for the answer of slot ``vcpu``; returns ``(status, read data)`` and frees it."""
        slot = self.slots[vcpu]
        if slot.flags & abi.SLOT_F_POSTED_WRITE:
            return abi.STATUS_OK, 0
        self._wait_state(vcpu, (abi.SLOT_DONE,), timeout)
        status = slot.status
        data = slot.data if slot.direction == abi.DIR_READ else 0
        slot.t_done = time.monotonic_ns()
        self.region.store_release32(self._state_offset(vcpu), abi.SLOT_FREE)
        return status, data

    def post(self, vcpu, vm_id, gpa, size, is_write, value=0, *, posted=False, timeout=10.0,
             raw=None):
        """One guest access, as the stub handles it: ``(status, data)``.

        With no model attached the stub does not post: read-as-zero, write-ignored.
        """
        if not self.model_attached():
            return abi.STATUS_UNHANDLED, 0
        self.begin(vcpu, vm_id, gpa, size, is_write, value, posted=posted, timeout=timeout,
                   raw=raw)
        return self.finish(vcpu, timeout)

    def _wait_state(self, vcpu, states, timeout):
        offset = self._state_offset(vcpu)
        load = self.region.load_acquire32
        deadline = None
        spins = 0
        while (state := load(offset)) not in states:
            spins += 1
            if spins < 200:
                continue
            if deadline is None:
                deadline = time.monotonic() + timeout
            elif time.monotonic() > deadline:
                raise TrapTimeout(f"slot {vcpu}: state {state} after {timeout} s, "
                                  f"waiting for {states}")
            time.sleep(0.0001)

    def mmio(self, vm_id, vcpu=0, *, posted_notify=False, timeout=10.0):
        """A ``handle_mmio_trap``-compatible callable that traps through this page.

        The stub's policy for UNHANDLED (and for a detached model) is
        read-as-zero / write-ignored, so the callable returns ``(False, 0)``.
        With ``posted_notify`` and the model's consent, QueueNotify writes are posted.
        """
        def handle_mmio_trap(addr, value, is_write, size):
            posted = (posted_notify and is_write
                      and self.header.model_features & abi.F_POSTED_WRITES
                      and addr % 0x1000 == REG_QUEUE_NOTIFY)
            status, data = self.post(vcpu, vm_id, addr, size, is_write, value,
                                     posted=bool(posted), timeout=timeout)
            return status == abi.STATUS_OK, data
        return handle_mmio_trap

    # -- virtual interrupts (AVT_F_VIRQ_REQUEST) -------------------------------------------

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

