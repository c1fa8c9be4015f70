"""Board files: where a board's virtio windows, SPIs, trap page, guest RAM and GIC are.

A board file (``boards/*.toml``, schema in docs/boards.md) is loaded with
``load_board(path)`` into a ``Board``; every mistake is a ``ConfigError``
naming the file, the key and the problem. ``Board.open_region(spec)`` maps a
*region spec*, either a UIO map (on a board) or a window of a file (on the
emulated board), so the daemon does not care which. Shipped boards are found
by name (``rpi4``) with ``avatar_hw.shipped.board_path``.

Interrupt numbers: a guest sees the layout's *guest INTIDs* (48 + 8 per VM +
slot); on a GIC board the daemon raises *board INTIDs*, SPIs free on that
SoC (``[interrupts] board_intids``), and the hypervisor injects the guest
INTID when the board SPI arrives. ``Board.board_intid(guest_intid)`` is the
one place that maps one to the other; ``BoardInterruptLine`` raises through it.
"""

import string
from dataclasses import dataclass
from pathlib import Path

from .errors import AvatarError, ConfigError, DeviceNotFound
from .hw.gic import (AFFINITY_MASK, FIRST_SPI, SPECIAL_INTIDS, VERSIONS, GicError, SpiConfig,
                     open_gic)
from .hw.region import Region
from .hw.uio import find_uio
from .interrupts import BoardInterruptLine
from .layout import Layout, address
from .schema import (REQUIRED, EntryError, Field, Schema, at_least, between, choice, read_toml,
                     under)
from .shipped import shipped_hint
from .wait import DOORBELL, MODES

PAGE = 0x1000                 # stage-2 granule: the hypervisor traps whole 4 KiB pages
MIN_DEVICE_SIZE = 0x200       # virtio-mmio registers (0x100) and a device config space
GIC_FRAME_SIZES = {"v2": 0x1000, "v3": 0x10000, "v2m": 0x1000}
GICC_SIZE = 0x2000
INTERRUPT_KINDS = ("gic", "stub")
GIC_ONLY_KEYS = ("board_intids", "target_cpu", "priority")
U64_MAX = (1 << 64) - 1       # addresses, offsets and sizes are 64-bit
OFF_MAX = (1 << 63) - 1       # a file region's bytes lie at file offsets (off_t) up to this

DEFAULT_PRIORITY = 0xA0       # Linux's own default (GICD_INT_DEF_PRI); GIC-400 keeps bits 7:3


@dataclass(frozen=True)
class RegionSpec:
    """How to reach a region: UIO device ``uio`` map ``map``, or ``size`` bytes of ``file``.

    ``uio`` and ``file`` may contain ``{vm}``, replaced by the VM number; or VM n's
    part of one ``file`` lies at ``offset + n * vm_stride`` (the emulated board:
    every VM's RAM in QEMU's one RAM file).
    """

    uio: str | None = None
    map: int = 0
    file: str | None = None
    offset: int = 0
    size: int | None = None
    vm_stride: int = 0

    @property
    def per_vm(self):
        return "{vm}" in self.template or self.vm_stride != 0

    @property
    def template(self):
        return self.uio if self.uio is not None else self.file

    def name_for(self, vm=None):
        if self.per_vm and vm is None:
            raise ValueError(f"region {self.template} is per VM: give vm")
        return self.template.format(vm=vm)

    def offset_for(self, vm=None):
        return self.offset + (vm or 0) * self.vm_stride


@dataclass(frozen=True)
class GicSpec:
    version: str              # "v2", "v3" or "v2m"
    distributor: int          # physical address of the distributor (v2m: of the frame)
    cpu_interface: int | None  # GICv2 CPU interface, for the overlap check
    lines: int                # interrupt lines the GIC implements (INTIDs 0..lines-1)
    region: RegionSpec


@dataclass(frozen=True)
class IntidRange:
    """An entry of an INTID list in a board file: one INTID, or ``[first, last]`` inclusive."""

    first: int
    last: int

    def __contains__(self, intid):
        return self.first <= intid <= self.last

    def __iter__(self):
        return iter(range(self.first, self.last + 1))

    def __str__(self):
        return str(self.first) if self.first == self.last else f"[{self.first}, {self.last}]"


