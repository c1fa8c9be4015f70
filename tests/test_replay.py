"""Record and replay (avatar_hw.replay): a console + block + rng session recorded in process,
replayed clean on a model rebuilt with no board and no QEMU, and a changed model caught at
the right trap."""

import json
import os
import random
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from avatar_hw import replay as rr
from avatar_hw.devices import block as blk
from avatar_hw.devices.block import BlockDevice
from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.devices.rng import RngDevice
from avatar_hw.hw.region import Region
from avatar_hw.testing.driver import GuestRam, VirtioDriver
from avatar_hw.testing.virtio import RAM_BASE, IrqRecorder
from avatar_hw.virtio import transport as transport_module
from avatar_hw.virtio.memory import GuestMemory
from avatar_hw.virtio.subsystem import Subsystem
from patching import this_thread_only

RAM_SIZE = 2 << 20


class Session:
    """One VM with a console (file log), a block image and an rng (fixed source)."""

    def __init__(self, tmp_path, image, ram_size=RAM_SIZE):
        self.buffer = bytearray(ram_size)
        self.subsystem = Subsystem(interrupt_line=IrqRecorder())
        self.subsystem.vm_init(0, GuestMemory(Region(memoryview(self.buffer)), RAM_BASE))
        self.ram = GuestRam(self.buffer, RAM_BASE)
        self.devices = [ConsoleDevice(f"file:{tmp_path / 'console.log'}"), BlockDevice(image),
                        RngDevice(source=str(tmp_path / "entropy"))]
        self.windows = [self.subsystem.create_device(0, d).window for d in self.devices]

    def driver(self, slot):
        return VirtioDriver(self.subsystem.handle_mmio_trap, self.windows[slot], self.ram)


def play(session):
    """Console output, a block write then read back, an rng request: the guest's side."""
    con = session.driver(0)
    _, tx = con.init([0, 1], size=8)[:2]
    tx.post(readable=[b"hello from the guest\n"])
    tx.notify()
    tx.get_used()
    con.ack_interrupt()

    block = session.driver(1)
    (q,) = block.init([0], size=8)
    sector = 3
    q.post(readable=[struct.pack("<IIQ", blk.T_OUT, 0, sector), bytes(range(256)) * 2],
           writable=[1])
    q.notify()
    q.post(readable=[struct.pack("<IIQ", blk.T_IN, 0, sector)], writable=[512, 1])
    q.notify()
    used = q.get_used()
    assert [u.data[-1] for u in used] == [0, 0]
    assert used[1].data[:512] == bytes(range(256)) * 2
    block.ack_interrupt()

    rng = session.driver(2)
    (q,) = rng.init([0], size=8)
    q.post(writable=[64])
    q.notify()
    assert q.get_used()[0].data == bytes(range(64))
    rng.ack_interrupt()


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "entropy").write_bytes(bytes(range(256)))
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 512))
    shutil.copy(image, tmp_path / "disk-before.img")
    return tmp_path


def record(workdir):
    path = workdir / "session.avrr"
    session = Session(workdir, workdir / "disk.img")
    recorder = rr.Recorder(session.subsystem, path)
    play(session)
    recorder.close()
    session.subsystem.close()
    return path, recorder.traps


def rebuild(workdir):
    """The ``build`` of ``replay``: the same devices on the image as it was, zeroed RAM."""
    def build(meta):
        assert meta["vms"]["0"] == {"base": RAM_BASE, "size": RAM_SIZE}
        shutil.copy(workdir / "disk-before.img", workdir / "disk-replay.img")
        # Other entropy than recorded: replay feeds the rng the recorded bytes.
        (workdir / "entropy").write_bytes(bytes(255 - i for i in range(256)))
        return Session(workdir, workdir / "disk-replay.img").subsystem
    return build


def test_replay_session_clean(workdir):
    path, traps = record(workdir)
    assert traps > 50
    replayed, difference = rr.replay(path, rebuild(workdir))
    assert difference is None
    assert replayed == traps


