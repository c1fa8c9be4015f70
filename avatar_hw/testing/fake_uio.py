"""A fake UIO tree for tests: sysfs attributes and /dev nodes in a temporary directory.

Laid out and formatted as the kernel does (``class/uio/uioN`` a symlink into
``devices/``, ``maps/mapM/{addr,size,offset,name}``), so ``find_uio`` and
``UioDevice.map`` run unchanged with ``sysfs_root``/``dev_root`` pointed at it.
The device node is a regular file (real mmap: map M at M * page size, its
bytes filled with M + 1) or, with ``node="fifo"``, a FIFO that stands in for
the interrupt side (the test writes the 4-byte counts the kernel would).
"""

import os
from pathlib import Path

from ..hw.uio import PAGE_SIZE


def make_tree(root, devices, node="file"):
    """sysfs and /dev for ``{number: (name, [(addr, size, offset, map name or None)])}``
    (added to the tree already in ``root``, if any)."""
    sys_root, dev_root = Path(root) / "sys", Path(root) / "dev"
    (sys_root / "class" / "uio").mkdir(parents=True, exist_ok=True)
    dev_root.mkdir(exist_ok=True)
    for number, (name, maps) in devices.items():
        device = sys_root / "devices" / "platform" / f"{name}@0" / "uio" / f"uio{number}"
        device.mkdir(parents=True)
        (sys_root / "class" / "uio" / f"uio{number}").symlink_to(device)
        (device / "name").write_text(name + "\n")
        (device / "version").write_text("devicetree\n")
        for index, (addr, size, offset, map_name) in enumerate(maps):
            map_dir = device / "maps" / f"map{index}"
            map_dir.mkdir(parents=True)
            (map_dir / "addr").write_text(f"0x{addr:016x}\n")
            (map_dir / "size").write_text(f"0x{size:016x}\n")
            (map_dir / "offset").write_text(f"0x{offset:x}\n")
            if map_name is not None:
                (map_dir / "name").write_text(map_name + "\n")
        dev_node = dev_root / f"uio{number}"
        if node == "fifo":
            os.mkfifo(dev_node)
        else:
            with open(dev_node, "wb") as f:      # each map's pages filled with its index + 1
                for index, (_, size, _, _) in enumerate(maps):
                    f.seek(index * PAGE_SIZE)
                    f.write(bytes([index + 1]) * size)
    return {"sysfs_root": str(sys_root), "dev_root": str(dev_root)}