@dataclass(frozen=True)
class Board:
    path: Path
    name: str
    description: str
    layout: Layout
    interrupts: str           # "gic": the daemon writes the GIC; "stub": asks the stub
    gic: GicSpec | None
    trap: RegionSpec
    ram: RegionSpec
    ram_guest_base: int       # guest-physical address of the start of each VM's RAM
    board_intids: tuple = ()  # board INTID of each guest INTID, from layout.irq_base on
    reserved_intids: tuple = ()   # IntidRange entries no board SPI may use
    doorbell_intid: int | None = None   # the SPI the stub raises for the trap doorbell
    target_cpus: tuple = ()   # per VM: the CPU (or v3 affinity) its board SPIs target
    priority: int = DEFAULT_PRIORITY
    wait: str = DOORBELL      # how the daemon waits for traps (avatar_hw.wait)

    def board_intid(self, guest_intid):
        """The INTID the daemon raises for a device whose guest sees ``guest_intid``."""
        index = guest_intid - self.layout.irq_base
        if not 0 <= index < len(self.board_intids):
            raise GicError(f"{self.path}: guest INTID {guest_intid} is outside the layout "
                           f"({self.layout.irq_base}..{self.layout.last_intid})")
        return self.board_intids[index]

    def spi_config(self, guest_intid):
        """How the board SPI of ``guest_intid`` is set up (``hw.gic.SpiConfig``)."""
        vm = (guest_intid - self.layout.irq_base) // self.layout.irqs_per_vm
        return SpiConfig(priority=self.priority, target=self.target_cpus[vm])

    def open_region(self, spec, vm=None, *, sysfs_root="/sys", dev_root="/dev"):
        """Map ``spec`` (for VM ``vm`` when it is per VM) as a ``Region``."""
        name = spec.name_for(vm)
        if spec.uio is not None:
            return find_uio(name, sysfs_root=sysfs_root, dev_root=dev_root).map(spec.map)
        offset = spec.offset_for(vm)
        try:
            return Region.map_file(name, spec.size, offset=offset)
        except FileNotFoundError:
            raise DeviceNotFound(f"{name}: no such file (a region of board file {self.path}); "
                                 "is the emulated board running?") from None
        except (OSError, ValueError, OverflowError) as err:
            raise AvatarError(f"{name}: cannot map 0x{spec.size:x} bytes at offset "
                              f"0x{offset:x} (board file {self.path}): {err}") from None

    def open_gic(self, *, sysfs_root="/sys", dev_root="/dev"):
        """The GIC driver over the mapped ``[gic] region``; its ``regs`` is that Region."""
        if self.gic is None:
            raise AvatarError(f"{self.path}: board {self.name} has interrupts.kind = "
                              f"{self.interrupts!r}, no [gic]")
        regs = self.open_region(self.gic.region, sysfs_root=sysfs_root, dev_root=dev_root)
        driver = open_gic(self.gic.version, regs)
        outside = [intid for intid in self.board_intids if intid not in driver.spi_range]
        if outside:
            regs.close()
            raise GicError(
                f"{self.path}: interrupts.board_intids uses INTID {outside[0]} but the "
                f"GIC{self.gic.version} at {regs.name} has SPIs {driver.spi_range.start}.."
                f"{driver.spi_range.stop - 1}; fix [interrupts] or [gic] for this board")
        return driver

    def interrupt_line(self, *, sysfs_root="/sys", dev_root="/dev"):
        """The daemon's interrupt line on a GIC board (``BoardInterruptLine``)."""
        return BoardInterruptLine(self, self.open_gic(sysfs_root=sysfs_root, dev_root=dev_root))


# -- reading the board file ----------------------------------------------------------------

