"""Console endpoint rfc2217: a virtio console served to pyserial's rfc2217:// client."""

import hashlib
import logging
import os
import socket
import struct
import threading
import time
import types

import pytest
import serial
from serial import rfc2217

from avatar_hw.backends.console import ConsoleBackend
from avatar_hw.endpoints import open_endpoint
from avatar_hw.endpoints.rfc2217 import (INPUT_HOLD, RECV_SIZE, SUBOPTION_LIMIT, GuestLine,
                                         Rfc2217Endpoint)
from avatar_hw.devices.console import ConsoleDevice
from avatar_hw.errors import ConfigError
from avatar_hw.loop import EventLoop
from avatar_hw.testing.virtio import VirtioBench
from avatar_hw.virtio import constants as c
from test_console import Progress

IAC, SB, SE = 0xFF, 0xFA, 0xF0
WILL, WONT, DO, DONT = 0xFB, 0xFC, 0xFD, 0xFE
NEGOTIATION = {WILL, WONT, DO, DONT}
BINARY = 0
BINARY_BOTH_WAYS = bytes([IAC, WILL, BINARY, IAC, DO, BINARY])    # RFC 856: 8-bit clean


@pytest.fixture
def loop():
    lp = EventLoop()
    yield lp
    lp.close()


@pytest.fixture
def served(loop):
    """A console device whose port 0 is an rfc2217 endpoint on a free loopback port."""
    device = ConsoleDevice("rfc2217:127.0.0.1:0", limit=64 << 10)
    bench = VirtioBench(device, loop=loop, ram_size=8 << 20)
    endpoint = device.ports[0].backend.endpoints[0]
    yield bench, endpoint
    bench.subsystem.close()
    bench.check_guards()


