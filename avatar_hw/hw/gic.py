"""GIC drivers: raise a guest's SPI by writing the GIC, and say why one stays silent.

Every driver works over any object with ``read32(offset)`` / ``write32(offset,
value)`` (a ``Region`` on a UIO map, or ``QTest.window`` in tests) and offers
the *interrupt line* interface the device model uses:

- ``raise_spi(intid)``: make the SPI pending;
- ``clear_spi(intid)``: remove the pending state (for level semantics);
- ``spi_range``: the INTIDs it can raise; anything else is refused with
  ``GicError`` before any register is written.

Drivers:

- ``GicV2Distributor``: GICD_ISPENDRn (0x200 + 4n) / GICD_ICPENDRn (0x280 + 4n),
  one bit per INTID, write-one-to-set/clear (other bits are unaffected).
- ``GicV3Distributor``: GICD_SETSPI_NSR (0x040) / GICD_CLRSPI_NSR (0x048), a
  write of the INTID. The architecture provides these only when GICD_TYPER.MBIS
  (bit 16) is 1 (GIC-600 has them; QEMU 7.2's GICv3 does not and ignores the
  writes), so without MBIS the driver uses GICD_ISPENDRn / GICD_ICPENDRn,
  which every GICv3 distributor has for SPIs.
- ``GicV2mFrame``: MSI_SETSPI_NS (0x040), a write of the INTID, within the
  frame's SPIs (MSI_TYPER 0x008: first SPI in bits 25:16, count in 9:0).
  A v2m frame can only *set*: its SPIs are edge-triggered, the pending state
  ends when the CPU acknowledges it, so ``clear_spi`` checks the INTID and does
  nothing.

``configure_spi(intid, SpiConfig(priority, target))`` (v2 and v3
distributors) sets a board SPI up the way the daemon needs it, because
Linux's GIC driver disables every SPI and targets it at the boot CPU
(``gic_dist_config``): disabled while its trigger changes, edge-triggered
(GICD_ICFGR), the priority (GICD_IPRIORITYR byte), the target (GICv2
GICD_ITARGETSR byte; GICv3 with affinity routing GICD_IROUTER, IRM = 0), then
enabled. What the distributor reads back is remembered as the configuration.

``diagnose_spi(intid)`` (v2 and v3 distributors) reads the SPI's state and
``SpiDiagnosis.explain()`` says in one line why a guest would get no
interrupt, including any setting that differs from the configuration
(Linux or the hypervisor wrote the distributor later). Only the distributor
is visible here: the CPU interface (its enable and priority mask) and the
hypervisor's routing are not.
"""

from dataclasses import dataclass

from ..errors import AvatarError

GICD_CTLR = 0x000
GICD_TYPER = 0x004
GICD_SETSPI_NSR = 0x040
GICD_CLRSPI_NSR = 0x048
GICD_IGROUPR = 0x080
GICD_ISENABLER = 0x100
GICD_ICENABLER = 0x180
GICD_ISPENDR = 0x200
GICD_ICPENDR = 0x280
GICD_ISACTIVER = 0x300
GICD_IPRIORITYR = 0x400
GICD_ITARGETSR = 0x800
GICD_ICFGR = 0xC00
GICD_IROUTER = 0x6000
MSI_TYPER = 0x008
MSI_SETSPI_NS = 0x040

FIRST_SPI = 32
SPECIAL_INTIDS = 1020        # 1020..1023 are special, never an interrupt
TYPER_MBIS = 1 << 16
CTLR_ARE = 0x30              # ARE (or ARE_S) and ARE_NS: affinity routing, GICv3
IROUTER_IRM = 1 << 31        # "any participating CPU"
AFFINITY_MASK = 0xFF_00FF_FFFF   # Aff3 (39:32), Aff2..Aff0 (23:0): MPIDR_EL1's affinity fields
ICFGR_ATTEMPTS = 4           # writes of a GICD_ICFGR word before its read-back is taken as is


class GicError(AvatarError):
    """An INTID the GIC cannot raise, or an unknown GIC version."""


def _check(intid, spis, what):
    if intid not in spis:
        raise GicError(f"{what}: INTID {intid} is outside its SPIs {spis.start}..{spis.stop - 1}; "
                       f"check the board file's layout.irq_base and irqs_per_vm")


@dataclass(frozen=True)
class SpiConfig:
    """How a board SPI is set up: enabled, edge-triggered, ``priority``, sent to ``target``.

    ``target``: with GICD_ITARGETSR (GICv2, GICv3 without affinity routing) a
    CPU interface number 0..7; with affinity routing (GICv3) the target PE's
    affinity ``Aff3 << 32 | Aff2 << 16 | Aff1 << 8 | Aff0`` (MPIDR_EL1's
    affinity fields).
    """

    priority: int
    target: int


