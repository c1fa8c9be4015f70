"""The control server against clients that misbehave: whatever a local client sends, the
daemon's loop answers in bounded turns, holds bounded memory, logs no traceback, and
keeps serving (avatar_hw.control)."""

import errno
import json
import socket

import pytest

from avatar_hw import control
from avatar_hw.control import LINES_PER_TURN, MAX_CLIENTS, MAX_REQUEST, ControlServer
from avatar_hw.loop import EventLoop

DEVICES = [{"vm": 0, "slot": 0, "name": "console"}]


class Introspected:
    """What the control server asks of a daemon, for ``list``, ``info`` and ``debug``."""

    faults = None

    def list_devices(self):
        return DEVICES

    def info(self):
        return {"vms": [{"vm": 0, "devices": DEVICES * 50}]}

    def debug_device(self, vm, slot):
        return DEVICES[0]

    def screenshot(self, vm, slot):
        raise ValueError(f"VM {vm} slot {slot} is a console, not a gpu")


@pytest.fixture
def served(tmp_path):
    loop = EventLoop()
    server = ControlServer(tmp_path / "control.sock", Introspected())
    server.attach(loop)
    yield loop, server
    server.close()
    loop.close()


def connect(server):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(server.path)
    sock.setblocking(False)
    return sock


def pump(loop, turns=20):
    for _ in range(turns):
        loop.run_once(0.01)


def replies(loop, sock, count):
    got = bytearray()
    for _ in range(500):
        loop.run_once(0.01)
        try:
            got += sock.recv(1 << 20)
        except BlockingIOError:
            pass
        if got.count(b"\n") >= count:
            return [json.loads(line) for line in got.splitlines()]
    raise AssertionError(f"{count} replies never came: {bytes(got[:200])}")


def held(server):
    """Bytes the server holds for its clients."""
    return sum(len(c.inbox) + len(c.outbox) for c in server._clients.values())


def test_a_client_that_never_reads_its_answers_holds_one_of_them(served):
    """Requests sent as fast as the socket takes them, answers never read: the server
    stops reading from that client once an answer waits, so what it holds stays about one
    answer and one read (it grew by an answer per request: 200 MB in 20 s); another
    client is answered meanwhile, and the first gets every answer in order once it reads."""
    loop, server = served
    flood = connect(server)
    request = b'{"command": "info"}\n'
    sent = 0
    for _ in range(200):
        try:
            sent += flood.send(request * 64)
        except BlockingIOError:
            pump(loop, 2)
    pump(loop)
    answer = len(json.dumps({"ok": True, "result": Introspected().info()})) + 1
    assert held(server) <= answer + 2 * MAX_REQUEST
    other = connect(server)
    other.send(b'{"command": "list"}\n')
    assert replies(loop, other, 1) == [{"ok": True, "result": DEVICES}]
    flood.setblocking(True)
    flood.settimeout(0.05)
    got = 0
    for _ in range(20000):
        loop.run_once(0)
        try:
            chunk = flood.recv(1 << 20)
        except TimeoutError:
            continue
        got += chunk.count(b"\n")
        if got == sent // len(request):
            break
    assert got == sent // len(request)


def test_a_turn_answers_a_bounded_number_of_one_clients_requests(served):
    loop, server = served
    sock = connect(server)
    sock.send(b'{"command": "list"}\n' * 100)
    loop.run_once(0.5)                  # the read, and the first answers
    loop.run_once(0)
    assert sock.recv(1 << 20).count(b"\n") <= 2 * LINES_PER_TURN
    assert len(replies(loop, sock, 100 - 2 * LINES_PER_TURN)) >= 100 - 2 * LINES_PER_TURN


def test_failed_screenshots_among_requests_leave_no_timer_behind(served):
    """A screenshot that fails at once, inside a batch of requests longer than a turn's:
    its answer served the client's next lines from inside the batch's own serve, whose
    timer for the next turn was then forgotten; it fired after the client had gone and
    the loop raised (epoll of fd -1): every VM lost its devices."""
    loop, server = served
    sock = connect(server)
    shot = b'{"command": "screenshot", "vm": 0, "device": "0"}\n'
    listing = b'{"command": "list"}\n'
    sock.send(listing * 8 + shot + listing * 8 + shot + listing * 2)
    sock.shutdown(socket.SHUT_WR)
    answers = replies(loop, sock, 20)
    assert [a["ok"] for a in answers] == [True] * 8 + [False] + [True] * 8 + [False] + [True] * 2
    pump(loop)
    assert server._clients == {}


