"""Console endpoint ``pty:PATH``: a pseudo-terminal; ``PATH`` becomes a stable symlink to its
/dev/pts/N (``pty:`` alone: no symlink; its URL becomes ``pty:/dev/pts/N``, as ``avatar-hw info``
shows it).

As QEMU's pty chardev, the daemon holds only the master side: the pty is *attached* (and
*connected*) only while some program has it open. Linux reports POLLHUP on the master while
nobody holds the slave and gives the master no event when one opens it, so the endpoint
watches the slave's /dev/pts node with inotify (IN_OPEN, sent once the open is done) and
looks then; it also looks every ``poll_interval`` seconds (QEMU only does that), the one
way left when inotify cannot be had (``fs.inotify.max_user_instances``). A close is seen
at once when the master wakes a reader or a waiting writer with the hang-up, else at the
next look. An opener sets its terminal up after the open, and pyserial's ``open()``, as
many terminal programs, then flushes its input: output sent at the open itself went with
it. So the first output goes ``OPENER_HOLD_S`` after the open was seen, the log first; only an
opener that takes longer than that after its open to flush can lose it. A program that opens
the pty while another has it open gets the same hold (seen by inotify only).
While nobody has it open the guest's output goes to the console's unattached log
(``avatar_hw.backends.console``), replayed first to the next program that opens the pty;
what was handed to the pty before its reader closed stays in the pty (Linux keeps it) and
comes before the log. Input typed before the close is still read; the raw mode set here
is kept for every later opener.
"""

import logging
import os
import select
import struct
import tty
import weakref

from .. import paths
from ..errors import ConfigError, os_reason
from ..libc import check, libc
from .base import OPENER_HOLD_S, Endpoint

log = logging.getLogger(__name__)

IN_OPEN = 0x20
_EVENT = struct.Struct("iIII")      # struct inotify_event: wd, mask, cookie, len


