"""A restart of the daemon under a running guest (marker ``emulated``): host mode.

The daemon runs in its own process (``EmulatedBoard(daemon_process=True)``) with a state
file. The guest copies a block device to another with O_DIRECT 4 KiB writes while it
prints the source in base64 on its console; the test SIGKILLs the daemon in the middle
of both, starts a new one, and checks that both transfers are sha256-exact and that the
guest's drivers never reset their devices. A vsock connection open across a restart is
reset for the guest (its host side died with the daemon), and the device goes on.
"""

import base64
import hashlib
import pathlib
import re
import threading
import time

import pytest

from avatar_hw.board import load_board
from avatar_hw.control import request
from avatar_hw.emulated.session import EmulatedBoard, _connect_unix
from avatar_hw.hil import vsock
from avatar_hw.shipped import board_path
from bench.board import VSOCK_PORT, _guest_line, build_initrd, vsock_host_echo
from test_emulated_linux import pytestmark  # noqa: F401 (emulated, tools)

ROOT = pathlib.Path(__file__).resolve().parent.parent

MIB = 1 << 20
SIZE = 192 << 10
SOURCE = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(SIZE // 32))
SOURCE_B64_START = base64.b64encode(SOURCE[:48])
END = b"XFER-END"


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("restart")
    (tmp / "source.img").write_bytes(SOURCE)
    (tmp / "target.img").write_bytes(bytes(2 * MIB))
    config = tmp / "vms.toml"
    config.write_text(
        '[vm.0]\n'
        'console = { endpoints = ["unix:vm0-console.sock"], log = 16777216 }\n'
        f'block = [{{ image = "{tmp / "target.img"}" }}, '
        f'{{ image = "{tmp / "source.img"}", readonly = true }}]\n'
        f'vsock = {{ cid = 3, socket = "{tmp / "v.sock"}" }}\n')
    with EmulatedBoard(config=config, daemon_process=True, initrd=build_initrd(tmp)) as b:
        b.guest = b.shell(timeout=120)
        b.tmp = tmp
        yield b


def _read_until(sock, data, pattern, timeout):
    """Append what ``sock`` sends to ``data`` until ``pattern`` is in it; None at EOF."""
    deadline = time.monotonic() + timeout
    while pattern not in data:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s: {data[-300:]!r}"
    return data


def _diff(data, received, at_kill):
    first = next((i for i, (a, b) in enumerate(zip(data, SOURCE)) if a != b), None)
    return (f"{len(data)} bytes decoded, {len(SOURCE)} sent, first difference at {first}; "
            f"killed after {at_kill} bytes received: "
            f"{bytes(received[at_kill - 200:at_kill + 400])!r}")


def _devices(board):
    info = request("info", board.control_path)
    return {d.get("image", d["name"]).rpartition("/")[2]: d
            for vm in info["vms"] for d in vm["devices"]}


def test_bench_reads_the_counters_of_a_daemon_in_its_own_process(board):
    """bench/board.py and bench/two_guests.py read the daemon's counters through its control
    socket: here the daemon is not in this process (``board.daemon`` is None)."""
    from bench.board import daemon_info, daemon_mode, traps_waited
    from bench.two_guests import daemon_counters

    def block_requests(info):
        return sum(d["requests"] for d in info["vms"][0]["devices"] if d["name"] == "block")

    assert board.daemon is None and board.daemon_alive() and daemon_mode(board) == "process"
    info_before, before = daemon_info(board), daemon_counters(board)
    out, status = board.guest.run("dd if=/dev/vda of=/dev/null bs=4096 count=32 iflag=direct")
    assert status == 0, out
    info, after = daemon_info(board), daemon_counters(board)
    assert info["pid"] == board.process.pid
    assert info["mode"] == load_board(board_path("emulated")).wait   # the board file's
    assert block_requests(info) - block_requests(info_before) >= 32
    assert len(after) == 1 and after[0]["traps_served"] - before[0]["traps_served"] >= 32
    assert after[0]["service_ms"] > before[0]["service_ms"]
    assert 0 <= traps_waited(info_before) <= traps_waited(info)


def test_restart_under_guest_host_mode_transfers_are_exact_and_nothing_resets(board):
    guest = board.guest
    names, _ = guest.run("for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/size); done")
    source = next(n.split()[0] for n in names.splitlines() if n.split()[1] == str(SIZE // 512))
    target = next(n.split()[0] for n in names.splitlines() if n.split()[0] != source)
    dmesg_before, _ = guest.run("dmesg | wc -l")
    statuses_before, _ = guest.run("cat /sys/bus/virtio/devices/*/status")
    pid = board.process.pid

    # Both transfers at once: block copy in the background, base64 of it on the console.
    guest.sock.sendall(
        f"for i in 1 2 3 4; do dd if=/dev/{source} of=/dev/{target} bs=512 iflag=direct "
        f"oflag=direct 2>>/tmp/dd.err || echo dd failed >>/tmp/dd.err; done & "
        f"base64 /dev/{source}; wait; echo {END.decode()[:4]}''{END.decode()[4:]}\n".encode())
    received = _read_until(guest.sock, bytearray(), SOURCE_B64_START, 60)
    # Not reading any more: the socket fills and output stays in flight (the daemon
    # answers ``info`` between two flushes: output it holds then is output the socket
    # did not take). So the kill lands between two writes, not just after one (a kill
    # there repeats the bytes of that write: docs/testing.md, "Restart").
    deadline = time.monotonic() + 120
    while not _devices(board)["console"]["ports"][0]["buffered"]:
        assert time.monotonic() < deadline, "the console output never backed up"
        time.sleep(0.2)
    board.kill_daemon()                                     # SIGKILL in mid-transfer
    at_kill = len(received)
    assert _read_until(guest.sock, received, END, 30) is None   # the old connection ends
    guest.sock.close()

    assert board.start_daemon() != pid
    sock = guest.sock = _connect_unix(board.console_path, 30)
    guest._buffer = b""
    received = _read_until(sock, received, END, 240)
    assert received is not None

    text = bytes(received[received.index(SOURCE_B64_START):received.rindex(END)])
    data = base64.b64decode(b"".join(re.split(rb"\r*\n", text)))
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(SOURCE).hexdigest(), _diff(
        data, received, at_kill)

    out, status = guest.run(f"dd if=/dev/{target} bs=64k count=3 iflag=direct 2>/dev/null "
                            "| sha256sum")
    image = (board.tmp / "target.img").read_bytes()[:SIZE]
    bad = [i // 512 for i in range(0, SIZE, 512) if image[i:i + 512] != SOURCE[i:i + 512]]
    assert not bad, (f"target sectors {bad[:20]} ({len(bad)}) differ from the source",
                     guest.run("cat /tmp/dd.err")[0])
    assert status == 0 and out.split()[0] == hashlib.sha256(SOURCE).hexdigest()

    # No driver reset: the same status bytes, no new virtio/block/console kernel lines.
    statuses_after, _ = guest.run("cat /sys/bus/virtio/devices/*/status")
    assert statuses_after == statuses_before
    new_lines, _ = guest.run(f"dmesg | tail -n +{int(dmesg_before) + 1}")
    assert not re.search(r"virtio|vd[a-z]|hvc|I/O error|reset", new_lines), new_lines
    devices = _devices(board)
    for name in ("console", "target.img", "source.img"):
        assert devices[name]["status"] == "ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK"
    assert devices["target.img"]["requests"] > 0     # the new daemon wrote: mid-transfer
    log = (board.state_path.parent / "daemon.log").read_text()
    assert "restored" in log and "chain(s) in flight" in log



def test_restart_under_guest_resets_vsock_connections_and_the_device_goes_on(board):
    """A vsock connection's host side dies with the daemon. The new one tells the guest
    (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET): its socket is reset instead of waiting for
    ever, its driver does not reset the device, and a new connection echoes."""
    guest, path = board.guest, board.tmp / "v.sock"
    _guest_line(guest, f"avbench vsock-echo {VSOCK_PORT} {MIB} >/tmp/reset.log 2>&1 & true", "")
    with vsock.connect(path, VSOCK_PORT) as sock:
        sock.settimeout(30)
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"                      # the echo is under way
        statuses_before, _ = guest.run("cat /sys/bus/virtio/devices/*/status")
        board.kill_daemon()
        board.start_daemon()
    board.guest = guest = board.shell(wait_ready=False)
    out, _ = guest.run("wait; cat /tmp/reset.log", timeout=30)
    assert "avbench error recv: " in out, out      # reset (ECONNRESET, then ENOTCONN)
    statuses_after, _ = guest.run("cat /sys/bus/virtio/devices/*/status")
    assert statuses_after == statuses_before
    assert _devices(board)["vsock"]["status"] == "ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK"
    assert vsock_host_echo(guest, path, 256 << 10) > 0


def test_a_daemon_started_from_a_thread_that_ends_goes_on_serving(board):
    """A restart from a worker thread (a test helper, a timer): the daemon was SIGKILLed as
    that thread ended (PR_SET_PDEATHSIG follows the thread that forked the child)."""
    board.kill_daemon()
    worker = threading.Thread(target=board.start_daemon)
    worker.start()
    worker.join()
    deadline = time.monotonic() + 60
    while pathlib.Path(f"/proc/self/task/{worker.native_id}").exists():   # its exit, done
        assert time.monotonic() < deadline
        time.sleep(0.01)
    board.guest = guest = board.shell(wait_ready=False)
    assert guest.run("echo served-$((6 * 7))", timeout=60) == ("served-42\n", 0)
    assert board.daemon_alive()


def test_the_restart_example_of_docs_testing_md_runs(capsys):
    """docs/testing.md's restart example, as written: every device still 0xf after the
    daemon was killed and started again."""
    text = (ROOT / "docs" / "testing.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "kill_daemon" in b]
    exec(compile(block, "docs/testing.md restart example", "exec"), {})
    statuses = capsys.readouterr().out.split()
    assert statuses and set(statuses) == {"0x0000000f"}, statuses
