"""The C library, for the few calls ``os`` lacks (fallocate, fchownat of an O_PATH fd,
getdents64, inotify): ``libc`` and ``check``, which turns -1 into ``OSError``."""

import ctypes
import ctypes.util
import os

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def check(result):
    """``result`` of a libc call, or ``OSError`` from errno when it is negative."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result