class _Opens:
    """inotify for the ptys of one loop (a device's ``DeviceLoop``: a console's ports and
    endpoints): one instance, a watch per pty. A user has 128 instances in all by default,
    shared with every program of theirs; watches are far more."""

    _by_loop = weakref.WeakKeyDictionary()

    def __init__(self, loop):
        self.fd = check(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        self.endpoints = {}                         # watch descriptor -> PtyEndpoint
        loop.add_reader(self.fd, self._read)

    @classmethod
    def watch(cls, loop, endpoint):
        """Call ``endpoint._seen_open()`` when its slave is opened: the watch descriptor, or
        None (logged) when inotify is out of instances or watches."""
        opens = cls._by_loop.get(loop)
        try:
            if opens is None:
                opens = cls._by_loop[loop] = cls(loop)
            wd = check(libc.inotify_add_watch(opens.fd, os.fsencode(endpoint.tty_name), IN_OPEN))
        except OSError as err:
            log.info("%s: no inotify (%s): an opener is seen within a second", endpoint,
                     err.strerror)
            if opens is not None:
                opens._close_if_unused(loop)
            return None
        opens.endpoints[wd] = endpoint
        return wd

    @classmethod
    def unwatch(cls, loop, wd):
        opens = cls._by_loop[loop]
        del opens.endpoints[wd]
        libc.inotify_rm_watch(opens.fd, wd)
        opens._close_if_unused(loop)

    def _close_if_unused(self, loop):
        if not self.endpoints:
            loop.remove_reader(self.fd)
            os.close(self.fd)
            del self._by_loop[loop]

    def _read(self):
        """Each pty opened looks once, however many opens the events tell (more than a
        read's worth keep the fd readable for the next turn)."""
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        opened, offset = set(), 0
        while offset < len(data):                   # struct inotify_event, then its name
            wd, _, _, name_len = _EVENT.unpack_from(data, offset)
            opened.add(wd)
            offset += _EVENT.size + name_len
        for wd in opened:
            endpoint = self.endpoints.get(wd)       # None: IN_IGNORED of a removed watch
            if endpoint is not None:
                endpoint._seen_open()


class PtyEndpoint(Endpoint):
    """A pseudo-terminal in raw mode; ``path`` becomes a symlink to its /dev/pts/N."""

    poll_interval = 1.0             # seconds between looks for an opener (QEMU: 1 s)

    def __init__(self, url, path, limit):
        super().__init__(url, limit)
        self.master, slave = os.openpty()
        try:
            tty.setraw(slave)
            self.tty_name = os.ttyname(slave)
        finally:
            os.close(slave)
        os.set_blocking(self.master, False)
        self._poll = select.poll()
        self._poll.register(self.master, select.POLLIN)     # POLLHUP: nobody holds the slave
        self.opened = False                         # some program has the slave open
        self.interactive = False                    # input to read (until EIO after a close)
        self._look_timer = None
        self._watch = None                          # its inotify watch while attached
        self.path = path
        if not path:
            self.url = f"pty:{self.tty_name}"       # what info and the daemon's log show
        if path:
            if os.path.lexists(path) and not os.path.islink(path):
                self.close()            # a file or a directory the user has there: kept
                raise ConfigError(url, "path", f"{path} is there and not a symlink (the pty's "
                                               "link replaces only a link); choose another path")
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                os.symlink(self.tty_name, tmp)
                os.replace(tmp, path)
            except OSError as err:
                paths.remove(tmp)
                self.close()
                raise ConfigError(url, "path", f"cannot create the pty symlink {path}: "
                                               f"{os_reason(err)}") from None

    @property
    def connected(self):
        return self.opened

    @property
    def attached(self):
        return self.opened and super().attached

    def attach(self, loop, on_input, on_drained, on_connection=None):
        super().attach(loop, on_input, on_drained, on_connection)
        self._watch = _Opens.watch(loop, self)
        self._look()

    def detach(self):
        if self._look_timer is not None:
            self._loop.cancel(self._look_timer)
            self._look_timer = None
        if self._watch is not None:
            _Opens.unwatch(self._loop, self._watch)
            self._watch = None
        super().detach()

    # -- is the slave open? ------------------------------------------------------------------------

    def _events(self):
        events = self._poll.poll(0)
        return events[0][1] if events else 0

    def _seen_open(self):
        """inotify saw the slave opened. An opener beside one that already has it may
        flush its input too (two programs on one terminal share what it receives): the
        output is held for it as for a first opener."""
        if self.opened:
            self._hold(OPENER_HOLD_S)
        self._check()

    def _look(self):
        self._look_timer = self._loop.call_later(self.poll_interval, self._look)
        self._check()

    def _check(self):
        events = self._events()
        if events & select.POLLIN and not self.interactive:
            self.interactive = True                 # written by a program that came and went
            self._update_reader()
        self._set_opened(not events & select.POLLHUP)

    def _set_opened(self, opened):
        if opened == self.opened:
            return
        self.opened = opened
        if opened:
            log.info("%s: %s opened", self, self.tty_name)
            self.interactive = True
            self._update_reader()
            self._hold(OPENER_HOLD_S)
        else:
            self._cancel_hold()
            log.info("%s: %s closed by its last user; output goes to the console's log until "
                     "it is opened again", self, self.tty_name)
            self._set_writer(False)
        if self._on_connection is not None:
            self._on_connection()

    def _writable(self):
        # a hang-up also wakes a waiting writer: a full pty nobody reads any more
        if self._events() & select.POLLHUP:
            self._set_opened(False)
        else:
            super()._writable()

    def _input_gone(self, err):
        """EIO from the master: the slave is closed and what it wrote is all read."""
        self._set_reader(False)
        self.interactive = False
        self._set_opened(False)

    def input_fd(self):
        return self.master

    def output_fd(self):
        return self.master if self.opened else None

    def close(self):
        super().close()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
        if self.path and os.path.islink(self.path) and os.readlink(self.path) == self.tty_name:
            paths.remove(self.path)


def open_url(url, rest, limit):
    return PtyEndpoint(url, rest, limit)


def pyserial_url(rest):
    return rest or None             # the symlink, or /dev/pts/N (the URL of ``pty:`` alone)
