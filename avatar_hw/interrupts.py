"""Interrupt lines: how the daemon raises a guest's interrupt (the ``InterruptLine`` seam).

Whatever carries it, an interrupt line has one method the core calls,
``raise_intid(intid)``, with the *guest INTID* of the device (the layout's:
48 + 8 per VM + slot). Implementations:

- ``BoardInterruptLine``: a GIC board; raises the board SPI the board file
  maps that guest INTID to, through the distributor (``avatar_hw.hw.gic``),
  and the hypervisor injects the guest INTID when it arrives;
- ``StubInterruptLine``: boards whose interrupts go through the stub
  (``interrupts.kind = "stub"``, the emulated board): sets the INTID's bit in
  the trap page's ``virq_pending`` and rings the stub, which injects it;
- in tests, ``avatar_hw.testing.virtio.IrqRecorder``.
"""

from typing import Protocol

from . import abi
from .errors import AvatarError
from .hw.gic import GicError
from .hw import ordering


class InterruptLine(Protocol):
    def raise_intid(self, intid: int) -> None:
        """Make the guest interrupt ``intid`` pending (edge: one call, one interrupt)."""


class StubInterruptLine:
    """Raise a guest INTID through the stub: a bit in virq_pending, then ``ring_stub()``."""

    def __init__(self, trap_region, ring_stub, spi_range=range(32, 256)):
        self._base = trap_region.address + abi.VIRQ_PENDING_OFFSET
        trap_region.check(abi.VIRQ_PENDING_OFFSET, 32)
        self._ring_stub = ring_stub
        self.spi_range = spi_range

    def check_intid(self, intid):
        if intid not in self.spi_range:
            raise AvatarError(f"stub interrupt line: INTID {intid} is outside "
                              f"{self.spi_range.start}..{self.spi_range.stop - 1}")

    def raise_intid(self, intid):
        self.check_intid(intid)
        ordering.fetch_or32(self._base + 4 * (intid // 32), 1 << (intid % 32))
        self._ring_stub()


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