def _template(name):
    """A region's ``uio`` or ``file`` name: ``{vm}`` is the only placeholder."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(name) if f is not None}
    except ValueError as err:
        raise ValueError(f"{name!r}: {err}") from None
    if not fields <= {"vm"}:
        raise ValueError(f"{name!r}: the only placeholder allowed is {{vm}}")


def _intid_ranges(items):
    """A board file's INTID list, each entry an INTID or ``[first, last]``: a tuple of
    ``IntidRange``; ``EntryError`` names a wrong entry."""
    entries = []
    for index, item in enumerate(items):
        pair = [item, item] if isinstance(item, int) and not isinstance(item, bool) else item
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise EntryError(index, f"must be an INTID or [first, last], not {item!r}")
        first, last = pair
        if not FIRST_SPI <= first <= last < SPECIAL_INTIDS:
            raise EntryError(index, f"{item!r}: INTIDs must be SPIs ({FIRST_SPI}.."
                                    f"{SPECIAL_INTIDS - 1}), first <= last")
        entries.append(IntidRange(first, last))
    return tuple(entries)


def _check_cpus(value):
    """``target_cpu``: one CPU (or GICv3 affinity) for every VM, or an array with one per VM
    (its length is checked against the layout by ``_parse``)."""
    for cpu in value if isinstance(value, list) else [value]:
        if not isinstance(cpu, int) or isinstance(cpu, bool) or cpu < 0 or cpu & ~AFFINITY_MASK:
            raise ValueError(f"{cpu!r} is not a CPU number (GICv2: 0..7) or an affinity "
                             "Aff3 << 32 | Aff2 << 16 | Aff1 << 8 | Aff0")


def _check_priority(value):
    if not 0 <= value <= 0xFF:
        raise ValueError(f"must be 0..255 (a GICD_IPRIORITYR byte), not {value}")


def _u64(value):
    """An address or offset: 64 bits, not negative."""
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"must fit 64 bits (0 to 0x{U64_MAX:x}), not {value:#x}")


def _size(value):
    """A size: at least 1 byte, 64 bits."""
    if not 1 <= value <= U64_MAX:
        raise ValueError(f"must be 1 to 0x{U64_MAX:x} (64 bits), not {value:#x}")


INTIDS = "INTIDs, each an integer or [first, last]"
NOT_NEGATIVE = at_least(0)

REGION = Schema("", (
    Field("uio", str, None, "the name of a UIO device", _template),
    Field("map", int, 0, check=NOT_NEGATIVE, only_with="uio"),
    Field("file", str, None, "the path of a file (relative to the board file)", _template,
          path=under),
    Field("offset", int, 0, check=_u64, only_with="file"),
    Field("size", int, REQUIRED, check=_size, only_with="file"),
    Field("vm_stride", int, 0, check=_u64, only_with="file"),
), one_of=("uio", "file"))

BOARD = Schema("", (
    Field("board", Schema("", (
        Field("name", str, REQUIRED),
        Field("description", str, ""),
    )), REQUIRED),
    Field("layout", Schema("", (
        Field("base", int, REQUIRED, check=_u64),
        Field("vm_size", int, REQUIRED, check=_size),
        Field("device_size", int, REQUIRED, check=at_least(MIN_DEVICE_SIZE)),
        Field("irq_base", int, REQUIRED, check=at_least(FIRST_SPI)),
        # guest INTIDs are SPIs: no more of them per VM, nor more VMs, than the GIC has SPIs
        # (their product is checked against the GIC's lines below)
        Field("irqs_per_vm", int, REQUIRED, check=between(1, SPECIAL_INTIDS - FIRST_SPI)),
        Field("max_vms", int, REQUIRED, check=between(1, SPECIAL_INTIDS - FIRST_SPI)),
    )), REQUIRED),
    Field("interrupts", Schema("", (
        Field("kind", str, "gic", check=choice(*INTERRUPT_KINDS)),
        Field("board_intids", list, None, INTIDS, _intid_ranges),
        Field("doorbell_intid", int, None, check=at_least(FIRST_SPI)),
        Field("target_cpu", (int, list), None,
              "a CPU number (or GICv3 affinity), or a list of one per VM", _check_cpus),
        Field("priority", int, None, check=_check_priority),
        Field("reserved_intids", list, None, INTIDS, _intid_ranges),
    )), {}),
    Field("gic", Schema("", (               # required with interrupts.kind = "gic": _parse
        Field("version", str, REQUIRED, check=choice(*VERSIONS)),
        Field("distributor", int, REQUIRED, check=_u64),
        Field("cpu_interface", int, None, check=_u64),
        Field("lines", int, REQUIRED, check=between(FIRST_SPI + 1, SPECIAL_INTIDS)),
        Field("region", REGION, REQUIRED),
    ))),
    Field("trap", Schema("", (
        Field("region", REGION, REQUIRED),
        Field("wait", str, DOORBELL, check=choice(*MODES)),
    )), REQUIRED),
    Field("ram", Schema("", (
        Field("region", REGION, REQUIRED),
        Field("guest_base", int, REQUIRED, check=_u64),
    )), REQUIRED),
))
"""The board file's tables and keys (docs/boards.md); ``_parse`` checks across keys."""


