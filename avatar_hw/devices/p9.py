"""virtio-9p (device ID 9, VirtIO 1.2 section 5.6 / 9P2000.L): a host folder shared with the guest.

One request queue; each chain is one 9P message (device-readable) and room for
its reply (device-writable). The file server is ``avatar_hw.backends.p9fs``
(confinement, security models and limits are described there and in
docs/devices.md); this file is the virtio side: the mount tag in the
configuration space (VIRTIO_9P_MOUNT_TAG), serving the queue in turns, used
lengths that count the reply bytes really written.

The guest mounts it with ``mount -t 9p -o trans=virtio,version=9p2000.L TAG /mnt``.
Requests run synchronously inside ``queue_notify`` like block's.
"""

import logging
import os
import resource
import struct

from ..backends.p9fs import MODELS, P9Server
from ..errors import ConfigError
from ..schema import REQUIRED, Field, Schema, positive, under
from ..virtio.constants import ID_9P, bit
from ..virtio.device import VirtioDevice

log = logging.getLogger(__name__)

QUEUE_SIZE = 128
F_MOUNT_TAG = 0
TAG_MAX = 64
DEFAULT_MAX_FIDS = 4096
# What a path component opened (walks, and finding a fid's name again from the root for
# Tremove, Trename, Tlink: up to PATH_MAX / 2 components each) costs the turn, in bytes of
# its budget (virtio.queue.TURN_BYTES): one openat takes the daemon ~3 us, the time it
# copies 32 to 100 KiB in. So a request of a few bytes that walks 2 000 components ends
# the queue's turn, and the other devices and VMs are served before its next.
STEP_COST = 64 << 10


_reserved_fds = 0                      # what every 9p device of this process may hold


def reserve_fds(count):
    """Raise the soft RLIMIT_NOFILE (up to the hard one) so that ``count`` more descriptors
    fit beside those open and those other devices reserved; False if the hard limit is short."""
    global _reserved_fds
    _reserved_fds += count
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = len(os.listdir("/proc/self/fd")) + _reserved_fds + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft == resource.RLIM_INFINITY or soft >= needed


def release_fds(count):
    global _reserved_fds
    _reserved_fds -= count


def check_tag(tag):
    if not tag or len(tag.encode()) > TAG_MAX:
        raise ValueError(f"must be 1 to {TAG_MAX} bytes")


def check_model(model):
    if model not in MODELS:
        raise ValueError(f"must be one of {', '.join(MODELS)}, not {model!r}")


class P9Device(VirtioDevice):
    """A virtio-9p device sharing the folder ``path`` under mount tag ``tag``."""

    device_id = ID_9P
    name = "9p"

    def __init__(self, path, *, tag, readonly=False, security_model="none",
                 max_fids=DEFAULT_MAX_FIDS):
        check_tag(tag)
        check_model(security_model)
        positive(max_fids)
        self.path = str(path)
        try:
            self.server = P9Server(self.path, readonly=readonly, security_model=security_model,
                                   max_fids=max_fids)
        except FileNotFoundError:
            raise ConfigError(self.path, None, "no such folder to share") from None
        except NotADirectoryError:
            raise ConfigError(self.path, None, "is not a folder") from None
        except OSError as err:
            raise ConfigError(self.path, None, f"cannot open: {err.strerror}") from None
        self.tag = tag
        self.security_model = security_model
        self._fds = 2 * max_fids           # a fid holds an O_PATH and maybe an open descriptor
        try:
            self.check_access()
        except ConfigError:
            self.server.close()
            raise
        if not reserve_fds(self._fds):
            log.warning("%s: the open-files limit (ulimit -n) is below what max_fids = %d "
                        "needs; a guest holding that many fids gets EMFILE errors",
                        self.path, max_fids)
        encoded = tag.encode()
        super().__init__(queue_sizes=[QUEUE_SIZE], features=bit(F_MOUNT_TAG),
                         config=struct.pack("<H", len(encoded)) + encoded)
        self.counters.update(fids=0)

    def check_access(self):
        try:            # O_PATH needs no permission on the folder; each walk and read does
            os.close(os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                             dir_fd=self.server.folder.root_fd))
        except OSError as err:
            raise ConfigError(self.path, None, f"the folder shared as {self.tag!r} cannot be "
                                               f"read or searched ({err.strerror}): give the "
                                               "daemon's user r and x on it") from None
        if self.security_model == "passthrough" and os.geteuid() != 0:
            raise ConfigError(self.path, None, "security_model = \"passthrough\" needs root: "
                                               "use \"mapped-xattr\" or \"none\"")

    def detach(self):
        if self.server.folder.root_fd is not None:
            release_fds(self._fds)
        self.server.close()
        super().detach()

    def reset(self):
        self.server.clunk_all()        # a new driver starts with Tversion; no fid survives

    def queue_reset(self, index):
        self.server.clunk_all()

    def queue_notify(self, index):
        queue = self.queues[index]
        served = False
        while self.server.folder.root_fd is not None and (chain := queue.pop()) is not None:
            written, err = self.server.handle(chain.readable, chain.readable_len,
                                              chain.writable, chain.writable_len)
            if self.server.bug is not None:     # answered EIO; the device carries on
                self.error("internal error in a 9p request: %r", self.server.bug)
                self.server.bug = None
            if not written:
                self.guest_error("9p message of %d bytes with %d bytes for the reply: "
                                 "returned with length 0", chain.readable_len,
                                 chain.writable_len)
            if err:
                self.counters["errors"] += 1
            queue.add_used(chain, written)
            queue.charge(self.server.folder.steps * STEP_COST)
            self.server.folder.steps = 0
            self.count(bytes_from_guest=chain.readable_len, bytes_to_guest=written)
            served = True
        self.counters["fids"] = len(self.server.fids)
        if served:
            self.signal_used(queue)

    def info(self):
        out = super().info()
        out.update(tag=self.tag, path=self.path, readonly=self.server.readonly,
                   security_model=self.server.folder.model, msize=self.server.msize)
        return out


SCHEMA = Schema("9p", (
    Field("tag", str, REQUIRED, f"the mount tag (1 to {TAG_MAX} bytes)", check_tag),
    Field("path", str, REQUIRED, "the host folder to share", path=under),
    Field("readonly", bool, False),
    Field("security_model", str, "none", f"one of {', '.join(MODELS)}", check_model),
    Field("max_fids", int, None, "the most fids (open names) the guest may hold", positive),
    Field("create", bool, False, "create the folder (mode 0700) if it does not exist"),
))


def claims(options):
    """What the device must have to itself in its VM (avatar_hw.config): its mount tag, also
    among the VM's fs devices."""
    yield "tag", f"mount tag {options['tag']!r}", True


def from_config(options):
    """The VMs config's ``9p = { tag, path, readonly, security_model, max_fids, create }``;
    ``create`` makes a missing folder (not its parents; an existing one is used as it is)."""
    if options.get("create"):
        try:
            os.mkdir(options["path"], 0o700)
        except FileExistsError:
            pass
        except OSError as err:
            raise ConfigError(options["path"], None, f"cannot create the folder to share: "
                              f"{err.strerror}") from None
    return P9Device(options["path"], tag=options["tag"], readonly=options.get("readonly", False),
                    security_model=options.get("security_model", "none"),
                    max_fids=options.get("max_fids", DEFAULT_MAX_FIDS))
