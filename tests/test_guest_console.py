"""GuestConsole against real peers: a shell on a pty, on socket://, unix:// and rfc2217://."""

import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import termios
import threading
import time

import pytest
import serial

from avatar_hw.endpoints import open_endpoint
from avatar_hw.errors import AvatarError
from avatar_hw.hil.console import (POLL, ConsoleClosed, ConsoleTimeout, GuestConsole, open_serial,
                                   pyserial_url)
from avatar_hw.loop import EventLoop
from patching import this_thread_only

libc = ctypes.CDLL(None, use_errno=True)
libc.ptsname.restype = ctypes.c_char_p


def spawn_shell(fd, shell="/bin/sh", prompt="$ ", setup=None):
    """An interactive ``shell`` with ``fd`` as its terminal (or socket)."""
    env = {"PATH": os.environ["PATH"], "PS1": prompt, "HOME": "/tmp", "TERM": "dumb"}
    args = [shell, "--norc", "--noprofile", "-i"] if shell.endswith("bash") else [shell, "-i"]

    def child():                                 # fd is the child's 0, 1 and 2 by now
        default_signals()
        if os.isatty(0):
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            if setup:
                subprocess.run(["stty", *setup.split()], check=True)

    return subprocess.Popen(args, stdin=fd, stdout=fd, stderr=fd, env=env, cwd="/tmp",
                            start_new_session=True, preexec_fn=child)


def default_signals():
    """SIGINT and SIGQUIT as a guest's shell has them (Ctrl-C ends its command), whatever
    pytest inherited: a script's background job (``pytest &``) starts with both ignored, the
    shell would keep them so and pass them on to its commands."""
    for signum in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)


def stop(process):
    process.kill()
    process.wait(5)


@pytest.fixture
def pty_shell(request):
    """GuestConsole on the master side of a new pty (pyserial opens /dev/ptmx); a real shell
    on the other side, in its default (cooked, echoing) terminal modes unless ``setup``."""
    shell, prompt, setup = getattr(request, "param", ("/bin/sh", "$ ", None))
    if not shutil.which(shell):
        pytest.skip(f"{shell} is not installed")
    port = serial.Serial("/dev/ptmx", timeout=POLL)
    fd = port.fileno()
    assert libc.grantpt(fd) == 0 and libc.unlockpt(fd) == 0
    slave = os.open(libc.ptsname(fd), os.O_RDWR | os.O_NOCTTY)
    attrs = termios.tcgetattr(slave)             # pyserial made it raw: give the shell a
    attrs[0] |= termios.ICRNL                    # terminal like a console's (sane modes)
    attrs[1] |= termios.OPOST | termios.ONLCR
    attrs[3] |= termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN | termios.ECHOE
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    process = spawn_shell(slave, shell, prompt, setup)
    os.close(slave)
    console = GuestConsole(port, name=f"pty {shell}")
    yield console
    stop(process)
    console.close()


SHELLS = [("/bin/sh", "$ ", None), ("/bin/sh", "$ ", "-echo"), ("/bin/bash", "$ ", None),
          ("/bin/sh", "__AVT_0123456789abcdef_E0 > ", None), ("/bin/sh", "", None)]
IDS = ["sh-echo", "sh-noecho", "bash-readline", "prompt-like-a-marker", "no-prompt"]


@pytest.mark.parametrize("pty_shell", SHELLS, ids=IDS, indirect=True)
def test_run_on_a_pty(pty_shell):
    console = pty_shell
    console.wait_shell(60)
    assert console.run("echo hello") == ("hello\n", 0)
    assert console.run("false") == ("", 1)
    assert console.run("sh -c 'exit 7'") == ("", 7)
    assert console.run("printf 'no newline'") == ("no newline", 0)
    assert console.run("printf 'a\\nb\\n'; echo err >&2;") == ("a\nb\nerr\n", 0)
    output, status = console.run("echo __AVT_; echo __AVT_0123456789abcdef_E5; echo x''_B")
    assert (output, status) == ("__AVT_\n__AVT_0123456789abcdef_E5\nx_B\n", 0)
    assert console.check("seq 1 2000 | wc -l").strip() == "2000"
    with pytest.raises(AssertionError, match="exited 1"):
        console.check("test -e /nonexistent")


def test_expect_and_sendline(pty_shell):
    console = pty_shell
    console.wait_shell(60)
    console.sendline("read v; echo got-$v")
    console.sendline("value")
    assert console.expect(r"got-(\w+)", 30).group(1) == "value"
    console.sendline("echo ab''cd")
    assert console.expect(rb"abcd", 30).group(0) == "abcd"             # bytes patterns too