def spin_until(loop, condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once(0.01)


def while_serving(loop, function):
    """Call ``function()`` in a thread while this one serves the loop; its result."""
    result = {}

    def call():
        try:
            result["value"] = function()
        except Exception as err:        # re-raised here
            result["error"] = err

    thread = threading.Thread(target=call)
    thread.start()
    spin_until(loop, lambda: not thread.is_alive())
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def pyserial_client(loop, endpoint):
    """pyserial's rfc2217:// client (its open waits for our negotiation answers)."""
    url = "rfc2217://" + endpoint.url.partition(":")[2]
    return while_serving(loop, lambda: serial.serial_for_url(url, baudrate=9600, timeout=0.05))


def test_url_names_the_real_port_and_listens_on_loopback(served):
    _, endpoint = served
    assert isinstance(endpoint, Rfc2217Endpoint)
    host, port = endpoint.listener.getsockname()
    assert host == "127.0.0.1" and port != 0
    assert endpoint.url == f"rfc2217:127.0.0.1:{port}"


def test_pyserial_client_both_ways_with_iac_bytes(served, loop):
    bench, endpoint = served
    rx, tx = bench.driver.init([0, 1])
    client = pyserial_client(loop, endpoint)
    try:
        assert client.baudrate == 9600 and endpoint.line.baudrate == 9600   # negotiated
        payload = bytes(range(256)) * 4 + b"\xff\xff end"
        tx.post(readable=[payload])
        tx.notify()
        got = bytearray()

        def received():
            loop.run_once(0)
            got.extend(client.read(client.in_waiting or 1))
            return len(got) >= len(payload)

        spin_until(loop, received)
        assert bytes(got) == payload
        typed = b"typed \xff\xfe\xff"
        client.write(typed)
        for _ in range(4):
            rx.post(writable=[8])
        rx.notify()
        used = []
        spin_until(loop, lambda: used.extend(rx.get_used()) or
                   sum(len(u.data) for u in used) >= len(typed))
        assert b"".join(u.data for u in used) == typed
        # a COM-port subnegotiation: the client waits for the answer
        while_serving(loop, lambda: setattr(client, "baudrate", 115200))
        assert endpoint.line.baudrate == 115200
    finally:
        client.close()


def telnet_data(stream, state):
    """Strip Telnet commands from ``stream`` (a raw client's view); ``state`` carries over."""
    out = bytearray()
    for byte in stream:
        mode = state.get("mode")
        if mode == "iac":
            state["mode"] = ("sb" if byte == SB else "opt" if byte in NEGOTIATION else None)
            if byte == IAC:
                out.append(IAC)
        elif mode == "opt":
            state["mode"] = None
        elif mode == "sb":
            state["mode"] = "sb-iac" if byte == IAC else "sb"
        elif mode == "sb-iac":
            state["mode"] = None if byte == SE else "sb"
        elif byte == IAC:
            state["mode"] = "iac"
        else:
            out.append(byte)
    return bytes(out)


def test_4_mib_each_way_with_stalls_nothing_lost(served, loop):
    """A raw Telnet client (in BINARY both ways) that stops reading, and a guest that posts
    no receive buffers, for a while: both sides wait, buffers stay bounded, every byte
    arrives once."""
    bench, endpoint = served
    total, chunk = 4 << 20, 16 << 10
    rx, tx = bench.driver.init([0, 1], buf_size=chunk, size=64)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)    # stall sooner
    client.connect(endpoint.listener.getsockname())
    client.setblocking(False)
    spin_until(loop, lambda: endpoint.client is not None)
    # acknowledged = in the kernel: a small send buffer makes the guest wait sooner
    endpoint.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    out_data = os.urandom(total)                                   # guest -> client
    in_data = os.urandom(total)                                    # client -> guest
    escaped_in = BINARY_BOTH_WAYS + in_data.replace(b"\xff", b"\xff\xff")
    sent_guest = sent_host = tx_used = 0
    got_host, got_guest, state = bytearray(), hashlib.sha256(), {}
    got_guest_n = 0
    # Nothing is timed: the stall phase ends on the endpoint's state, and only a stream that
    # moves nothing for a minute fails (TCP on loopback may lag behind under load).
    stalled, progress = True, Progress()
    while len(got_host) < total or got_guest_n < total:
        while sent_guest < total and tx.free:
            tx.post(readable=[out_data[sent_guest:sent_guest + chunk]])
            sent_guest += chunk
        if not stalled:
            while rx.free:
                rx.post(writable=[chunk])
        tx.notify()
        rx.notify()
        loop.run_once(0)
        if sent_host < len(escaped_in):
            try:
                sent_host += client.send(escaped_in[sent_host:sent_host + (256 << 10)])
            except BlockingIOError:
                pass
        while not stalled:
            try:
                data = client.recv(1 << 20)
            except BlockingIOError:
                break
            got_host += telnet_data(data, state)
        for used in rx.get_used():
            got_guest.update(used.data)
            got_guest_n += len(used.data)
        tx_used += len(tx.get_used(read_data=False))
        assert endpoint.buffered <= 64 << 10 and len(endpoint._input) <= INPUT_HOLD + (64 << 10)
        if stalled and endpoint.buffered and not endpoint._reading:
            # Both ways held: the guest's output waits, the client's input is not read.
            assert tx.outstanding and not got_host and not got_guest_n
            stalled = False
        if not progress.moved(sent_guest, sent_host, tx_used, len(got_host), got_guest_n,
                              endpoint.buffered, len(endpoint._input)):
            loop.run_once(0.001)                        # nothing moved: let the kernel run
    client.close()
    assert not stalled
    assert bytes(got_host) == out_data
    assert got_guest_n == total and got_guest.digest() == hashlib.sha256(in_data).digest()


def guest_writes(bench, loop, tx, data):
    """The guest sends ``data``; serve until its buffer came back (all of it sent)."""
    tx.post(readable=[data])
    tx.notify()
    used = []
    spin_until(loop, lambda: used.extend(tx.get_used()) or used)


