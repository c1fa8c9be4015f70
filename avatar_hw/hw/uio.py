"""Linux UIO devices: find them by name, map their regions, wait for their interrupts.

The hypervisor's carve-outs (trap page, each guest's RAM, the GIC distributor)
reach Linux as device-tree nodes (scripts/avatar-rpi4-overlay.dts) that a UIO
driver makes ``/dev/uioN``, named after the node, with its memory maps described
under ``/sys/class/uio/uioN/maps/mapM/{addr,size,name,offset}``:

- ``find_uio(name)`` finds the device whose ``name`` attribute matches, through
  pyudev when looking at the real /sys, else (a test tree, or no usable udev)
  by reading ``<sysfs_root>/class/uio/uio*/name``;
- ``UioDevice.map(m)`` maps map ``m``: the kernel selects it by the mmap offset
  ``m * page size``; the registers start ``offset`` bytes into the first page.
  Nothing rounds for us: ``avatar_uio`` (boards/linux) and ``uio_pdrv_genirq``
  (Linux 6.1) report the node's region as it is, and ``uio_mmap_physical``
  refuses a map whose ``addr`` is not page-aligned (ENODEV) or a mapping
  longer than ``size`` (EINVAL), so a map that is not page-aligned, or not a
  whole number of pages (a 4 KiB trap page on a 16 KiB-page kernel), is
  refused here with one line naming the
  node and the page size (``os.sysconf("SC_PAGE_SIZE")``);
- interrupts: ``wait()`` reads the 4-byte event count, ``enable()``/``disable()``
  write 1/0, ``fileno()`` goes into a selector loop.

Shared memory (trap page, guest RAM) follows the ordering rule in
``avatar_hw.hw.ordering``: publish data, then the state word with a
store-release; read the state word with a load-acquire, then the data.
"""

import errno
import logging
import mmap
import os
import select
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import AvatarError, DeviceNotFound
from .region import Region

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PAGE_HINT = ("a UIO map must start on a page boundary and be a whole number of pages "
             "(Linux's uio_mmap_physical): fix the reg of the device-tree node, or of the "
             "reserved-memory node its memory-region names")
SETUP_HINT = ("install the udev rules (scripts/install-udev-rules) and join group 'avatar' "
              "(sudo usermod -aG avatar $USER, then log in again)")


@dataclass(frozen=True)
class UioMap:
    index: int
    addr: int          # physical address of the map (mmap needs it page-aligned)
    size: int          # bytes (mmap needs a whole number of pages)
    offset: int        # where the device's registers start inside the first page
    name: str | None

    def page_problem(self, page_size):
        """Why Linux cannot mmap this map with ``page_size``-byte pages (None: it can)."""
        if self.addr % page_size:
            return (f"physical address 0x{self.addr:x} is not a multiple of the page size "
                    f"0x{page_size:x}")
        if self.size < page_size:
            return f"0x{self.size:x} bytes, smaller than a page (0x{page_size:x} bytes)"
        if self.size % page_size:
            return (f"0x{self.size:x} bytes, not a whole number of pages (0x{page_size:x} "
                    "bytes)")
        return None


