"""Block, entropy and network devices behind ``avatar-hw serve`` (a subprocess against the
stand-in stub, helpers from test_daemon): the VMs config builds them in window order and
``avatar-hw info`` shows each one's requests, bytes and errors."""

import json
import socket

from avatar_hw.devices import block as blk
from avatar_hw.devices import net
from avatar_hw.testing.standin_stub import FakeBoard, StandinStub
from avatar_hw.virtio import constants as vc
from test_daemon import Served, wait_used

FRAME = bytes.fromhex("ffffffffffff" "020000000001" "0800") + bytes(range(50))
REMOTE_FRAME = bytes.fromhex("020000000001" "020000000002" "0800") + bytes(range(60))


def test_block_rng_net_served_and_info_shows_their_counters(tmp_path):
    board = FakeBoard(tmp_path / "board", vms=1)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    switch = tmp_path / "net.sock"
    config = tmp_path / "vms.toml"
    config.write_text(f'[vm.0]\nblock = {{ image = "{image}", serial = "served" }}\n'
                      f'rng = {{ max_bytes = 64 }}\n'
                      f'net = {{ switch = "{switch}", mac = "02:00:00:00:00:01" }}\n')
    stub = StandinStub(board)
    daemon = Served(board, config)
    remote = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        stub.page.wait_attached()
        block, rng, nic = (stub.driver(0, slot) for slot in range(3))
        assert [d.read(vc.REG_DEVICE_ID) for d in (block, rng, nic)] == [2, 4, 1]

        q, = block.init([0], buf_size=4096)
        q.post(readable=[blk.HEADER.pack(blk.T_OUT, 0, 8), b"\x5a" * 4096], writable=[1])
        q.post(readable=[blk.HEADER.pack(blk.T_OUT, 0, 4096), bytes(512)], writable=[1])
        q.post(readable=[blk.HEADER.pack(blk.T_FLUSH, 0, 0)], writable=[1])
        q.notify()
        used = wait_used(stub, block, q, 3)
        assert [u.data for u in used] == [b"\0", b"\1", b"\0"]   # past the capacity: IOERR
        assert image.read_bytes()[4096:8192] == b"\x5a" * 4096

        q, = rng.init([0], buf_size=4096)
        q.post(writable=[100])
        q.notify()
        [used] = wait_used(stub, rng, q, 1)
        assert used.length == 64

        remote.bind(str(tmp_path / "remote.sock"))
        remote.settimeout(10)
        remote.sendto(b"", str(switch))              # joins the switch
        rx, tx = nic.init([0, 1], buf_size=2048)
        tx.post(readable=[bytes(net.HEADER_LEN), FRAME])
        tx.notify()
        wait_used(stub, nic, tx, 1)
        assert remote.recv(4096) == FRAME            # broadcast: flooded to the remote port
        remote.sendto(REMOTE_FRAME, str(switch))     # to the MAC the switch learned
        rx.post(writable=[2048])
        rx.notify()
        [used] = wait_used(stub, nic, rx, 1)
        assert used.data[net.HEADER_LEN:] == REMOTE_FRAME

        info = json.loads(daemon.cli("info", "--json"))
        devices = {d["name"]: d for d in info["vms"][0]["devices"]}
        assert (devices["block"]["requests"], devices["block"]["bytes_from_guest"],
                devices["block"]["errors"], devices["block"]["flushes"]) == (2, 4096, 1, 1)
        assert (devices["rng"]["requests"], devices["rng"]["bytes_to_guest"]) == (1, 64)
        assert (devices["net"]["tx_frames"], devices["net"]["rx_frames"],
                devices["net"]["bytes_to_guest"]) == (1, 1, len(REMOTE_FRAME))
        assert devices["net"]["tx_wrong_source"] == 0
        assert devices["block"]["guest_errors"] >= 1 and "log_lines_suppressed" in devices["rng"]
        text = daemon.cli("info")
        assert "block" in text and "rng" in text and "net" in text
        assert "requests 2; errors 1; guest errors" in text and "log lines suppressed" in text
    finally:
        remote.close()
        daemon.close()
        stub.close()
