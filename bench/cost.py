"""The daemon's cost: CPU per GiB moved, and resident memory with 8 VMs x 4 devices.

``avatar-hw serve`` runs as a subprocess on a ``FakeBoard`` (trap page and
guest RAM are shared files in a fake UIO tree); the Python stand-in stub
plays the guest driver through the trap page (``StandinStub.driver``). The
daemon's CPU time is read from /proc/PID/stat before and after, so only the
serving process is counted (the driver's own work is in another process).

- block: sequential 1 MiB reads and writes and 4 KiB reads against a raw
  image in /tmp (page cache), ``DEPTH`` requests in flight, one notify per
  refill; CPU seconds per GiB and CPU µs per request;
- console: guest->host through a ``file:`` endpoint, 64 KiB buffers; CPU s/GiB;
- memory: VmRSS / RssAnon / RssFile / RssShmem of a daemon serving 8 VMs with
  4 devices each, after start-up and after every device reached DRIVER_OK;
- hostile memory: the same 8 VMs (consoles on Unix sockets whose clients never
  read) with every queue of every device at its maximum size and flooded, round
  after round, with chains of the longest length accepted (queue-size indirect
  tables of tiny descriptors) and 32768-entry tables; VmHWM is the daemon's peak.
"""

import importlib.util
import os
import socket
import struct
import tempfile
import time
from pathlib import Path

from avatar_hw.errors import AvatarError
from avatar_hw.layout import Layout
from avatar_hw.testing.driver import VirtioDriver
from avatar_hw.testing.hostile import flood, forget_used
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub
from avatar_hw.virtio import constants as vc

from .common import Child, table

GIB = 1 << 30
DEPTH = 8
BLK_T_IN, BLK_T_OUT = 0, 1
BLK_F_SIZE_MAX, BLK_F_SEG_MAX = 1, 2
SECTOR = 512
VMS, DEVICES_PER_VM = 8, 4


def device_kinds_available():
    """The device kinds whose module exists in this tree (others are still being written)."""
    modules = {"console": "avatar_hw.devices.console", "block": "avatar_hw.devices.block",
               "rng": "avatar_hw.devices.rng", "net": "avatar_hw.devices.net"}
    return [kind for kind, module in modules.items() if importlib.util.find_spec(module)]


class ServedBoard:
    """A FakeBoard, the stand-in stub and ``avatar-hw serve`` with the VMs config
    ``config(board_root)`` (a function returning TOML text)."""

    def __init__(self, root, config, *, vms=1, ram_size=64 << 20, extra=()):
        self.board = FakeBoard(Path(root) / "board", vms=vms, ram_size=ram_size)
        self.stub = StandinStub(self.board)
        path = self.board.root / "vms.toml"
        path.write_text(config(self.board.root))
        self.log_path = self.board.root / "daemon.log"
        self._log = open(self.log_path, "w")
        self.daemon = Child(self.board.serve_argv(path, "--log-level", "warning", *extra),
                            stdout=self._log, stderr=self._log)
        try:
            self.stub.page.wait_attached(30)
        except Exception:
            self.close()
            raise AvatarError(f"the daemon did not attach: {self.log_path.read_text()[-800:]}")

    def close(self):
        self.daemon.stop()
        self._log.close()
        self.stub.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_used(stub, queue, timeout=30.0):
    """Used buffers of ``queue``, sleeping on the stub's interrupt FIFO until there are some."""
    deadline = time.monotonic() + timeout
    while not (used := queue.get_used(read_data=False)):
        if time.monotonic() > deadline:
            raise AvatarError(f"queue {queue.index}: no used buffer within {timeout} s")
        stub.wait_irqs(0.01)
    return used


# -- block -------------------------------------------------------------------------------------