def test_a_client_that_refuses_binary_gets_the_nvt_cr_rule_both_ways(served, loop):
    """RFC 854: outside BINARY a lone CR travels as CR NUL. The guest's lone CR reached a
    plain telnet client as a bare CR, and the client's CR NUL (its Enter) reached the guest
    as CR NUL; 0xFF is still doubled, CR LF stays CR LF."""
    bench, endpoint = served
    rx, tx = bench.driver.init([0, 1])
    client = raw_client(endpoint)
    client.send(bytes([IAC, DONT, BINARY, IAC, WONT, BINARY]))
    spin_until(loop, lambda: endpoint.client is not None)
    endpoint._release()                                     # no hold: a telnet never purges
    guest_writes(bench, loop, tx, b"a\rb\r\nc\xff\r")
    got, state = bytearray(), {}
    spin_until(loop, lambda: got.extend(telnet_data(received(client), state)) or
               len(got) >= 10)
    assert bytes(got) == b"a\r\0b\r\nc\xff\r\0"
    client.send(b"ls\r")
    loop.run_once(0.01)
    client.send(b"\0x\r\n\0\r\r\0")                  # CR NUL across two sends
    assert guest_reads(loop, rx, 9) == b"ls\rx\r\n\0\r\r"
    client.close()


def test_a_pyserial_client_is_binary_both_ways_cr_and_nul_untouched(served, loop):
    """pyserial's rfc2217:// client agrees to BINARY both ways: no NUL is added after the
    guest's CR nor taken from the client's CR NUL."""
    bench, endpoint = served
    rx, tx = bench.driver.init([0, 1])
    client = pyserial_client(loop, endpoint)
    try:
        guest_writes(bench, loop, tx, b"\r\xff\r")
        got = bytearray()
        spin_until(loop, lambda: got.extend(client.read(client.in_waiting or 1)) or
                   len(got) >= 3)
        loop.run_once(0.05)
        got += client.read(client.in_waiting)
        assert bytes(got) == b"\r\xff\r"
        client.write(b"\r\0\r")
        assert guest_reads(loop, rx, 3) == b"\r\0\r"
    finally:
        client.close()


def test_negotiation_is_answered_while_the_guest_takes_no_input(served, loop):
    """The client's open completes before the guest driver is even up."""
    _, endpoint = served
    client = pyserial_client(loop, endpoint)
    client.close()


def test_reconnect_gets_a_fresh_session(served, loop):
    bench, endpoint = served
    rx, tx = bench.driver.init([0, 1])
    first = pyserial_client(loop, endpoint)
    first.close()
    spin_until(loop, lambda: endpoint.client is None)
    second = pyserial_client(loop, endpoint)
    try:
        tx.post(readable=[b"again"])
        tx.notify()
        got = bytearray()
        spin_until(loop, lambda: got.extend(second.read(second.in_waiting or 1)) or
                   got == b"again")
    finally:
        second.close()


def test_a_second_pyserial_client_opens_and_reads_why_it_is_refused(served, loop):
    """The console has a client: a second one's open succeeds (its negotiations are
    answered) and it reads the one line saying why, then the end; its open once failed with
    pyserial's "Remote does not seem to support RFC2217 or BINARY mode"."""
    bench, endpoint = served
    bench.driver.init([0, 1])
    first = pyserial_client(loop, endpoint)
    second = pyserial_client(loop, endpoint)
    try:
        started = time.monotonic()
        line = while_serving(loop, lambda: second.read_until(b"\n"))
        assert line.startswith(b"avatar-hw: rfc2217:127.0.0.1:") and b"already has a client" in line
        assert time.monotonic() - started < 0.9         # at its open's end, not after HOLD_S
        second.close()
        spin_until(loop, lambda: not endpoint._refusing)  # its end: closed with it
        assert endpoint.client is not None
    finally:
        second.close()
        first.close()


@pytest.mark.parametrize("url", ["rfc2217:nope", "rfc2217:127.0.0.1:notaport"])
def test_bad_urls_are_one_line_errors(url):
    with pytest.raises(ConfigError, match=f"^{url}: rfc2217: needs a port, e.g. rfc2217:") as err:
        open_endpoint(url)
    assert "\n" not in str(err.value)


