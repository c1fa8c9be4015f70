"""A small client for QEMU's qtest protocol: QEMU's own device models as test peers.

``QTest`` starts one short-lived ``qemu-system-aarch64`` with ``-qtest`` and
(optionally) a QMP monitor, and speaks the qtest text protocol::

    readl 0x8000204          ->  OK 0x0000000000010000
    writel 0x8000204 0x10000 ->  OK
    irq_intercept_in PATH    ->  OK   (then "IRQ raise N" / "IRQ lower N" lines at any time)

Both sockets are listening sockets created here, to which QEMU connects at
start-up (``-qtest unix:PATH``, QEMU as client, as QEMU's own libqtest does):
there is no window in which we poll for a socket QEMU has not created yet.
Debian 12's QEMU 7.2 has no ``-accel qtest``; the machine runs under TCG, so
``stopped=True`` (the default) passes ``-S`` to keep the vCPU from running;
tests that need a running guest pass ``stopped=False`` and their own program.

``IRQ`` lines can arrive between a command and its answer; they are collected
in ``irq_events`` (a list of ``(level, line)``, level ``"raise"`` or
``"lower"``) and ``wait_irq`` waits for one. ``close()`` kills QEMU by its own
PID and removes the sockets and the temporary directory; use ``with``.

Register access goes through ``readl``/``writel``, so a ``QTest`` can stand
where a ``Region`` is expected by code that only needs ``read32``/``write32``
(see ``window``).
"""

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time

from ..emulated.machine import qemu_value
from ..errors import AvatarError

QEMU = "qemu-system-aarch64"


class QTestError(AvatarError):
    """QEMU refused a command, died, or did not answer in time."""