@dataclass(frozen=True)
class SpiSettings:
    """The configurable state of one SPI as the distributor reads it back."""

    enabled: bool
    trigger: str                  # "edge" or "level" (GICD_ICFGR)
    priority: int                 # GICD_IPRIORITYR byte
    targets: tuple | None = None  # CPUs in GICD_ITARGETSR (no affinity routing)
    route: str | None = None      # GICD_IROUTER (GICv3 with affinity routing)

    def phrases(self):
        where = (f"routed to {self.route}" if self.route is not None
                 else f"targets CPUs {list(self.targets)}")
        return {"enabled": "enabled" if self.enabled else "disabled",
                "trigger": f"{self.trigger}-triggered",
                "priority": f"priority 0x{self.priority:02x}", "destination": where}

    def changes_from(self, configured):
        """Phrases for every setting that differs from ``configured`` (empty: none)."""
        now, then = self.phrases(), configured.phrases()
        return [f"{now[key]} (configured: {then[key]})" for key in now if now[key] != then[key]]


@dataclass(frozen=True)
class SpiDiagnosis:
    """What the distributor says about one SPI (``explain()`` for people)."""

    intid: int
    gic: str                     # "v2" or "v3"
    ctlr: int                    # GICD_CTLR
    distributor_enabled: bool    # some interrupt group enabled in GICD_CTLR
    group: int                   # GICD_IGROUPR bit
    enabled: bool                # GICD_ISENABLER bit
    trigger: str                 # "edge" or "level" (GICD_ICFGR)
    priority: int                # GICD_IPRIORITYR byte (lower is more urgent)
    pending: bool                # GICD_ISPENDR bit
    active: bool                 # GICD_ISACTIVER bit
    targets: tuple | None = None  # v2: CPUs in GICD_ITARGETSR
    route: str | None = None     # v3 with affinity routing: GICD_IROUTER
    configured: SpiSettings | None = None   # what configure_spi set (None: not configured)

    def settings(self):
        return SpiSettings(self.enabled, self.trigger, self.priority, self.targets, self.route)

    def changes(self):
        """What Linux or the hypervisor changed since the SPI was configured (phrases)."""
        return [] if self.configured is None else self.settings().changes_from(self.configured)

    def problems(self):
        """The reasons, each a phrase, why this SPI cannot reach a CPU now."""
        found = []
        if not self.distributor_enabled:
            found.append(f"the distributor is disabled (GICD_CTLR = 0x{self.ctlr:x}), "
                         "so it forwards no interrupt at all")
        if not self.enabled:
            found.append("the SPI is disabled (its GICD_ISENABLER bit is 0): the guest has "
                         "not enabled it, or no driver requested it")
        if self.targets == ():
            found.append("it targets no CPU (its GICD_ITARGETSR byte is 0)")
        if self.active:
            found.append("it is active: a CPU acknowledged it earlier and has not written "
                         "end-of-interrupt, so it is not delivered again until then")
        return found

    def explain(self):
        where = (f"routed to {self.route}" if self.route is not None
                 else f"targets CPUs {list(self.targets)}" if self.targets is not None else "")
        head = (f"SPI {self.intid} (GIC{self.gic}, {self.trigger}-triggered, group {self.group}, "
                f"priority 0x{self.priority:02x}{', ' + where if where else ''}) is "
                f"{'pending' if self.pending else 'not pending'}")
        changes = self.changes()
        if changes:
            head += ("; changed since avatar-hw configured it (Linux or the hypervisor wrote the "
                     "distributor): " + ", ".join(changes))
        problems = self.problems()
        if problems:
            return f"{head}; the guest gets no interrupt because " + "; ".join(problems) + "."
        if self.pending:
            return (f"{head} and the distributor forwards it: if the guest sees nothing, check "
                    "the CPU interface (enabled, priority mask above 0x"
                    f"{self.priority:02x}) and the hypervisor's routing of the SPI to the guest.")
        return (f"{head} and the distributor would forward it: nobody has raised it since it "
                "was last acknowledged; check that the device model raises it (an edge SPI "
                "stops pending when a CPU acknowledges it).")


