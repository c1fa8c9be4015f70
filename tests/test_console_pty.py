"""virtio-console's ``pty:`` endpoint: attached only while some program has the pty open
(issue 16: a guest never waits for a pty nobody reads; an opener gets the unattached log
first, then the live output, flow-controlled)."""

import os
import termios
import time

import pytest

from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.endpoints import pyserial_url
from avatar_hw.endpoints import pty
from avatar_hw.endpoints.pty import PtyEndpoint
from avatar_hw.errors import ConfigError
from avatar_hw.loop import EventLoop
from avatar_hw.testing.virtio import VirtioBench

LOG = 5000


@pytest.fixture
def loop():
    lp = EventLoop()
    yield lp
    lp.close()


@pytest.fixture(autouse=True)
def quick_looks(monkeypatch):
    """Look for an opener every 20 ms (1 s in the daemon) so the tests stay short."""
    monkeypatch.setattr(PtyEndpoint, "poll_interval", 0.02)


class PtyConsole:
    """A console device whose port 0 has a pty endpoint (and maybe more), nobody on it yet."""

    def __init__(self, tmp_path, loop, *more, log_size=LOG):
        self.loop, self.link = loop, str(tmp_path / "vm0-console")
        self.bench = VirtioBench(ConsoleDevice([f"pty:{self.link}", *more], limit=4096,
                                               log_size=log_size), loop=loop,
                                 ram_size=4 << 20)
        self.backend = self.bench.device.ports[0].backend
        self.pty = self.backend.endpoints[0]
        self.rx, self.tx = self.bench.driver.init([0, 1])
        self.posted = self.returned = 0     # transmit buffers the guest gave, got back

    def until(self, condition, what, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            self.loop.run_once(0.01)

    def print(self, data, chunk=4000):
        """The guest prints ``data`` in buffers of ``chunk`` bytes."""
        for i in range(0, len(data), chunk):
            self.tx.post(readable=[data[i:i + chunk]])
            self.posted += 1
        self.tx.notify()
        self.loop.run_once(0)

    def collect(self):
        self.returned += len(self.tx.get_used())
        return self.returned

    def all_back(self):
        return self.collect() == self.posted

    def open(self, flags=os.O_RDWR):
        fd = os.open(self.link, flags | os.O_NOCTTY | os.O_NONBLOCK)
        self.until(lambda: self.pty.attached and self.pty._held is None,
                   "output after the pty was opened")
        return fd

    def read(self, fd, want, per_round=1 << 20):
        """What the opener reads, ``per_round`` bytes per turn of the loop, until ``want``
        bytes came (and the guest gets its buffers back meanwhile)."""
        got = bytearray()

        def more():
            self.collect()
            try:
                got.extend(os.read(fd, per_round))
            except BlockingIOError:
                pass
            return len(got) >= want
        self.until(more, f"{want} bytes from the pty (got {len(got)})")
        return bytes(got)

    def info(self):
        return self.bench.device.info()["ports"][0]

    def close(self):
        self.bench.subsystem.close()


@pytest.fixture
def con(tmp_path, loop):
    c = PtyConsole(tmp_path, loop)
    yield c
    c.close()


def lines(first, count, tag=b"line"):
    return b"".join(b"%s-%06d\n" % (tag, i) for i in range(first, first + count))


def nothing_waits_on_the_master(con):
    """No reader nor writer on a pty nobody holds (its POLLHUP would wake the loop for ever)."""
    return not con.loop.watches(con.pty.master)


def test_a_pty_nobody_opens_does_not_hold_the_guest(con):
    """The guest prints far more than the pty and the port's stream hold: every buffer comes
    back at once, the last ``log`` bytes are kept (the rest counted), and the daemon does not
    spin on the master's hang-up."""
    out = lines(0, 20000)                                # 240 KB, 60 buffers
    con.print(out)
    con.until(con.all_back, "transmit buffers back")
    assert con.backend.buffered == 0 and not con.pty.attached
    assert con.info()["log"] == LOG and con.info()["log_overwritten"] == len(out) - LOG
    assert con.backend.log == out[-LOG:]
    for _ in range(5):
        con.loop.run_once(0.03)
    assert nothing_waits_on_the_master(con)


def test_a_pty_and_a_file_nobody_reads_the_file_takes_all(tmp_path, loop):
    """A console on a pty and a file: the pty nobody opens holds nothing, the file gets it all."""
    log_path = tmp_path / "vm0.log"
    c = PtyConsole(tmp_path, loop, f"file:{log_path}")
    try:
        out = lines(0, 20000)
        c.print(out)
        c.until(c.all_back, "transmit buffers back")
        assert log_path.read_bytes() == out
    finally:
        c.close()


def test_a_later_opener_gets_the_log_first_then_the_live_output(con):
    out = lines(0, 2000)
    con.print(out)
    con.until(con.all_back, "transmit buffers back")
    fd = con.open()
    try:
        assert con.read(fd, LOG) == out[-LOG:]
        con.print(b"live\n")
        assert con.read(fd, 5) == b"live\n"
        con.until(con.all_back, "the live buffer back")
        assert con.info()["log"] == 0
    finally:
        os.close(fd)


def test_an_opener_that_flushes_its_input_after_setting_up_still_gets_the_log(con,
                                                                             monkeypatch):
    """pyserial's ``open()``, as many terminal programs, sets the terminal up and then
    flushes its input: output sent when the open was seen went with it. A look sees the
    open within 20 ms here; this opener flushes 100 ms after its open (a loaded machine).
    The hold is 5 s here, not 0.25 s, so that a stall of the test does not outlast it."""
    monkeypatch.setattr(pty, "OPENER_HOLD_S", 5.0)
    out = lines(0, 100)
    con.print(out)
    con.until(con.all_back, "transmit buffers back")
    fd = os.open(con.link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        con.until(lambda: con.pty.attached, "attach after the pty was opened")
        deadline = time.monotonic() + 0.1
        while time.monotonic() < deadline:
            con.loop.run_once(0.01)
        termios.tcflush(fd, termios.TCIFLUSH)
        assert con.read(fd, len(out)) == out
    finally:
        os.close(fd)


def test_a_second_opener_that_flushes_its_input_still_gets_what_follows_its_open(con,
                                                                                monkeypatch):
    """A program opening the pty while another has it open gets the hold a first opener gets:
    what the guest prints as it opens is sent after its flush (100 ms after the open here),
    not into it. The first program reads nothing meanwhile (or would share the bytes).
    The hold is 5 s here, as above."""
    first = con.open()
    monkeypatch.setattr(pty, "OPENER_HOLD_S", 5.0)
    try:
        second = os.open(con.link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            con.until(lambda: con.pty._held is not None, "hold after the second open (inotify)")
            con.print(b"after the second open\n")
            deadline = time.monotonic() + 0.1
            while time.monotonic() < deadline:
                con.loop.run_once(0.01)
            termios.tcflush(second, termios.TCIFLUSH)
            assert con.read(second, 22) == b"after the second open\n"
            con.until(con.all_back, "the buffer back")
        finally:
            os.close(second)
    finally:
        os.close(first)


def test_a_hold_leaves_no_writer_to_wake_the_loop(con):
    """Output waiting for a full pty when a second opener comes: while held, the endpoint
    does not wait for the fd to become writable (else each turn of the loop would, once a
    reader made room: a busy loop for the hold's 0.25 s); afterwards it flows again."""
    first = con.open()
    try:
        out = lines(0, 25000)
        con.print(out)
        con.until(lambda: con.pty._writer_registered, "output waiting for the full pty")
        second = os.open(con.link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            con.until(lambda: con.pty._held is not None, "a hold for the second opener")
            assert not con.pty._writer_registered
            got = con.read(first, len(out))
            assert got == out
        finally:
            os.close(second)
    finally:
        os.close(first)


def test_an_opener_that_reads_slowly_loses_nothing(con):
    """After the log, an opener reading 512 bytes per turn gets every live byte in order; the
    guest waits for it (its buffers held) instead of anything going to the log."""
    con.print(lines(0, 2000, b"early"))
    con.until(con.all_back, "transmit buffers back")
    fd = con.open()
    try:
        assert con.read(fd, LOG, 512) == lines(0, 2000, b"early")[-LOG:]
        overwritten = con.info()["log_overwritten"]
        live = lines(0, 25000)                           # 300 KB, 75 buffers
        con.print(live)
        for _ in range(10):
            con.loop.run_once(0.01)
        assert con.collect() < con.posted and con.backend.buffered > 0     # the guest waits
        assert con.read(fd, len(live), 512) == live
        con.until(con.all_back, "every buffer back")
        assert con.info()["log"] == 0 and con.info()["log_overwritten"] == overwritten
    finally:
        os.close(fd)


def test_close_then_reopen(con):
    """``cat``-style use: open, read, close, reopen (read-only). What the pty held when its
    reader closed comes first, then what the guest printed while nobody had it open (the
    log), then the live output."""
    fd = con.open()
    con.print(b"one\n")
    assert con.read(fd, 4) == b"one\n"
    con.print(b"unread\n")                               # in the pty when the reader closes
    con.until(con.all_back, "buffers back")
    os.close(fd)
    con.until(lambda: not con.pty.attached, "detach after the last close")
    away = lines(0, 20000)
    con.print(away)
    con.until(con.all_back, "buffers back while nobody had the pty open")
    for _ in range(5):
        con.loop.run_once(0.03)
    assert nothing_waits_on_the_master(con)
    fd = con.open(os.O_RDONLY)
    try:
        got = con.read(fd, 7 + LOG)
        assert got == b"unread\n" + away[-LOG:]
        con.print(b"again\n")
        assert con.read(fd, 6) == b"again\n"
    finally:
        os.close(fd)


def test_a_reader_that_leaves_in_a_buffer_never_makes_the_next_get_bytes_twice(tmp_path,
                                                                               loop):
    """One 48 KiB buffer, more than the pty takes; the reader reads a little and closes.
    The next reader gets the rest, each byte once: what the pty kept, then the log from
    where the pty's output had got to (the log had the whole buffer: its first part came
    twice). Linux may discard what the first reader was sent and did not read."""
    con = PtyConsole(tmp_path, loop, log_size=1 << 20)
    try:
        out = lines(0, 4800)                                 # 48 000 bytes
        fd = con.open()
        con.tx.post(readable=[out[i:i + 4000] for i in range(0, len(out), 4000)])  # one chain
        con.posted += 1
        con.tx.notify()
        assert con.read(fd, 2000, per_round=2000)[:2000] == out[:2000]
        os.close(fd)
        con.until(con.all_back, "the buffer back once nobody holds the pty")
        fd = con.open(os.O_RDONLY)
        try:
            rest = b""
            while not rest.endswith(out[-12:]):
                rest += con.read(fd, 1, per_round=1 << 16)
        finally:
            os.close(fd)
        start = out.find(rest[:64])
        assert start >= 2000 and rest == out[start:], (start, len(rest))
    finally:
        con.close()


def test_a_close_under_a_full_pty_is_seen_at_once(con, monkeypatch):
    """The guest waits for a reader that stopped reading; when it closes, the hang-up wakes
    the waiting writer and the guest's buffers come back without waiting for a look."""
    fd = con.open()
    monkeypatch.setattr(con.pty, "poll_interval", 3600)
    con.loop.run_once(0.05)                              # the pending 20 ms look re-arms
    out = lines(0, 25000)
    con.print(out)
    for _ in range(10):
        con.loop.run_once(0.01)
    assert con.collect() < con.posted                            # held: the pty is full
    os.close(fd)
    con.until(con.all_back, "buffers back after the reader closed", timeout=20)
    assert not con.pty.attached


def test_input_of_a_program_that_opened_wrote_and_left_reaches_the_guest(con):
    """``echo cmd > PTY`` opens, writes and closes between two looks: the look finds input
    waiting behind the hang-up and reads it (the pty is not attached meanwhile)."""
    for text in (b"typed\n", b"again\n"):
        writer = os.open(con.link, os.O_WRONLY | os.O_NOCTTY)
        os.write(writer, text)
        os.close(writer)
        con.rx.post(writable=[64])
        con.rx.notify()
        typed = []
        con.until(lambda: typed.extend(u.data for u in con.rx.get_used()) or typed,
                  "the input of a writer that left")
        assert typed == [text]


def test_a_pty_without_a_path_is_named_in_info(tmp_path, loop):
    """``pty:`` alone: info (and the daemon's log of endpoints) names its /dev/pts/N, which a
    client opens like the symlink."""
    b = VirtioBench(ConsoleDevice("pty:"), loop=loop, ram_size=4 << 20)
    try:
        [url] = b.device.info()["ports"][0]["endpoints"]
        assert url.startswith("pty:/dev/pts/") and pyserial_url(url) == url[4:]
        b.driver.init([0, 1])
        fd = os.open(url[4:], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        pty = b.device.ports[0].backend.endpoints[0]
        deadline = time.monotonic() + 30
        while not pty.attached:
            assert time.monotonic() < deadline, "never attached"
            loop.run_once(0.01)
        os.close(fd)
    finally:
        b.subsystem.close()


def test_a_pty_path_holding_a_file_is_refused_and_kept_and_an_old_link_replaced(tmp_path):
    """The pty's symlink replaces a link (a previous daemon's), never a file or a directory
    the user has at that path (``os.replace`` put the link over a mistyped path's file)."""
    kept = tmp_path / "notes.txt"
    kept.write_text("keep")
    with pytest.raises(ConfigError, match="is there and not a symlink"):
        ConsoleDevice(f"pty:{kept}")
    assert kept.read_text() == "keep"
    link = tmp_path / "vm0-console"
    link.symlink_to("/dev/pts/nonexistent")                 # left by a daemon that died
    device = ConsoleDevice(f"pty:{link}")
    try:
        assert os.readlink(link).startswith("/dev/pts/") and os.path.exists(link)
    finally:
        device.detach()


def test_an_opener_gets_the_output_without_waiting_for_a_look(con, monkeypatch):
    """inotify tells the endpoint of the open: output printed before and after reaches the
    opener after the hold (``OPENER_HOLD_S``), with no look due for an hour."""
    monkeypatch.setattr(con.pty, "poll_interval", 3600)
    con.loop.run_once(0.05)                              # the pending 20 ms look re-arms
    con.print(b"before\n")
    fd = os.open(con.link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        assert con.read(fd, 7) == b"before\n"
        con.print(b"after\n")
        assert con.read(fd, 6) == b"after\n"
    finally:
        os.close(fd)


def inotify_instances():
    """inotify instances this process holds."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass                        # the listing's own fd, closed meanwhile
    return count


def test_the_ptys_of_one_console_share_one_inotify_instance(tmp_path, loop, monkeypatch):
    """A user has 128 inotify instances in all (shared with every program of theirs): a
    console takes one, not one per pty; each pty's opener is still seen at once, and the
    instance goes with the console."""
    before = inotify_instances()
    c = PtyConsole(tmp_path, loop, f"pty:{tmp_path}/b", f"pty:{tmp_path}/c")
    fds = []
    try:
        assert inotify_instances() == before + 1
        ptys = c.backend.endpoints
        for pty in ptys:
            monkeypatch.setattr(pty, "poll_interval", 3600)
        loop.run_once(0.05)                              # the pending 20 ms looks re-arm
        for link in (c.link, f"{tmp_path}/b", f"{tmp_path}/c"):
            fds.append(os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
        c.until(lambda: all(p.attached and p._held is None for p in ptys), "all three open")
        c.print(b"to all\n")
        assert [c.read(fd, 7) for fd in fds] == [b"to all\n"] * 3
    finally:
        for fd in fds:
            os.close(fd)
        c.close()
    assert inotify_instances() == before
