"""UIO discovery, mapping and interrupts on fake sysfs and /dev trees built in tmp dirs.

What is real: the sysfs attribute files (laid out and formatted as the kernel
does, class/uio/uioN a symlink into devices/), the mmap of the device node at
``map index * page size``, the file descriptors and select(). What is not: the
device node. A regular file stands in for memory maps (real mmap, real shared
pages). For interrupts a FIFO stands in: the test writes a 4-byte count where
the kernel would, and reads back what ``enable()``/``disable()`` write (on a
real /dev/uioN those writes go to the driver, not back to the reader). So these
tests prove the file formats, offsets, byte counts and timeouts, not the
kernel's interrupt behaviour.
"""

import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from avatar_hw.errors import AvatarError, DeviceNotFound
from avatar_hw.hw import uio
from avatar_hw.hw.uio import PAGE_SIZE, find_uio, list_uio
from avatar_hw.loop import EventLoop
from avatar_hw.testing.fake_uio import make_tree

TRAP = ("avatar-trap", [(0x1FFF0000, 0x1000, 0, "trap")])
GICD = ("avatar-gicd", [(0xFF841000, 0x1000, 0, None)])
RAM = ("avatar-vm0-ram", [(0x20000000, 0x4000, 0, "ram"), (0x24000000, 0x1000, 0x100, "ctl")])


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path, {0: TRAP, 2: RAM, 10: GICD})


def test_find_uio_reads_name_number_node_and_maps(tree):
    device = find_uio("avatar-vm0-ram", **tree)
    assert device.name == "avatar-vm0-ram" and device.number == 2
    assert device.dev_path == Path(tree["dev_root"]) / "uio2"
    assert [(m.index, m.addr, m.size, m.offset, m.name) for m in device.maps] == [
        (0, 0x20000000, 0x4000, 0, "ram"), (1, 0x24000000, 0x1000, 0x100, "ctl")]


def test_list_uio_is_in_device_number_order(tree):
    assert [(d.number, d.name) for d in list_uio(**tree)] == [
        (0, "avatar-trap"), (2, "avatar-vm0-ram"), (10, "avatar-gicd")]


def test_missing_device_is_one_line_naming_it_and_the_fix(tree):
    with pytest.raises(DeviceNotFound) as err:
        find_uio("avatar-vm1-ram", **tree)
    message = str(err.value)
    assert "\n" not in message
    for part in ("'avatar-vm1-ram'", "present: avatar-trap, avatar-vm0-ram, avatar-gicd",
                 "scripts/avatar-rpi4-overlay.dts", "avatar_uio", "scripts/install-board",
                 "udev/99-avatar-hw.rules"):
        assert part in message


def test_real_sys_is_read_through_pyudev(monkeypatch):
    """This machine has no UIO devices: udev is asked and finds none."""
    import pyudev
    asked = []
    real_list_devices = pyudev.Context.list_devices

    def spy(context, **match):
        asked.append(match)
        return real_list_devices(context, **match)

    monkeypatch.setattr(pyudev.Context, "list_devices", spy)
    with pytest.raises(DeviceNotFound, match="'avatar-trap' not found in /sys"):
        find_uio("avatar-trap")
    assert asked == [{"subsystem": "uio"}]


def test_real_sys_falls_back_to_sysfs_when_udev_fails(monkeypatch):
    import pyudev

    def broken(*args, **kwargs):
        raise ImportError("libudev.so.1: cannot open shared object file")

    monkeypatch.setattr(pyudev, "Context", broken)
    globbed = []
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: globbed.append((str(self), pattern))
                        or real_glob(self, pattern))
    with pytest.raises(DeviceNotFound, match="'avatar-trap' not found in /sys"):
        find_uio("avatar-trap")
    assert globbed[0] == ("/sys/class/uio", "uio[0-9]*")


def test_map_selects_the_map_by_page_offset_and_writes_through(tree):
    device = find_uio("avatar-vm0-ram", **tree)
    with device.map(0) as ram:
        assert (ram.name, ram.phys_addr, ram.size) == ("ram", 0x20000000, 0x4000)
        assert ram.read32(0) == 0x01010101 and ram.read8(0x3FFF) == 1
        ram.write64(0x3FF8, 0x1122334455667788)
    with device.map(1) as ctl:
        # registers start 0x100 into the page; the region ends with the map
        assert (ctl.name, ctl.phys_addr, ctl.size) == ("ctl", 0x24000100, 0x1000 - 0x100)
        assert ctl.read32(0) == 0x02020202
        ctl.write32(0, 0xCAFEF00D)
    with open(device.dev_path, "rb") as node:
        assert os.pread(node.fileno(), 8, 0x3FF8) == (0x1122334455667788).to_bytes(8, "little")
        assert os.pread(node.fileno(), 4, PAGE_SIZE + 0x100) == (0xCAFEF00D).to_bytes(4, "little")
        assert os.pread(node.fileno(), 4, PAGE_SIZE + 0xFC) == b"\x02" * 4


def test_map_without_a_name_is_named_after_the_device(tree):
    with find_uio("avatar-gicd", **tree).map(0) as gicd:
        assert gicd.name == "avatar-gicd" and gicd.phys_addr == 0xFF841000


def test_map_larger_than_the_node_is_one_line(tree):
    os.truncate(Path(tree["dev_root"]) / "uio10", 0)
    with pytest.raises(AvatarError, match=r"uio10 \(UIO device avatar-gicd\): cannot map map 0 "
                                          r"\(0x1000 bytes\): "):
        find_uio("avatar-gicd", **tree).map(0)


