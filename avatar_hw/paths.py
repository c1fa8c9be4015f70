"""Removing the sockets and links the daemon made, also after ``--user`` dropped root.

A daemon started as root creates its control socket, console sockets and pty
links while still root; after the drop it may lack write permission on their
directory (/run, a root-owned /run/avatar). Leaving such an entry behind is
harmless: the next start replaces a stale socket or link. So ``remove`` never
raises for it, it says so in the log.

``clear_for_socket`` is that replacement, and the only way a path the user gave is ever
unlinked before a bind: only a socket nobody serves goes, never a file, a directory or a
live socket (``unix:`` on a mistyped path once deleted whatever was there).
"""

import logging
import os
import socket
import stat

log = logging.getLogger(__name__)

NOT_A_SOCKET = "is not a socket"
IN_USE = "is in use (a socket another process serves)"


def remove(path):
    """Unlink ``path`` if it is there; a permission problem is logged, not raised."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.info("%s left in place (%s): the next start replaces it", path, err.strerror)


def clear_for_socket(path, kind=socket.SOCK_STREAM):
    """Make ``path`` free for a Unix socket of type ``kind``: a socket there that nobody
    serves (left by a process that died) is unlinked. None when the path is free now, else
    what is in the way: ``NOT_A_SOCKET`` (a file, a directory, a link) or ``IN_USE`` —
    never unlinked."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(mode):
        return NOT_A_SOCKET
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return None
    except OSError:
        pass                # another type of socket, or not ours to connect to: in use
    finally:
        probe.close()
    return IN_USE