class BlockLoad:
    """Sequential requests of ``size`` bytes, ``DEPTH`` in flight, through the trap page."""

    def __init__(self, served, image_size, size):
        self.stub = served.stub
        self.driver = served.stub.driver(0, 0)
        self.queue, = self.driver.init([0], buf_size=0)
        features = self.driver.features
        self.size = size
        size_max = self.driver.read_config(8) if features & (1 << BLK_F_SIZE_MAX) else size
        seg_max = self.driver.read_config(12) if features & (1 << BLK_F_SEG_MAX) else 1 << 16
        self.seg_len = min(size, size_max)
        if -(-size // self.seg_len) > seg_max:
            raise AvatarError(f"block device: {size}-byte requests need more than seg_max "
                              f"{seg_max} segments of {self.seg_len}")
        ram = self.driver.ram
        self.slots = [(ram.alloc(16, 16), ram.alloc(size, 4096), ram.alloc(1, 1))
                      for _ in range(DEPTH)]
        self.sectors = image_size // SECTOR
        self.next_sector = 0

    def _post(self, slot, kind):
        header, data, status = self.slots[slot]
        self.driver.ram.write(header, struct.pack("<IIQ", kind, 0, self.next_sector))
        self.next_sector = (self.next_sector + self.size // SECTOR) % self.sectors
        writable = kind == BLK_T_IN
        segments = [(header, 16, False)]
        segments += [(data + off, min(self.seg_len, self.size - off), writable)
                     for off in range(0, self.size, self.seg_len)]
        segments.append((status, 1, True))
        head = self.queue.add_chain(segments)
        self.heads[head] = slot

    def run(self, kind, total_bytes):
        """Move ``total_bytes``; returns (requests, wall seconds)."""
        requests = total_bytes // self.size
        self.heads = {}
        posted = done = 0
        start = time.perf_counter()
        while posted < min(DEPTH, requests):
            self._post(posted, kind)
            posted += 1
        self.queue.notify()
        while done < requests:
            free = []
            for used in wait_used(self.stub, self.queue):
                slot = self.heads.pop(used.head)
                status = self.driver.ram.read(self.slots[slot][2], 1)[0]
                if status != 0:
                    raise AvatarError(f"block request failed with status {status}")
                free.append(slot)
                done += 1
            for slot in free:
                if posted < requests:
                    self._post(slot, kind)
                    posted += 1
            if free and posted > done:
                self.queue.notify()
        return requests, time.perf_counter() - start


def block_cost(tmp, quick):
    image_size = (32 if quick else 512) << 20
    Path(tmp).mkdir(parents=True, exist_ok=True)
    image = Path(tmp) / "disk.img"
    with open(image, "wb") as f:
        f.truncate(image_size)
    cases = [("read", BLK_T_IN, 1 << 20, (64 << 20) if quick else 2 * GIB),
             ("write", BLK_T_OUT, 1 << 20, (64 << 20) if quick else GIB),
             ("read", BLK_T_IN, 4096, (8 << 20) if quick else 128 << 20)]
    rows = []
    with ServedBoard(tmp, lambda root: f'[vm.0]\nblock = {{ image = "{image}" }}\n') as served:
        for size in sorted({case[2] for case in cases}, reverse=True):
            load = BlockLoad(served, image_size, size)
            for name, kind, case_size, total in cases:
                if case_size != size:
                    continue
                cpu_before = served.daemon.cpu_seconds()
                requests, wall = load.run(kind, total)
                cpu = served.daemon.cpu_seconds() - cpu_before
                rows.append({"op": f"{name} {size >> 10} KiB", "bytes": requests * size,
                             "requests": requests, "wall_s": round(wall, 3),
                             "MiB_per_s": round(requests * size / wall / (1 << 20), 1),
                             "daemon_cpu_s": cpu,
                             "cpu_s_per_GiB": round(cpu / (requests * size / GIB), 3),
                             "cpu_us_per_request": round(cpu * 1e6 / requests, 1)})
    return rows


# -- console -----------------------------------------------------------------------------------

def console_cost(tmp, quick, chunk=64 << 10, *, record=False):
    """Guest->host console bytes; ``record``: served with ``--record`` (avatar_hw.replay),
    the row also gives the recording's size per MiB moved."""
    total = ((16 if record else 64) << 20) if quick else ((256 << 20) if record else GIB)
    recording = Path(tmp) / "session.avrr"
    def config(root):
        return f'[vm.0]\nconsole = {{ endpoints = ["file:{root}/console.out"] }}\n'
    extra = ("--record", str(recording)) if record else ()
    with ServedBoard(tmp, config, extra=extra) as served:
        driver = served.stub.driver(0, 0)
        _, tx = driver.init([0, 1], buf_size=chunk, size=64)
        # 17 incompressible payloads in turn (17 is prime to the 64 slots): each slot's
        # content changes every round, as a real guest's buffers do.
        payloads = [os.urandom(chunk) for _ in range(17)]
        cpu_before = served.daemon.cpu_seconds()
        start = time.perf_counter()
        sent = 0
        while sent < total:
            while sent < total and tx.free:
                tx.post(readable=[payloads[(sent // chunk) % len(payloads)]])
                sent += chunk
            tx.notify()
            wait_used(served.stub, tx)
        while tx.outstanding:
            wait_used(served.stub, tx)
        wall = time.perf_counter() - start
        cpu = served.daemon.cpu_seconds() - cpu_before
        out = served.board.root / "console.out"
        deadline = time.monotonic() + 10
        while out.stat().st_size < total and time.monotonic() < deadline:
            time.sleep(0.05)
        if out.stat().st_size != total:
            raise AvatarError(f"console: {out.stat().st_size} bytes reached the file, "
                              f"expected {total}")
    row = {"op": f"console guest->host {chunk >> 10} KiB buffers" + (" --record" if record else ""),
           "bytes": total, "requests": total // chunk, "wall_s": round(wall, 3),
           "MiB_per_s": round(total / wall / (1 << 20), 1), "daemon_cpu_s": cpu,
           "cpu_s_per_GiB": round(cpu / (total / GIB), 3),
           "cpu_us_per_request": round(cpu * 1e6 / (total // chunk), 1)}
    if record:
        row["record_bytes_per_MiB"] = round(recording.stat().st_size / (total >> 20))
    return [row]


# -- memory ------------------------------------------------------------------------------------

def device_table(kind, vm, index, tmp):
    if kind == "console":
        return f'{{ endpoints = ["file:{tmp}/vm{vm}-{index}.log"] }}'
    if kind == "block":
        image = Path(tmp) / f"vm{vm}-{index}.img"
        image.parent.mkdir(parents=True, exist_ok=True)
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        return f'{{ image = "{image}" }}'
    if kind == "rng":
        return "{ }"
    return f'{{ switch = "{tmp}/switch.sock" }}'


def memory_config(tmp, kinds, table=device_table):
    """8 VMs, each with DEVICES_PER_VM devices: one of each kind available, then consoles;
    ``table(kind, vm, index, tmp)`` is a device's config table."""
    per_vm = (kinds + ["console"] * DEVICES_PER_VM)[:DEVICES_PER_VM]
    lines = []
    for vm in range(VMS):
        lines.append(f"[vm.{vm}]")
        for kind in dict.fromkeys(per_vm):
            tables = [table(kind, vm, i, tmp) for i, k in enumerate(per_vm) if k == kind]
            lines.append(f"{kind} = [{', '.join(tables)}]")
    return "\n".join(lines) + "\n", per_vm


def drive_every_device(served, slots, set_up_queue):
    """A ``VirtioDriver`` for each of every VM's first ``slots`` devices: features
    negotiated, ``set_up_queue(driver, ram, index)`` for each queue, then DRIVER_OK."""
    for vm in range(VMS):
        mmio = served.stub.page.mmio(vm, 0)
        for slot in range(slots):
            ram = served.stub.guest_ram(vm, alloc_start=(1 + slot) << 20)
            driver = VirtioDriver(mmio, Layout().window(vm, slot), ram)
            driver.negotiate()
            for index in range(_queue_count(driver)):
                set_up_queue(driver, ram, index)
            driver.driver_ok()


def memory(tmp):
    kinds = device_kinds_available()
    config, per_vm = memory_config(tmp, kinds)
    out = {"vms": VMS, "devices_per_vm": per_vm, "note":
           "RSS of the daemon process; guest RAM here is a shared file mapping (RssFile/RssShmem "
           "count only the pages the daemon touched); on a board it is a UIO mapping, "
           "not counted. RssAnon is the daemon's own memory."}
    def baseline(root):
        return f'[vm.0]\nconsole = {{ endpoints = ["file:{root}/c.log"] }}\n'
    with ServedBoard(Path(tmp) / "one", baseline, vms=1, ram_size=16 << 20) as served:
        time.sleep(0.2)
        out["one_vm_one_console"] = served.daemon.status()
    with ServedBoard(Path(tmp) / "many", lambda root: config, vms=VMS,
                     ram_size=16 << 20) as served:
        time.sleep(0.2)
        out["after_start"] = served.daemon.status()
        drive_every_device(served, len(per_vm),
                           lambda driver, ram, index: driver.setup_queue(index, 64, buf_size=0))
        out["after_driver_ok"] = served.daemon.status()
    return out


HOSTILE_ROUNDS = 6


def hostile_memory(tmp, quick=False):
    """Peak RSS of the daemon while every VM floods every queue (see the docstring)."""
    tmp = Path(tmp)

    def table(kind, vm, index, tmp):
        if kind == "console":
            return f'{{ endpoints = ["unix:{tmp}/vm{vm}-{index}.sock"] }}'
        return device_table(kind, vm, index, tmp)
    config, per_vm = memory_config(tmp, device_kinds_available(), table)
    clients = []
    with ServedBoard(tmp / "board", lambda root: config, vms=VMS, ram_size=16 << 20) as served:
        for path in sorted(tmp.glob("vm*.sock")):       # clients that never read
            client = socket.socket(socket.AF_UNIX)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(str(path))
            clients.append(client)
        queues = []

        def set_up(driver, ram, index):
            q = driver.setup_queue(index, buf_size=0)
            data = ram.alloc(4096, 16)
            ram.write(data, struct.pack("<IIQ", BLK_T_IN, 0, 0))
            queues.append((q, data, ram.alloc(16 * 32768, 16), index % 2 == 0))
        drive_every_device(served, len(per_vm), set_up)
        root = served.board.root
        before = {**served.daemon.status(), "RssWithoutGuestRam": served.daemon.rss_outside(root)}
        for round_ in range(2 if quick else HOSTILE_ROUNDS):
            entries = 32768 if round_ % 3 == 2 else None
            for q, data, table_gpa, writable in queues:
                forget_used(q)          # even queues: a header, then device-writable bytes
                if q.free:              # odd ones (console, net transmit): all readable
                    n = entries or q.size
                    flood(q, table_gpa, [(data, 16, False)] + [(data + 512, 1, writable)] * (n - 1))
                q.notify()
            time.sleep(0.5)
        for q, *_ in queues:
            forget_used(q)
        after = {**served.daemon.status(), "RssWithoutGuestRam": served.daemon.rss_outside(root)}
        alive = served.daemon.process.poll() is None
    for client in clients:
        client.close()
    return {"before": before, "after": after, "daemon_alive": alive,
            "queues_flooded": len(queues), "rounds": 2 if quick else HOSTILE_ROUNDS}


def _queue_count(driver):
    """How many queues the device has (QueueNumMax non-zero)."""
    count = 0
    while True:
        driver.write(vc.REG_QUEUE_SEL, count)
        if not driver.read(vc.REG_QUEUE_NUM_MAX):
            return count
        count += 1


# -- the part ------------------------------------------------------------------------------------

def run(quick=False):
    out = {"kinds_available": device_kinds_available(), "throughput": []}
    with tempfile.TemporaryDirectory(prefix="avatar-bench-cost-") as tmp:
        out["throughput"] += console_cost(Path(tmp) / "console", quick)
        out["throughput"] += console_cost(Path(tmp) / "console-record", quick, record=True)
        if "block" in out["kinds_available"]:
            out["throughput"] += block_cost(Path(tmp) / "block", quick)
        else:
            out["block"] = "not measured: avatar_hw.devices.block does not exist in this tree yet"
        out["memory"] = memory(Path(tmp) / "memory")
        out["hostile_memory"] = hostile_memory(Path(tmp) / "hostile", quick)
    report(out)
    return out


def report(out):
    table("Daemon CPU per GiB (avatar-hw serve, driven through the trap page by the stand-in)",
          ["transfer", "MiB", "requests", "MiB/s", "daemon CPU s", "CPU s/GiB", "CPU µs/request"],
          [[r["op"], r["bytes"] >> 20, r["requests"], r["MiB_per_s"], f"{r['daemon_cpu_s']:.2f}",
            r["cpu_s_per_GiB"], r["cpu_us_per_request"]] for r in out["throughput"]])
    for r in out["throughput"]:
        if "record_bytes_per_MiB" in r:
            print(f"  {r['op']}: the recording holds {r['record_bytes_per_MiB']} bytes per MiB "
                  f"moved")
    if "block" in out:
        print(f"  block: {out['block']}")
    mem = out["memory"]
    keys = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
    table(f"Daemon memory, kB (8 VMs x {'/'.join(mem['devices_per_vm'])})", ["state", *keys],
          [[name, *(mem[name].get(k, "-") for k in keys)]
           for name in ("one_vm_one_console", "after_start", "after_driver_ok")])
    hostile = out["hostile_memory"]
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssWithoutGuestRam")
    table(f"Daemon memory under hostile guests, kB ({hostile['queues_flooded']} queues "
          f"flooded, {hostile['rounds']} rounds; daemon alive: {hostile['daemon_alive']})",
          ["state", *keys], [[name, *(hostile[name].get(k, "-") for k in keys)]
                             for name in ("before", "after")])
