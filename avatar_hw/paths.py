"""Removing the sockets and links the daemon made, also after ``--user`` dropped root.

A daemon started as root creates its control socket, console sockets and pty
links while still root; after the drop it may lack write permission on their
directory (/run, a root-owned /run/avatar). Leaving such an entry behind is
harmless: the next start replaces a stale socket or link. So ``remove`` never
raises for it, it says so in the log.
"""

import logging
import os

log = logging.getLogger(__name__)


def remove(path):
    """Unlink ``path`` if it is there; a permission problem is logged, not raised."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.info("%s left in place (%s): the next start replaces it", path, err.strerror)