def _region(file, key, options, per_vm):
    """The ``RegionSpec`` of a checked region table; ``per_vm``: each VM has its own."""
    region = RegionSpec(**options)
    name_key = f"{key}.{'uio' if region.uio is not None else 'file'}"
    if region.vm_stride and ("{vm}" in region.template or not per_vm):
        raise ConfigError(file, f"{key}.vm_stride", "per-VM parts of one file: only for a region "
                                                    "each VM has its own, and then without {vm} "
                                                    "in the file name")
    if 0 < region.vm_stride < region.size:
        raise ConfigError(file, f"{key}.vm_stride", f"0x{region.vm_stride:x} is less than size "
                                                    f"0x{region.size:x}: each VM's part would "
                                                    "overlap the next VM's; give vm_stride >= size")
    if per_vm != region.per_vm:
        problem = ("each VM has its own: put {vm} in the name (or give vm_stride)" if per_vm
                   else "one region shared by all VMs: no {vm} in the name")
        raise ConfigError(file, name_key, f"{options.get('uio', options.get('file'))!r}: "
                                          f"{problem}")
    return region


def _parse(file, data):
    options = BOARD.read(file, "", data, base=Path(file).parent)
    layout = Layout(**options["layout"])
    interrupts = options["interrupts"]
    kind = interrupts["kind"]
    irq = {"reserved_intids": _intid_ranges(interrupts.get("reserved_intids", ())),
           "doorbell_intid": interrupts.get("doorbell_intid")}
    if kind == "stub":
        # The stub injects the guest INTID itself: no physical SPI is raised for a device.
        for key in GIC_ONLY_KEYS:
            if key in interrupts:
                raise ConfigError(file, f"interrupts.{key}", 'only with kind = "gic": with '
                                  '"stub" the stub injects the guest INTIDs itself')
        irq["board_intids"] = tuple(range(layout.irq_base, layout.last_intid + 1))
        if "gic" in options:
            raise ConfigError(file, "gic", 'only with interrupts.kind = "gic": with "stub" the '
                                           "daemon never touches the GIC; remove [gic]")
    else:
        if "board_intids" not in interrupts:
            raise ConfigError(file, "interrupts.board_intids", "missing; list the SPIs the "
                              "daemon raises on this SoC, free there, e.g. [[191, 207], "
                              "[209, 223]] (docs/boards.md)")
        irq["board_intids"] = tuple(intid for entry in _intid_ranges(interrupts["board_intids"])
                                    for intid in entry)
        irq["priority"] = interrupts.get("priority", DEFAULT_PRIORITY)
        cpus = interrupts.get("target_cpu", 0)
        if isinstance(cpus, list) and len(cpus) != layout.max_vms:
            raise ConfigError(file, "interrupts.target_cpu",
                              f"has {len(cpus)} entries but layout.max_vms is "
                              f"{layout.max_vms}: give one CPU per VM, or one for all")
        irq["target_cpus"] = tuple(cpus if isinstance(cpus, list) else [cpus] * layout.max_vms)

    gic_spec = None
    if "gic" in options:
        gic = options["gic"]
        gic_spec = GicSpec(version=gic["version"], distributor=gic["distributor"],
                           cpu_interface=gic.get("cpu_interface"), lines=gic["lines"],
                           region=_region(file, "gic.region", gic["region"], per_vm=False))
    elif kind == "gic":
        raise BOARD.missing(file, "", "gic")
    ram = options["ram"]
    return Board(path=Path(file), name=options["board"]["name"],
                 description=options["board"]["description"], layout=layout,
                 interrupts=kind, gic=gic_spec,
                 trap=_region(file, "trap.region", options["trap"]["region"], per_vm=False),
                 wait=options["trap"]["wait"],
                 ram=_region(file, "ram.region", ram["region"], per_vm=True),
                 ram_guest_base=ram["guest_base"], **irq)