@pytest.mark.parametrize("line", [b"[" * 3000, b'{"command": "debug", "vm": 1e400, '
                                  b'"device": "0"}', b'{"command": "clear", "vm": 1e400}',
                                  b"\n" * 3, b"x" * (MAX_REQUEST + 10)],
                         ids=["deep", "infinite-vm", "infinite-clear", "empty", "long"])
def test_a_bad_request_is_a_one_line_answer_and_no_traceback(served, caplog, line):
    loop, server = served
    sock = connect(server)
    sock.send(line + b"\n")
    answers = replies(loop, sock, 1)
    assert all(not a["ok"] and "\n" not in a["error"] for a in answers), answers
    assert "Traceback" not in caplog.text and not caplog.records
    sock.send(b'{"command": "list"}\n')
    assert replies(loop, sock, 1)[-1] == {"ok": True, "result": DEVICES}


@pytest.mark.parametrize("line, error", [
    ("{}", 'missing key "command" (a string: list, info, debug, ...)'),
    ('{"command": 5}', '"command" must be a string'),
    ("[1, 2]", 'a request is a JSON object, e.g. {"command": "list"}'),
    ('{"command": "debug"}', 'missing key "vm" (debug takes vm, device)'),
    ('{"command": "inject", "vm": 0, "device": "0"}',
     'missing key "fault" (inject takes vm, device, fault)'),
    ('{"command": "debug", "vm": "zero", "device": "0"}',
     '"vm" must be a VM number (0, 1, ...), not "zero"'),
    ('{"command": "balloon", "vm": 1.5}', '"vm" must be a VM number (0, 1, ...), not 1.5'),
    ('{"command": "pause", "seconds": "soon"}', 'pause of "soon" s: give 0 < seconds <= 3600'),
    ('{"command": "clear", "device": "0"}',
     'missing key "vm" (clear takes a device with its vm)'),
])
def test_a_bad_request_says_what_is_wrong_with_it(served, line, error):
    """Not Python's text ("'command'", "list indices must be integers or slices, not str")."""
    loop, server = served
    assert server.answer(line) == {"ok": False, "error": f"bad request: {error}"}


def test_clients_past_the_limit_are_told_and_the_others_served(served):
    loop, server = served
    clients = []
    for _ in range(MAX_CLIENTS):
        clients.append(connect(server))         # the backlog is short: accept as they come
        pump(loop, 1)
    extra = connect(server)
    [refused] = replies(loop, extra, 1)
    assert not refused["ok"] and "try again" in refused["error"]
    clients[0].send(b'{"command": "list"}\n')
    assert replies(loop, clients[0], 1) == [{"ok": True, "result": DEVICES}]


class OutOfDescriptors:
    """The listening socket of a daemon with no descriptor left: accept() fails."""

    def __init__(self, sock):
        self.sock, self.calls, self.failing = sock, 0, True

    def fileno(self):
        return self.sock.fileno()

    def accept(self):
        self.calls += 1
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def close(self):
        self.sock.close()


def test_no_descriptor_for_a_client_pauses_accepting_and_stops_nothing(tmp_path):
    """accept() failing (EMFILE) raised out of the loop: the daemon exited, every VM lost
    its devices. Now accepting pauses a while, then the client is served."""
    loop = EventLoop()
    server = ControlServer(tmp_path / "control.sock", Introspected())
    server.sock = OutOfDescriptors(server.sock)
    server.attach(loop)
    try:
        sock = connect(server)
        sock.send(b'{"command": "list"}\n')
        for _ in range(10):
            loop.run_once(0.01)
        assert 1 <= server.sock.calls <= 3                  # not once a turn
        server.sock.failing = False
        assert replies(loop, sock, 1) == [{"ok": True, "result": DEVICES}]
    finally:
        server.close()
        loop.close()
