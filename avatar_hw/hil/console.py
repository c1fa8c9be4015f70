"""Expect-style access to a guest's shell over any pyserial port.

``GuestConsole`` wraps a pyserial object (``serial_for_url`` of a board UART
such as /dev/ttyUSB0, a pty path, ``socket://host:port``,
``rfc2217://host:port``, or ``unix:///path`` for the daemon's ``unix:``
console endpoints)::

    console = GuestConsole.open("rfc2217://127.0.0.1:4560")
    console.wait_shell(60)                    # until a shell answers
    output, status = console.run("uname -m")  # ("aarch64\\n", 0)
    console.sendline("cat")
    console.expect(r"some (\\w+)", timeout=5).group(1)
    console.expect(["login: ", r"\\$ ", ConsoleTimeout])   # the index, like pexpect's
    console.expect_exact("[ OK ]")                          # literal text

``log`` (a text file, or None) receives everything read from the port, as it
arrives: the pytest plugin points it at a per-test, per-VM file. ``gone`` is
None while the port works, else why it went away (the peer closed: a daemon
restarted, a VM reset), as a read or write found it; ``reopen`` clears it.

``run`` does not depend on the shell's prompt or on whether the terminal
echoes: the command line is bracketed by two markers carrying a fresh
identifier, written so that the shell's *output* differs from the *typed*
text (``echo __AVT_<id>''_B`` prints ``__AVT_<id>_B``; ``echo __AVT_<id>_E$?``
prints ``__AVT_<id>_E0``), so an echo of the typed line never matches, and
output that happens to contain marker-like text cannot match either.
"""

import codecs
import errno
import re
import termios
import time
import uuid

import serial
from serial.urlhandler import protocol_socket

from ..endpoints import pyserial_url  # noqa: F401 (part of this module's API)
from ..errors import AvatarError
from .protocol_unix import waiting

DEFAULT_TIMEOUT = 30.0
POLL = 0.02              # pyserial read timeout: the longest a wait sleeps between checks
RETRY = 0.2              # reopen: between tries
CHUNK = 4096
TRANSCRIPT_LIMIT = 64 * 1024
DRAIN_TIME = 2.0         # drain: at most this long, and at most DRAIN_BYTES (a chatty guest)
DRAIN_BYTES = 256 * 1024


class ConsoleTimeout(AvatarError, AssertionError):
    """``expect`` saw no match in time; the message shows the last output."""


class ConsoleClosed(AvatarError):
    """The port went away (socket closed, device unplugged) while waiting."""


def open_serial(url, **kwargs):
    """``serial.serial_for_url`` that also knows ``unix:///path`` (Unix socket consoles)."""
    if __package__ not in serial.protocol_handler_packages:
        serial.protocol_handler_packages.append(__package__)
    try:
        return serial.serial_for_url(url, **kwargs)
    except (serial.SerialException, ValueError) as err:
        raise AvatarError(f"console {url}: {_open_problem(err)}") from None
    except KeyError:                # pyserial formats its usage text with str.format ("{a|b}")
        raise AvatarError(f"console {url}: {BAD_URL}") from None
    except OSError as err:          # the peer closed at once: a daemon's endpoint that has
        raise AvatarError(f"console {url}: {err.strerror or err} (an avatar-hw endpoint "
                          "takes one client at a time: is another attached?)") from None


BAD_URL = ("not a URL pyserial takes: check its host:port and ?options (loop:// and socket:// "
           "take only ?logging=LEVEL)")


def _open_problem(err):
    """Why pyserial could not open a port, once: its messages repeat the errno and the path
    (``[Errno 2] could not open port X: [Errno 2] No such file or directory: 'X'``), so
    the OS's words are taken from the error it raised them from."""
    cause = err.__cause__ or err.__context__
    while cause is not None:
        if isinstance(cause, OSError) and not isinstance(cause, serial.SerialException) \
                and cause.strerror:
            code, reason = cause.errno, cause.strerror
            break
        if isinstance(cause, termios.error) and len(cause.args) == 2:
            code, reason = cause.args
            break
        if isinstance(cause, (KeyError, TypeError)):     # pyserial's URL parsing failed
            return BAD_URL
        cause = cause.__cause__ or cause.__context__
    else:
        text = re.sub(r"^(?:\[Errno \d+\] )?[Cc]ould not open port \S*: ", "", str(err))
        return f"cannot open: {text}" if text != str(err) else text
    if code == errno.ENOTTY:
        reason += (" (not a serial port or a terminal: give a tty, or a socket://, rfc2217:// "
                   "or unix:// URL)")
    return f"cannot open: {reason}"