# -- checks across keys ---------------------------------------------------------------------

def _check(board):
    file, lay = board.path, board.layout
    if lay.base % PAGE or lay.vm_size % PAGE:
        key = "layout.base" if lay.base % PAGE else "layout.vm_size"
        raise ConfigError(file, key, "must be a multiple of 0x1000: the hypervisor traps "
                                     "whole 4 KiB pages")
    if lay.vm_size % lay.device_size:
        raise ConfigError(file, "layout.device_size", f"0x{lay.device_size:x} does not divide "
                                                      f"layout.vm_size 0x{lay.vm_size:x}")
    # One device per IRQ: each VM has irqs_per_vm devices, which must fit its window.
    if lay.irqs_per_vm * lay.device_size > lay.vm_size:
        raise ConfigError(file, "layout.irqs_per_vm",
                          f"{lay.irqs_per_vm} devices (one per IRQ) of 0x{lay.device_size:x} "
                          f"bytes need 0x{lay.irqs_per_vm * lay.device_size:x} bytes but "
                          f"layout.vm_size is 0x{lay.vm_size:x}: they would overlap the next "
                          "VM's window")
    lines = board.gic.lines if board.gic else SPECIAL_INTIDS
    _check_intids(file, lay, lines)
    _check_interrupts(board, lines)
    _check_64_bits(board)
    windows = (lay.base, lay.base + lay.max_vms * lay.vm_size)
    others = [("ram.guest_base", board.ram_guest_base, board.ram_guest_base + 1)]
    if board.gic:
        start = board.gic.distributor
        others.append(("gic.distributor", start, start + GIC_FRAME_SIZES[board.gic.version]))
        if board.gic.cpu_interface is not None:
            start = board.gic.cpu_interface
            others.append(("gic.cpu_interface", start, start + GICC_SIZE))
    for key, start, end in others:
        if start < windows[1] and windows[0] < end:
            raise ConfigError(file, key, f"{address(start)}-{address(end - 1)} lies inside the "
                                         f"virtio windows {address(windows[0])}-"
                                         f"{address(windows[1] - 1)} "
                                         "([layout] base + max_vms * vm_size)")


def _check_intids(file, lay, lines):
    """The guest INTIDs lie on the GIC; the message names the key that puts one past it."""
    past = f"past the GIC's {lines} lines (INTIDs up to {lines - 1})"
    limit = min(lines, SPECIAL_INTIDS)
    if lay.irq_base >= limit:
        raise ConfigError(file, "layout.irq_base", f"INTID {lay.irq_base} is {past}")
    if lay.irq_base + lay.irqs_per_vm > limit:
        raise ConfigError(file, "layout.irqs_per_vm",
                          f"VM 0's last device would get INTID "
                          f"{lay.irq_base + lay.irqs_per_vm - 1}, {past}; lower irqs_per_vm")
    if lay.last_intid >= limit:
        raise ConfigError(file, "layout.max_vms",
                          f"VM {lay.max_vms - 1}'s last device would get INTID {lay.last_intid}, "
                          f"{past}; lower max_vms or irqs_per_vm")


