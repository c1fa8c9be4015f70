"""Doorbells: how the stub wakes the daemon when it posts a trap while the model sleeps.

The daemon needs three things from a doorbell, whatever carries it:

- ``fileno()``: readable when the stub rang (goes into the event loop);
- ``ack()``: consume the rings and re-arm, *before* the slots are scanned, so
  a ring during the scan is not lost; returns a count (informational);
- ``close()``.

and, only on boards whose interrupts go through the stub (``interrupts.kind
= "stub"``, ``AVT_F_VIRQ_REQUEST``), ``ring_stub()`` to wake the stub after
setting ``virq_pending`` bits.

Implementations:

- ``UioDoorbell``: the trap page's UIO interrupt on a board. The avatar_uio
  driver (boards/linux; like uio_pdrv_genirq) masks the line each time it
  fires, so ``ack`` reads the 4-byte event count and writes 1 to unmask it,
  then the daemon scans.
- ``FifoDoorbell``: two named pipes, for the stand-in stub of the tests (a
  separate process rings by writing a 4-byte count, as the kernel hands one to
  a UIO reader) and for anything else that cannot raise a UIO interrupt. A
  FIFO has no mask, so there is nothing to re-enable.
- ``StubDoorbell``: an eventfd that the emulated board's UART reader
  (avatar_hw.emulated.machine) signals for each doorbell byte of the stub.
"""

import errno
import os
import select
import stat
from typing import Protocol

from .errors import AvatarError


class Doorbell(Protocol):
    def fileno(self) -> int:
        """Readable when the stub rang."""

    def ack(self) -> int:
        """Consume the rings and re-arm (before the slots are scanned)."""

    def close(self) -> None:
        """Let go of what carries the rings."""


class UioDoorbell:
    """The interrupt of the trap page's UIO device (``avatar_hw.hw.uio.UioDevice``)."""

    def __init__(self, device):
        self.device = device
        device.enable()                 # armed from the start (a line masked earlier stays so)

    def fileno(self):
        return self.device.fileno()

    def ack(self):
        count = self.device.wait(timeout=0) or 0
        self.device.enable()
        return count

    def close(self):
        self.device.close()


KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
         (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"))


def open_fifo(path):
    """A doorbell FIFO's fd, non-blocking; anything else at ``path`` is refused (a regular
    file would be always readable: the daemon would spin)."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISFIFO(mode):
            kind = next((name for test, name in KINDS if test(mode)), "something else")
            raise AvatarError(f"doorbell FIFO {path}: {kind}, not a FIFO: give a FIFO's path "
                              "(create one with mkfifo; the stand-in stub makes it)")
        # O_RDWR: opening never blocks, and the FIFO never reports EOF when the peer exits.
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise AvatarError(f"doorbell FIFO {path}: {err.strerror} (create it with mkfifo; "
                          "the stand-in stub makes it)") from None


class FifoDoorbell:
    """Rings from the stub arrive as 4-byte counts on ``to_model``; ``ring_stub`` writes
    4 bytes to ``to_stub``."""

    RING_SIZE = 4

    def __init__(self, to_model, to_stub=None):
        self._in = open_fifo(to_model)
        try:
            self._out = open_fifo(to_stub) if to_stub else None
        except AvatarError:
            os.close(self._in)
            raise
        self._buffer = bytearray(4096)

    @classmethod
    def from_spec(cls, spec):
        """``fifo:TO_MODEL[,TO_STUB]`` (the daemon's --doorbell option)."""
        paths = spec.removeprefix("fifo:").split(",")
        if not paths[0] or len(paths) > 2:
            raise AvatarError(f"--doorbell {spec}: expected fifo:PATH or fifo:PATH,STUB_PATH")
        return cls(*paths)

    def fileno(self):
        return self._in

    def ack(self):
        rings = 0
        while True:
            try:
                n = os.readv(self._in, [self._buffer])
            except BlockingIOError:
                return rings
            rings += n // self.RING_SIZE
            if n < len(self._buffer):
                return rings

    def ring_stub(self):
        if self._out is None:
            raise AvatarError("this doorbell has no FIFO towards the stub (fifo:PATH,STUB_PATH)")
        ring(self._out)

    def close(self):
        for fd in (self._in, self._out):
            if fd is not None:
                os.close(fd)
        self._in = self._out = None


def ring(fd, count=1):
    """Write one ring (a 4-byte count) to a FIFO; a full FIFO already holds rings."""
    try:
        os.write(fd, count.to_bytes(4, "little"))
    except OSError as err:
        if err.errno != errno.EAGAIN:
            raise


class StubDoorbell:
    """Counts the stub's doorbell bytes (readable through an eventfd); ``ring_stub()``
    wakes the stub (the daemon's doorbell interface, avatar_hw.doorbell)."""

    def __init__(self, ring_stub, fd=None):
        """``fd``: an eventfd made elsewhere (the emulated board's daemon in its own
        process inherits the launcher's); None: a new one."""
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if fd is None else fd
        self.ring_stub = ring_stub

    def fileno(self):
        return self._fd

    def signal(self, count=1):
        os.eventfd_write(self._fd, count)

    def ack(self):
        """Consume the rings so far; returns how many there were (0 if none)."""
        try:
            return os.eventfd_read(self._fd)
        except BlockingIOError:
            return 0

    def wait(self, timeout=None):
        """Block until rung or ``timeout`` seconds pass; returns the rings consumed."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        return self.ack() if ready else 0

    def close(self):
        """Nothing: the UART link owns the eventfd (a daemon closing its doorbell must not
        stop the reader that drains QEMU's UART)."""

    def release(self):
        """Close the eventfd (the UART link's job, once its reader has stopped)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
