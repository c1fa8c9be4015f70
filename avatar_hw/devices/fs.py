"""virtio-fs (device ID 26, VirtIO 1.2 section 5.11) served by virtiofsd over vhost-user.

``FsDevice`` starts ``/usr/lib/qemu/virtiofsd`` (Debian's qemu-system-common)
on a socket in a private temporary directory, sharing ``shared_dir`` with
``cache=auto`` and its default sandbox (mount, pid and net namespaces with
pivot_root into the shared folder), connects to it as a
``VhostUserDevice`` and stops it with the device. The configuration space
is ours: ``tag[36]`` (NUL padded) and ``le32 num_request_queues`` (1: queue 0
is the high-priority queue, queue 1 the request queue).

Under ``avatar-hw serve --user``: the device is built before the privilege
drop, so virtiofsd is started (and connected to) by root, as its sandbox
needs; its socket and folder are removed as soon as the connection is made
(there is no reconnection), so nothing is left for the unprivileged daemon to
clean up. At the end the daemon closes the connection, on which virtiofsd
exits by itself; the daemon reaps it (a parent needs no privilege for that)
and signals it only if it is still there after ``STOP_GRACE`` seconds. Its
stderr is read by the event loop into the daemon's rate-limited log (a pipe
nobody reads would stall virtiofsd once full).
"""

import logging
import os
import shutil
import struct
import subprocess
import tempfile
import time

from ..processes import end_process
from ..schema import REQUIRED, Field, Schema, under
from ..vhost_user import VhostUserError
from .p9 import claims  # noqa: F401 (avatar_hw.config's: a mount tag, among 9p's too)
from .vhost_user import VhostUserDevice

ID_FS = 26
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
TAG_MAX = 36
QUEUE_SIZE = 1024
START_TIMEOUT = 10.0
STOP_GRACE = 2.0

log = logging.getLogger(__name__)


def check_tag(tag):
    if not 0 < len(tag.encode()) <= TAG_MAX or "\0" in tag:
        raise ValueError(f"must be 1 to {TAG_MAX} bytes without NUL")


def check_backend(name):
    if name != "virtiofsd":
        raise ValueError("must be 'virtiofsd' (for another back-end, use vhost_user)")


def start_virtiofsd(shared_dir, socket_path):
    """virtiofsd serving ``shared_dir`` on ``socket_path``, once the socket exists."""
    if not os.path.isfile(VIRTIOFSD):
        raise ValueError(f"{VIRTIOFSD} is missing; install Debian's qemu-system-common")
    if not os.path.isdir(shared_dir):
        raise ValueError(f"shared_dir {shared_dir} is not a folder")
    proc = subprocess.Popen(
        [VIRTIOFSD, f"--socket-path={socket_path}", "-o", f"source={shared_dir}",
         "-o", "cache=auto", "-o", "log_level=err"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(socket_path):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            proc.stderr.close()
            raise ValueError(f"{VIRTIOFSD} did not start: "
                             + (err[-1] if err else f"exit status {proc.returncode}"))
        if time.monotonic() > deadline:
            stop(proc)
            raise ValueError(f"{VIRTIOFSD} did not start: no socket after {START_TIMEOUT:.0f} s")
        time.sleep(0.01)
    return proc


def stop(proc, grace=0.0):
    """End virtiofsd ``proc``: wait ``grace`` s for it to exit by itself (it does once its
    front end hung up), then SIGTERM, then SIGKILL after 2 s; reaped in every case."""
    try:
        end_process(proc, 2, grace)
    except PermissionError:                     # root's, and we dropped to --user
        log.error("%s (PID %d) did not exit when its front end hung up and runs as "
                  "another user: stop it yourself", VIRTIOFSD, proc.pid)
    proc.stderr.close()


class FsDevice(VhostUserDevice):
    name = "fs"

    def __init__(self, *, tag, shared_dir, timeout=2.0):
        check_tag(tag)
        rundir = tempfile.mkdtemp(prefix="avatar-fs-")
        socket_path = os.path.join(rundir, "vhost-user.sock")
        try:
            self.process = start_virtiofsd(os.path.abspath(shared_dir), socket_path)
            try:
                config = tag.encode().ljust(TAG_MAX, b"\0") + struct.pack("<I", 1)
                super().__init__(socket=socket_path, device_id=ID_FS,
                                 queue_sizes=[QUEUE_SIZE, QUEUE_SIZE], config=config,
                                 timeout=timeout, connect_wait=START_TIMEOUT)
            except BaseException:
                stop(self.process)
                raise
        finally:
            shutil.rmtree(rundir, ignore_errors=True)     # connected: the path is not needed
        os.set_blocking(self.process.stderr.fileno(), False)
        self.tag = tag

    def attach(self, loop):
        super().attach(loop)
        self.loop.add_reader(self.process.stderr.fileno(), self._on_stderr)

    def _on_stderr(self):
        try:
            data = os.read(self.process.stderr.fileno(), 4096)
        except BlockingIOError:
            return
        if not data:
            self.loop.remove_reader(self.process.stderr.fileno())
            return
        for line in data.decode(errors="replace").splitlines():
            if line.strip():
                self.error("virtiofsd: %s", line.strip())

    def detach(self):
        if self.loop is not None and not self.process.stderr.closed:
            self.loop.remove_reader(self.process.stderr.fileno())
        super().detach()                        # hangs up: virtiofsd exits
        stop(self.process, STOP_GRACE)

    def info(self):
        out = super().info()
        out.update(tag=self.tag, backend_pid=self.process.pid)
        return out


SCHEMA = Schema("fs", (
    Field("tag", str, REQUIRED, f"the mount tag (1 to {TAG_MAX} bytes)", check_tag),
    Field("backend", str, "virtiofsd", "the back-end to start: virtiofsd", check_backend),
    Field("shared_dir", str, REQUIRED, "the host folder to share", path=under),
))


def from_config(options):
    """The VMs config's ``fs = { tag, backend, shared_dir }``."""
    try:
        return FsDevice(tag=options["tag"], shared_dir=options["shared_dir"])
    except VhostUserError as err:
        raise ValueError(str(err)) from None