def _check_64_bits(board):
    """Every address range ends within 64 bits, every file region's below 2**63 (off_t)."""
    file, lay = board.path, board.layout
    ends = [("layout.base", lay.base + lay.max_vms * lay.vm_size,
             f"the virtio windows (base + max_vms {lay.max_vms} x vm_size {lay.vm_size:#x})")]
    if board.gic:
        ends.append(("gic.distributor", board.gic.distributor
                     + GIC_FRAME_SIZES[board.gic.version], "the distributor's frame"))
        if board.gic.cpu_interface is not None:
            ends.append(("gic.cpu_interface", board.gic.cpu_interface + GICC_SIZE,
                         "the CPU interface"))
    if board.ram.size is not None:
        ends.append(("ram.guest_base", board.ram_guest_base + board.ram.size,
                     f"each VM's RAM (ram.region.size {board.ram.size:#x})"))
    for key, end, what in ends:
        if end - 1 > U64_MAX:
            raise ConfigError(file, key, f"{what} would end at {end - 1:#x}, past 64 bits "
                                         f"(0x{U64_MAX:x})")
    for key, spec, vms in (("trap.region", board.trap, 1), ("ram.region", board.ram, lay.max_vms),
                           ("gic.region", board.gic and board.gic.region, 1)):
        if not spec or spec.file is None:
            continue
        last = spec.offset + (vms - 1) * spec.vm_stride + spec.size - 1
        if last > OFF_MAX:
            culprit = ("size" if spec.size > OFF_MAX else
                       "vm_stride" if spec.offset + spec.size - 1 <= OFF_MAX else "offset")
            raise ConfigError(file, f"{key}.{culprit}",
                              f"the region would end at file offset {last:#x}, past "
                              f"{OFF_MAX:#x} (2**63 - 1: files' offsets are signed 64-bit)")


def _check_interrupts(board, lines):
    """Board SPIs: one per guest INTID, distinct, on the GIC, not reserved, not the doorbell."""
    file, lay = board.path, board.layout
    key = "interrupts.board_intids"
    needed = lay.irqs_per_vm * lay.max_vms
    if len(board.board_intids) != needed:
        raise ConfigError(file, key, f"lists {len(board.board_intids)} INTIDs but the layout has "
                                     f"{needed} guest INTIDs (layout.max_vms {lay.max_vms} x "
                                     f"irqs_per_vm {lay.irqs_per_vm}): one board SPI per guest "
                                     "INTID, in order")
    seen = set()
    reserved = [("interrupts.doorbell_intid (the trap doorbell)", IntidRange(d, d))
                for d in (board.doorbell_intid,) if d is not None]
    reserved += [(f"interrupts.reserved_intids entry {entry}", entry)
                 for entry in board.reserved_intids]
    for intid in board.board_intids:
        if intid in seen:
            raise ConfigError(file, key, f"INTID {intid} is listed twice")
        seen.add(intid)
        if intid >= lines:
            raise ConfigError(file, key, f"INTID {intid} is past the GIC's {lines} lines "
                                         f"(INTIDs up to {lines - 1})")
        if board.interrupts == "gic":
            for what, entry in reserved:
                if intid in entry:
                    raise ConfigError(file, key, f"INTID {intid} is reserved by {what}: "
                                                 "choose SPIs no device of the SoC uses")
    if board.doorbell_intid is not None:
        key = "interrupts.doorbell_intid"
        if board.doorbell_intid >= lines:
            raise ConfigError(file, key, f"INTID {board.doorbell_intid} is past the GIC's "
                                         f"{lines} lines (INTIDs up to {lines - 1})")
        for entry in board.reserved_intids:
            if board.doorbell_intid in entry:
                raise ConfigError(file, key, f"INTID {board.doorbell_intid} is reserved by "
                                             f"interrupts.reserved_intids entry {entry}")
    if board.gic is not None and board.gic.version != "v3":
        for cpu in board.target_cpus:
            if cpu > 7:
                raise ConfigError(file, "interrupts.target_cpu",
                                  f"{cpu}: a GIC{board.gic.version} targets CPU interfaces 0..7 "
                                  "(GICD_ITARGETSR)")


def load_board(path):
    """Read and check a board file; ``ConfigError`` (file, key, problem) if anything is wrong."""
    path = Path(path)
    data = read_toml(path, "board file", shipped_hint)
    if "board" not in data and "vm" in data:
        raise ConfigError(path, None, f"a VMs config (for --config), not a board file; "
                                      f"{shipped_hint()}")
    board = _parse(path, data)
    _check(board)
    return board