def test_listen_error_names_the_scheme():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"rfc2217: cannot listen on 127.0.0.1:{port}"):
            open_endpoint(f"rfc2217:127.0.0.1:{port}")
    finally:
        taken.close()


def test_output_printed_while_nobody_was_attached_reaches_a_pyserial_client(served, loop):
    """pyserial's open ends with PURGE_DATA of its receive buffer, emptying its own queue of
    what it read meanwhile: the log sent at the connection was lost to every labgrid
    NetworkSerialPort. Output now waits for the client's purge of its transmit buffer."""
    bench, endpoint = served
    rx, tx = bench.driver.init([0, 1])
    spin_until(loop, lambda: bench.device.ports[0].guest_open)
    tx.post(readable=[b"printed-before-anyone-came\n"])
    tx.notify()
    spin_until(loop, lambda: tx.get_used())              # nobody attached: logged at once
    client = pyserial_client(loop, endpoint)
    try:
        assert while_serving(loop, lambda: client.read(27)) == b"printed-before-anyone-came\n"
    finally:
        client.close()


def test_a_client_that_never_purges_gets_the_output_after_the_hold(served, loop):
    """A client that sends no RFC 2217 at all (telnet, a raw socket) gets the output once
    the hold ends (``HOLD_S``) instead of never."""
    bench, endpoint = served
    rx, tx = bench.driver.init([0, 1])
    spin_until(loop, lambda: bench.device.ports[0].guest_open)
    tx.post(readable=[b"for-a-raw-client\n"])
    tx.notify()
    spin_until(loop, lambda: tx.get_used())
    raw = socket.create_connection(("127.0.0.1", int(endpoint.url.rpartition(":")[2])))
    raw.setblocking(False)
    got = bytearray()

    def data():
        try:
            got.extend(raw.recv(4096))
        except BlockingIOError:
            pass
        return b"for-a-raw-client\n" in got
    try:
        spin_until(loop, data)
    finally:
        raw.close()


def test_output_in_flight_when_a_pyserial_client_connects_reaches_it(loop):
    """Output waiting in the stream (here for a tcp: client in its own hold) when an
    rfc2217:// client connects is held for it too: the Telnet negotiation its session
    starts with used to flush it out before the hold, and pyserial's open purged it."""
    tcp, rfc = open_endpoint("tcp:127.0.0.1:0"), open_endpoint("rfc2217:127.0.0.1:0")
    bench = VirtioBench(ConsoleDevice(ConsoleBackend([tcp, rfc])), loop=loop,
                        ram_size=4 << 20)
    rx, tx = bench.driver.init([0, 1])
    other = socket.create_connection(("127.0.0.1", int(tcp.url.rpartition(":")[2])))
    try:
        spin_until(loop, lambda: tcp.connected)
        tx.post(readable=[b"in-flight\n"])
        tx.notify()
        loop.run_once(0)
        client = pyserial_client(loop, rfc)
        try:
            got = bytearray()

            def line():
                got.extend(client.read(100))
                return b"\n" in got
            spin_until(loop, line)
            assert got == b"in-flight\n"
        finally:
            client.close()
    finally:
        other.close()
        bench.subsystem.close()


def raw_client(endpoint, rcvbuf=None):
    """A raw Telnet client of ``endpoint`` (non-blocking; accepted as the loop runs)."""
    client = socket.socket()
    if rcvbuf:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.connect(endpoint.listener.getsockname())
    client.setblocking(False)
    return client


def received(client):
    """What ``client`` has received by now (b"" also at EOF: see ``closed``)."""
    try:
        return client.recv(1 << 20)
    except BlockingIOError:
        return b""


def closed(loop, client):
    """Serve until the endpoint closed ``client`` (it reads EOF or a reset)."""
    def eof():
        loop.run_once(0.01)
        try:
            return client.recv(1 << 20) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
    spin_until(loop, eof)