def test_expect_timeout_shows_the_last_output(pty_shell):
    console = pty_shell
    console.wait_shell(60)
    console.sendline("echo something else")
    with pytest.raises(ConsoleTimeout, match="no 'never' within 0.3 s; last output: .*else"):
        console.expect("never", 0.3)


def test_expect_a_list_gives_the_index_of_the_earliest_match(pty_shell):
    console = pty_shell
    console.wait_shell(60)
    console.sendline("echo one-$((1)) two-$((2))")
    assert console.expect(["two-2", r"one-(\d)", "never"], 30) == 1       # earliest in the output
    assert console.match.group(1) == "1"
    assert console.expect(["never", "two-2"], 30) == 1                     # the rest stays
    assert console.expect(["never", ConsoleTimeout], 0.3) == 1            # pexpect's TIMEOUT
    with pytest.raises(ConsoleTimeout, match="no 'never' or 'nor this' within 0.3 s"):
        console.expect(["never", "nor this"], 0.3)


def test_expect_exact_takes_text_literally(pty_shell, tmp_path):
    console = pty_shell
    console.wait_shell(60)
    console.sendline("echo '[ OK ] a.b*' x''y")
    assert console.expect_exact("[ OK ] a.b*", 30).group(0) == "[ OK ] a.b*"
    assert console.expect_exact([b"a.c", "xy"], 30) == 1
    log = open(tmp_path / "console.log", "w")
    console.log = log
    console.sendline("echo lo''gged")
    console.expect_exact("logged", 30)
    log.close()
    assert "logged" in (tmp_path / "console.log").read_text()


def test_wait_shell_interrupts_a_command_left_running(pty_shell):
    """A previous test's ``sleep`` still running and a half-typed line: only Ctrl-C first
    (``interrupt``) gets a prompt back."""
    console = pty_shell
    console.wait_shell(60)
    console.sendline("sleep 1000")
    console.send("echo half-typ")
    with pytest.raises(ConsoleTimeout, match="no shell answered within 1 s"):
        console.wait_shell(1)
    console.wait_shell(30, interrupt=True)
    assert console.run("echo $((6 * 7))") == ("42\n", 0)


def test_run_rejects_several_lines(pty_shell):
    with pytest.raises(ValueError, match="one command line"):
        pty_shell.run("echo a\necho b")


def socket_pair_server(family, address):
    """A listening socket whose first client gets an interactive sh on the connection."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1)
    processes = []

    def serve():
        conn, _ = listener.accept()
        processes.append(spawn_shell(conn.fileno()))
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, processes


def test_run_over_socket_url():
    listener, processes = socket_pair_server(socket.AF_INET, ("127.0.0.1", 0))
    try:
        with GuestConsole.open("socket://127.0.0.1:%d" % listener.getsockname()[1]) as console:
            console.wait_shell(60)
            assert console.run("echo over tcp; false") == ("over tcp\n", 1)
    finally:
        listener.close()
        for process in processes:
            stop(process)


def test_run_over_unix_url(tmp_path):
    path = str(tmp_path / "console.sock")
    listener, processes = socket_pair_server(socket.AF_UNIX, path)
    try:
        with GuestConsole.open(f"unix://{path}") as console:
            console.wait_shell(60)
            assert console.run("echo over unix") == ("over unix\n", 0)
    finally:
        listener.close()
        for process in processes:
            stop(process)


def test_closed_peer_is_reported(tmp_path):
    path = str(tmp_path / "console.sock")
    listener, processes = socket_pair_server(socket.AF_UNIX, path)
    try:
        with GuestConsole.open(f"unix://{path}") as console:
            console.wait_shell(60)
            assert console.gone is None
            console.sendline("exit")
            with pytest.raises(ConsoleClosed, match="disconnected"):
                console.expect("never", 60)          # ends at the disconnect
            assert "socket disconnected" in console.gone
            with pytest.raises(ConsoleClosed):
                console.expect("never", 0)
            assert "socket disconnected" in console.gone
    finally:
        listener.close()
        for process in processes:
            stop(process)


class ShellBehindEndpoint:
    """A real shell on a pty behind a daemon console endpoint, served by an EventLoop thread:
    what a guest's hvc0 shell is behind the console device (here without the device)."""

    def __init__(self, url):
        self.loop = EventLoop()
        self.endpoint = open_endpoint(url)
        self.master, slave = os.openpty()
        self.process = spawn_shell(slave)
        os.close(slave)
        os.set_blocking(self.master, False)
        self.buffer = bytearray(4096)
        self.endpoint.attach(self.loop, self._to_shell, self._from_shell)
        self.loop.add_reader(self.master, self._from_shell)
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            self.loop.run_once(0.05)

    def _to_shell(self):
        view = memoryview(self.buffer)
        n = self.endpoint.readinto([view])
        if n:
            os.write(self.master, view[:n])

    def _from_shell(self):
        room = self.endpoint.room()
        if not room:
            self.loop.remove_reader(self.master)        # resumed by the drained callback
            return
        self.loop.add_reader(self.master, self._from_shell)
        try:
            data = os.read(self.master, room)
        except (BlockingIOError, OSError):
            return
        self.endpoint.write([memoryview(data)], len(data))

    def close(self):
        self._stop = True
        self.thread.join(5)
        stop(self.process)
        self.endpoint.close()
        os.close(self.master)
        self.loop.close()