class UioDevice:
    """One /dev/uioN: its maps and its interrupt."""

    def __init__(self, name, number, sysfs_path, dev_path, maps):
        self.name, self.number = name, number
        self.sysfs_path, self.dev_path = Path(sysfs_path), Path(dev_path)
        self.maps = maps
        self._irq_fd = None

    def __repr__(self):
        return f"<UioDevice {self.name} {self.dev_path} maps={len(self.maps)}>"

    def _open(self, flags):
        try:
            return os.open(self.dev_path, flags | os.O_CLOEXEC)
        except PermissionError:
            raise AvatarError(f"{self.dev_path} (UIO device {self.name}): permission denied; "
                              f"{SETUP_HINT}") from None
        except FileNotFoundError:
            raise DeviceNotFound(f"{self.dev_path} (UIO device {self.name}) is listed in sysfs "
                                 "but has no device node; is udev running?") from None

    def map(self, index=0):
        """A ``Region`` over map ``index``: from its register offset to the end of the map."""
        if not 0 <= index < len(self.maps):
            raise DeviceNotFound(f"UIO device {self.name} ({self.dev_path}) has no map {index} "
                                 f"(it has {len(self.maps)}); check the device-tree node's reg")
        info = self.maps[index]
        problem = info.page_problem(PAGE_SIZE)
        if problem is not None:
            raise AvatarError(f"{self.dev_path} (UIO device {self.name}) map {index}: {problem}; "
                              f"{PAGE_HINT}")
        fd = self._open(os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, info.size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=index * PAGE_SIZE)
        except (OSError, ValueError) as err:
            raise AvatarError(f"{self.dev_path} (UIO device {self.name}): cannot map map {index} "
                              f"(0x{info.size:x} bytes): {err}") from None
        finally:
            os.close(fd)
        registers = memoryview(mapping)[info.offset:]

        def unmap():
            registers.release()
            mapping.close()

        region = Region(registers, name=info.name or self.name,
                        phys_addr=info.addr + info.offset, closer=unmap)
        region.file = (str(self.dev_path), index * PAGE_SIZE + info.offset)
        region.uio_map = index
        return region

    # -- interrupts -------------------------------------------------------------------

    def fileno(self):
        """The interrupt file descriptor (readable when an interrupt came), for selectors."""
        if self._irq_fd is None:
            self._irq_fd = self._open(os.O_RDWR)
        return self._irq_fd

    def wait(self, timeout=None):
        """Wait for an interrupt; return the total event count, or None after ``timeout`` s.

        avatar_uio (like uio_pdrv_genirq) disables the interrupt line each time it fires. Call
        ``enable()`` right after ``wait()`` returns and *before* handling the
        work, so an interrupt that comes during the handling is counted and not
        missed; then handle everything that is pending, then wait again.
        """
        fd = self.fileno()
        if timeout is not None and not select.select([fd], [], [], timeout)[0]:
            return None
        data = self._irq_io(os.read, fd, 4)
        if len(data) != 4:
            raise AvatarError(f"{self.dev_path}: interrupt read returned {len(data)} bytes, "
                              "not 4; does this UIO device have an interrupt?")
        return int.from_bytes(data, sys.byteorder)

    def enable(self):
        """Unmask the interrupt (4-byte write of 1)."""
        self._write_irq_control(1)

    def disable(self):
        """Mask the interrupt (4-byte write of 0)."""
        self._write_irq_control(0)

    def _write_irq_control(self, value):
        self._irq_io(os.write, self.fileno(), value.to_bytes(4, sys.byteorder))

    def _irq_io(self, call, *args):
        """``call(*args)`` on the interrupt fd; EIO, the UIO core's answer for a device
        without an interrupt (drivers/uio/uio.c), is one line naming the node to fix."""
        try:
            return call(*args)
        except OSError as err:
            if err.errno != errno.EIO:
                raise
            raise AvatarError(f"{self.dev_path} (UIO device {self.name}) has no interrupt "
                              f"(EIO): check the interrupts of its device-tree node {self.name} "
                              "in the overlay, and dmesg | grep avatar_uio") from None

    def close(self):
        if self._irq_fd is not None:
            os.close(self._irq_fd)
            self._irq_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_attr(path):
    return path.read_text().strip()


def _read_device(sysfs_path, dev_root):
    sysfs_path = Path(sysfs_path)
    maps = []
    map_dirs = sorted(sysfs_path.glob("maps/map*"), key=lambda p: int(p.name[3:]))
    for map_dir in map_dirs:
        # "offset" and "name" are missing on old kernels.
        offset_file, name_file = map_dir / "offset", map_dir / "name"
        maps.append(UioMap(
            index=int(map_dir.name[3:]),
            addr=int(_read_attr(map_dir / "addr"), 16),
            size=int(_read_attr(map_dir / "size"), 16),
            offset=int(_read_attr(offset_file), 16) if offset_file.exists() else 0,
            name=(_read_attr(name_file) if name_file.exists() else "") or None))
    return UioDevice(name=_read_attr(sysfs_path / "name"), number=int(sysfs_path.name[3:]),
                     sysfs_path=sysfs_path, dev_path=Path(dev_root) / sysfs_path.name, maps=maps)


def _uio_sysfs_paths(sysfs_root):
    """The uioN directories: from udev for the real /sys, else from ``class/uio``."""
    if str(sysfs_root) == "/sys":
        try:
            import pyudev
            return sorted(Path(d.sys_path) for d in pyudev.Context().list_devices(subsystem="uio"))
        except Exception as err:     # no libudev, no /run/udev: read sysfs ourselves
            log.debug("pyudev not usable (%s); reading /sys/class/uio", err)
    return sorted((Path(sysfs_root) / "class" / "uio").glob("uio[0-9]*"))


def list_uio(*, sysfs_root="/sys", dev_root="/dev"):
    """Every UIO device, in uioN order."""
    devices = [_read_device(p, dev_root) for p in _uio_sysfs_paths(sysfs_root)]
    return sorted(devices, key=lambda d: d.number)


def find_uio(name, *, sysfs_root="/sys", dev_root="/dev"):
    """The UIO device called ``name``; ``DeviceNotFound`` (one line, with the fix) if none."""
    devices = list_uio(sysfs_root=sysfs_root, dev_root=dev_root)
    for device in devices:
        if device.name == name:
            return device
    present = ", ".join(d.name for d in devices) or "none"
    raise DeviceNotFound(
        f"UIO device {name!r} not found in {sysfs_root} (present: {present}); load the "
        "avatar_uio driver (scripts/install-board) and the device-tree overlay "
        "(scripts/avatar-rpi4-overlay.dts), and install udev/99-avatar-hw.rules "
        "(docs/board-setup.md)")