def test_replay_catches_changed_register_answer(workdir, monkeypatch):
    path, _ = record(workdir)
    meta, records = rr.read_records(path)
    steps = list(rr._steps(records))
    # The first read of QueueNumMax (0x34): a changed answer must be named at that trap.
    target = next(n for n, s in enumerate(steps) if s[1][1] == 0x34 and not s[1][3])
    original = transport_module.MmioTransport.read

    def changed(self, offset, size):
        value = original(self, offset, size)
        return value - 1 if offset == 0x34 else value
    monkeypatch.setattr(transport_module.MmioTransport, "read",
                        this_thread_only(original, changed))
    replayed, difference = rr.replay(path, rebuild(workdir))
    assert replayed == target + 1
    assert difference.startswith(f"trap {target} (read window 0 offset 0x34 size 4)")


def test_replay_catches_changed_used_length(workdir, monkeypatch):
    path, _ = record(workdir)
    meta, records = rr.read_records(path)
    steps = list(rr._steps(records))
    # The rng request: the last QueueNotify (0x50 write) of window 2.
    target = max(n for n, s in enumerate(steps) if s[1][:2] == (2, 0x50) and s[1][3])
    from avatar_hw.virtio.queue import Virtqueue
    original = Virtqueue.add_used

    def short(self, chain, length, *args, **kw):
        return original(self, chain, max(length - 1, 0) if length == 64 else length, *args, **kw)
    monkeypatch.setattr(Virtqueue, "add_used", this_thread_only(original, short))
    replayed, difference = rr.replay(path, rebuild(workdir))
    assert replayed == target + 1, difference
    assert difference.startswith(f"trap {target} (write window 2 offset 0x50 size 4): guest page")


