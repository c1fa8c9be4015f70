"""What the daemon does as a system service: tell systemd its state, drop root."""

import logging
import os
import pwd
import socket

from .errors import AvatarError

log = logging.getLogger("avatar_hw.daemon")


def sd_notify(state):
    """Tell systemd (``Type=notify`` units) ``state``: one datagram to $NOTIFY_SOCKET, as
    sd_notify(3) does; nothing without it. A failure is logged, never raised."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]                       # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), path)
    except OSError as err:
        log.warning("NOTIFY_SOCKET %s: %s", os.environ["NOTIFY_SOCKET"], err)
        return False
    return True


def drop_privileges(user, owned_paths=()):
    """Become ``user`` (with its groups); ``owned_paths`` are given to it first."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise AvatarError(f"--user {user}: no such user") from None
    if os.geteuid() != 0:
        if os.geteuid() == entry.pw_uid:
            return
        raise AvatarError(f"--user {user}: only root can change user (running as UID "
                          f"{os.geteuid()})")
    try:
        for path in owned_paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.initgroups(user, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as err:
        raise AvatarError(f"--user {user}: cannot become UID {entry.pw_uid}: {err}") from None
    log.info("running as %s (UID %d)", user, entry.pw_uid)