@pytest.mark.parametrize("addr, size, problem", [
    (0x20000800, 0x1000, "physical address 0x20000800 is not a multiple of the page size 0x1000"),
    (0x20000000, 0x800, "0x800 bytes, smaller than a page (0x1000 bytes)"),
    (0x20000000, 0x1800, "0x1800 bytes, not a whole number of pages (0x1000 bytes)"),
])
def test_map_linux_cannot_mmap_is_one_line_naming_the_node_and_page_size(
        tmp_path, monkeypatch, addr, size, problem):
    monkeypatch.setattr(uio, "PAGE_SIZE", 0x1000)
    tree = make_tree(tmp_path, {3: ("avatar-trap", [(addr, size, 0, "trap")])})
    with pytest.raises(AvatarError) as err:
        find_uio("avatar-trap", **tree).map(0)
    assert str(err.value) == (
        f"{tree['dev_root']}/uio3 (UIO device avatar-trap) map 0: {problem}; a UIO map must "
        "start on a page boundary and be a whole number of pages (Linux's uio_mmap_physical): "
        "fix the reg of the device-tree node, or of the reserved-memory node its memory-region "
        "names")


def test_a_4k_trap_page_on_a_16k_page_kernel_is_refused(tree, monkeypatch):
    monkeypatch.setattr(uio, "PAGE_SIZE", 0x4000)      # what os.sysconf says on such a kernel
    with pytest.raises(AvatarError, match=r"UIO device avatar-trap\) map 0: 0x1000 bytes, "
                                          r"smaller than a page \(0x4000 bytes\)"):
        find_uio("avatar-trap", **tree).map(0)
    with find_uio("avatar-vm0-ram", **tree).map(0) as ram:      # 16 KiB: one such page
        assert ram.size == 0x4000


def test_page_size_is_the_kernels():
    assert PAGE_SIZE == os.sysconf("SC_PAGE_SIZE")


def test_map_index_past_the_maps_is_refused(tree):
    with pytest.raises(DeviceNotFound, match=r"avatar-trap .*has no map 1 \(it has 1\)"):
        find_uio("avatar-trap", **tree).map(1)


def error_in_child(action, uid=None):
    """Run ``action`` in a forked child (as ``uid`` when given); its AvatarError text or ''."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        message = ""
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            action()
        except AvatarError as err:
            message = str(err)
        except BaseException as err:
            message = f"unexpected {err!r}"
        finally:
            os.write(write_end, message.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.fixture
def shared_tmp():
    """A temporary directory other users can traverse (pytest's own is private to us)."""
    path = Path(tempfile.mkdtemp(prefix="avatar-uio-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def test_permission_denied_names_the_node_and_the_fix(shared_tmp):
    tree = make_tree(shared_tmp, {3: TRAP})
    node = Path(tree["dev_root"]) / "uio3"
    device = find_uio("avatar-trap", **tree)
    # Root ignores file modes, so as root a child that is not root does the mapping.
    uid = 65534 if os.geteuid() == 0 else None
    os.chmod(node, 0o666)
    assert error_in_child(device.map, uid) == ""          # control: readable, it maps
    os.chmod(node, 0o600 if uid is not None else 0)
    assert error_in_child(device.map, uid) == (
        f"{node} (UIO device avatar-trap): permission denied; {uio.SETUP_HINT}")


@pytest.fixture
def irq_device(tmp_path):
    tree = make_tree(tmp_path, {0: TRAP}, node="fifo")
    device = find_uio("avatar-trap", **tree)
    # The "kernel side" of the fake node: our own read and write ends of the FIFO.
    kernel = os.open(device.dev_path, os.O_RDWR | os.O_NONBLOCK)
    yield device, kernel
    device.close()
    os.close(kernel)


def test_wait_times_out_then_returns_the_event_count(irq_device):
    device, kernel = irq_device
    assert device.wait(timeout=0.01) is None
    os.write(kernel, (7).to_bytes(4, sys.byteorder))
    assert device.wait(timeout=5) == 7
    os.write(kernel, (8).to_bytes(4, sys.byteorder))
    assert device.wait() == 8                       # blocking form


def test_enable_and_disable_write_four_bytes(irq_device):
    device, kernel = irq_device
    device.enable()
    assert os.read(kernel, 16) == (1).to_bytes(4, sys.byteorder)
    device.disable()
    assert os.read(kernel, 16) == (0).to_bytes(4, sys.byteorder)


def test_fileno_wakes_an_event_loop(irq_device):
    device, kernel = irq_device
    loop, counts = EventLoop(), []
    loop.add_reader(device.fileno(), lambda: counts.append(device.wait(timeout=0)))
    loop.run_once(0.01)
    assert counts == []
    os.write(kernel, (3).to_bytes(4, sys.byteorder))
    loop.run_once(5)
    assert counts == [3]


def test_short_interrupt_read_is_an_error(irq_device):
    device, kernel = irq_device
    os.write(kernel, b"\x01\x00")
    with pytest.raises(AvatarError, match="returned 2 bytes, not 4"):
        device.wait(timeout=5)


@pytest.mark.parametrize("call, action", [("write", "enable"), ("read", "wait")])
def test_a_device_without_an_interrupt_is_one_line_naming_the_node(irq_device, monkeypatch,
                                                                    call, action):
    """The UIO core answers EIO to the interrupt read and write of a device registered
    without an interrupt (drivers/uio/uio.c); the fake node is a FIFO, so that is stood in."""
    device, kernel = irq_device
    os.write(kernel, (1).to_bytes(4, sys.byteorder))

    def eio(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(uio.os, call, eio)
    with pytest.raises(AvatarError) as error:
        getattr(device, action)()
    assert str(error.value) == (
        f"{device.dev_path} (UIO device avatar-trap) has no interrupt (EIO): check the "
        "interrupts of its device-tree node avatar-trap in the overlay, and dmesg | grep "
        "avatar_uio")