def test_replay_refuses_other_and_damaged_files_with_one_line(workdir, tmp_path):
    bad = tmp_path / "not-a-recording"
    bad.write_bytes(b"hello")
    with pytest.raises(rr.ReplayFormatError, match="not an avatar-hw recording"):
        rr.read_records(bad)
    path, _ = record(workdir)
    data = path.read_bytes()
    at = 10 + struct.unpack_from("<I", data, 6)[0]
    while data[at] != rr.GUEST_PAGE:                   # the first page record
        at += 5 + struct.unpack_from("<I", data, at + 1)[0]
    # Damage its compressed content (the zlib header), then cut the file short.
    damaged = bytearray(data)
    damaged[at + 5 + 9:at + 5 + 11] = b"\xff\xff"
    for name, content, error in (("damaged", damaged, "bad record"),
                                 ("cut", data[:len(data) - 3], "no end record: cut after")):
        (tmp_path / name).write_bytes(bytes(content))
        with pytest.raises(rr.ReplayFormatError, match=error):
            rr.replay(tmp_path / name, rebuild(workdir))
    config = tmp_path / "vms.toml"
    config.write_text(f'[vm.0]\nconsole = {{ endpoints = ["file:{tmp_path}/log"] }}\n'
                      f'block = {{ image = "{workdir}/disk-before.img" }}\nrng = {{}}\n')
    result = subprocess.run([sys.executable, "-m", "avatar_hw", "replay", str(tmp_path / "cut"),
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no end record: cut after trap" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_replay_of_a_served_session_recorded_with_serve_record(tmp_path):
    """``avatar-hw serve --record`` (a subprocess on the fake board, the stand-in stub playing
    the hypervisor) then ``avatar-hw replay`` with a copy of the image as it was: clean."""
    from tests.test_daemon import Served
    from avatar_hw.testing.standin_stub import FakeBoard, StandinStub

    board = FakeBoard(tmp_path / "board", vms=1)
    image = tmp_path / "vm0.img"
    image.write_bytes(bytes(64 * 512))
    shutil.copy(image, tmp_path / "vm0-before.img")

    def config(name, disk):
        path = tmp_path / name
        path.write_text(f'[vm.0]\nconsole = {{ endpoints = ["file:{tmp_path}/{name}.log"] }}\n'
                        f'block = {{ image = "{disk}" }}\n')
        return path

    recording = tmp_path / "session.avrr"
    stub = StandinStub(board)
    daemon = Served(board, config("vms.toml", image), "--record", str(recording))
    try:
        stub.page.wait_attached()
        con, block = stub.driver(0, 0), stub.driver(0, 1)
        _, tx = con.init([0, 1], size=8)
        tx.post(readable=[b"recorded\n"])
        tx.notify()
        (q,) = block.init([0], size=8)
        q.post(readable=[struct.pack("<IIQ", blk.T_OUT, 0, 5), b"\x5a" * 512], writable=[1])
        q.notify()
        q.post(readable=[struct.pack("<IIQ", blk.T_IN, 0, 6)], writable=[512, 1])
        q.notify()
        deadline = time.monotonic() + 60
        used = []
        while len(used) < 2 and time.monotonic() < deadline:
            stub.wait_irqs(0.5)
            block.ack_interrupt()
            used += q.get_used()
        assert [u.data for u in used] == [b"\0", bytes(513)]
    finally:
        assert daemon.stop() == 0
        stub.close()
    # The replay line of the worked example in docs/testing.md, as it stands.
    config("replay.toml", tmp_path / "vm0-before.img")
    doc = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    example = re.search(r"```sh\n(.*?)```", doc[doc.index("## Record and replay"):], re.S)
    [line] = [line for line in example.group(1).splitlines()
              if line.startswith("avatar-hw replay")]
    result = subprocess.run([sys.executable, "-m", "avatar_hw", *shlex.split(line)[1:]],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(r"session.avrr: \d+ traps replayed, every answer, guest-memory write "
                        r"and interrupt the same\n", result.stdout)

    # An image that is not the one recorded: the block read of sector 6 differs.
    stale = bytearray((tmp_path / "vm0-before.img").read_bytes())
    stale[6 * 512:7 * 512] = b"\xff" * 512
    (tmp_path / "stale.img").write_bytes(stale)
    result = subprocess.run([sys.executable, "-m", "avatar_hw", "replay", str(recording),
                             "--config", str(config("stale.toml", tmp_path / "stale.img"))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"DIFFERENT at trap \d+ \(write window 1 offset 0x50 size 4\): guest page "
                     r"vm0 0x[0-9a-f]+ written differently", result.stdout), result.stdout


def test_a_recording_damaged_anywhere_is_one_error_or_a_difference(workdir, tmp_path):
    """Bytes of a real recording changed at random (the header's JSON, record kinds,
    lengths, a trap's window, offset and size) or the file cut: ``replay`` reports a
    ``ReplayFormatError`` or a difference, never another exception (a trap record naming
    a window outside the layout raised IndexError in ``Subsystem.dispatch``)."""
    path, _ = record(workdir)
    data = path.read_bytes()
    rnd = random.Random(15)
    damaged = tmp_path / "damaged.avrr"
    for _ in range(150):
        content = bytearray(data)
        for _ in range(rnd.choice([1, 2, 4, 16])):
            at = rnd.randrange(len(content) if rnd.random() < 0.5 else min(len(content), 400))
            content[at] = rnd.randrange(256)
        if rnd.random() < 0.2:
            content = content[:rnd.randrange(len(content))]
        damaged.write_bytes(bytes(content))
        try:
            rr.replay(damaged, rebuild(workdir))
        except rr.ReplayFormatError as err:
            assert "\n" not in str(err)


def _boundaries(data):
    """(offset, kind) of each record of a recording."""
    at = 10 + struct.unpack_from("<I", data, 6)[0]
    while at < len(data):
        yield at, data[at]
        at += 5 + struct.unpack_from("<I", data, at + 1)[0]


def test_a_recording_cut_between_records_is_never_the_same(workdir, tmp_path):
    """Cut at any record boundary (a killed daemon, a full disk), a recording has no END
    record: replay checks the whole traps before the cut, then names the cut; a trap whose
    answer or pages are missing is not counted."""
    path, traps = record(workdir)
    data = path.read_bytes()
    assert rr.replay(path, rebuild(workdir)) == (traps, None)
    cut = tmp_path / "cut.avrr"
    whole, open_trap = 0, False                # traps whose records all precede the cut
    for at, kind in _boundaries(data):
        cut.write_bytes(data[:at])
        with pytest.raises(rr.ReplayFormatError) as err:
            rr.replay(cut, rebuild(workdir))
        assert str(err.value) == (f"{cut}: no end record: cut before the first trap"
                                  if not whole else
                                  f"{cut}: no end record: cut after trap {whole - 1}, the "
                                  f"{whole} traps before the cut replayed the same (the "
                                  "daemon was killed or could not write)")
        # A trap is whole once a record that cannot be its own (a page of the guest's, the
        # next trap) follows it: a cut before that leaves its model pages unknown.
        if kind in (rr.GUEST_PAGE, rr.TRAP) and open_trap:
            whole, open_trap = whole + 1, False
        open_trap = open_trap or kind == rr.TRAP


class _FullAfter:
    """A recording file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if not self.room:
            raise OSError(28, "No space left on device")
        n = min(len(data), self.room)
        self.room -= n
        return self.file.write(data[:n])

    def close(self):
        self.file.close()


@pytest.mark.parametrize("room", [0, 3000])
def test_a_recording_that_cannot_be_written_stops_and_the_model_serves_on(workdir, caplog,
                                                                          room):
    """A full disk: the model answers as without --record (play's asserts), one error line
    names the file, close does not raise, and the file replays as cut."""
    path = workdir / "session.avrr"
    session = Session(workdir, workdir / "disk.img")
    recorder = rr.Recorder(session.subsystem, path)
    recorder.writer.file = _FullAfter(recorder.writer.file, room)
    play(session)
    recorder.close()
    session.subsystem.close()
    [line] = [r.getMessage() for r in caplog.records if r.name == "avatar_hw.replay"]
    assert line.startswith(f"--record {path}: cannot write (No space left on device)")
    with pytest.raises(rr.ReplayFormatError, match="no end record: cut"):
        rr.replay(path, rebuild(workdir))


def test_a_recording_stops_whole_at_its_max_size(workdir, caplog):
    path = workdir / "session.avrr"
    session = Session(workdir, workdir / "disk.img")
    recorder = rr.Recorder(session.subsystem, path, max_size=4000)
    play(session)
    recorder.close()
    session.subsystem.close()
    assert path.stat().st_size <= 4000
    [line] = [r.getMessage() for r in caplog.records if r.name == "avatar_hw.replay"]
    assert re.fullmatch(rf"--record {path}: stopped at \d+ bytes, the --record-max-size, "
                        r"after (\d+) traps \(the file is a whole recording of them\)", line)
    replayed, difference = rr.replay(path, rebuild(workdir))
    assert difference is None and 0 < replayed < recorder.traps
    assert line.endswith(f"after {replayed} traps (the file is a whole recording of them)")


def _hostile(data, path):
    """Recordings a damaged disk or a hostile hand could give, each with what replay says."""
    at = 10 + struct.unpack_from("<I", data, 6)[0]
    meta = json.loads(data[10:at])
    body = data[at:]

    def header(m, version=rr.VERSION):
        blob = m if isinstance(m, bytes) else json.dumps(m).encode()
        return b"AVRR" + struct.pack("<HI", version, len(blob)) + blob

    def changed(**fields):
        return header({**meta, **fields}) + body
    ram = meta["vms"]["0"]
    bomb = zlib.compress(bytes(64 << 20), 9)
    return {
        "vms-list": (changed(vms=[]), "bad header: not an object"),
        "ram-text": (changed(vms={"0": {**ram, "size": str(ram["size"])}}), "RAM size"),
        "ram-huge": (changed(vms={"0": {**ram, "size": 1 << 47}}), "needs twice that"),
        "ram-odd": (changed(vms={"0": {**ram, "size": 4097}}), "not a multiple"),
        "device-size-0": (changed(layout={**meta["layout"], "device_size": 0}), "device_size"),
        "max-vms-text": (changed(layout={**meta["layout"], "max_vms": "8"}), "max_vms"),
        "vm-superscript": (changed(vms={"0": ram, "\u00b2": ram}), "bad header: VM '\u00b2'"),
        "windows-2^32": (changed(layout={**meta["layout"], "max_vms": (1 << 32) - 1,
                                         "vm_size": (1 << 32) - 1, "device_size": 1}),
                         "more than 65536 device windows"),
        "nested": (header(b"[" * 100000 + b"]" * 100000), "nested too deeply"),
        "header-4GiB": (b"AVRR" + struct.pack("<HI", rr.VERSION, 0xFFFFFFFF), "a header of"),
        "record-4GiB": (header(meta) + struct.pack("<BI", rr.TRAP, 0xFFFFFFFF), "a record of"),
        "zlib-bomb": (header(meta) + struct.pack("<BI", rr.GUEST_PAGE, 9 + len(bomb))
                      + struct.pack("<BQ", 0, ram["base"]) + bomb, "not 4096 bytes"),
        "version-1": (header(meta, version=1) + body, "version 1, this avatar-hw reads only"),
    }


def test_hostile_recordings_are_one_line_naming_the_file(workdir, tmp_path):
    path, _ = record(workdir)
    cases = _hostile(path.read_bytes(), path)
    for name, (content, error) in cases.items():
        (tmp_path / name).write_bytes(content)
    os.mkfifo(tmp_path / "fifo")
    cases.update(fifo=(None, "not a regular file"), **{".": (None, "not a regular file")})
    for name, (_, error) in cases.items():
        target = tmp_path / name
        with pytest.raises(rr.ReplayFormatError) as err:
            rr.replay(target, rebuild(workdir))
        message = str(err.value)
        assert message.startswith(f"{target}: ") and error in message and "\n" not in message


def test_an_rng_buffer_larger_than_a_record_is_recorded_in_records_replay_takes(tmp_path,
                                                                                 monkeypatch):
    """A source read of more than MAX_RECORD (an rng with max_bytes raised, one big guest
    buffer) was one SOURCE record, which replay then refused: the tap reads at most a
    record's worth at a time (the rng loops on short reads)."""
    monkeypatch.setattr(rr, "MAX_RECORD", 64 << 10)
    big = 200 << 10
    (tmp_path / "entropy").write_bytes(random.Random(1).randbytes(big))

    def session():
        ram = bytearray(1 << 20)
        subsystem = Subsystem(interrupt_line=IrqRecorder())
        subsystem.vm_init(0, GuestMemory(Region(memoryview(ram)), RAM_BASE))
        device = RngDevice(max_bytes=big, source=str(tmp_path / "entropy"))
        return subsystem, GuestRam(ram, RAM_BASE), subsystem.create_device(0, device).window

    subsystem, ram, window = session()
    path = tmp_path / "big.avrr"
    recorder = rr.Recorder(subsystem, path)
    (queue,) = VirtioDriver(subsystem.handle_mmio_trap, window, ram).init([0], size=2,
                                                                          buf_size=big)
    queue.post(writable=[big])
    queue.notify()
    assert [u.length for u in queue.get_used()] == [big]
    recorder.close()
    subsystem.close()
    assert rr.replay(path, lambda meta: session()[0]) == (recorder.traps, None)
