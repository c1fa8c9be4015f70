"""Patching what a daemon thread also calls, for this test's thread only.

The pytest plugin's session-scoped emulated board keeps a daemon thread alive in the test
process (host mode), across tests. A test that replaces a module's function or a class's
method (``os.pwritev``, ``Virtqueue.add_used``) for everyone changes that daemon too, while
it serves its guest. ``this_thread_only(real, replacement)`` is what to patch in instead:
``replacement`` in the thread that made it, ``real`` in every other.
"""

import functools
import threading


def this_thread_only(real, replacement):
    here = threading.current_thread()

    @functools.wraps(real)
    def patched(*args, **kwargs):
        if threading.current_thread() is here:
            return replacement(*args, **kwargs)
        return real(*args, **kwargs)
    return patched