def opening():
    """The Telnet requests a new session starts with."""
    sent = bytearray()
    rfc2217.PortManager(GuestLine(), types.SimpleNamespace(write=sent.extend))
    return bytes(sent)


def a_fresh_session_is_served(bench, loop, endpoint):
    """The device did not fail, and a new client gets a session's opening first."""
    assert not bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET
    client = raw_client(endpoint)
    try:
        got = bytearray()
        spin_until(loop, lambda: got.extend(received(client)) or len(got) >= len(opening()))
        assert bytes(got).startswith(opening())
    finally:
        client.close()


def guest_reads(loop, rx, want):
    """What the guest reads, a 512-byte buffer at a time, until ``want`` bytes came."""
    got, progress = bytearray(), Progress()
    while len(got) < want:
        for used in rx.get_used():
            got.extend(used.data)
        if not rx.outstanding:
            rx.post(writable=[512])
            rx.notify()
        if not progress.moved(len(got)):
            loop.run_once(0.001)
    return bytes(got)


SUB = bytes([IAC, SB, 44])                                  # IAC SB COM-PORT-OPTION
END = bytes([IAC, SE])


@pytest.mark.parametrize("request_", [
    bytes([IAC, SE]),                                       # SE without SB
    SUB + b"\x01\x00" + END,                                # SET-BAUDRATE, 1 value byte
    SUB + b"\x03\x09" + END,                                # SET-PARITY 9
    SUB + b"\x04\x09" + END,                                # SET-STOPSIZE 9
    SUB + b"\x0a" + END,                                    # SET-LINESTATE-MASK, no value
    SUB + b"\x0b" + END,                                    # SET-MODEMSTATE-MASK, no value
], ids=["se", "baud", "parity", "stopsize", "linestate", "modemstate"])
def test_malformed_telnet_drops_the_client_not_the_device(served, loop, request_):
    """pyserial's PortManager raises on these; the exception left the event loop and put
    the guest's console into DEVICE_NEEDS_RESET. The client is dropped now; what it typed
    before still reaches the guest."""
    bench, endpoint = served
    rx, tx = bench.driver.init([0, 1])
    client = raw_client(endpoint)
    client.send(b"before" + request_ + b"after")
    closed(loop, client)
    client.close()
    assert not bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET
    assert guest_reads(loop, rx, 6) == b"before"
    a_fresh_session_is_served(bench, loop, endpoint)


@pytest.mark.parametrize("how", ["reset_at_once", "reset_after_a_request"])
def test_a_client_that_resets_does_not_fail_the_device(served, loop, how):
    """A client reset before its session's opening was sent (or with a reply unread): the
    failed send dropped the client while a view of the replies existed (BufferError)."""
    bench, endpoint = served
    bench.driver.init([0, 1])
    client = raw_client(endpoint)
    if how == "reset_after_a_request":
        spin_until(loop, lambda: endpoint.client is not None)
        client.send(bytes([IAC, 0xFD, 99]))                      # DO 99: a reply comes
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    spin_until(loop, lambda: bench.driver.status & c.STATUS_DEVICE_NEEDS_RESET or
               endpoint.client is None and not endpoint._departed)
    a_fresh_session_is_served(bench, loop, endpoint)


def test_a_client_that_reads_no_replies_is_dropped_and_its_replies_with_it(served, loop):
    """Past RAW_LIMIT bytes of replies the client is dropped; the rest of that read went on
    through the filter, whose replies went to the next client first (or failed the
    device, dropping the client a second time)."""
    bench, endpoint = served
    bench.driver.init([0, 1])
    client = raw_client(endpoint, rcvbuf=4096)
    spin_until(loop, lambda: endpoint.client is not None)
    endpoint.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    requests = bytes([IAC, 0xFB, 44, IAC, 0xFC, 44]) * 20000    # WILL, WONT COM-PORT

    def dropped():
        try:
            client.send(requests)
        except BlockingIOError:
            pass
        loop.run_once(0.001)
        return endpoint.client is None
    spin_until(loop, dropped)
    client.close()
    assert not endpoint._raw
    a_fresh_session_is_served(bench, loop, endpoint)