class _Distributor:
    """Register access shared by the GICv2 and GICv3 distributors."""

    gic = ""

    def __init__(self, regs):
        self.regs = regs
        self.typer = regs.read32(GICD_TYPER)
        self.lines = min(32 * ((self.typer & 0x1F) + 1), SPECIAL_INTIDS)
        self.spi_range = range(FIRST_SPI, self.lines)
        self.configured = {}     # INTID -> SpiSettings read back after configure_spi

    def check_spi(self, intid):
        _check(intid, self.spi_range, f"GIC{self.gic} distributor ({self.lines} lines)")

    def _set_bit(self, base, intid):
        self.check_spi(intid)
        self.regs.write32(base + 4 * (intid // 32), 1 << (intid % 32))

    def _field(self, base, intid, width):
        """The ``width``-bit field of ``intid`` in a bank of 32-bit registers at ``base``."""
        per_register = 32 // width
        word = self.regs.read32(base + 4 * (intid // per_register))
        return (word >> (width * (intid % per_register))) & ((1 << width) - 1)

    def is_pending(self, intid):
        self.check_spi(intid)
        return bool(self._field(GICD_ISPENDR, intid, 1))

    def _targets(self, intid):
        """CPUs in the SPI's GICD_ITARGETSR byte (without affinity routing)."""
        if self._uniprocessor():
            # One CPU: GICD_ITARGETSR is read-as-zero and every SPI goes to CPU 0.
            return (0,)
        mask = self._field(GICD_ITARGETSR, intid, 8)
        return tuple(cpu for cpu in range(8) if mask >> cpu & 1)

    def _uniprocessor(self):
        return (self.typer >> 5) & 0x7 == 0

    def _settings(self, ctlr, intid):
        return SpiSettings(enabled=bool(self._field(GICD_ISENABLER, intid, 1)),
                           trigger="edge" if self._field(GICD_ICFGR, intid, 2) & 2 else "level",
                           priority=self._field(GICD_IPRIORITYR, intid, 8),
                           **self._destination(ctlr, intid))

    def configure_spi(self, intid, config):
        """Set SPI ``intid`` up as ``config`` (a ``SpiConfig``) says; returns the read-back.

        Disabled first: changing the trigger of an enabled interrupt is
        UNPREDICTABLE (GICv2 architecture, GICD_ICFGR). GICD_IPRIORITYR and
        GICD_ITARGETSR are byte-accessible, so those are single byte writes
        touching no other SPI; GICD_ICFGR is not (``_set_edge``).
        """
        self.check_spi(intid)
        self._set_bit(GICD_ICENABLER, intid)
        self._set_edge(intid)
        self.regs.write8(GICD_IPRIORITYR + intid, config.priority)
        self._route(self.regs.read32(GICD_CTLR), intid, config.target)
        self._set_bit(GICD_ISENABLER, intid)
        self.configured[intid] = self._settings(self.regs.read32(GICD_CTLR), intid)
        return self.configured[intid]

    def _set_edge(self, intid):
        """Set bit 1 (edge) of ``intid``'s field in its GICD_ICFGR word, which holds 15 other
        INTIDs' fields, some of them Linux's (the doorbell beside PCIe and GENET on a Pi 4).
        Linux changes the word under its irq_controller_lock (gic_configure_irq), which a
        process cannot take, so: no write when the bit is set already, else the word just
        read with the bit added, then read back, and written again (at most ICFGR_ATTEMPTS
        times) when the bit is gone, i.e. a write of Linux's landed after ours. What remains
        is the window between a read and the write after it: a change Linux makes there to
        another INTID of the word is undone (docs/board-setup.md, "The distributor is shared
        with Linux")."""
        icfgr = GICD_ICFGR + 4 * (intid // 16)
        edge = 2 << (2 * (intid % 16))
        for _ in range(ICFGR_ATTEMPTS):
            word = self.regs.read32(icfgr)
            if word & edge:
                return
            self.regs.write32(icfgr, word | edge)

    def expected_settings(self, config):
        """The ``SpiSettings`` that ``config`` gives on this distributor (for another
        process's ``diagnose_spi``; assumes the GIC implements the priority's bits)."""
        ctlr = self.regs.read32(GICD_CTLR)
        if self._affinity_routing(ctlr):
            destination = {"route": _affinity(config.target)}
        else:
            destination = {"targets": (0,) if self._uniprocessor() else (config.target,)}
        return SpiSettings(enabled=True, trigger="edge", priority=config.priority, **destination)

    def _route(self, ctlr, intid, target):
        if self._uniprocessor():
            return                   # GICD_ITARGETSR is read-as-zero, write-ignored
        self.regs.write8(GICD_ITARGETSR + intid, 1 << target)

    def _affinity_routing(self, ctlr):
        return False

    def diagnose_spi(self, intid, expected=None):
        """Read the distributor's state of SPI ``intid`` (a ``SpiDiagnosis``); it compares
        with ``expected`` (``SpiSettings``) or else with what ``configure_spi`` set."""
        self.check_spi(intid)
        ctlr = self.regs.read32(GICD_CTLR)
        settings = self._settings(ctlr, intid)
        return SpiDiagnosis(
            intid=intid, gic=self.gic, ctlr=ctlr,
            distributor_enabled=bool(ctlr & self._group_enables),
            group=self._field(GICD_IGROUPR, intid, 1),
            enabled=settings.enabled, trigger=settings.trigger, priority=settings.priority,
            pending=bool(self._field(GICD_ISPENDR, intid, 1)),
            active=bool(self._field(GICD_ISACTIVER, intid, 1)),
            targets=settings.targets, route=settings.route,
            configured=expected if expected is not None else self.configured.get(intid))


class GicV2Distributor(_Distributor):
    """GICv2 distributor (GIC-400 on the Raspberry Pi 4, QEMU ``virt,gic-version=2``)."""

    gic = "v2"
    _group_enables = 0x3         # EnableGrp0 (or Enable) and EnableGrp1

    def raise_spi(self, intid):
        self._set_bit(GICD_ISPENDR, intid)

    def clear_spi(self, intid):
        self._set_bit(GICD_ICPENDR, intid)

    def _destination(self, ctlr, intid):
        return {"targets": self._targets(intid)}


class GicV3Distributor(_Distributor):
    """GICv3 distributor; SETSPI/CLRSPI when GICD_TYPER.MBIS says they exist."""

    gic = "v3"
    _group_enables = 0x7         # EnableGrp0, EnableGrp1NS, EnableGrp1S

    def __init__(self, regs):
        super().__init__(regs)
        self.message_based = bool(self.typer & TYPER_MBIS)

    def raise_spi(self, intid):
        if self.message_based:
            self.check_spi(intid)
            self.regs.write32(GICD_SETSPI_NSR, intid)
        else:
            self._set_bit(GICD_ISPENDR, intid)

    def clear_spi(self, intid):
        if self.message_based:
            self.check_spi(intid)
            self.regs.write32(GICD_CLRSPI_NSR, intid)
        else:
            self._set_bit(GICD_ICPENDR, intid)

    def _affinity_routing(self, ctlr):
        return bool(ctlr & CTLR_ARE)

    def _destination(self, ctlr, intid):
        if not self._affinity_routing(ctlr):
            return {"targets": self._targets(intid)}
        low = self.regs.read32(GICD_IROUTER + 8 * intid)
        high = self.regs.read32(GICD_IROUTER + 8 * intid + 4)
        if low & IROUTER_IRM:
            return {"route": "any CPU (GICD_IROUTER.IRM = 1)"}
        return {"route": _affinity(high << 32 | low)}

    def _route(self, ctlr, intid, target):
        """GICD_IROUTER (64 bits, written as its two 32-bit halves) with IRM = 0."""
        if not self._affinity_routing(ctlr):
            super()._route(ctlr, intid, target)
            return
        self.regs.write32(GICD_IROUTER + 8 * intid, target & 0xFF_FFFF)
        self.regs.write32(GICD_IROUTER + 8 * intid + 4, target >> 32)


def _affinity(value):
    aff = ((value >> 32) & 0xFF, (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF)
    return "CPU with affinity " + ".".join(map(str, aff))


class GicV2mFrame:
    """A GICv2m MSI frame: raises its SPIs by writing the INTID; edge-triggered only."""

    gic = "v2m"

    def __init__(self, regs):
        self.regs = regs
        typer = regs.read32(MSI_TYPER)
        first, count = (typer >> 16) & 0x3FF, typer & 0x3FF
        self.spi_range = range(first, first + count)

    def check_spi(self, intid):
        _check(intid, self.spi_range, "GICv2m frame (MSI_TYPER)")

    def raise_spi(self, intid):
        self.check_spi(intid)
        self.regs.write32(MSI_SETSPI_NS, intid)

    def clear_spi(self, intid):
        """Nothing to do: a v2m SPI is edge-triggered and stops pending when acknowledged."""
        self.check_spi(intid)


_DRIVERS = {"v2": GicV2Distributor, "v3": GicV3Distributor, "v2m": GicV2mFrame}
VERSIONS = tuple(_DRIVERS)


def open_gic(version, regs):
    """The driver for ``version`` ("v2", "v3" or "v2m") over ``regs``."""
    try:
        driver = _DRIVERS[version]
    except KeyError:
        raise GicError(f"unknown GIC version {version!r}; expected one of "
                       f"{', '.join(VERSIONS)}") from None
    return driver(regs)