@pytest.mark.parametrize("scheme", ["rfc2217", "tcp"])
def test_run_over_the_daemons_network_endpoints(scheme):
    peer = ShellBehindEndpoint(f"{scheme}:127.0.0.1:0")
    try:
        port = peer.endpoint.listener.getsockname()[1]
        url = pyserial_url(f"{scheme}:0.0.0.0:{port}")
        assert url == f"{'socket' if scheme == 'tcp' else scheme}://127.0.0.1:{port}"
        with GuestConsole.open(url) as console:
            console.wait_shell(60)
            assert console.run("printf '\\377\\n' | od -An -tx1") == (" ff 0a\n", 0)
            assert console.run("printf 'x\\377y'") == ("x\ufffdy", 0)   # 0xFF arrives raw
            console.sendline("read v; printf %s \"$v\" | od -An -tx1")      # and is sent raw
            console.send(b"\xfe\xff\n")
            assert console.expect(r" fe ff\r?\n", 30)
    finally:
        peer.close()


def test_pyserial_urls_of_endpoints():
    assert pyserial_url("pty:/run/avatar/vm0") == "/run/avatar/vm0"
    assert pyserial_url("unix:/run/avatar/vm0.sock") == "unix:///run/avatar/vm0.sock"
    assert pyserial_url("tcp:4555") == "socket://127.0.0.1:4555"
    assert pyserial_url("rfc2217:[::]:4560") == "rfc2217://[::1]:4560"
    assert pyserial_url("rfc2217:10.0.0.2:4560") == "rfc2217://10.0.0.2:4560"
    assert pyserial_url("file:/var/log/x") is None and pyserial_url("stdio") is None


def test_bad_url_is_one_line():
    with pytest.raises(AvatarError, match="^console nope://x: .*nope") as err:
        open_serial("nope://x")
    assert "\n" not in str(err.value)


def test_a_port_that_does_not_open_is_one_clean_line(tmp_path):
    """pyserial's message doubled the errno and the path: "[Errno 2] could not open port X:
    [Errno 2] No such file or directory: 'X'"; a bad ?option was a KeyError traceback."""
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    cases = {
        str(tmp_path / "ttyUSB9"): "cannot open: No such file or directory",
        str(tmp_path / "dir"): "cannot open: Is a directory",
        str(tmp_path / "file"): "cannot open: Inappropriate ioctl for device (not a serial "
                                "port or a terminal: give a tty, or a socket://, rfc2217:// "
                                "or unix:// URL)",
        f"unix://{tmp_path / 'none.sock'}": "cannot open: No such file or directory",
        f"socket://127.0.0.1:{port}": "cannot open: Connection refused",
        "loop://?colour=1": "not a URL pyserial takes: check its host:port and ?options",
        "socket://127.0.0.1:1?colour=1": "not a URL pyserial takes",
    }
    for url, problem in cases.items():
        with pytest.raises(AvatarError) as err:
            open_serial(url)
        assert str(err.value).startswith(f"console {url}: {problem}"), str(err.value)
        assert "Errno" not in str(err.value) and "\n" not in str(err.value)