class QTest:
    def __init__(self, extra_args=(), *, machine="virt", stopped=True, qmp=False,
                 qemu=QEMU, timeout=30.0):
        self.timeout = timeout
        self.irq_events = []
        self.qmp_events = []
        self._buf = {}
        self._dir = tempfile.mkdtemp(prefix="avatar-qtest-")
        self._proc = self._sock = self._qmp = None
        try:
            qtest_listener = self._listen("qtest.sock")
            qmp_listener = self._listen("qmp.sock") if qmp else None
            self._stderr = open(os.path.join(self._dir, "stderr"), "w+b")
            argv = [qemu, "-M", machine, "-display", "none", "-nodefaults",
                    "-qtest", f"unix:{qemu_value(qtest_listener.getsockname())}",
                    "-qtest-log", "/dev/null"]
            if qmp_listener:
                argv += ["-qmp", f"unix:{qemu_value(qmp_listener.getsockname())}"]
            if stopped:
                argv.append("-S")
            argv += list(extra_args)
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                          stdout=self._stderr, stderr=self._stderr)
            self._sock = self._accept(qtest_listener)
            if qmp_listener:
                self._qmp = self._accept(qmp_listener)
                self._qmp_line()                       # greeting
                self.qmp("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    # -- process and sockets ------------------------------------------------------

    def _listen(self, name):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.path.join(self._dir, name))
        listener.listen(1)
        return listener

    def _accept(self, listener):
        with listener:
            deadline = time.monotonic() + self.timeout
            while not select.select([listener], [], [], 0.05)[0]:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise QTestError(f"QEMU did not connect: {self._failure()}")
            conn, _ = listener.accept()
        return conn

    def _failure(self):
        status = self._proc.poll() if self._proc else None
        self._stderr.seek(0)
        output = self._stderr.read().decode(errors="replace").strip().replace("\n", " | ")
        state = "running" if status is None else f"exit status {status}"
        return f"{state}; QEMU said: {output or '(nothing)'}"

    def _line(self, sock, deadline):
        """Next line from ``sock`` (without the newline), or None at ``deadline``."""
        buf = self._buf.setdefault(sock.fileno(), bytearray())
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
                return None
            try:
                data = sock.recv(65536)
            except ConnectionResetError:      # QEMU exited with our command unread
                data = b""
            if not data:
                raise QTestError(f"QEMU closed the connection: {self._failure()}")
            buf += data
        line, _, rest = bytes(buf).partition(b"\n")
        buf[:] = rest
        return line.decode().rstrip("\r")

    def close(self):
        """Kill QEMU (its own PID), close the sockets, remove the temporary files."""
        for sock in (self._sock, self._qmp):
            if sock is not None:
                sock.close()
        self._sock = self._qmp = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
            self._stderr = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def pid(self):
        return self._proc.pid if self._proc else None

    # -- qtest protocol -------------------------------------------------------------

    def command(self, text):
        """Send one qtest command; return the words after ``OK`` (a list)."""
        try:
            self._sock.sendall(text.encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            raise QTestError(f"QEMU closed the connection: {self._failure()}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            line = self._line(self._sock, deadline)
            if line is None:
                raise QTestError(f"no answer to {text!r} in {self.timeout} s: {self._failure()}")
            if not self._take_irq(line):
                break
        words = line.split()
        if not words or words[0] != "OK":
            raise QTestError(f"QEMU answered {line!r} to {text!r}")
        return words[1:]

    def _take_irq(self, line):
        words = line.split()
        if len(words) == 3 and words[0] == "IRQ" and words[1] in ("raise", "lower"):
            self.irq_events.append((words[1], int(words[2])))
            return True
        return False

    def _read(self, op, addr):
        return int(self.command(f"{op} 0x{addr:x}")[0], 16)

    def _write(self, op, addr, value):
        self.command(f"{op} 0x{addr:x} 0x{value:x}")

    def readb(self, addr):
        return self._read("readb", addr)

    def readw(self, addr):
        return self._read("readw", addr)

    def readl(self, addr):
        return self._read("readl", addr)

    def readq(self, addr):
        return self._read("readq", addr)

    def writeb(self, addr, value):
        self._write("writeb", addr, value)

    def writew(self, addr, value):
        self._write("writew", addr, value)

    def writel(self, addr, value):
        self._write("writel", addr, value)

    def writeq(self, addr, value):
        self._write("writeq", addr, value)

    def memread(self, addr, size):
        """``size`` bytes of guest memory at ``addr``."""
        return base64.b64decode(self.command(f"b64read 0x{addr:x} 0x{size:x}")[0])

    def memwrite(self, addr, data):
        encoded = base64.b64encode(bytes(data)).decode()
        self.command(f"b64write 0x{addr:x} 0x{len(data):x} {encoded}")

    def irq_intercept_in(self, qom_path):
        """Report the input GPIO lines of ``qom_path`` (e.g. a CPU) as ``IRQ`` events."""
        self.command(f"irq_intercept_in {qom_path}")

    def wait_irq(self, level="raise", line=0, timeout=None):
        """Wait for (and consume) the event ``(level, line)``; earlier events stay listed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while (level, line) not in self.irq_events:
            event = self._line(self._sock, deadline)
            if event is None:
                raise QTestError(f"no 'IRQ {level} {line}' within the timeout "
                                 f"(events so far: {self.irq_events})")
            if not self._take_irq(event):
                raise QTestError(f"unexpected line from QEMU: {event!r}")
        self.irq_events.remove((level, line))

    def window(self, base):
        """A ``read32``/``write32`` view of the guest-physical registers at ``base``."""
        return QTestWindow(self, base)

    # -- QMP --------------------------------------------------------------------------

    def _qmp_line(self):
        line = self._line(self._qmp, time.monotonic() + self.timeout)
        if line is None:
            raise QTestError(f"QMP did not answer in {self.timeout} s: {self._failure()}")
        return json.loads(line)

    def qmp(self, command, **arguments):
        """Run one QMP command and return its ``return`` value (events are kept in qmp_events)."""
        if self._qmp is None:
            raise QTestError("QMP is not open: start QTest(..., qmp=True)")
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._qmp.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._qmp_line()
            if "event" in reply:
                self.qmp_events.append(reply)
            elif "error" in reply:
                raise QTestError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            else:
                return reply["return"]

    def find_devices(self, type_suffix, root="/machine/unattached"):
        """QOM paths of ``root``'s children whose type ends with ``type_suffix`` (needs
        qmp=True)."""
        return sorted(f"{root}/{child['name']}" for child in self.qmp("qom-list", path=root)
                      if child["type"].startswith("child<")
                      and child["type"][len("child<"):-1].endswith(type_suffix))


class QTestWindow:
    """Registers at ``base`` seen through qtest, with Region's 8- and 32-bit access names."""

    def __init__(self, qtest, base):
        self.qtest, self.base = qtest, base

    def read8(self, offset):
        return self.qtest.readb(self.base + offset)

    def write8(self, offset, value):
        self.qtest.writeb(self.base + offset, value)

    def read32(self, offset):
        return self.qtest.readl(self.base + offset)

    def write32(self, offset, value):
        self.qtest.writel(self.base + offset, value)


def require_qemu(qemu=QEMU):
    """Skip the calling test when ``qemu`` is not installed (scripts/setup installs it)."""
    if shutil.which(qemu) is None:
        import pytest
        pytest.skip(f"{qemu} is not installed: run scripts/setup (Debian package qemu-system-arm)")
