"""Interrupt lines: how the daemon raises a guest's interrupt (the ``InterruptLine`` seam).

Whatever carries it, an interrupt line has one method the core calls,
``raise_intid(intid)``, with the *guest INTID* of the device (the layout's:
48 + 8 per VM + slot). Implementations:

- ``BoardInterruptLine``: a GIC board; raises the board SPI the board file
  maps that guest INTID to, through the distributor (``avatar_hw.hw.gic``),
  and the hypervisor injects the guest INTID when it arrives;
- ``StubInterruptLine``: boards whose interrupts go through the stub
  (``interrupts.kind = "stub"``, the emulated board): sets the INTID's bit in
  the trap page's ``virq_pending`` and rings the stub, which injects it; not
  when the stub says its CPU for that INTID polls (``virq_polling``,
  ``AVT_F_HALT_POLL``: docs/trap-abi.md section 8), nor while a ring it sent
  is not taken yet (``rings_taken``, ``AVT_F_RINGS_TAKEN``);
- in tests, ``avatar_hw.testing.virtio.IrqRecorder``.
"""

import ctypes
from typing import Protocol

from . import abi
from .errors import AvatarError
from .hw.gic import GicError
from .hw import ordering


class InterruptLine(Protocol):
    def raise_intid(self, intid: int) -> None:
        """Make the guest interrupt ``intid`` pending (edge: one call, one interrupt)."""


class StubInterruptLine:
    """Raise a guest INTID through the stub: a bit in virq_pending, then ``ring_stub()``
    unless the bit was pending already (a GIC's pending state too holds one edge: the
    stub takes both requests with one injection), the stub polls for it or has already
    taken it.

    The stub sets an INTID's ``virq_polling`` bit while a CPU of its VM polls
    ``virq_pending`` in a trapped WFI (only with ``AVT_F_HALT_POLL`` accepted; a stub
    without it leaves the reserved words zero). The OR, a full fence, then the read of
    ``virq_polling`` are the model's half of a Dekker pair with the stub's "set polling,
    DMB ISH, poll; clear polling, DMB ISH, look once more": the model sees polling set
    and the stub will take the bit, or it sees polling clear and rings. A poll that sees
    the bit takes it before it clears polling, so a clear polling with the bit already
    gone from ``virq_pending`` (read after it, acquire) means taken: no ring either.
    With ``AVT_F_RINGS_TAKEN`` (``attach``) the stub counts in ``rings_taken`` each time
    it clears its ring source, and stores, DMB ISH, then looks at ``virq_pending``; the
    line reads the count after its OR and fence and rings only when it moved since its
    last ring: that ring, still to be taken, makes the stub look after counting (the
    same Dekker pair). So the stub's UART never holds more than a ring or two.
    ``rings`` and ``rings_skipped`` count both outcomes (``avatar-hw info``); docs/trap-abi.md
    section 8.
    """

    def __init__(self, trap_region, ring_stub, spi_range=range(32, 256)):
        self._base = trap_region.address + abi.VIRQ_PENDING_OFFSET
        trap_region.check(abi.VIRQ_PENDING_OFFSET, 32)
        trap_region.check(abi.VIRQ_POLLING_OFFSET, 32)
        # At their addresses, as the OR: no buffer export that would keep the region mapped.
        self._pending = (ctypes.c_uint32 * 8).from_address(self._base)
        self._polling = (ctypes.c_uint32 * 8).from_address(
            trap_region.address + abi.VIRQ_POLLING_OFFSET)
        self._ring_stub = ring_stub
        trap_region.check(abi.RINGS_TAKEN_OFFSET, 4)
        self._taken = ctypes.c_uint32.from_address(trap_region.address + abi.RINGS_TAKEN_OFFSET)
        self._counted = False           # AVT_F_RINGS_TAKEN accepted: ring once per count
        self._rung_at = None            # the count when this line last rang
        self.spi_range = spi_range
        self.rings = 0
        self.rings_skipped = 0

    def check_intid(self, intid):
        if intid not in self.spi_range:
            raise AvatarError(f"stub interrupt line: INTID {intid} is outside "
                              f"{self.spi_range.start}..{self.spi_range.stop - 1}")

    def raise_intid(self, intid):
        self.check_intid(intid)
        word, bit = intid // 32, 1 << (intid % 32)
        if ordering.fetch_or32(self._base + 4 * word, bit) & bit:
            self.rings_skipped += 1             # still pending: the stub has yet to take the
            return                              # request before, which was rung or polled for
        ordering.fence()            # the OR's store before the load of virq_polling
        if self._polling[word] & bit:
            self.rings_skipped += 1             # the stub polls: it will take the bit
            return
        ordering.acquire_fence()    # polling's clear read before the bit: the take is seen
        if not self._pending[word] & bit:
            self.rings_skipped += 1             # taken already (then polling was cleared)
            return
        self._ring()

    def _ring(self):
        if self._counted:
            taken = self._taken.value           # after the OR and its fence
            if taken == self._rung_at:
                self.rings_skipped += 1         # the last ring is not taken yet
                return
            self._rung_at = taken
        self.rings += 1
        self._ring_stub()

    def attach(self, features):
        """The model attached, accepting ``features``: count rings by the stub's
        ``rings_taken`` if ``AVT_F_RINGS_TAKEN`` is among them, and ring once if a request
        is pending (a model that died between its OR and its ring left one the stub was
        not told of, and ``raise_intid`` does not ring for a bit already set)."""
        self._counted = bool(features & abi.F_RINGS_TAKEN)
        self._rung_at = None
        if any(self._pending):
            self._ring()

    def info(self):
        """The counters ``avatar-hw info`` shows."""
        return {"stub_rings": self.rings, "stub_rings_skipped": self.rings_skipped,
                "stub_rings_taken": self._taken.value if self._counted else 0}


class BoardInterruptLine:
    """``raise_intid(guest_intid)`` raises that device's board SPI through the GIC driver.

    ``configure(guest_intids)`` sets their board SPIs up (enabled, edge, the
    board file's priority and target; a GICv2m frame cannot, its SPIs belong
    to the distributor's owner); ``diagnose_spi(guest_intid)`` reports on the
    board SPI, compared with that configuration.
    """

    def __init__(self, board, driver):
        self.board, self.driver = board, driver
        self.regs = driver.regs
        lay = board.layout
        self._board_intids = {guest: board.board_intid(guest)
                              for guest in range(lay.irq_base, lay.last_intid + 1)}

    def _board(self, guest_intid):
        try:
            return self._board_intids[guest_intid]
        except KeyError:
            return self.board.board_intid(guest_intid)      # raises, naming the layout

    def raise_intid(self, guest_intid):
        self.driver.raise_spi(self._board(guest_intid))

    @property
    def configurable(self):
        return hasattr(self.driver, "configure_spi")

    def configure(self, guest_intids):
        """Configure the board SPIs of ``guest_intids``; returns {board INTID: read-back}."""
        if not self.configurable:
            return {}
        return {self._board(guest): self.driver.configure_spi(self._board(guest),
                                                              self.board.spi_config(guest))
                for guest in guest_intids}

    def diagnose_spi(self, guest_intid):
        """The board SPI's ``SpiDiagnosis``, compared with what this process configured or
        else with what the board file says it should be."""
        intid = self._board(guest_intid)
        if not self.configurable:
            raise GicError(f"{self.board.path}: a GICv2m frame shows nothing of SPI {intid}'s "
                           "state; read the distributor instead")
        expected = None
        if intid not in self.driver.configured:
            expected = self.driver.expected_settings(self.board.spi_config(guest_intid))
        return self.driver.diagnose_spi(intid, expected)