def test_unix_url_keeps_what_the_peer_sent_at_once(tmp_path, monkeypatch):
    """unix:// does not discard input at open (pyserial's socket:// does): a shell's first
    prompt or the daemon's backlog arrives the moment the client connects."""
    path = str(tmp_path / "peer.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    sent = threading.Event()

    def greet():
        conn, _ = listener.accept()
        conn.sendall(b"first prompt$ ")
        sent.set()
        conn.recv(1)
        conn.close()

    threading.Thread(target=greet, daemon=True).start()
    original = socket.socket.setblocking

    def slow_setblocking(sock, flag):               # open() finishes after the greeting
        sent.wait(5)
        time.sleep(0.05)
        return original(sock, flag)

    monkeypatch.setattr(socket.socket, "setblocking",
                        this_thread_only(original, slow_setblocking))
    console = GuestConsole.open(f"unix://{path}")
    monkeypatch.undo()
    try:
        assert console.expect_exact("first prompt$ ", 30)
    finally:
        console.send(b"x")
        console.close()
        listener.close()


def one_client(family, address, serve):
    """A listening socket; ``serve(conn)`` in a thread for its first client. The listener."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1)

    def accept():
        conn, _ = listener.accept()
        with conn:
            serve(conn)

    threading.Thread(target=accept, daemon=True).start()
    return listener


def one_client_url(family, tmp_path, serve):
    """``one_client`` on a Unix socket in ``tmp_path`` or on loopback TCP: (the listener, the
    console's URL)."""
    if family == socket.AF_UNIX:
        path = str(tmp_path / "console.sock")
        return one_client(family, path, serve), f"unix://{path}"
    listener = one_client(family, ("127.0.0.1", 0), serve)
    return listener, "socket://127.0.0.1:%d" % listener.getsockname()[1]


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET], ids=["unix", "tcp"])
def test_the_last_output_before_the_peer_closes_is_kept(tmp_path, family):
    """A guest's last line and its close, both waiting when the console reads (pyserial's
    socket read drops what it read in the call that meets the close): the line is read,
    then ConsoleClosed shows it."""
    opened, closed = threading.Event(), threading.Event()

    def panic(conn):
        opened.wait(30)
        conn.sendall(b"Kernel panic - not syncing: Attempted to kill init!\n")
        conn.shutdown(socket.SHUT_WR)
        closed.set()

    listener, url = one_client_url(family, tmp_path, panic)
    try:
        with GuestConsole.open(url) as console:
            opened.set()
            assert closed.wait(30)
            assert console.expect(["Kernel panic", ConsoleClosed], 30) == 0
            with pytest.raises(ConsoleClosed, match="last output: .*Attempted to kill init"):
                console.expect("never", 30)
    finally:
        listener.close()


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET], ids=["unix", "tcp"])
def test_output_waiting_is_read_in_large_reads(tmp_path, family):
    """64 KiB waiting on the socket (it holds them all): read in chunks, not a byte a call
    (pyserial's socket:// in_waiting says 1 for any: 80 times the CPU per byte)."""
    opened, sent = threading.Event(), threading.Event()

    def flood(conn):
        opened.wait(30)
        conn.sendall(b"x" * (64 << 10) + b"END\n")
        sent.set()
        opened.wait(30)
        time.sleep(0.5)

    listener, url = one_client_url(family, tmp_path, flood)
    try:
        with GuestConsole.open(url) as console:
            reads, read = [], console.port.read
            console.port.read = lambda size=1: reads.append(size) or read(size)
            opened.set()
            assert sent.wait(30)
            console.expect("END", 30)
            assert len(reads) < 200, f"{len(reads)} reads for 64 KiB"
    finally:
        listener.close()


@pytest.mark.timeout(60)
def test_drain_returns_while_the_guest_keeps_printing(tmp_path):
    """``dmesg -w``: output that never stops; drain reads a bounded amount and returns."""
    path = str(tmp_path / "console.sock")
    stop_printing = threading.Event()

    def chatter(conn):
        while not stop_printing.is_set():
            try:
                conn.sendall(b"[   12.345678] virtio_net virtio2 eth0: chatter\r\n" * 64)
            except OSError:
                return

    listener = one_client(socket.AF_UNIX, path, chatter)
    try:
        with GuestConsole.open(f"unix://{path}") as console:
            console.expect_exact("chatter", 30)
            console.drain()
            assert "chatter" in console.buffer
    finally:
        stop_printing.set()
        listener.close()


def test_expect_at_timeout_zero_reads_what_is_waiting(tmp_path):
    path = str(tmp_path / "console.sock")
    sent, done = threading.Event(), threading.Event()

    def ready(conn):
        conn.sendall(b"ready\n")
        sent.set()
        done.wait(30)

    listener = one_client(socket.AF_UNIX, path, ready)
    try:
        with GuestConsole.open(f"unix://{path}") as console:
            assert sent.wait(30)
            assert console.expect_exact("ready", timeout=0).group(0) == "ready"
    finally:
        done.set()
        listener.close()