@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_what_a_client_sent_before_it_left_reaches_the_guest(served, loop, how):
    """Its input, filtered and held while the guest took none, was discarded with it
    (typing then a close: nothing; 200 000 bytes then a shutdown: 5 120)."""
    bench, endpoint = served
    rx, tx = bench.driver.init([0, 1])
    client = raw_client(endpoint)
    spin_until(loop, lambda: endpoint.client is not None)
    client.send(b"hello guest\n")
    if how == "close":
        client.close()             # with the session's opening unread: a reset
    else:
        client.shutdown(socket.SHUT_WR)
    spin_until(loop, lambda: endpoint.client is None)
    client.close()
    rx.post(writable=[64])
    rx.notify()
    for _ in range(3):
        loop.run_once(0)
    assert [u.data for u in rx.get_used()] == [b"hello guest\n"]


def test_input_held_while_the_guest_reads_slowly_is_bounded(served, loop):
    """Each pause of a guest reading a small buffer at a time read another RECV_SIZE bytes:
    20 MB sent, 19.5 MB held. Now at most INPUT_HOLD + RECV_SIZE, and all arrives."""
    bench, endpoint = served
    rx, tx = bench.driver.init([0, 1])
    client = raw_client(endpoint)
    data = bytes(range(255)) * 4096                              # 1 MiB, no IAC
    sender = threading.Thread(target=lambda: (client.setblocking(True), client.sendall(data)))
    sender.start()
    got, progress = bytearray(), Progress()
    try:
        while len(got) < len(data):
            for used in rx.get_used():
                got.extend(used.data)
            if not rx.outstanding:
                rx.post(writable=[512])
                rx.notify()
            loop.run_once(0)
            assert len(endpoint._input) <= INPUT_HOLD + RECV_SIZE
            if not progress.moved(len(got), len(endpoint._input)):
                loop.run_once(0.001)
    finally:
        sender.join()
        client.close()
    assert got == data


def test_an_endless_subnegotiation_drops_the_client(served, loop):
    """An IAC SB never ended grew pyserial's suboption buffer without bound."""
    bench, endpoint = served
    bench.driver.init([0, 1])
    client = raw_client(endpoint)
    client.send(SUB)
    filler = b"A" * 65536

    def dropped():
        try:
            client.send(filler)
        except (BlockingIOError, ConnectionResetError, BrokenPipeError):
            pass
        loop.run_once(0.001)
        if endpoint.protocol is not None and endpoint.protocol.suboption is not None:
            assert len(endpoint.protocol.suboption) <= SUBOPTION_LIMIT + RECV_SIZE
        return endpoint.client is None
    spin_until(loop, dropped)
    client.close()
    a_fresh_session_is_served(bench, loop, endpoint)


def test_what_a_client_makes_pyserial_log_is_rate_limited(served, loop, caplog):
    """Every NOP, refused option and unknown subnegotiation was a warning: 8 000 lines
    from 32 KB."""
    bench, endpoint = served
    rx, tx = bench.driver.init([0, 1])
    client = raw_client(endpoint)
    requests = (bytes([IAC, 0xF1, IAC, 0xFB, 99]) + SUB + b"\x63" + END) * 2000
    client.setblocking(True)
    client.sendall(requests + b"end")
    client.setblocking(False)
    with caplog.at_level(logging.INFO, logger="avatar_hw.endpoints.rfc2217"):
        assert guest_reads(loop, rx, 3) == b"end"              # all of it was filtered
    assert len(caplog.records) <= 2 * 20 + 6                # 20 each of warnings and info
    assert endpoint.client is not None                     # nothing wrong with the client
    client.close()