class GuestConsole:
    """A guest's console on pyserial port ``port`` (opened; owned by this object)."""

    def __init__(self, port, *, encoding="utf-8", name=None):
        self.port = port
        self.name = name or getattr(port, "portstr", None) or "console"
        if port.timeout != POLL:
            port.timeout = POLL          # (pyserial reconfigures the port on every change)
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        self.encoding = encoding
        self.buffer = ""                 # received, not yet consumed by expect
        self.transcript = ""             # the last TRANSCRIPT_LIMIT characters received
        self.match = None                # the last expect's re.Match
        self.log = None                  # a text file: everything received, as it arrives
        self.gone = None                 # why the port first went away (peer closed), until reopen

    @classmethod
    def open(cls, url, **kwargs):
        """Open any pyserial URL (see ``open_serial``)."""
        return cls(open_serial(url, timeout=POLL), name=url, **kwargs)

    def close(self):
        self.port.close()

    def reopen(self, locate, timeout=0.0):
        """Attach to the URL ``locate()`` gives instead (the guest started again): a new port,
        nothing pending. Both are tried again for ``timeout`` s: after a reset the daemon may
        not answer yet, or serve the console elsewhere (a new pty, a new TCP port), and an
        endpoint may still be down after a power cycle. The old port is closed first: an
        endpoint takes one client at a time."""
        self.port.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                url = locate()
                self.port = open_serial(url, timeout=POLL)
                break
            except AvatarError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(RETRY)
        self.name = url
        self.buffer = ""
        self.gone = None
        self._decoder.reset()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- output from the guest -----------------------------------------------------------------

    def _read(self):
        """What the port has, waiting up to ``POLL`` for a first byte. Asks for no more than
        ``in_waiting``: pyserial's socket:// read drops the bytes of a call that meets the
        peer's close, such as a panic's last line; that close is raised on the next call."""
        data = b""
        try:
            data = self.port.read(max(1, min(self._waiting(), CHUNK)))
            while data and len(data) < CHUNK and (more := self._waiting()):
                data += self.port.read(min(more, CHUNK - len(data)))
        except (serial.SerialException, OSError) as err:
            if not data:
                self.gone = self.gone or str(err) or type(err).__name__
                raise ConsoleClosed(f"{self.name}: {err}; last output: {self.tail()!r}") from None
        return data

    def _waiting(self):
        """The bytes the port has to read: counted on the socket for socket:// (pyserial's
        ``in_waiting`` says 1 for any there: a read a byte) and unix://."""
        if isinstance(self.port, protocol_socket.Serial) and self.port.is_open:
            return waiting(self.port._socket)
        return self.port.in_waiting

    def _receive(self):
        """Read what arrives within ``POLL`` seconds; the text."""
        text = self._decoder.decode(self._read())
        if text:
            self.buffer += text
            self.transcript = (self.transcript + text)[-TRANSCRIPT_LIMIT:]
            if self.log is not None:
                self.log.write(text)
                self.log.flush()
        return text

    def drain(self):
        """Read what has already arrived (into ``buffer``, ``log``), without waiting for
        more than one ``POLL``, nor for longer than ``DRAIN_TIME`` or more than
        ``DRAIN_BYTES`` from a guest that keeps printing; consumes nothing."""
        deadline, left = time.monotonic() + DRAIN_TIME, DRAIN_BYTES
        while left > 0 and time.monotonic() < deadline and (text := self._receive()):
            left -= len(text)

    def tail(self, n=300):
        return self.transcript[-n:]

    def expect(self, pattern, timeout=DEFAULT_TIMEOUT):
        """Wait for ``pattern`` (regex: str, bytes or compiled); the ``re.Match``.

        Output up to the end of the match is consumed; a timeout raises
        ``ConsoleTimeout`` showing what did arrive. With a list of patterns (as
        pexpect's ``expect``): the index of the one matching earliest in the output
        (the first listed on a tie), its match in ``self.match``; ``ConsoleTimeout``
        or ``ConsoleClosed`` in the list are answered with their index instead of
        being raised.
        """
        if isinstance(pattern, (list, tuple)):
            return self._expect_list(pattern, timeout, literal=False)
        self._expect_list([pattern], timeout, literal=False)
        return self.match

    def expect_exact(self, text, timeout=DEFAULT_TIMEOUT):
        """``expect`` for literal text (str or bytes), or a list of them (the index)."""
        if isinstance(text, (list, tuple)):
            return self._expect_list(text, timeout, literal=True)
        self._expect_list([text], timeout, literal=True)
        return self.match

    def _expect_list(self, patterns, timeout, literal):
        regexes = {}
        for index, pattern in enumerate(patterns):
            if pattern in (ConsoleTimeout, ConsoleClosed):
                continue
            if literal:
                text = pattern.decode(self.encoding) if isinstance(pattern, bytes) else pattern
                regexes[index] = re.compile(re.escape(text))
            else:
                regexes[index] = _compile(pattern, self.encoding)
        deadline = time.monotonic() + timeout
        read = False                            # the port is read once even at timeout 0
        while True:
            found = [(match.start(), index, match) for index, regex in regexes.items()
                     if (match := regex.search(self.buffer))]
            if found:
                _, index, self.match = min(found, key=lambda f: f[:2])
                self.buffer = self.buffer[self.match.end():]
                return index
            if read and time.monotonic() >= deadline:
                if ConsoleTimeout in patterns:
                    return patterns.index(ConsoleTimeout)
                wanted = " or ".join(repr(r.pattern) for r in regexes.values())
                raise ConsoleTimeout(f"{self.name}: no {wanted} within {timeout} s; "
                                     f"last output: {self.tail()!r}")
            read = True
            try:
                self._receive()
            except ConsoleClosed:
                if ConsoleClosed in patterns:
                    return patterns.index(ConsoleClosed)
                raise

    def read_pending(self, quiet=0.1):
        """Consume and return everything received until the guest is quiet for ``quiet`` s."""
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            if self._receive():
                last = time.monotonic()
        out, self.buffer = self.buffer, ""
        return out

    # -- input to the guest --------------------------------------------------------------------

    def send(self, data):
        if isinstance(data, str):
            data = data.encode(self.encoding)
        try:
            self.port.write(data)
            self.port.flush()
        except (serial.SerialException, OSError) as err:
            self.gone = self.gone or str(err) or type(err).__name__
            raise ConsoleClosed(f"{self.name}: {err}") from None

    def sendline(self, line=""):
        """Send ``line`` and Enter (LF: what a Linux tty in its default modes takes)."""
        self.send(line + "\n")

    # -- a shell -------------------------------------------------------------------------------

    def wait_shell(self, timeout=DEFAULT_TIMEOUT, retry=1.0, interrupt=False):
        """Press Enter and ask the shell for a marker until it answers (boot, a login-less
        getty's "press Enter", a busy shell): for a freshly started guest. ``interrupt``:
        Ctrl-C first, once (a command still running, a half-typed line: on a terminal)."""
        tag = _tag()
        deadline = time.monotonic() + timeout
        if interrupt:
            self.send(b"\x03")
        while True:
            self.sendline(f"echo {tag}''_S")
            try:
                left = max(0.0, deadline - time.monotonic())
                self.expect(re.escape(f"{tag}_S"), min(retry, left))
                return
            except ConsoleTimeout:
                if time.monotonic() >= deadline:
                    raise ConsoleTimeout(f"{self.name}: no shell answered within {timeout} s; "
                                         f"last output: {self.tail()!r}") from None

    def run(self, command, timeout=DEFAULT_TIMEOUT):
        """Run one shell command line; ``(output, exit_status)``.

        ``output`` is what the command printed, with the tty's CR LF turned into
        LF. The line must fit the tty's line buffer (4095 bytes on Linux) and
        must not read the console itself (its input would be the next line).
        """
        if "\n" in command or "\r" in command:
            raise ValueError("run() takes one command line; join several with ';' or '&&'")
        command = command.strip().rstrip(";").strip()
        tag = _tag()
        self.sendline(f"echo {tag}''_B; {command}; echo {tag}_E$?")
        # \r\r\n: a console bridged through a second tty (the emulated board's board mode)
        match = self.expect(rf"{tag}_B\r*\n(.*?){tag}_E(\d+)\r*\n", timeout)
        return re.sub(r"\r+\n", "\n", match.group(1)), int(match.group(2))

    def check(self, command, timeout=DEFAULT_TIMEOUT):
        """``run`` that raises ``AssertionError`` (with the output) unless the status is 0."""
        output, status = self.run(command, timeout)
        if status != 0:
            raise AssertionError(f"{self.name}: {command!r} exited {status}: {output!r}")
        return output


def _tag():
    return f"__AVT_{uuid.uuid4().hex[:16]}"


def _compile(pattern, encoding):
    if isinstance(pattern, re.Pattern):
        if isinstance(pattern.pattern, bytes):
            return re.compile(pattern.pattern.decode(encoding), pattern.flags & ~re.ASCII)
        return pattern
    if isinstance(pattern, bytes):
        pattern = pattern.decode(encoding)
    return re.compile(pattern, re.DOTALL)
